import Foundation
import RedisClient
import Synchronization
import TestSupport
import Testing

/// The client in cluster mode against a real local Redis Cluster (3 primaries, 3 replicas): routing, refusals,
/// redirections during migrations, and a primary killed with SIGKILL.
@Suite("Redis Cluster mode, on a real cluster", .serialized, .timeLimit(.minutes(3)))
struct ClusterTests {
    @Test("every command reaches the primary of its key's slot, with and without hash tags; pipelines answer in order")
    func routing() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { client in
                #expect(client.isCluster)
                #expect(try await client.primaries().count == 3)
                let keys = (0..<300).map { $0 % 3 == 0 ? "{tag\($0 % 7)}:k\($0)" : "key:\($0)" }
                for key in keys { try await client.set(key, to: "v-\(key)") }
                for key in keys { #expect(try await client.get(key)?.string == "v-\(key)") }
                // Each key is on the primary that owns its slot, asked directly (no redirection possible).
                for key in keys.prefix(30) {
                    let owner = try await cluster.primary(forSlot: HashSlot.of(key))
                    #expect(try await owner.cli("GET", key).trimmingCharacters(in: .whitespacesAndNewlines) == "v-\(key)")
                }
                // One pipeline over all three shards, answered in the caller's order.
                let replies = try await client.pipeline(keys.map { RedisCommand("GET", $0) })
                #expect(replies.map { try? $0.get().string } == keys.map { "v-\($0)" })
                // Keys of one tag share a slot: a multi-key command and a script over them work.
                #expect(try await client.send("MSET", "{t}:a", "1", "{t}:b", "2").string == "OK")
                #expect(try await client.send("DEL", "{t}:a", "{t}:b").int == 2)
                let script = RedisScript("return redis.call('INCRBY', KEYS[1], ARGV[1]) + redis.call('INCRBY', KEYS[2], ARGV[1])")
                #expect(try await client.eval(script, keys: ["{s}:x", "{s}:y"], arguments: [5]).int == 10)
                // SCAN runs on every primary.
                var scanned: [String] = []
                try await client.scan(matching: "key:*", count: 50) { scanned += $0 }
                #expect(Set(scanned) == Set(keys.filter { $0.hasPrefix("key:") }))
                // SCRIPT LOAD reaches every primary.
                let sha = try await client.load(RedisScript("return 42"))
                for (address, reply) in try await client.sendToEveryPrimary(RedisCommand("SCRIPT", "EXISTS", sha)) {
                    #expect(try reply.get().array?.first?.int == 1, "not loaded on \(address)")
                }
            }
        }
    }

    @Test("a command whose keys span slots is refused before it is sent, naming the keys")
    func crossSlotRefused() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { client in
                try await client.set("foo", to: "1")
                try await client.set("bar", to: "2")
                await #expect {
                    try await client.send("DEL", "foo", "bar")
                } throws: { error in
                    let error = error as? RedisError
                    return error?.code == .crossSlot && error?.message.contains("foo → 12182") == true
                }
                // Nothing was sent: both keys are still there.
                #expect(try await client.get("foo")?.string == "1")
                #expect(try await client.get("bar")?.string == "2")
                // In a pipeline, only that element fails.
                let replies = try await client.pipeline([RedisCommand("GET", "foo"), RedisCommand("MGET", "foo", "bar"), RedisCommand("GET", "bar")])
                #expect(try replies[0].get().string == "1")
                #expect(throws: RedisError.self) { try replies[1].get() }
                #expect(try replies[2].get().string == "2")
                #expect(throws: RedisError.self) { try client.sendWithoutReply(RedisCommand("DEL", "foo", "bar")) }
            }
        }
    }

    @Test("MOVED after a slot migration is followed and the map refreshed; a redis-cli reshard under load loses nothing")
    func movedDuringReshard() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { client in
                let key = "{moving}:a"
                let slot = HashSlot.of(key)
                try await client.set(key, to: "before")
                let (_, target) = try await cluster.sourceAndTarget(ofSlot: slot)
                try await cluster.migrateSlot(slot, to: target)
                // The client's map still names the source: it gets MOVED and follows it.
                #expect(try await client.get(key)?.string == "before")
                try await client.set(key, to: "after")
                #expect(try await target.cli("GET", key).trimmingCharacters(in: .whitespacesAndNewlines) == "after")

                // Load running while redis-cli moves 300 slots between two other primaries.
                let tally = LoadTally()
                let primaries = try await cluster.primaries()
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for worker in 0..<4 {
                        group.addTask {
                            var round = 0
                            while !tally.done.load(ordering: .relaxed) {
                                let key = "load:\(worker):\(round % 500)"
                                do {
                                    try await client.set(key, to: "\(round)")
                                    let value = try await client.get(key)?.string
                                    if value != "\(round)" { tally.fail("\(key): read \(value ?? "nil") after writing \(round)") }
                                } catch {
                                    tally.fail("\(key): \(error)")
                                }
                                tally.operations.add(1, ordering: .relaxed)
                                round += 1
                            }
                        }
                    }
                    try await cluster.reshard(slots: 300, from: primaries[1], to: primaries[2])
                    tally.done.store(true, ordering: .relaxed)
                    try await group.waitForAll()
                }
                let operations = tally.operations.load(ordering: .relaxed)
                let failures = tally.failures.withLock { $0 }
                print("cluster: \(operations) operations during a 300-slot reshard, \(failures.count) failed")
                #expect(operations > 100)
                #expect(failures.isEmpty, "\(failures.prefix(5))")
            }
        }
    }

    @Test("ASK during a migration is followed with ASKING, for keys not yet moved and for new keys")
    func askDuringMigration() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { client in
                let old = "{asking}:old"
                let slot = HashSlot.of(old)
                try await client.set(old, to: "on the source")
                let (source, target) = try await cluster.sourceAndTarget(ofSlot: slot)
                try await cluster.beginMigration(slot: slot, to: target)
                // The source still has this key and serves it.
                #expect(try await client.get(old)?.string == "on the source")
                // A new key of the slot: the source answers ASK, the target takes it after ASKING.
                let new = "{asking}:new"
                try await client.set(new, to: "on the target")
                #expect(try await client.get(new)?.string == "on the target")
                // The source does not have it: asked directly, it redirects with ASK to the target.
                let asked = try await source.cli("EXISTS", new)
                #expect(asked.contains("ASK \(slot) \(target.address)"), "\(asked)")
                try await cluster.finishMigration(slot: slot, to: target)
                #expect(try await client.get(old)?.string == "on the source")
                #expect(try await client.get(new)?.string == "on the target")
            }
        }
    }

    @Test("sharded pub/sub: messages on the channel's shard, and the subscription follows its slot through a migration and a failover")
    func shardedPubSub() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { subscriber in
                try await withClient(cluster.seedURL) { publisher in
                    let channel = "{control}:node-1"
                    let slot = HashSlot.of(channel)
                    let subscription = try await subscriber.subscribe(to: [channel])
                    var messages = subscription.makeAsyncIterator()
                    // Published until one arrives (each publish names how many received it): after a move the
                    // subscriber needs a moment to find the new shard.
                    func deliver(_ text: String) async throws -> Bool {
                        let started = ContinuousClock.now
                        while started.duration(to: .now) < .seconds(15) {
                            if try await publisher.publish(text, to: channel) == 1 { return true }
                            try await Task.sleep(for: .milliseconds(100))
                        }
                        return false
                    }
                    #expect(try await deliver("one"))
                    #expect(await messages.next().map { String(decoding: $0.payload, as: UTF8.self) } == "one")
                    // Only the shard that owns the slot knows the subscriber: SPUBLISH on another primary is refused.
                    let owner = try await cluster.primary(forSlot: slot)
                    let other = try #require(try await cluster.primaries().first { $0.port != owner.port })
                    #expect(try await other.cli("SPUBLISH", channel, "x").contains("MOVED"))

                    // A migration: the server ends the subscription (sunsubscribe); the client re-subscribes there.
                    try await cluster.migrateSlot(slot, to: other)
                    #expect(try await deliver("two"))
                    #expect(await messages.next().map { String(decoding: $0.payload, as: UTF8.self) } == "two")

                    // A failover of the new owner: the promoted replica takes the subscription.
                    let promoted = try await cluster.killPrimary(other)
                    #expect(try await deliver("three"))
                    #expect(await messages.next().map { String(decoding: $0.payload, as: UTF8.self) } == "three")
                    #expect(try await cluster.primary(forSlot: slot).port == promoted.port)

                    // Channels of one subscription must share a slot; patterns do not exist in sharded pub/sub.
                    await #expect(throws: RedisError.self) { try await subscriber.subscribe(to: ["foo", "bar"]) }
                    await #expect(throws: RedisError.self) { try await subscriber.subscribe(toPatterns: ["x*"]) }
                }
            }
        }
    }

    @Test("a primary killed with SIGKILL: its replica is promoted, commands resume within a bounded wait, NOSCRIPT is handled")
    func failover() async throws {
        try await RedisCluster.withCluster { cluster in
            try await withClient(cluster.seedURL) { client in
                let key = "{failover}:counter"
                let script = RedisScript("return redis.call('INCR', KEYS[1])")
                #expect(try await client.eval(script, keys: [key]).int == 1)
                let victim = try await cluster.primary(forSlot: HashSlot.of(key))
                // The write reached the replica before the kill.
                _ = try await victim.cli("WAIT", "1", "2000")
                let killed = ContinuousClock.now
                let promoted = try await cluster.killPrimary(victim)
                #expect(promoted.port != victim.port)
                // The first command after the failover: the client finds the new primary (whose script cache is
                // empty: the replica never ran EVALSHA) within its deadline.
                var value: Int?
                let resumed = await eventually(timeout: .seconds(20)) {
                    value = try? await client.eval(script, keys: [key], timeout: .seconds(5)).int
                    return value != nil
                }
                let elapsed = killed.duration(to: .now)
                print("cluster: commands resumed \(elapsed) after SIGKILL of the primary (promotion included)")
                #expect(resumed)
                #expect(value == 2, "the counter written before the kill survived on the replica")
                #expect(try await client.primaries().contains(promoted.address))
                #expect(!(try await client.primaries().contains(victim.address)))
                #expect(elapsed < .seconds(20))
            }
        }
    }
}

/// What the load of a test did: operations, failures, and the flag that ends it.
private final class LoadTally: Sendable {
    let done = Atomic<Bool>(false)
    let operations = Atomic<Int>(0)
    let failures = Mutex<[String]>([])

    func fail(_ what: String) {
        failures.withLock { $0.append(what) }
    }
}

extension RedisCluster {
    /// The primary serving `slot` and another primary to move it to.
    fileprivate func sourceAndTarget(ofSlot slot: Int) async throws -> (source: RedisServer, target: RedisServer) {
        let source = try await primary(forSlot: slot)
        let target = try #require(try await primaries().first { $0.port != source.port }, "no second primary to move slot \(slot) to")
        return (source, target)
    }
}
