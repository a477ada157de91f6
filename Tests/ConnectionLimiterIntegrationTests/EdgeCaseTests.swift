import RedisClient
import Synchronization
import TestSupport
import Testing

@testable import ConnectionLimiter

/// Races and edge paths found in review: each test failed before its fix.
@Suite("Edge paths: fencing races, re-admission, dry run, users index, shutdown, errors", .timeLimit(.minutes(2)))
struct EdgeCaseTests {
    @Test("an admission that times out after its node fenced itself is refused, not admitted on the local count")
    func noAdmissionAfterFence() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            // The node fences at most 1 s after the cut (TTL 1.5 s minus one 500 ms interval) and its lease is gone
            // after 1.5 s; the admission sent at the cut times out only after 2.5 s, well after both.
            let configuration = testConfiguration(limit: 1) {
                $0.policies.onLeaseLoss = .close
                $0.heartbeat.interval = .milliseconds(500)
                $0.heartbeat.nodeTTL = .milliseconds(1500)
                $0.admissionTimeout = .milliseconds(2500)
            }
            let isolated = try await LimiterNode.start(proxy.url, configuration)
            proxy.stall()
            let outcome: Result<AdmissionDecision, any Error>
            do {
                outcome = .success(try await isolated.limiter.admit(user: "fay", connection: "f1"))
            } catch {
                outcome = .failure(error)
            }
            #expect(isolated.limiter.isFenced)
            switch outcome {
            case .success(let decision):
                Issue.record("admitted by a fenced node: \(decision)")
            case .failure(let error):
                #expect((error as? LimiterError)?.code == .redisUnavailable, "\(error)")
                #expect("\(error)".contains("onLeaseLoss=close"), "\(error)")
            }
            #expect(isolated.limiter.localConnectionCount == 0)
            proxy.restore()
            await isolated.stop()
            await proxy.stop()
        }
    }

    @Test("re-admission after a lease loss under evict-oldest yields: it never evicts what other nodes admitted meanwhile")
    func readmissionYieldsUnderEvictOldest() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 2) {
                $0.policies.overflow = .evictOldest
                $0.lease.ttl = .seconds(30)
                $0.lease.renewInterval = .seconds(10)
            }
            let away = try await LimiterNode.start(proxy.url, configuration)
            let peer = try await LimiterNode.start(server.url, configuration)
            try await away.limiter.mustAdmit("eve", "a1")
            let events = LimiterEvents(away.limiter)
            let first = away.limiter.nodeID
            proxy.stall()
            let expired = try await withClient(server.url) { redis in
                try await eventually {
                    try await leaseHasRunOut(redis, configuration, node: first)
                }
            }
            try #require(expired)
            #expect(await eventually { (try? await peer.limiter.entries(user: "eve").count) == 0 }, "the peer did not sweep a1")
            try await peer.limiter.mustAdmit("eve", "b1")
            try await peer.limiter.mustAdmit("eve", "b2")
            proxy.restore()
            var kicked: [LimiterEvent] = []
            while let event = await events.next() {
                if case .kick = event { kicked.append(event) }
                if case .reregistered(let node, let readmitted, let denied) = event, node != first {
                    #expect(readmitted == 0 && denied == 1, "readmitted \(readmitted), denied \(denied)")
                    break
                }
            }
            #expect(kicked == [.kick(connection: "a1", user: "eve", reason: .deniedAfterLeaseLoss)])
            let entries = try await peer.limiter.entries(user: "eve").map(\.connection).sorted()
            #expect(entries == ["b1", "b2"])
            #expect(peer.limiter.localConnectionCount == 2)
            await away.stop()
            await peer.stop()
            await proxy.stop()
        }
    }

    @Test("an operator kick of a stale member of an earlier incarnation leaves the re-admitted live connection alone")
    func kickOfStaleIncarnationMember() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 5) {
                $0.lease.ttl = .seconds(30)
                $0.lease.renewInterval = .seconds(10)
            }
            let node = try await LimiterNode.start(proxy.url, configuration)
            try await node.limiter.mustAdmit("eve", "a1")
            let events = LimiterEvents(node.limiter)
            let first = node.limiter.nodeID
            proxy.stall()
            let expired = try await withClient(server.url) { redis in
                try await eventually { try await leaseHasRunOut(redis, configuration, node: first) }
            }
            try #require(expired)
            proxy.restore()
            while let event = await events.next() {
                if case .reregistered(let node, _, _) = event, node != first { break }
            }
            let second = node.limiter.nodeID
            // The earlier incarnation's member may still be in Redis (under the limit nothing drops it before the sweep)
            // or swept already; either way the kick names a member that is not the live connection's.
            try await node.limiter.kick(user: "eve", node: first, connection: "a1")
            let after = try await node.limiter.entries(user: "eve").map { "\($0.node):\($0.connection)" }
            #expect(after == ["\(second):a1"])
            #expect(node.limiter.localConnectionCount == 1, "the live a1 (held as \(second):a1) was closed")
            await node.stop()
            await proxy.stop()
        }
    }

    @Test("a renewal that put entries back under the old id before the re-registration: no socket is counted twice")
    func readmissionReplacesRenewedOldMember() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 20) {
            $0.lease.ttl = .seconds(30)
            $0.lease.renewInterval = .seconds(10)
        }
        let node = try await LimiterNode.start(server.url, configuration)
        // Well under the limit: at the limit the old incarnation's members would be dropped as dead anyway.
        for index in 0..<3 { try await node.limiter.mustAdmit("ivy", "i\(index)") }
        let events = LimiterEvents(node.limiter)
        let first = node.limiter.nodeID
        try await withClient(server.url) { redis throws in
            func members() async throws -> [String] {
                (try await redis.send("ZRANGE", connsKey(configuration, "ivy"), 0, -1).array ?? []).compactMap(\.string).sorted()
            }
            // Redis lost the user's entries (a restart without data), and a renewal puts them back under the id it holds…
            _ = try await redis.send("DEL", connsKey(configuration, "ivy"))
            await node.limiter.renewLeases()
            #expect(try await members() == (0..<3).map { "\(first):i\($0)" })
            // …before the heartbeat finds the registration gone too: a new incarnation re-admits the same sockets.
            _ = try await redis.send("ZREM", "\(configuration.keyPrefix):nodes", first)
            var readmitted: Int?
            while let event = await events.next() {
                if case .reregistered(let node, let count, _) = event, node != first {
                    readmitted = count
                    break
                }
            }
            #expect(readmitted == 3)
            let second = node.limiter.nodeID
            #expect(try await members() == (0..<3).map { "\(second):i\($0)" }, "the old entries must be replaced, not kept beside")
        }
        #expect(node.limiter.localConnectionCount == 3)
        await node.stop()
    }

    @Test("dry run never closes: connections admitted on the local count are all re-added by the renewal, over the limit")
    func dryRunRenewalNeverKicks() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 1) {
                $0.policies.dryRun = true
                $0.admissionTimeout = .milliseconds(300)
                $0.heartbeat.interval = .seconds(1)
                $0.heartbeat.nodeTTL = .seconds(5)
                $0.lease.ttl = .seconds(30)
                $0.lease.renewInterval = .seconds(1)
            }
            let node = try await LimiterNode.start(proxy.url, configuration)
            proxy.cut()
            for index in 0..<3 {
                let admission = try await node.limiter.mustAdmit("dora", "d\(index)")
                #expect(admission.basis == .localFallback)
            }
            proxy.restore()
            let readded = await eventually { (try? await node.limiter.entries(user: "dora").count) == 3 }
            #expect(readded, "the renewal did not re-add all three")
            #expect(node.limiter.localConnectionCount == 3)
            await node.stop()
            await proxy.stop()
        }
    }

    @Test("a release while the admission is pending is not lost when the admission ends on the local count")
    func pendingReleaseWithLocalFallback() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 5) {
                $0.admissionTimeout = .milliseconds(500)
                $0.policies.onRedisDown = .local
                $0.heartbeat.interval = .seconds(1)
                $0.heartbeat.nodeTTL = .seconds(5)
                $0.lease.ttl = .seconds(30)
                $0.lease.renewInterval = .seconds(10)
            }
            let node = try await LimiterNode.start(proxy.url, configuration)
            proxy.stall()
            let admission = Task { try await node.limiter.admit(user: "pat", connection: "p1") }
            let pending = await eventually { node.limiter.state.withLock { $0.table.connection("p1")?.state == .pending } }
            try #require(pending)
            // The client went away while its admission was in flight.
            await node.limiter.release(connection: "p1")
            _ = try await admission.value
            #expect(node.limiter.state.withLock { $0.table.connection("p1") } == nil)
            proxy.restore()
            // The script held up in the stalled link writes p1 when the link comes back; the node removes it again.
            let key = connsKey(configuration, "pat")
            let gone = await eventually { (try? await server.cli("ZCARD", key)) == "0" }
            let left = gone ? "" : ((try? await server.cli("ZRANGE", key, "0", "-1")) ?? "?")
            #expect(gone, "p1 stayed in Redis: \(left)")
            await node.stop()
            await proxy.stop()
        }
    }

    @Test("users leave the node's users index on every way out: denial, kick, release")
    func usersIndexHasNoLeftovers() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 0)
        let node = try await LimiterNode.start(server.url, configuration)
        for index in 0..<20 {
            #expect(try await !node.limiter.admit(user: "banned\(index)", connection: "c\(index)").isAdmitted)
        }
        try await node.limiter.mustAdmit("kicked", "k1", limit: 5)
        try await node.limiter.mustAdmit("released", "r1", limit: 5)
        let events = LimiterEvents(node.limiter)
        try await node.limiter.kick(user: "kicked", node: node.limiter.nodeID, connection: "k1")
        #expect(await events.nextKick() == .kick(connection: "k1", user: "kicked", reason: .operatorRequest))
        await node.limiter.release(connection: "r1")
        let index = "\(configuration.keyPrefix):{n:\(node.limiter.nodeID)}:users"
        let empty = await eventually { (try? await server.cli("SCARD", index)) == "0" }
        let left = empty ? "" : ((try? await server.cli("SMEMBERS", index)) ?? "?")
        #expect(empty, "left in the users index: \(left)")
        await node.stop()
    }

    @Test("admissions racing a graceful shutdown are refused with a clear error and leave no key without a TTL")
    func shutdownRefusesAndLeavesNoImmortalKey() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 5)
        let node = try await LimiterNode.start(server.url, configuration)
        let id = node.limiter.nodeID
        let admitted = ManagedCounter()
        let admitter = Task { () -> (any Error)? in
            var index = 0
            while true {
                index += 1
                do {
                    _ = try await node.limiter.admit(user: "d\(index)", connection: "c\(index)")
                    admitted.add()
                } catch {
                    return error
                }
            }
        }
        #expect(await eventually { admitted.value >= 50 })
        await node.stop()
        let error = await admitter.value
        #expect((error as? LimiterError)?.code == .notRunning, "\(String(describing: error))")
        #expect("\(String(describing: error))".contains("shutting down") || "\(String(describing: error))".contains("not running"))
        for key in try await server.cli("--scan", "--pattern", "\(configuration.keyPrefix)*").split(separator: "\n") {
            let ttl = try await server.cli("PTTL", String(key))
            #expect(ttl != "-1", "\(key) has no TTL after node \(id) stopped")
        }
    }

    @Test("a Redis error during admission names the user, the node and the keys to check")
    func admissionErrorsSayWhere() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 5)
        let node = try await LimiterNode.start(server.url, configuration)
        _ = try await server.cli("HSET", "\(configuration.keyPrefix):{u:odd}:limit", "x", "1")
        let error = await #expect(throws: LimiterError.self) { try await node.limiter.admit(user: "odd", connection: "o1") }
        #expect(error?.code == .unexpectedReply)
        let message = error?.message ?? ""
        #expect(message.contains("\"odd\"") && message.contains(node.limiter.nodeID) && message.contains("WRONGTYPE"), "\(message)")
        #expect(node.limiter.localConnectionCount == 0)
        await node.stop()
    }
}

/// A thread-safe counter for tests.
final class ManagedCounter: Sendable {
    private let count = Mutex(0)
    var value: Int { count.withLock { $0 } }
    func add() { count.withLock { $0 += 1 } }
}

@Suite("A full Redis (maxmemory reached, noeviction)", .timeLimit(.minutes(1)))
struct RedisFullTests {
    @Test("new admissions are refused with redisFull (never the local fallback); leases, heartbeats and releases go on")
    func redisFull() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--maxmemory-policy", "noeviction"])) { server throws in
            let configuration = testConfiguration(limit: 5) { $0.policies.onRedisDown = .local }
            let node = try await LimiterNode.start(server.url, configuration)
            for index in 0..<3 { try await node.limiter.mustAdmit("rita", "r\(index)") }
            try await withClient(server.url) { redis throws in
                func score(_ member: String) async throws -> Double {
                    try #require(Double(try await redis.send("ZSCORE", connsKey(configuration, "rita"), member).string ?? ""))
                }
                let member = "\(node.limiter.nodeID):r0"
                let leaseBefore = try await score(member)
                let nodeBefore = try #require(
                    Double(try await redis.send("ZSCORE", "\(configuration.keyPrefix):nodes", node.limiter.nodeID).string ?? ""))
                _ = try await server.cli("CONFIG", "SET", "maxmemory", "1")
                do {
                    let decision = try await node.limiter.admit(user: "rita", connection: "r3")
                    Issue.record("admitted by a full Redis: \(decision)")
                } catch let error as LimiterError {
                    #expect(error.code == .redisFull, "\(error)")
                    #expect(error.message.contains("maxmemory") && error.message.contains("rita"), "\(error)")
                }
                #expect(node.limiter.localConnectionCount == 3)
                // The renewal extends the leases at the memory limit, and the heartbeat the node's.
                await node.limiter.renewLeases()
                #expect(try await score(member) > leaseBefore)
                let beating = try await eventually(timeout: .seconds(5)) {
                    let now = Double(try await redis.send("ZSCORE", "\(configuration.keyPrefix):nodes", node.limiter.nodeID).string ?? "") ?? 0
                    return now > nodeBefore
                }
                #expect(beating, "the heartbeat stopped at the memory limit")
                // A release frees memory: it must work too.
                await node.limiter.release(connection: "r2")
                #expect(try await redis.send("ZCARD", connsKey(configuration, "rita")).int == 2)
                _ = try await server.cli("CONFIG", "SET", "maxmemory", "0")
                try await node.limiter.mustAdmit("rita", "r4")
            }
            await node.stop()
        }
    }

    @Test("a node warns when Redis evicts keys: every maxmemory-policy but noeviction")
    func evictionWarning() {
        #expect(ConnectionLimiter.evictionWarning(policy: "noeviction") == nil)
        for policy in ["allkeys-lru", "volatile-ttl", "volatile-lru", "allkeys-random"] {
            let warning = ConnectionLimiter.evictionWarning(policy: policy)
            #expect(warning?.contains(policy) == true && warning?.contains("noeviction") == true, "\(String(describing: warning))")
        }
    }
}
