import ConnectionLimiter
import Foundation
import RedisClient
import TestSupport
import Testing

/// The limiter unchanged on a real local Redis Cluster (3 primaries, 3 replicas): the incident's scenarios, the key
/// layout that lets a node's keys go in one command, and a failover that loses recent writes.
@Suite("The limiter on Redis Cluster", .serialized, .timeLimit(.minutes(3)))
struct ClusterLimiterTests {
    @Test("20 zombies of three kinds on a cluster: the 21st connection is admitted in under 2 s")
    func zombiesDoNotLockOut() async throws {
        try await RedisCluster.withCluster { cluster in
            let configuration = testConfiguration()
            let a = try await LimiterNode.start(cluster.seedURL, configuration)
            let b = try await LimiterNode.start(cluster.seedURL, configuration)
            let conns = connsKey(configuration, "alice smith")
            try await withClient(cluster.seedURL) { redis throws in
                // The registry and the user's set are on different shards (checked, so the test means something).
                #expect(HashSlot.of("\(configuration.keyPrefix):nodes") != HashSlot.of(conns))
                try await redis.send("ZADD", "\(configuration.keyPrefix):nodes", 1, "deadnod1")
                var members = (0..<7).map { "deadnod1:z\($0)" }
                members += (0..<7).map { "\(a.limiter.nodeID):z\($0)" }
                members += (0..<6).map { "\(b.limiter.nodeID):z\($0)" }
                try await redis.send(RedisCommand("ZADD", arguments: [conns] + members.flatMap { ["9999999999999", $0] }))
                let started = ContinuousClock.now
                try await a.limiter.mustAdmit("alice smith", "c21")
                let elapsed = started.duration(to: .now)
                print("cluster: 21st connection after 20 zombies admitted in \(elapsed)")
                #expect(elapsed < .seconds(2))
                // Room was made one of two ways. Usually the admission is denied and the cleanup purges this node's
                // zombies and has the live peer verify its own away (over the control channel, across shards), so
                // the dead node's entries wait for the sweeper. But when this node's sweeper has already counted
                // deadnod1 dead (its registry entry is expired; seen on a loaded CI machine), the admission script
                // drops deadnod1's entries at once and admits without a cleanup: the live nodes' zombies then stay,
                // harmless below the limit, until a denial needs them gone. Either way: c21 in, at most 20, and one
                // whole kind of zombie gone. (The peer's answer may come after the requester stopped waiting.)
                let c21 = "\(a.limiter.nodeID):c21"
                var left: [String] = []
                let settled = try await eventually(timeout: .seconds(5)) {
                    left = try await redis.send("ZRANGE", conns, 0, -1).array?.compactMap(\.string) ?? []
                    let dead = left.filter { $0.hasPrefix("deadnod1:") }
                    let live = left.filter { !$0.hasPrefix("deadnod1:") && $0 != c21 }
                    return left.contains(c21) && left.count <= 20 && (dead.isEmpty || live.isEmpty)
                }
                #expect(settled, "left: \(left.sorted())")
            }
            await a.stop()
            await b.stop()
        }
    }

    @Test("20 zombies of another live node on a cluster are verified away by that node over the control channel")
    func verifyProtocol() async throws {
        try await RedisCluster.withCluster { cluster in
            let configuration = testConfiguration { $0.verifyTimeout = .milliseconds(900) }
            let a = try await LimiterNode.start(cluster.seedURL, configuration)
            let b = try await LimiterNode.start(cluster.seedURL, configuration)
            let conns = connsKey(configuration, "bea trice")
            try await withClient(cluster.seedURL) { redis throws in
                let zombies = (0..<20).flatMap { ["9999999999999", "\(b.limiter.nodeID):z\($0)"] }
                try await redis.send(RedisCommand("ZADD", arguments: [conns] + zombies))
                let started = ContinuousClock.now
                try await a.limiter.mustAdmit("bea trice", "c21")
                let elapsed = started.duration(to: .now)
                print("cluster: 21st connection after 20 zombies of a live peer admitted in \(elapsed)")
                #expect(elapsed < .seconds(2))
                let left = try await redis.send("ZRANGE", conns, 0, -1).array?.compactMap(\.string) ?? []
                #expect(left == ["\(a.limiter.nodeID):c21"])
            }
            await a.stop()
            await b.stop()
        }
    }

    @Test("20 live connections on a cluster: the 21st is denied with the holders; 500 concurrent admissions admit exactly 20")
    func limitHolds() async throws {
        try await RedisCluster.withCluster { cluster in
            let configuration = testConfiguration()
            let nodes = [
                try await LimiterNode.start(cluster.seedURL, configuration), try await LimiterNode.start(cluster.seedURL, configuration),
                try await LimiterNode.start(cluster.seedURL, configuration),
            ]
            for index in 0..<20 { try await nodes[index % 2].limiter.mustAdmit("bob", "c\(index)") }
            for node in nodes.prefix(2) {
                guard case .denied(let denial) = try await node.limiter.admit(user: "bob", connection: "c21") else {
                    Issue.record("the 21st connection was admitted")
                    return
                }
                #expect(denial.description == "connection limit exceeded for user \"bob\" (20/20)")
                #expect(Set(denial.holders.map(\.node)) == [nodes[0].limiter.nodeID, nodes[1].limiter.nodeID])
            }
            // A storm: 500 concurrent admissions of one user over 3 nodes.
            let admitted = try await withThrowingTaskGroup(of: Int.self) { group in
                for index in 0..<500 {
                    group.addTask { try await nodes[index % 3].limiter.admit(user: "carol", connection: "s\(index)").isAdmitted ? 1 : 0 }
                }
                return try await group.reduce(0, +)
            }
            #expect(admitted == 20)
            try await withClient(cluster.seedURL) { redis throws in
                let entries = try await redis.send("ZRANGE", connsKey(configuration, "carol"), 0, -1).array?.compactMap(\.string) ?? []
                #expect(entries.count == 20, "\(entries)")
            }
            // Every node's hash and users index share a slot, so a drain deletes both in one DEL: nothing is left.
            for node in nodes {
                let id = node.limiter.nodeID
                #expect(HashSlot.of("\(configuration.keyPrefix):{n:\(id)}:info") == HashSlot.of("\(configuration.keyPrefix):{n:\(id)}:users"))
                await node.stop()
            }
            try await withClient(cluster.seedURL) { redis throws in
                var left: [String] = []
                try await redis.scan(matching: "\(configuration.keyPrefix):*") { left += $0 }
                #expect(left.isEmpty, "keys left after every node drained: \(left)")
            }
        }
    }

    @Test("a failover that loses recent writes: every open connection is back in Redis within a renewal interval")
    func failoverLosingWrites() async throws {
        try await RedisCluster.withCluster { cluster in
            let configuration = testConfiguration(limit: 50)
            let node = try await LimiterNode.start(cluster.seedURL, configuration)
            let user = "dora"
            let conns = connsKey(configuration, user)
            let victim = try await cluster.primary(forSlot: HashSlot.of(conns))
            for index in 0..<10 { try await node.limiter.mustAdmit(user, "c\(index)") }
            _ = try await victim.cli("WAIT", "1", "2000")
            // The replica that will take over is paused, so the next 5 admissions never reach it; the primary is
            // killed with them, and the replica resumes and is promoted without them.
            var successor: RedisServer?
            for replica in try await cluster.replicas() {
                let role = try await replica.cli("ROLE").split(whereSeparator: \.isNewline)
                if role.count > 2, role[2] == "\(victim.port)" { successor = replica }
            }
            let replica = try #require(successor, "no replica of \(victim.address)")
            replica.pause()
            for index in 10..<15 { try await node.limiter.mustAdmit(user, "c\(index)") }
            async let promotion = cluster.killPrimary(victim)
            #expect(await eventually { victim.pid == nil })
            replica.resume()
            let promoted = try await promotion
            #expect(promoted.port == replica.port)
            let survived = try await promoted.cli("ZCARD", conns).trimmingCharacters(in: .whitespacesAndNewlines)
            print("cluster: after the failover the new primary held \(survived) of 15 entries")
            let failedOver = ContinuousClock.now
            let back = try await withClient(cluster.seedURL) { redis throws in
                await eventually(timeout: .seconds(10)) {
                    (try? await redis.send("ZCARD", conns).int) == 15
                }
            }
            let elapsed = failedOver.duration(to: .now)
            print("cluster: every connection back in Redis \(elapsed) after the failover to \(promoted.address)")
            #expect(back)
            // One renewal interval (1 s here) plus the time the node's client takes to find the new primary.
            #expect(elapsed < configuration.lease.renewInterval + .seconds(5))
            await node.stop()
        }
    }
}
