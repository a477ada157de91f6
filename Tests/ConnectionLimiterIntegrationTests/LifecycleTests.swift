import ConnectionLimiter
import RedisClient
import TestSupport
import Testing

@Suite("Node life cycle: crashes, Redis restarts, exhaustion and recovery", .timeLimit(.minutes(2)))
struct LifecycleTests {
    @Test("a crashed node's entries are gone within 30 s (default 1 s heartbeat, 5 s node TTL)")
    func crashedNodeIsSwept() async throws {
        let server = try await SharedRedisServer.get()
        var configuration = testConfiguration()
        configuration.heartbeat = .init()  // the product defaults: 1 s heartbeat, 5 s node TTL,
        configuration.lease = .init()  // 5 min leases renewed every 2 min: only the sweeper can be this fast
        let survivor = try await LimiterNode.start(server.url, configuration)
        let victim = try await LimiterNode.start(server.url, configuration)
        for index in 0..<10 { try await victim.limiter.mustAdmit("user\(index % 3)", "v\(index)") }
        let victimID = victim.limiter.nodeID
        try await withClient(server.url) { redis throws in
            func victimEntries() async throws -> Int {
                var total = 0
                for user in 0..<3 {
                    let members = try await redis.send("ZRANGE", connsKey(configuration, "user\(user)"), 0, -1).array ?? []
                    total += members.compactMap(\.string).filter { $0.hasPrefix("\(victimID):") }.count
                }
                return total
            }
            #expect(try await victimEntries() == 10)
            let clock = ContinuousClock()
            let crashed = clock.now
            await victim.crash()
            let gone = try await eventually(timeout: .seconds(30)) { try await victimEntries() == 0 }
            let elapsed = crashed.duration(to: clock.now)
            print("entries of a crashed node gone after \(elapsed) (goal <= 10 s, promise <= 30 s)")
            #expect(gone)
            #expect(elapsed < .seconds(30))
            // Its registry keys go in the sweep's next write, right after the entries.
            let keysGone = try await eventually(timeout: .seconds(5)) {
                try await redis.send("EXISTS", "\(configuration.keyPrefix):{n:\(victimID)}:info").int == 0
            }
            #expect(keysGone)
        }
        await survivor.stop()
    }

    @Test("after Redis restarts without data, every open connection is back within one renewal interval")
    func redisRestartWithoutData() async throws {
        try await RedisServer.withServer { server throws in
            let configuration = testConfiguration {
                $0.lease.ttl = .seconds(15)
                $0.lease.renewInterval = .seconds(5)
            }
            let a = try await LimiterNode.start(server.url, configuration)
            let b = try await LimiterNode.start(server.url, configuration)
            for index in 0..<6 { try await (index < 3 ? a : b).limiter.mustAdmit("frank", "f\(index)") }
            try await server.restart(keepData: false)
            let clock = ContinuousClock()
            let restarted = clock.now
            let back = try await eventually(timeout: .seconds(10)) {
                try await withClient(server.url) { redis in try await redis.send("ZCARD", connsKey(configuration, "frank")).int == 6 }
            }
            let elapsed = restarted.duration(to: clock.now)
            print("all entries back \(elapsed) after a Redis restart without data")
            #expect(back)
            #expect(elapsed <= configuration.lease.renewInterval)
            #expect(a.limiter.localConnectionCount == 3)
            #expect(b.limiter.localConnectionCount == 3)
            await a.stop()
            await b.stop()
        }
    }

    @Test("entries Redis lost come back at the renewal that follows the reconnect, long before the 2-minute interval")
    func lostEntriesComeBackAfterReconnect() async throws {
        try await RedisServer.withServer { server throws in
            let configuration = testConfiguration { $0.lease = .init() }
            #expect(configuration.lease.renewInterval == .seconds(120))
            let node = try await LimiterNode.start(server.url, configuration)
            for index in 0..<3 { try await node.limiter.mustAdmit("gail", "g\(index)") }
            try await withClient(server.url) { redis throws in
                // What a failover to a replica that missed the writes looks like to the node: the entries are gone
                // and its connection to Redis is new.
                _ = try await redis.send("DEL", connsKey(configuration, "gail"))
                _ = try await redis.send("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                let clock = ContinuousClock()
                let lost = clock.now
                let back = try await eventually(timeout: .seconds(20)) { try await redis.send("ZCARD", connsKey(configuration, "gail")).int == 3 }
                let elapsed = lost.duration(to: clock.now)
                print("lost entries back \(elapsed) after the reconnect (renew interval \(configuration.lease.renewInterval))")
                #expect(back)
                #expect(elapsed < .seconds(20))
            }
            #expect(node.limiter.localConnectionCount == 3)
            await node.stop()
        }
    }

    @Test("releases Redis lost (a promoted replica, the last second of an AOF) are removed by their live owner after the reconnect")
    func lostReleasesAreReconciled() async throws {
        try await RedisServer.withServer { server throws in
            let configuration = testConfiguration { $0.lease = .init() }
            let node = try await LimiterNode.start(server.url, configuration)
            let id = node.limiter.nodeID
            try await node.limiter.mustAdmit("iris", "i0")
            try await node.limiter.mustAdmit("iris", "i1")
            try await node.limiter.mustAdmit("jack", "j0")
            await node.limiter.release(connection: "i1")
            await node.limiter.release(connection: "j0")  // jack's last connection here: jack leaves the index
            try await withClient(server.url) { redis throws in
                // The server forgets both releases, and the node's connection to it is new.
                for (user, connection) in [("iris", "i1"), ("jack", "j0")] {
                    _ = try await redis.send("ZADD", connsKey(configuration, user), "9999999999999", "\(id):\(connection)")
                }
                _ = try await redis.send("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                let clock = ContinuousClock()
                let lost = clock.now
                let clean = try await eventually(timeout: .seconds(20)) {
                    let iris = try await redis.send("ZRANGE", connsKey(configuration, "iris"), 0, -1).array?.compactMap(\.string)
                    let jack = try await redis.send("ZCARD", connsKey(configuration, "jack")).int
                    return iris == ["\(id):i0"] && jack == 0
                }
                print("released entries Redis kept removed \(clock.now - lost) after the reconnect")
                #expect(clean)
            }
            #expect(node.limiter.localConnectionCount == 1)
            await node.stop()
        }
    }

    @Test("a connection admitted on the local count while Redis is unreachable is written as soon as it is back")
    func locallyCountedConnectionIsWrittenSoon() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration {
                $0.lease = .init()
                $0.heartbeat = .init()  // a 5 s node TTL: the cut below must not cost the node its lease
            }
            let node = try await LimiterNode.start(proxy.url, configuration)
            try await node.limiter.mustAdmit("hugo", "h0")
            proxy.cut()
            let admission = try await node.limiter.mustAdmit("hugo", "h1")
            #expect(admission.basis == .localFallback)
            proxy.restore()
            let clock = ContinuousClock()
            let restored = clock.now
            let written = try await eventually(timeout: .seconds(20)) {
                try await withClient(server.url) { redis in try await redis.send("ZCARD", connsKey(configuration, "hugo")).int == 2 }
            }
            let elapsed = restored.duration(to: clock.now)
            print("locally counted connection written \(elapsed) after Redis was reachable again")
            #expect(written)
            #expect(elapsed < .seconds(20))
            await node.stop()
            await proxy.stop()
        }
    }

    @Test("exhaustion and recovery: after every connection closes the count is 0, and no key is left behind")
    func noLeakedKeys() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 5)
        let nodes = [try await LimiterNode.start(server.url, configuration), try await LimiterNode.start(server.url, configuration)]
        for round in 0..<3 {
            for index in 0..<5 { try await nodes[index % 2].limiter.mustAdmit("gina", "g\(round)-\(index)") }
            let full = try await nodes[0].limiter.admit(user: "gina", connection: "extra\(round)")
            #expect(!full.isAdmitted)
            for index in 0..<5 { await nodes[index % 2].limiter.release(connection: "g\(round)-\(index)") }
            #expect(try await nodes[0].limiter.entries(user: "gina").isEmpty)
        }
        for node in nodes { await node.stop() }
        try await withClient(server.url) { redis throws in
            let empty = try await eventually(timeout: .seconds(10)) {
                let keys = try await redis.send("KEYS", "\(configuration.keyPrefix):*").array ?? []
                return keys.isEmpty
            }
            let keys = try await redis.send("KEYS", "\(configuration.keyPrefix):*")
            #expect(empty, "keys left: \(keys)")
        }
    }

    @Test("graceful shutdown releases every entry and deregisters the node at once")
    func gracefulShutdown() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration()
        let node = try await LimiterNode.start(server.url, configuration)
        let id = node.limiter.nodeID
        for index in 0..<4 { try await node.limiter.mustAdmit("hank", "h\(index)") }
        await node.stop()
        try await withClient(server.url) { redis throws in
            #expect(try await redis.send("ZCARD", connsKey(configuration, "hank")).int == 0)
            #expect(try await redis.send("ZSCORE", "\(configuration.keyPrefix):nodes", id).isNull)
            #expect(try await redis.send("EXISTS", "\(configuration.keyPrefix):{n:\(id)}:info").int == 0)
        }
    }
}

@Suite("Lease loss at scale", .timeLimit(.minutes(2)))
struct LeaseLossAtScaleTests {
    @Test("a node with 3,000 connections that loses its lease re-registers once and gets every connection back")
    func reregistrationAtScale() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 5) {
                $0.lease.ttl = .seconds(30)
                $0.lease.renewInterval = .seconds(10)
            }
            let node = try await LimiterNode.start(proxy.url, configuration)
            // Eight at a time: enough to be quick, gentle on the other tests sharing the two cores.
            try await withThrowingTaskGroup(of: Void.self) { group in
                for lane in 0..<8 {
                    group.addTask {
                        for user in stride(from: lane, to: 600, by: 8) {
                            for index in 0..<5 { try await node.limiter.mustAdmit("u\(user)", "c\(user)-\(index)") }
                        }
                    }
                }
                try await group.waitForAll()
            }
            let first = node.limiter.nodeID
            let events = LimiterEvents(node.limiter)
            proxy.stall()
            // Past the node TTL: peers would consider it dead; Redis expires its lease.
            var lost = false
            while let event = await events.next() {
                if case .leaseLost = event {
                    lost = true
                    break
                }
            }
            #expect(lost)
            // Restore only once Redis itself has expired the lease. The node's own clock can give up first (the event
            // may even stem from heartbeats that timed out under load before the stall), and the heartbeats held by the
            // stalled proxy reach Redis on restore: arriving before the expiry, they would extend the lease, the node
            // would keep its id, and the re-registration this test waits for would never come.
            let expired = try await withClient(server.url) { redis in
                try await eventually {
                    try await leaseHasRunOut(redis, configuration, node: first)
                }
            }
            try #require(expired, "Redis still holds the lease of node \(first) after the stall")
            proxy.restore()
            var reregistrations: [LimiterEvent] = []
            var kicks = 0
            while let event = await events.next() {
                if case .kick = event { kicks += 1 }
                // Under load the node may have re-registered before the stall too; that one kept the id `first`.
                if case .reregistered(let node, _, _) = event, node != first {
                    reregistrations.append(event)
                    break
                }
            }
            guard case .reregistered(let second, let readmitted, let denied) = reregistrations.first else {
                Issue.record("no re-registration")
                return
            }
            #expect(second != first)
            #expect(readmitted == 3000)
            #expect(denied == 0)
            #expect(kicks == 0)
            // Still registered under the same incarnation afterwards: the heartbeats kept going during re-admission.
            try await Task.sleep(for: configuration.heartbeat.nodeTTL)
            #expect(node.limiter.nodeID == second)
            #expect(node.limiter.localConnectionCount == 3000)
            let inRedis = try await withClient(server.url) { redis in
                var total = 0
                for user in stride(from: 0, to: 600, by: 60) {
                    total += try await redis.send("ZCARD", connsKey(configuration, "u\(user)")).int ?? 0
                }
                return total
            }
            #expect(inRedis == 50)  // 10 sampled users × 5
            await node.stop()
            await proxy.stop()
        }
    }
}
