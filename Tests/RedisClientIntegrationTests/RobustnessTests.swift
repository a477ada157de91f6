import Foundation
import RedisClient
import TestSupport
import Testing

/// Failure modes found in review: each one once made the client hang, storm or mix up replies.
@Suite("Robustness: set-up failures, refused subscriptions, deep replies, leaks", .timeLimit(.minutes(2)))
struct RobustnessTests {
    @Test("a handshake that times out (stalled link) does not poison later connections")
    func handshakeTimeoutRecovers() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--requirepass", "pw"])) { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            try await withClient(
                "redis://:pw@\(proxy.address)",
                configure: {
                    $0.connectTimeout = .milliseconds(500)  // sub-second: also checks the deadline keeps its fraction
                    $0.commandTimeout = .seconds(15)
                }
            ) { client throws in
                #expect(try await client.ping() == "PONG")
                let first = proxy.acceptedCount
                proxy.cut()
                let dropped = await eventually { proxy.connectionCount == 0 }
                #expect(dropped)
                proxy.stall()
                // The client reconnects into the stall: AUTH gets no answer, the set-up times out, and it tries
                // again: a second stalled connection proves the first set-up was given up.
                let retried = await eventually { proxy.acceptedCount >= first + 2 }
                #expect(retried)
                proxy.restore()
                #expect(try await client.ping() == "PONG")
                #expect(try await client.send("ECHO", "mine").string == "mine")
            }
            await proxy.stop()
        }
    }

    @Test("a server that greets with an error and hangs up (maxclients) gets backoff, and requests say why")
    func maxClients() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--maxclients", "2"])) { server throws in
            try await withClient(server.url) { holder throws in
                #expect(try await holder.ping() == "PONG")
                try await withClient(server.url) { secondHolder throws in
                    #expect(try await secondHolder.ping() == "PONG")
                    // Both slots taken: this client is greeted with "-ERR max number of clients reached" and a close.
                    try await withClient(server.url, configure: { $0.commandTimeout = .seconds(3) }) { client throws in
                        let error = await #expect(throws: RedisError.self) { try await client.ping() }
                        #expect(error?.message.contains("max number of clients") == true, "\(String(describing: error))")
                        await #expect(throws: RedisError.self) { try await client.ping() }
                    }
                }
                // One slot is free again for redis-cli.
                let attempts = try await statsCounter(server, "rejected_connections")
                #expect(attempts >= 2)
                #expect(attempts <= 25, "\(attempts) connection attempts in about 6 s")
            }
        }
    }

    @Test("a refused SUBSCRIBE (NOPERM) fails the subscription with Redis's error, without a reconnect storm")
    func refusedSubscription() async throws {
        try await RedisServer.withServer { server throws in
            _ = try await server.cli("ACL", "SETUSER", "nosub", "on", ">pw", "~*", "+@all", "resetchannels")
            let before = try await statsCounter(server, "total_connections_received")
            try await withClient("redis://nosub:pw@127.0.0.1:\(server.port)") { client throws in
                let error = await #expect(throws: RedisError.self) { try await client.subscribe(to: ["forbidden"]) }
                #expect(error?.serverErrorPrefix == "NOPERM")
                #expect(try await client.ping() == "PONG")
            }
            // The command connection, the pub/sub connection and this INFO's own connection.
            let opened = try await statsCounter(server, "total_connections_received") - before
            #expect(opened <= 3, "\(opened) connections")
        }
    }

    @Test("replies nested up to hiredis 0.14's depth 7 decode; deeper ones fail clearly and the client recovers")
    func nesting() async throws {
        let server = try await SharedRedisServer.get()
        try await withClient(server.url) { client throws in
            let seven = try await client.send("EVAL", "return {{{{{{{1}}}}}}}", 0)
            var value = seven
            var depth = 0
            while case .array(let inner) = value, let first = inner.first {
                depth += 1
                value = first
            }
            #expect(depth == 7)
            #expect(value == .integer(1))
            let error = await #expect(throws: RedisError.self) { try await client.send("EVAL", "return {{{{{{{{{{1}}}}}}}}}}", 0) }
            #expect(error?.message.contains("depth") == true, "\(String(describing: error))")
            #expect(try await client.ping() == "PONG")
        }
    }

    @Test("a client is freed once its run() ended")
    func noLeak() async throws {
        let server = try await SharedRedisServer.get()
        weak var weakClient: RedisClient?
        do {
            let client = RedisClient(configuration: try RedisClientConfiguration(url: server.url))
            weakClient = client
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                _ = try await client.subscribe(to: ["leak-check"])
                #expect(try await client.ping() == "PONG")
                group.cancelAll()
            }
        }
        let freed = await eventually(timeout: .seconds(5)) { weakClient == nil }
        #expect(freed)
    }
}
