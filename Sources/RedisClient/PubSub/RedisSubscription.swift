/// One message received on a subscription.
public struct RedisPubSubMessage: Sendable, Hashable {
    /// The channel it was published to.
    public var channel: String
    /// The pattern that matched, for pattern subscriptions.
    public var pattern: String?
    /// The payload, binary-safe.
    public var payload: [UInt8]

    /// The payload decoded as UTF-8.
    public var string: String { String(decoding: payload, as: UTF8.self) }
}

/// The messages of a subscription, in the order the server sent them.
///
/// Redis pub/sub is at-most-once: messages published while the connection is down are not delivered, and the client
/// re-subscribes automatically after a reconnect. The subscription ends (and unsubscribes) when iteration is cancelled,
/// when ``unsubscribe()`` is called, when the subscription and all its iterators are gone, or when the client shuts
/// down.
public struct RedisSubscription: AsyncSequence, Sendable {
    public typealias Element = RedisPubSubMessage
    public typealias Failure = Never

    let stream: AsyncStream<RedisPubSubMessage>
    let token: Token

    /// Unsubscribes when the last copy of the subscription or of its iterators goes away (the router keeps the
    /// stream's continuation, so the stream alone would never end).
    final class Token: Sendable {
        let id: UInt64
        weak let router: PubSubRouter?

        init(id: UInt64, router: PubSubRouter) {
            self.id = id
            self.router = router
        }

        deinit { router?.remove(id) }
    }

    init(stream: AsyncStream<RedisPubSubMessage>, id: UInt64, router: PubSubRouter) {
        self.stream = stream
        self.token = Token(id: id, router: router)
    }

    /// Stops the subscription: the sequence finishes and channels nobody else listens to are unsubscribed.
    public func unsubscribe() {
        token.router?.remove(token.id)
    }

    /// Iterates the messages; keeps the subscription alive while it exists.
    public struct AsyncIterator: AsyncIteratorProtocol {
        var base: AsyncStream<RedisPubSubMessage>.Iterator
        let token: Token

        public mutating func next() async -> RedisPubSubMessage? {
            await base.next()
        }

        public mutating func next(isolation actor: isolated (any Actor)?) async -> RedisPubSubMessage? {
            await base.next(isolation: actor)
        }
    }

    public func makeAsyncIterator() -> AsyncIterator {
        AsyncIterator(base: stream.makeAsyncIterator(), token: token)
    }
}

extension RedisClient {
    /// Subscribes to `channels` and returns once the server confirmed every one of them.
    ///
    /// In cluster mode this is sharded pub/sub (`SSUBSCRIBE` on the primary of the channels' slot, followed when the
    /// slot moves); the channels of one call must then share a slot (else ``RedisError/Code/crossSlot``), and
    /// messages come from ``publish(_:to:)`` (`SPUBLISH`).
    /// - Throws: ``RedisError`` with ``RedisError/Code/timeout`` when no confirmation came within the command timeout.
    public func subscribe(to channels: [String], timeout: Duration? = nil) async throws -> RedisSubscription {
        if let cluster {
            return try await cluster.pubSub.subscribe(
                channels: channels, deadline: deadline(timeout), timeout: timeout ?? configuration.commandTimeout)
        }
        return try await pubSub.subscribe(
            channels: channels, patterns: [], deadline: deadline(timeout), timeout: timeout ?? configuration.commandTimeout)
    }

    /// Subscribes to glob-style `patterns` (`PSUBSCRIBE`) and returns once the server confirmed every one of them.
    /// Not in cluster mode (sharded pub/sub has no patterns): ``RedisError/Code/invalidArgument``.
    public func subscribe(toPatterns patterns: [String], timeout: Duration? = nil) async throws -> RedisSubscription {
        if isCluster {
            throw RedisError(
                code: .invalidArgument, message: "pattern subscriptions are not available in Redis Cluster mode (sharded pub/sub has no patterns)")
        }
        return try await pubSub.subscribe(
            channels: [], patterns: patterns, deadline: deadline(timeout), timeout: timeout ?? configuration.commandTimeout)
    }
}
