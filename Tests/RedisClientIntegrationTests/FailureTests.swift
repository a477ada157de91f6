import Foundation
import RedisClient
import TestSupport
import Testing

@Suite("Failures: deadlines, lost connections, refused connections, authentication", .timeLimit(.minutes(2)))
struct FailureTests {
    @Test("a command to a SIGSTOPped server hits its deadline; the late reply is discarded after SIGCONT")
    func stoppedServerTimesOut() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url) { client throws in
                try await client.set("k", to: "before")
                server.pause()
                let error = await #expect(throws: RedisError.self) {
                    try await client.send(RedisCommand("GET", "k"), timeout: .milliseconds(300))
                }
                #expect(error?.code == .timeout)
                #expect(error?.message.contains(server.address) == true)
                server.resume()
                // The abandoned GET's reply arrives first and must not be handed to this request.
                #expect(try await client.send("ECHO", "after").string == "after")
            }
        }
    }

    @Test("kill -9 mid-stream fails in-flight requests with connection lost; after a restart the same client works")
    func killedServer() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url, configure: { $0.commandTimeout = .seconds(20) }) { client throws in
                try await client.set("k", to: "v")
                server.pause()
                let results = try await withThrowingTaskGroup(of: RedisError.Code?.self) { group in
                    for index in 0..<50 {
                        group.addTask {
                            do {
                                try await client.send("ECHO", "\(index)")
                                return nil
                            } catch let error as RedisError {
                                #expect(error.message.contains(server.address))
                                return error.code
                            }
                        }
                    }
                    let written = await eventually { client.debugQueueDepth.inflight >= 50 }
                    #expect(written, "requests did not reach the socket")
                    await server.kill()
                    return try await group.reduce(into: [RedisError.Code?]()) { $0.append($1) }
                }
                #expect(results.count == 50)
                #expect(results.allSatisfy { $0 == .connectionLost })
                try await server.restart(keepData: false)
                #expect(try await client.ping() == "PONG")
                #expect(try await client.get("k") == nil)
            }
        }
    }

    @Test("requests made while the server is down wait for the reconnect")
    func waitsForReconnect() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url, configure: { $0.commandTimeout = .seconds(20) }) { client throws in
                try await client.set("k", to: "v")
                await server.kill()
                // A request sent before the client noticed the loss fails with connectionLost (it may have run);
                // wait until the client knows the server is gone: a PING failing as lost or refused, not one that
                // merely timed out (on a loaded machine, before the client even read the close).
                let noticed = await clientNoticedLoss(client)
                #expect(noticed)
                async let reply = client.send("ECHO", "queued")
                // Let the request be queued while nothing listens, then bring the server back.
                let queued = await eventually { client.debugQueueDepth.pending >= 1 }
                #expect(queued)
                try await server.restart(keepData: false)
                #expect(try await reply.string == "queued")
            }
        }
    }

    @Test("connecting to a closed port fails with an error naming the address")
    func closedPort() async throws {
        let closed = try ClosedPort()
        try await withClient("redis://\(closed.address)", configure: { $0.commandTimeout = .seconds(5) }) { client throws in
            let error = await #expect(throws: RedisError.self) { try await client.ping() }
            #expect(error?.code == .connectionRefused)
            #expect(error?.message.contains(closed.address) == true)
        }
    }

    @Test("AUTH with an ACL user: the right password works; a wrong one fails fast, clearly, without a retry storm")
    func aclAuthentication() async throws {
        try await RedisServer.withServer { server throws in
            _ = try await server.cli("ACL", "SETUSER", "app", "on", ">right-password", "~*", "+@all")
            let host = "127.0.0.1:\(server.port)"
            try await withClient("redis://app:right-password@\(host)") { client throws in
                #expect(try await client.send("ACL", "WHOAMI").string == "app")
            }
            let before = try await statsCounter(server, "total_connections_received")
            let clock = ContinuousClock()
            let started = clock.now
            try await withClient("redis://app:wrong@\(host)", configure: { $0.commandTimeout = .seconds(10) }) { client throws in
                let error = await #expect(throws: RedisError.self) { try await client.ping() }
                #expect(error?.code == .authenticationFailed)
                #expect(error?.message.contains("\"app\"") == true)
                #expect(error?.message.contains(host) == true)
                #expect(error?.message.contains("wrong") == false, "the password must not be echoed")
                // It failed fast, not at the 10 s deadline.
                #expect(started.duration(to: clock.now) < .seconds(5))
                // Over the next second, later requests fail at once and reconnect attempts stay few (backoff).
                try await Task.sleep(for: .seconds(1))
                await #expect(throws: RedisError.self) { try await client.ping() }
            }
            let attempts = try await statsCounter(server, "total_connections_received") - before
            #expect(attempts >= 1)
            #expect(attempts <= 12, "\(attempts) connection attempts in about a second")
        }
    }

    @Test("after shutdown, requests fail with clientShutdown")
    func shutdown() async throws {
        let server = try await SharedRedisServer.get()
        var configuration = try RedisClientConfiguration(url: server.url)
        configuration.commandTimeout = .seconds(10)
        let client = RedisClient(configuration: configuration)
        let runner = Task { try await client.run() }
        #expect(try await client.ping() == "PONG")
        runner.cancel()
        _ = try? await runner.value
        let error = await #expect(throws: RedisError.self) { try await client.ping() }
        #expect(error?.code == .clientShutdown)
    }
}
