import ConnectionLimiter
import MetricsTestKit
import RedisClient
import TestSupport
import Testing

@Suite("Limits and policies", .timeLimit(.minutes(2)))
struct PolicyTests {
    @Test("a Redis override wins over the default and the per-call limit; clearing it restores them")
    func overrides() async throws {
        let server = try await SharedRedisServer.get()
        let node = try await LimiterNode.start(server.url, testConfiguration(limit: 5))
        try await node.limiter.setLimitOverride(user: "ivy", to: 2)
        #expect(try await node.limiter.limitOverride(user: "ivy") == 2)
        try await node.limiter.mustAdmit("ivy", "i1", limit: 10)
        try await node.limiter.mustAdmit("ivy", "i2", limit: 10)
        guard case .denied(let denial) = try await node.limiter.admit(user: "ivy", connection: "i3", limit: 10) else {
            Issue.record("override did not apply")
            return
        }
        #expect(denial.limit == 2)
        try await node.limiter.clearLimitOverride(user: "ivy")
        #expect(try await node.limiter.limitOverride(user: "ivy") == nil)
        try await node.limiter.mustAdmit("ivy", "i3", limit: 3)
        #expect(try await node.limiter.admit(user: "ivy", connection: "i4", limit: 3).isAdmitted == false)
        await #expect(throws: LimiterError.self) { try await node.limiter.setLimitOverride(user: "ivy", to: -1) }
        await node.stop()
    }

    @Test("evict-oldest: the oldest connection is removed atomically and its node is told to close it")
    func evictOldest() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 2) { $0.policies.overflow = .evictOldest }
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        let events = LimiterEvents(a.limiter)
        try await a.limiter.mustAdmit("jack", "oldest")
        try await b.limiter.mustAdmit("jack", "middle")
        let admission = try await b.limiter.mustAdmit("jack", "newest")
        #expect(admission.evicted == "\(a.limiter.nodeID):oldest")
        // Node a hears the kick over its control channel.
        let kicked = await events.nextKick()
        // Usually the eviction's own kick; a lease renewal that runs first finds the entry marked kicked (or, without
        // the mark, gone) and closes it itself (a race between the renewal and the control message). Either way the
        // node is told to close it.
        #expect(
            kicked == .kick(connection: "oldest", user: "jack", reason: .evicted)
                || kicked == .kick(connection: "oldest", user: "jack", reason: .kickedAtRenewal)
                || kicked == .kick(connection: "oldest", user: "jack", reason: .lostAtRenewal), "\(String(describing: kicked))")
        let entries = try await a.limiter.entries(user: "jack").map(\.connection).sorted()
        #expect(entries == ["middle", "newest"])
        #expect(a.limiter.localConnectionCount == 0)
        await a.stop()
        await b.stop()
    }

    @Test("evict-oldest skips stale admission times, and evicts as many as needed after the limit was lowered")
    func evictOldestEdges() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 3) { $0.policies.overflow = .evictOldest }
        let node = try await LimiterNode.start(server.url, configuration)
        for index in 1...3 { try await node.limiter.mustAdmit("pia", "p\(index)") }
        _ = try await withClient(server.url) { redis throws in
            // An admission time whose entry is gone (expired, purged): it must not count as an eviction.
            try await redis.send("ZADD", "\(configuration.keyPrefix):{u:pia}:since", 0, "ghostnod:x")
        }
        let fourth = try await node.limiter.mustAdmit("pia", "p4")
        #expect(fourth.evictedAll == ["\(node.limiter.nodeID):p1"])
        try await node.limiter.setLimitOverride(user: "pia", to: 1)
        let fifth = try await node.limiter.mustAdmit("pia", "p5")
        #expect(fifth.evictedAll == ["p2", "p3", "p4"].map { "\(node.limiter.nodeID):\($0)" })
        #expect(fifth.count == 1)
        #expect(try await node.limiter.entries(user: "pia").map(\.connection) == ["p5"])
        #expect(node.limiter.localConnectionCount == 1)
        await node.stop()
    }

    @Test("a cancelled admission is never admitted on the local count")
    func cancelledAdmission() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 1)
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        try await b.limiter.mustAdmit("quinn", "q1")
        let outcome = await Task {
            withUnsafeCurrentTask { $0?.cancel() }
            return try await a.limiter.admit(user: "quinn", connection: "q2")
        }.result
        if case .success(let decision) = outcome { #expect(!decision.isAdmitted, "\(decision)") }
        #expect(a.limiter.localConnectionCount == 0)
        #expect(try await a.limiter.entries(user: "quinn").map(\.connection) == ["q1"])
        await a.stop()
        await b.stop()
    }

    @Test("dry run admits everyone and counts what the limit would have denied")
    func dryRun() async throws {
        let server = try await SharedRedisServer.get()
        let metrics = TestMetrics()
        let configuration = testConfiguration(limit: 1) {
            $0.policies.dryRun = true
            $0.metricsFactory = metrics
        }
        let node = try await LimiterNode.start(server.url, configuration)
        let first = try await node.limiter.mustAdmit("kate", "k1")
        let second = try await node.limiter.mustAdmit("kate", "k2")
        #expect(!first.wouldHaveBeenDenied)
        #expect(second.wouldHaveBeenDenied)
        #expect(second.count == 2)
        let wouldDeny = try metrics.expectCounter("fleetgate_admissions_total", [("result", "dry_run_denied")])
        #expect(wouldDeny.totalValue == 1)
        let admitted = try metrics.expectCounter("fleetgate_admissions_total", [("result", "admitted")])
        #expect(admitted.totalValue == 1)
        await node.stop()
    }

    @Test("Redis down with onRedisDown=local admits up to the limit by this node's count; with reject, refuses clearly")
    func redisDown() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let local = try await LimiterNode.start(proxy.url, testConfiguration(limit: 2))
            let strict = try await LimiterNode.start(proxy.url, testConfiguration(limit: 2) { $0.policies.onRedisDown = .reject })
            proxy.cut()
            let first = try await local.limiter.mustAdmit("liam", "l1")
            #expect(first.basis == .localFallback)
            try await local.limiter.mustAdmit("liam", "l2")
            #expect(try await local.limiter.admit(user: "liam", connection: "l3").isAdmitted == false)
            let error = await #expect(throws: LimiterError.self) { try await strict.limiter.admit(user: "liam", connection: "s1") }
            #expect(error?.code == .redisUnavailable)
            #expect(error?.message.contains("liam") == true)
            #expect(error?.message.contains(proxy.address) == true)
            // Back up: the renewal registers the locally admitted connections in Redis.
            proxy.restore()
            let synced = await eventually(timeout: .seconds(10)) { (try? await local.limiter.entries(user: "liam").count) == 2 }
            #expect(synced)
            await local.stop()
            await strict.stop()
            await proxy.stop()
        }
    }

    @Test("odd user ids stay in their own keys; empty and oversized ids are refused, never truncated")
    func userIDs() async throws {
        let server = try await SharedRedisServer.get()
        let node = try await LimiterNode.start(server.url, testConfiguration(limit: 1))
        let odd = ["a{b}c", "}{", "with space", "emoji 🚀", "tab\there", "100%", "%7B", String(repeating: "é", count: 128)]
        for (index, user) in odd.enumerated() {
            try await node.limiter.mustAdmit(user, "o\(index)")
        }
        for (index, user) in odd.enumerated() {
            #expect(try await node.limiter.entries(user: user).map(\.connection) == ["o\(index)"], "user \(user)")
        }
        for bad in ["", String(repeating: "x", count: 257)] {
            let error = await #expect(throws: LimiterError.self) { try await node.limiter.admit(user: bad, connection: "x") }
            #expect(error?.code == .invalidUser)
        }
        let badConnection = await #expect(throws: LimiterError.self) { try await node.limiter.admit(user: "u", connection: "has:colon") }
        #expect(badConnection?.code == .invalidConnection)
        await node.stop()
    }

    @Test("a node cut off from Redis for longer than its TTL fences (policy close) before its lease can run out")
    func leaseLossFencing() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            // The node fences one heartbeat interval before its lease can run out: 500 ms leaves a loaded machine
            // room to deliver the event, and a 2.5 s TTL keeps a heartbeat delayed by the load (the whole suite runs
            // at once on two cores) from fencing the node before the link is cut.
            let configuration = testConfiguration {
                $0.policies.onLeaseLoss = .close
                $0.heartbeat.interval = .milliseconds(500)
                $0.heartbeat.nodeTTL = .milliseconds(2500)
            }
            let isolated = try await LimiterNode.start(proxy.url, configuration)
            let peer = try await LimiterNode.start(server.url, configuration)
            try await isolated.limiter.mustAdmit("mia", "m1")
            try await peer.limiter.mustAdmit("mia", "m2")
            let events = LimiterEvents(isolated.limiter)
            let (registry, node) = ("\(configuration.keyPrefix):nodes", isolated.limiter.nodeID)
            let clock = ContinuousClock()
            proxy.stall()
            let cut = clock.now
            var fencedAfter: Duration?
            var leaseLeft: Int64?
            var lost = false
            while let event = await events.next() {
                if case .fenced = event {
                    fencedAfter = cut.duration(to: clock.now)
                    let fencedAt = unixMilliseconds()
                    // The lease is what Redis holds, not what this test's clock says: ask Redis (over the peer's
                    // direct link) for the node's lease expiry, its score in the registry. Asked after the event, so
                    // an expiry still ahead proves the fence came before the lease ran out.
                    let reply = try await peer.client.send("ZSCORE", registry, node)
                    if let expiresAt = reply.string.flatMap(Double.init) { leaseLeft = Int64(expiresAt) - fencedAt }
                }
                if case .leaseLost = event {
                    lost = true
                    break
                }
            }
            let fenced = try #require(fencedAfter, "no fencing event")
            let left = try #require(leaseLeft, "the node was no longer in the registry when it fenced")
            let ttl = configuration.heartbeat.nodeTTL
            print("fenced \(fenced) after the link was cut, \(left) ms before its lease in Redis ran out (node TTL \(ttl))")
            #expect(left > 0, "fenced \(-left) ms after the node's lease had run out in Redis")
            #expect(lost)
            // A fenced node takes no new connections until it is registered again.
            let refused = await #expect(throws: LimiterError.self) { try await isolated.limiter.admit(user: "mia", connection: "m3") }
            #expect(refused?.code == .redisUnavailable)
            // The peer's link is direct: it keeps working and eventually sweeps the isolated node's entry.
            let swept = await eventually(timeout: .seconds(10)) {
                (try? await peer.limiter.entries(user: "mia").map(\.connection)) == ["m2"]
            }
            #expect(swept)
            proxy.restore()
            let back = await eventually(timeout: .seconds(10)) { isolated.limiter.isRegistered }
            #expect(back)
            await isolated.stop()
            await peer.stop()
            await proxy.stop()
        }
    }
}

@Suite("Operator inspection", .timeLimit(.minutes(2)))
struct InspectionTests {
    @Test("entries, nodes and totals describe what is live; an operator kick closes the connection on its node")
    func inspection() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 5) { $0.policies.overflow = .evictOldest }
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        try await a.limiter.mustAdmit("nora", "n1")
        try await b.limiter.mustAdmit("nora", "n2")
        try await b.limiter.mustAdmit("oscar", "o1")
        let entries = try await a.limiter.entries(user: "nora")
        #expect(Set(entries.map(\.connection)) == ["n1", "n2"])
        #expect(entries.allSatisfy { $0.leaseRemaining > .zero && $0.leaseRemaining <= configuration.lease.ttl })
        #expect(entries.allSatisfy { $0.admittedAgo != nil })  // kept with evict-oldest
        // Node hashes are refreshed at each heartbeat.
        let reported = try await eventually {
            let totals = try await a.limiter.totals()
            return (totals.liveNodes, totals.deadNodes, totals.connections, totals.userNodePairs) == (2, 0, 3, 3)
        }
        #expect(reported)
        let nodes = try await a.limiter.nodes()
        #expect(Set(nodes.map(\.id)) == [a.limiter.nodeID, b.limiter.nodeID])
        #expect(nodes.allSatisfy { $0.isAlive && $0.name == "test" && $0.pid != nil })
        #expect(try await a.limiter.usersOverLimit().isEmpty)

        let events = LimiterEvents(b.limiter)
        try await a.limiter.kick(user: "nora", node: b.limiter.nodeID, connection: "n2")
        let kicked = await events.nextKick()
        // The kick message, or b's renewal (every second here) if it runs first: the kick marker answers it "kicked".
        #expect(
            kicked == .kick(connection: "n2", user: "nora", reason: .operatorRequest)
                || kicked == .kick(connection: "n2", user: "nora", reason: .kickedAtRenewal), "\(String(describing: kicked))")
        // b's renewal (every second here) may have re-added n2 between the operator's removal and the kick; b removes
        // it again when it closes the connection, well before the 3 s lease could end it.
        let gone = await eventually(timeout: .seconds(2)) { (try? await a.limiter.entries(user: "nora").map(\.connection)) == ["n1"] }
        #expect(gone)
        await a.stop()
        await b.stop()
    }
}
