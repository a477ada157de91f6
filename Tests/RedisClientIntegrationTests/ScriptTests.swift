import RedisClient
import TestSupport
import Testing

@Suite("Scripts", .timeLimit(.minutes(2)))
struct ScriptTests {
    @Test("EVALSHA falls back to EVAL transparently after SCRIPT FLUSH (NOSCRIPT)")
    func noScriptFallback() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url) { client throws in
                let script = RedisScript("return redis.call('INCRBY', KEYS[1], ARGV[1])")
                #expect(try await client.load(script) == script.sha1)
                #expect(try await client.eval(script, keys: ["k"], arguments: [5]) == .integer(5))
                try await client.send("SCRIPT", "FLUSH")
                #expect(try await client.send("SCRIPT", "EXISTS", script.sha1) == .array([.integer(0)]))
                #expect(try await client.eval(script, keys: ["k"], arguments: [2]) == .integer(7))
                // EVAL cached it again: the next call is a plain EVALSHA hit.
                #expect(try await client.send("SCRIPT", "EXISTS", script.sha1) == .array([.integer(1)]))
            }
        }
    }

    @Test("a script's own error reply is thrown, not retried")
    func scriptError() async throws {
        let server = try await SharedRedisServer.get()
        try await withClient(server.url) { client throws in
            let script = RedisScript("return redis.error_reply('LIMIT reached for test')")
            let error = await #expect(throws: RedisError.self) { try await client.eval(script) }
            #expect(error?.serverErrorPrefix == "LIMIT")
        }
    }
}
