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
/// when ``unsubscribe()`` is called, or when the client shuts down.
public struct RedisSubscription: AsyncSequence, Sendable {
    public typealias Element = RedisPubSubMessage
    public typealias Failure = Never

    let stream: AsyncStream<RedisPubSubMessage>
    let id: UInt64
    let router: PubSubRouter

    /// Stops the subscription: the sequence finishes and channels nobody else listens to are unsubscribed.
    public func unsubscribe() {
        router.remove(id)
    }

    public func makeAsyncIterator() -> AsyncStream<RedisPubSubMessage>.Iterator {
        stream.makeAsyncIterator()
    }
}

extension RedisClient {
    /// Subscribes to `channels` and returns once the server confirmed every one of them.
    ///
    /// - Throws: ``RedisError`` with ``RedisError/Code/timeout`` when no confirmation came within the command timeout.
    public func subscribe(to channels: [String], timeout: Duration? = nil) async throws -> RedisSubscription {
        try await pubSub.subscribe(channels: channels, patterns: [], deadline: deadline(timeout), timeout: timeout ?? configuration.commandTimeout)
    }

    /// Subscribes to glob-style `patterns` (`PSUBSCRIBE`) and returns once the server confirmed every one of them.
    public func subscribe(toPatterns patterns: [String], timeout: Duration? = nil) async throws -> RedisSubscription {
        try await pubSub.subscribe(channels: [], patterns: patterns, deadline: deadline(timeout), timeout: timeout ?? configuration.commandTimeout)
    }
}
