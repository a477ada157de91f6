import ConnectionLimiter
import RedisClient
import TestSupport
import Testing

/// The incident this project started from, and the limit under concurrency.
@Suite("Admission against real Redis: the incident, the limit, concurrency", .timeLimit(.minutes(2)))
struct IncidentTests {
    @Test("20 zombies of three kinds never lock a user out: the 21st connection is admitted in under 2 s")
    func zombiesDoNotLockOut() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration()
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        // A user id with a space: it travels through the verify messages too.
        let conns = connsKey(configuration, "alice smith")
        try await withClient(server.url) { redis throws in
            // A node that died: registered, lease expired, not swept yet (we hold the sweeper off by seeding directly).
            try await redis.send("ZADD", "\(configuration.keyPrefix):nodes", 1, "deadnod1")
            var members: [String] = []
            members += (0..<7).map { "deadnod1:z\($0)" }  // owned by a dead node
            members += (0..<7).map { "\(a.limiter.nodeID):z\($0)" }  // owned by this live node, not open here
            members += (0..<6).map { "\(b.limiter.nodeID):z\($0)" }  // owned by another live node, not open there
            let far = 9_999_999_999_999
            try await redis.send(RedisCommand("ZADD", arguments: [conns] + members.flatMap { [String(far), $0] }))
            #expect(try await redis.send("ZCARD", conns).int == 20)

            let clock = ContinuousClock()
            let started = clock.now
            try await a.limiter.mustAdmit("alice smith", "c21")
            let elapsed = started.duration(to: clock.now)
            print("21st connection after 20 zombies admitted in \(elapsed)")
            // The promise (guarantee 4); the suite shares two cores, so the typical figure is for the benchmarks.
            #expect(elapsed < .seconds(2))
        }
        await a.stop()
        await b.stop()
    }

    @Test("20 zombies of another live node are verified away by that node, and the 21st connection is admitted")
    func verifyProtocol() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration { $0.verifyTimeout = .milliseconds(900) }
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        let conns = connsKey(configuration, "bea trice")
        try await withClient(server.url) { redis throws in
            let zombies = (0..<20).flatMap { ["9999999999999", "\(b.limiter.nodeID):z\($0)"] }
            try await redis.send(RedisCommand("ZADD", arguments: [conns] + zombies))
            let clock = ContinuousClock()
            let started = clock.now
            try await a.limiter.mustAdmit("bea trice", "c21")
            let elapsed = started.duration(to: clock.now)
            print("21st connection after 20 zombies of a live peer admitted in \(elapsed)")
            #expect(elapsed < .seconds(2))
            let left = try await redis.send("ZRANGE", conns, 0, -1).array?.compactMap(\.string) ?? []
            #expect(left == ["\(a.limiter.nodeID):c21"])
        }
        await a.stop()
        await b.stop()
    }

    @Test("20 live connections over two nodes: the 21st is denied on either node with a clear message and the holders")
    func realLimit() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration()
        let a = try await LimiterNode.start(server.url, configuration)
        let b = try await LimiterNode.start(server.url, configuration)
        for index in 0..<20 {
            try await (index.isMultiple(of: 2) ? a : b).limiter.mustAdmit("bob", "c\(index)")
        }
        let clock = ContinuousClock()
        for node in [a, b] {
            let started = clock.now
            let decision = try await node.limiter.admit(user: "bob", connection: "c21")
            #expect(started.duration(to: clock.now) < .seconds(1))
            guard case .denied(let denial) = decision else {
                Issue.record("21st connection admitted")
                return
            }
            #expect(denial.description == "connection limit exceeded for user \"bob\" (20/20)")
            #expect(denial.holders.count == 20)
            #expect(Set(denial.holders.map(\.node)) == [a.limiter.nodeID, b.limiter.nodeID])
            #expect(denial.retryAfter >= .seconds(1))
        }
        // Releasing one makes room again.
        await a.limiter.release(connection: "c0")
        try await b.limiter.mustAdmit("bob", "c21")
        await a.stop()
        await b.stop()
    }

    @Test("500 concurrent admissions for one user over 3 nodes admit exactly the limit")
    func concurrentAdmissions() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 20)
        let nodes = [
            try await LimiterNode.start(server.url, configuration),
            try await LimiterNode.start(server.url, configuration),
            try await LimiterNode.start(server.url, configuration),
        ]
        let admitted = try await withThrowingTaskGroup(of: Int.self) { group in
            for index in 0..<500 {
                group.addTask {
                    try await nodes[index % 3].limiter.admit(user: "carol", connection: "c\(index)").isAdmitted ? 1 : 0
                }
            }
            return try await group.reduce(0, +)
        }
        #expect(admitted == 20)
        try await withClient(server.url) { redis throws in
            #expect(try await redis.send("ZCARD", connsKey(configuration, "carol")).int == 20)
        }
        #expect(nodes.reduce(0) { $0 + $1.limiter.localConnectionCount } == 20)
        for node in nodes { await node.stop() }
    }

    @Test("a user at the limit with zombies does not affect other users; concurrent cleanups do not over-admit")
    func isolationAndConcurrentCleanups() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 10)
        let nodes = [
            try await LimiterNode.start(server.url, configuration),
            try await LimiterNode.start(server.url, configuration),
            try await LimiterNode.start(server.url, configuration),
        ]
        let conns = connsKey(configuration, "dave")
        try await withClient(server.url) { redis throws in
            try await redis.send("ZADD", "\(configuration.keyPrefix):nodes", 1, "deadnod2")
            let zombies = (0..<10).flatMap { ["9999999999999", "deadnod2:z\($0)"] }
            try await redis.send(RedisCommand("ZADD", arguments: [conns] + zombies))
            // Other users are unaffected.
            for index in 0..<10 { try await nodes[index % 3].limiter.mustAdmit("erin", "e\(index)") }
            // 15 concurrent attempts for dave over 3 nodes, each cleaning up: exactly 10 admitted.
            let admitted = try await withThrowingTaskGroup(of: Int.self) { group in
                for index in 0..<15 {
                    group.addTask { try await nodes[index % 3].limiter.admit(user: "dave", connection: "d\(index)").isAdmitted ? 1 : 0 }
                }
                return try await group.reduce(0, +)
            }
            #expect(admitted == 10)
            let members = try await redis.send("ZRANGE", conns, 0, -1).array?.compactMap(\.string) ?? []
            #expect(members.count == 10)
            #expect(members.allSatisfy { !$0.hasPrefix("deadnod2:") })
            #expect(try await redis.send("ZCARD", connsKey(configuration, "erin")).int == 10)
        }
        for node in nodes { await node.stop() }
    }
}
