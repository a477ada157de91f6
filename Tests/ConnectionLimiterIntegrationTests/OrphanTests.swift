import ConnectionLimiter
import RedisClient
import TestSupport
import Testing

@Suite("Admissions that fail after their script may have run", .timeLimit(.minutes(2)))
struct OrphanTests {
    @Test("an admission refused on a timeout leaves no entry once Redis answers again (long before its lease ends)")
    func timedOutAdmissionIsCleanedUp() async throws {
        try await RedisServer.withServer { server throws in
            let configuration = testConfiguration(limit: 5) { configuration in
                configuration.policies.onRedisDown = .reject
                configuration.admissionTimeout = .milliseconds(150)
                configuration.heartbeat.interval = .seconds(1)
                configuration.heartbeat.nodeTTL = .seconds(5)
                configuration.lease.ttl = .seconds(30)
                configuration.lease.renewInterval = .seconds(10)
            }
            let node = try await LimiterNode.start(server.url, configuration)
            // Redis freezes with the admission's script already written to it: the admission times out and is
            // refused, then Redis wakes up and runs the script anyway.
            server.pause()
            do {
                let decision = try await node.limiter.admit(user: "quinn", connection: "late-1")
                Issue.record("admitted while Redis was frozen: \(decision)")
            } catch let error as LimiterError {
                #expect(error.code == .redisUnavailable, "\(error)")
            }
            server.resume()
            let key = connsKey(configuration, "quinn")
            let gone = try await eventually(timeout: .seconds(10)) { try await server.cli("ZCARD", key) == "0" }
            let left = try await server.cli("ZRANGE", key, "0", "-1")
            #expect(gone, "the refused admission's entry is still there: \(left)")
            // The same id admitted again later is not removed behind its back.
            _ = try await node.limiter.mustAdmit("quinn", "late-1")
            // A negative check: the cleanup runs every second; give it two rounds to (wrongly) act.
            try await Task.sleep(for: .seconds(2))
            #expect(try await server.cli("ZCARD", key) == "1")
            await node.stop()
        }
    }
}
