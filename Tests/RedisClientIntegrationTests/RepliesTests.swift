import RedisClient
import TestSupport
import Testing

@Suite("Replies against a real redis-server", .timeLimit(.minutes(2)))
struct RepliesTests {
    @Test("bulk strings round-trip: empty, 1 MiB, binary with NUL, CRLF and invalid UTF-8")
    func bulkStrings() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            let megabyte = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            let binary: [UInt8] = [0x00, 0x0D, 0x0A, 0xFF, 0xC3, 0x28, 0x00, 0x0A]
            for (name, value) in [("empty", [UInt8]()), ("mib", megabyte), ("binary", binary)] {
                try await client.set(prefix + name, to: value)
                #expect(try await client.get(prefix + name) == .bulkString(value), "value \(name)")
            }
            #expect(try await client.send("STRLEN", prefix + "mib") == .integer(1 << 20))
        }
    }

    @Test("nil, negative integers, status replies and nested arrays")
    func scalarAndNested() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            #expect(try await client.get(prefix + "missing") == nil)
            #expect(try await client.send("INCRBY", prefix + "n", -42) == .integer(-42))
            #expect(try await client.send("SET", prefix + "s", "v") == .simpleString("OK"))
            let nested = try await client.send("EVAL", "return {1, {-2, {'x', {}}}, false}", 0)
            #expect(nested == .array([.integer(1), .array([.integer(-2), .array([.bulkString(Array("x".utf8)), .array([])])]), .null]))
            let withError = try await client.send("EVAL", "return {1, redis.error_reply('BOOM inside')}", 0)
            #expect(withError == .array([.integer(1), .error("BOOM inside")]))
        }
    }

    @Test("error replies are thrown with their prefix and the server's address")
    func serverErrors() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            try await client.send("LPUSH", prefix + "list", "a")
            let wrongType = await #expect(throws: RedisError.self) { try await client.send("GET", prefix + "list") }
            #expect(wrongType?.code == .wrongType)
            #expect(wrongType?.serverErrorPrefix == "WRONGTYPE")
            let unknown = await #expect(throws: RedisError.self) { try await client.send("NOSUCHCOMMAND", "x") }
            #expect(unknown?.code == .server)
            #expect(unknown?.serverErrorPrefix == "ERR")
            #expect(unknown?.message.contains(server.address) == true)
            // The connection is still usable after error replies.
            #expect(try await client.ping() == "PONG")
        }
    }

    @Test("an explicit pipeline returns each reply or error reply in order")
    func explicitPipeline() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            let replies = try await client.pipeline([
                RedisCommand("SET", prefix + "a", "1"),
                RedisCommand("INCR", prefix + "a"),
                RedisCommand("LPUSH", prefix + "a", "x"),
                RedisCommand("GET", prefix + "a"),
            ])
            #expect(replies.count == 4)
            #expect(try replies[0].get() == .simpleString("OK"))
            #expect(try replies[1].get() == .integer(2))
            #expect(throws: RedisError.self) { try replies[2].get() }
            #expect(try replies[3].get().string == "2")
            #expect(try await client.pipeline([]).isEmpty)
            // A batch of one takes the plain request path but keeps the batch's contract.
            let single = try await client.pipeline([RedisCommand("INCR", prefix + "a")])
            #expect(try single.map { try $0.get() } == [.integer(3)])
            let failing = try await client.pipeline([RedisCommand("LPUSH", prefix + "a", "x")])
            #expect(throws: RedisError.self) { try failing[0].get() }
        }
    }

    @Test("10,000 concurrent commands from many tasks each get their own reply")
    func manyConcurrentCallers() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            let mismatches = try await withThrowingTaskGroup(of: Int.self) { group in
                for index in 0..<10_000 {
                    group.addTask {
                        let reply =
                            index.isMultiple(of: 2)
                            ? try await client.send("ECHO", "\(prefix)\(index)").string
                            : try await client.send("INCRBY", "\(prefix)counter", index).int.map { _ in "\(prefix)\(index)" }
                        return reply == "\(prefix)\(index)" ? 0 : 1
                    }
                }
                return try await group.reduce(0, +)
            }
            #expect(mismatches == 0)
            // Sum of the odd numbers below 10,000: every INCRBY ran exactly once.
            #expect(try await client.get(prefix + "counter")?.int == 25_000_000)
        }
    }

    @Test("SELECT and CLIENT SETNAME are applied on connect")
    func databaseAndName() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url + "/2", configure: { $0.clientName = "fleetgate-test" }) { client throws in
            try await client.set(prefix + "db", to: "two")
            #expect(try await client.send("CLIENT", "GETNAME").string == "fleetgate-test")
        }
        try await withClient(server.url) { client throws in
            #expect(try await client.get(prefix + "db") == nil)
            try await client.send("SELECT", 2)
            #expect(try await client.get(prefix + "db")?.string == "two")
            try await client.delete(prefix + "db")
        }
    }
}
