import RedisClient
import TestSupport
import Testing

@Suite("Pub/sub", .timeLimit(.minutes(2)))
struct PubSubTests {
    @Test("messages arrive in order, with binary payloads; pattern subscriptions name the pattern")
    func inOrder() async throws {
        let server = try await SharedRedisServer.get()
        let prefix = uniqueKeyPrefix()
        try await withClient(server.url) { client throws in
            let subscription = try await client.subscribe(to: [prefix + "events"])
            let patterned = try await client.subscribe(toPatterns: [prefix + "ev*"])
            for index in 0..<1_000 {
                #expect(try await client.publish("m\(index)", to: prefix + "events") == 2)
            }
            try await client.publish([0x00, 0xFF, 0x0D, 0x0A], to: prefix + "events")
            var received: [String] = []
            for await message in subscription {
                if received.count == 1_000 {
                    #expect(message.payload == [0x00, 0xFF, 0x0D, 0x0A])
                    break
                }
                received.append(message.string)
            }
            #expect(received == (0..<1_000).map { "m\($0)" })
            var iterator = patterned.makeAsyncIterator()
            let first = await iterator.next()
            #expect(first?.pattern == prefix + "ev*")
            #expect(first?.channel == prefix + "events")
            #expect(first?.string == "m0")
        }
    }

    @Test("unsubscribing stops delivery and the server drops the channel")
    func unsubscribe() async throws {
        let server = try await SharedRedisServer.get()
        let channel = uniqueKeyPrefix() + "c"
        try await withClient(server.url) { client throws in
            let subscription = try await client.subscribe(to: [channel])
            #expect(try await client.send("PUBSUB", "NUMSUB", channel).array?.last == .integer(1))
            subscription.unsubscribe()
            let dropped = try await eventually { try await client.send("PUBSUB", "NUMSUB", channel).array?.last == .integer(0) }
            #expect(dropped)
            var iterator = subscription.makeAsyncIterator()
            #expect(await iterator.next() == nil)
        }
    }

    @Test("a subscription dropped without being iterated unsubscribes (no leak)")
    func droppedSubscription() async throws {
        let server = try await SharedRedisServer.get()
        let channel = uniqueKeyPrefix() + "dropped"
        try await withClient(server.url) { client throws in
            do {
                let subscription = try await client.subscribe(to: [channel])
                #expect(try await client.send("PUBSUB", "NUMSUB", channel).array?.last == .integer(1))
                _ = subscription
            }
            let dropped = await eventually { (try? await client.send("PUBSUB", "NUMSUB", channel))?.array?.last == .integer(0) }
            #expect(dropped)
        }
    }

    @Test("a subscription resumes after the server restarts")
    func resumesAfterRestart() async throws {
        try await RedisServer.withServer { server throws in
            try await withClient(server.url, configure: { $0.commandTimeout = .seconds(20) }) { client throws in
                let subscription = try await client.subscribe(to: ["news"])
                var iterator = subscription.makeAsyncIterator()
                try await client.publish("before", to: "news")
                #expect(await iterator.next()?.string == "before")
                try await server.restart(keepData: false)
                // The client re-subscribes on its own; wait until the new server knows the subscriber.
                let back = await eventually { (try? await client.send("PUBSUB", "NUMSUB", "news"))?.array?.last == .integer(1) }
                // Without the subscriber, "after" reaches nobody and the wait for it below would never end.
                try #require(back)
                try await client.publish("after", to: "news")
                #expect(await iterator.next()?.string == "after")
            }
        }
    }
}
