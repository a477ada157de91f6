import Foundation
import TestSupport
import Testing

@testable import RedisClient

/// Deadlines, ordering and pub/sub refusals: cases found in review, each failed before its fix.
@Suite("Deadlines, ordering and refusals", .timeLimit(.minutes(2)))
struct OrderingTests {
    @Test("a refused SUBSCRIBE fails only the subscriptions to its topics, not another one waiting at the same time")
    func refusalIsAttributed() async throws {
        try await RedisServer.withServer { server throws in
            _ = try await server.cli("ACL", "SETUSER", "limited", "on", ">pw", "~*", "+@all", "resetchannels", "&ok-*")
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            try await withClient("redis://limited:pw@\(proxy.address)") { client throws in
                _ = try await client.subscribe(to: ["ok-warm"], timeout: .seconds(10))  // the pub/sub connection is up
                // Held by the proxy until both SUBSCRIBEs are written, forbidden first: its refusal then arrives while
                // the permitted one also waits.
                proxy.stall()
                let forbidden = Task { try await client.subscribe(to: ["forbidden"], timeout: .seconds(10)) }
                #expect(await eventually { client.pubSub.unansweredSubscribes == 1 })
                let permittedTask = Task { try await client.subscribe(to: ["ok-a"], timeout: .seconds(10)) }
                #expect(await eventually { client.pubSub.unansweredSubscribes == 2 })
                proxy.restore()
                let permitted = try await permittedTask.value
                let refusal = await #expect(throws: RedisError.self) { _ = try await forbidden.value }
                #expect(refusal?.serverErrorPrefix == "NOPERM", "\(String(describing: refusal))")
                #expect(try await client.publish("hello", to: "ok-a") == 1)
                var iterator = permitted.makeAsyncIterator()
                #expect(await iterator.next()?.string == "hello")
            }
            await proxy.stop()
        }
    }

    @Test("a short request timing out behind a long one does not close the connection under the long one")
    func longRequestSurvivesShortTimeouts() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url, configure: { $0.commandTimeout = .seconds(1) }) { client throws in
                let blocked = Task { try await client.send(RedisCommand("BLPOP", "ordering:empty", 3), timeout: .seconds(10)) }
                #expect(await eventually { client.debugQueueDepth.inflight == 1 })
                // Written behind the BLPOP: no reply before its 1 s deadline.
                let ping = await #expect(throws: RedisError.self) { try await client.send(RedisCommand("PING")) }
                #expect(ping?.code == .timeout)
                #expect(try await blocked.value.isNull, "BLPOP should time out on the server (nil after 3 s)")
                #expect(try await client.ping() == "PONG")
            }
        }
    }

    @Test("a command sent without a reply that expires unsent takes the commands queued behind it along, with a clear error")
    func discardedCommandKeepsItsOrder() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url, configure: { $0.commandTimeout = .seconds(10) }) { client throws in
                try await client.ping()
                await server.kill()
                // Until the client has seen the connection go, a command could still be written to the dead socket.
                let noticed = await clientNoticedLoss(client)
                try #require(noticed)
                try client.sendWithoutReply(RedisCommand("SET", "ordering:k", "first"), timeout: .milliseconds(300))
                let later = await #expect(throws: RedisError.self) { try await client.send(RedisCommand("GET", "ordering:k")) }
                #expect(later?.code == .connectionLost, "\(String(describing: later))")
                #expect(later?.message.contains("queued before it") == true, "\(String(describing: later))")
            }
        }
    }

    @Test("a black-holed pub/sub link is noticed by its keepalive PING: the client reconnects and the subscription works again")
    func pubSubKeepalive() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            try await withClient(proxy.url, configure: { $0.commandTimeout = .seconds(1) }) { client throws in
                // The first connection may be slow on a loaded machine: a subscription deadline of its own.
                let subscription = try await client.subscribe(to: ["news"], timeout: .seconds(10))
                let accepted = proxy.acceptedCount
                proxy.stall()
                // Keepalive every second, stuck after a second without a reply: a new connection within seconds.
                #expect(await eventually(timeout: .seconds(20)) { proxy.acceptedCount > accepted }, "the dead pub/sub link was never replaced")
                proxy.restore()
                var iterator = subscription.makeAsyncIterator()
                let resubscribed = try await eventually { try await server.cli("PUBSUB", "NUMSUB", "news").hasSuffix("1") }
                #expect(resubscribed)
                _ = try await server.cli("PUBLISH", "news", "back")
                var received: [String] = []
                while let message = await iterator.next() {
                    received.append(message.string)
                    if message.string == "back" { break }
                }
                #expect(received.last == "back")
            }
            await proxy.stop()
        }
    }

    @Test("a subscription waiting for its confirmation ends when its task is cancelled, not at its deadline")
    func cancelledSubscription() async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            try await withClient(proxy.url) { client throws in
                _ = try await client.subscribe(to: ["warm"], timeout: .seconds(10))
                proxy.stall()
                let waiting = Task { try await client.subscribe(to: ["never-confirmed"], timeout: .seconds(600)) }
                waiting.cancel()
                // Were it to wait for its deadline, the suite's two-minute limit would fail the test.
                let error = await #expect(throws: RedisError.self) { _ = try await waiting.value }
                #expect(error?.code == .cancelled, "\(String(describing: error))")
                proxy.restore()
            }
            await proxy.stop()
        }
    }

    @Test("a practically infinite timeout is a timeout, not an arithmetic overflow")
    func hugeTimeout() async throws {
        let server = try await SharedRedisServer.get()
        try await withClient(server.url) { client throws in
            #expect(try await client.send(RedisCommand("PING"), timeout: .seconds(10_000_000_000)).string == "PONG")
        }
    }
}
