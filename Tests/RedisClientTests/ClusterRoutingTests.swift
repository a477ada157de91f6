import Testing

@testable import RedisClient

/// The pure parts of cluster mode: slots, where a command goes, the cluster URL, `CLUSTER SLOTS` and redirections.
/// (Routing against a real cluster, with migrations and failovers, is in RedisClientIntegrationTests.)
@Suite("Redis Cluster routing")
struct ClusterRoutingTests {
    @Test("CRC16-XMODEM and slots match Redis's reference values")
    func slots() {
        // The check value of CRC-16/XMODEM, and slots from the Redis Cluster specification and CLUSTER KEYSLOT.
        #expect(HashSlot.crc16(Array("123456789".utf8)) == 0x31C3)
        #expect(HashSlot.of("foo") == 12182)
        #expect(HashSlot.of("bar") == 5061)
        #expect(HashSlot.of("") == 0)
        // Hash tags: the first {…} with something inside.
        #expect(HashSlot.of("{user1000}.following") == HashSlot.of("{user1000}.followers"))
        #expect(HashSlot.of("{user1000}.following") == HashSlot.of("user1000"))
        #expect(HashSlot.of("foo{}{bar}") == Int(HashSlot.crc16(Array("foo{}{bar}".utf8)) & 0x3FFF), "an empty first tag hashes the whole key")
        #expect(HashSlot.of("foo{}{bar}") != HashSlot.of("bar"))
        #expect(HashSlot.of("foo{{bar}}zap") == HashSlot.of("{bar"))
        #expect(HashSlot.of("foo{bar}{zap}") == HashSlot.of("bar"))
        #expect(HashSlot.of("P:{u:alice}:conns") == HashSlot.of("P:{u:alice}:limit"))
    }

    @Test("a command goes to the slot of its keys, wherever its keys are")
    func routes() {
        #expect(CommandRoute(RedisCommand("GET", "foo")) == .slot(12182))
        #expect(CommandRoute(RedisCommand("ZADD", "{u:a}:conns", 1, "m")) == .slot(HashSlot.of("u:a")))
        #expect(CommandRoute(RedisCommand("EVALSHA", "abc", 2, "{x}a", "{x}b", "arg")) == .slot(HashSlot.of("x")))
        #expect(CommandRoute(RedisCommand("EVALSHA", "abc", 0, "arg")) == .anyNode)
        #expect(CommandRoute(RedisCommand("PING")) == .anyNode)
        #expect(CommandRoute(RedisCommand("TIME")) == .anyNode)
        #expect(CommandRoute(RedisCommand("SCRIPT", "LOAD", "return 1")) == .anyNode)
        #expect(CommandRoute(RedisCommand("PUBLISH", "foo", "m")) == .anyNode)
        #expect(CommandRoute(RedisCommand("SPUBLISH", "foo", "m")) == .slot(12182))
        #expect(CommandRoute(RedisCommand("MEMORY", "USAGE", "foo")) == .slot(12182))
        #expect(CommandRoute(RedisCommand("DEL", "{n:1}:info", "{n:1}:users")) == .slot(HashSlot.of("n:1")))
        #expect(CommandRoute(RedisCommand("MSET", "{t}a", "1", "{t}b", "2")) == .slot(HashSlot.of("t")))
    }

    @Test("keys in different slots are refused before sending, naming the keys and their slots")
    func crossSlot() {
        let command = RedisCommand("DEL", "foo", "bar")
        #expect(CommandRoute(command) == .crossSlot(keys: ["foo", "bar"], slots: [12182, 5061]))
        #expect(CommandRoute(RedisCommand("EVAL", "s", 2, "foo", "bar")) == .crossSlot(keys: ["foo", "bar"], slots: [12182, 5061]))
        // MSET's values are not keys.
        #expect(CommandRoute(RedisCommand("MSET", "foo", "bar", "foo", "x")) == .slot(12182))
        let error = ClusterRouter.crossSlot(command, keys: ["foo", "bar"], slots: [12182, 5061])
        #expect(error.code == .crossSlot)
        #expect(error.message.contains("foo → 12182") && error.message.contains("bar → 5061"), "\(error.message)")
        #expect(error.message.contains("hash tag"))
    }

    @Test("redis+cluster:// URLs give the seeds, credentials and refuse a database other than 0")
    func clusterURL() throws {
        let configuration = try RedisClientConfiguration(url: "redis+cluster://app:s%3Acret@10.0.0.1:7000,10.0.0.2,[::1]:7002")
        #expect(configuration.isCluster)
        #expect(configuration.clusterSeeds.map(\.description) == ["10.0.0.1:7000", "10.0.0.2:6379", "[::1]:7002"])
        #expect(configuration.username == "app")
        #expect(configuration.password == "s:cret")
        #expect(configuration.address == "10.0.0.1:7000")
        #expect(try RedisClientConfiguration(url: "redis+cluster://h:1/0").clusterSeeds.count == 1)
        #expect(try !RedisClientConfiguration(url: "redis://h:1").isCluster)
        for (url, reason) in [
            ("redis+cluster://h:1/2", "only database 0"), ("redis+cluster://", "missing host"), ("redis+cluster://h:1,,h:2", "empty seed"),
            ("redis+cluster://h:99999", "not in 1-65535"), ("redis+cluster://:hunter2@h:x", "not in 1-65535"),
            ("redis+cluster://h:1?x=1", "query"),
        ] {
            #expect {
                try RedisClientConfiguration(url: url)
            } throws: { error in
                let message = (error as? RedisError)?.message ?? ""
                return message.contains(reason) && !message.contains("hunter2")
            }
        }
    }

    @Test("CLUSTER SLOTS becomes a slot → primary map; an empty host is the node asked")
    func parsesSlots() throws {
        let reply = RESPValue.array([
            .array([.integer(0), .integer(5460), .array([.bulkString(Array("127.0.0.1".utf8)), .integer(7000), .bulkString(Array("id1".utf8))])]),
            .array([
                .integer(5461), .integer(16383), .array([.bulkString(Array("".utf8)), .integer(7001), .bulkString(Array("id2".utf8))]),
                .array([.bulkString(Array("127.0.0.1".utf8)), .integer(7004), .bulkString(Array("id5".utf8))]),
            ]),
        ])
        let map = try ClusterRouter.parseSlots(reply, askedHost: "10.1.1.1")
        #expect(map.primaries == ["127.0.0.1:7000", "10.1.1.1:7001"])
        #expect(map.owners[0] == "127.0.0.1:7000")
        #expect(map.owners[5460] == "127.0.0.1:7000")
        #expect(map.owners[5461] == "10.1.1.1:7001")
        #expect(map.owners[16383] == "10.1.1.1:7001")
        #expect(throws: RedisError.self) { try ClusterRouter.parseSlots(.array([.array([.integer(1)])]), askedHost: "h") }
        #expect(throws: RedisError.self) { try ClusterRouter.parseSlots(.bulkString(Array("x".utf8)), askedHost: "h") }
    }

    @Test("MOVED and ASK replies name the slot and the node")
    func redirections() {
        let moved = RedisError.serverReply("MOVED 3999 127.0.0.1:6381", address: "127.0.0.1:6380")
        #expect(moved.code == .moved)
        #expect(ClusterRouter.redirection(moved)! == (3999, "127.0.0.1:6381"))
        let ask = RedisError.serverReply("ASK 12 [::1]:7000", address: nil)
        #expect(ask.code == .ask)
        #expect(ClusterRouter.redirection(ask)! == (12, "[::1]:7000"))
        #expect(ClusterRouter.redirection(RedisError.serverReply("MOVED x y", address: nil)) == nil)
        #expect(RedisError.serverReply("TRYAGAIN Multiple keys request during rehashing of slot", address: nil).code == .tryAgain)
        #expect(RedisError.serverReply("CLUSTERDOWN The cluster is down", address: nil).code == .clusterDown)
        #expect(RedisError.serverReply("CROSSSLOT Keys in request don't hash to the same slot", address: nil).code == .crossSlot)
    }
}
