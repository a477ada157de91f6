import ConnectionLimiter
import Logging
import RedisClient
import TestSupport
import Testing

/// One limiter node with its own Redis client (its own connection), as a separate gateway process would have.
final class LimiterNode: Sendable {
    let client: RedisClient
    let limiter: ConnectionLimiter
    let task: Task<Void, Never>

    init(url: String, configuration: LimiterConfiguration) throws {
        var redisConfiguration = try RedisClientConfiguration(url: url)
        redisConfiguration.commandTimeout = .seconds(5)
        redisConfiguration.reconnectBackoff = .init(initialDelay: .milliseconds(20), maximumDelay: .milliseconds(200))
        let client = RedisClient(configuration: redisConfiguration, logger: Logger(label: "test.redis"))
        let limiter = ConnectionLimiter(redis: client, configuration: configuration, logger: Logger(label: "test.limiter"))
        self.client = client
        self.limiter = limiter
        task = Task {
            await withDiscardingTaskGroup { group in
                group.addTask { try? await client.run() }
                try? await limiter.run()
                group.cancelAll()
            }
        }
    }

    /// Starts a node and waits until it is registered.
    static func start(_ url: String, _ configuration: LimiterConfiguration) async throws -> LimiterNode {
        let node = try LimiterNode(url: url, configuration: configuration)
        let registered = await eventually { node.limiter.isRegistered }
        try #require(registered, "limiter node did not register at \(url)")
        return node
    }

    /// Graceful shutdown: releases and deregisters, then stops the client.
    func stop() async {
        limiter.shutdownGracefully()
        await task.value
    }

    /// A crash: no release, no deregistration.
    func crash() async {
        task.cancel()
        await task.value
    }
}

/// A limiter configuration for tests: a unique key prefix and short timings (1 s node TTL, 3 s leases).
func testConfiguration(prefix: String = uniqueKeyPrefix(), limit: Int = 20, _ adjust: (inout LimiterConfiguration) -> Void = { _ in })
    -> LimiterConfiguration
{
    var configuration = LimiterConfiguration(nodeName: "test")
    configuration.keyPrefix = String(prefix.dropLast())
    configuration.defaultLimit = limit
    configuration.heartbeat.interval = .milliseconds(200)
    configuration.heartbeat.nodeTTL = .seconds(1)
    configuration.lease.ttl = .seconds(3)
    configuration.lease.renewInterval = .seconds(1)
    // The whole suite shares two cores: round trips can take far longer than in production.
    configuration.admissionTimeout = .seconds(5)
    adjust(&configuration)
    return configuration
}

/// Runs `body` with a plain client (for inspecting and seeding Redis directly).
func withClient<T: Sendable>(_ url: String, _ body: (RedisClient) async throws -> T) async throws -> T {
    let client = RedisClient(configuration: try RedisClientConfiguration(url: url))
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await client.run() }
        defer { group.cancelAll() }
        return try await body(client)
    }
}

extension ConnectionLimiter {
    /// Admits and expects admission.
    @discardableResult
    func mustAdmit(_ user: String, _ connection: String, limit: Int? = nil, sourceLocation: SourceLocation = #_sourceLocation) async throws
        -> Admission
    {
        let decision = try await admit(user: user, connection: connection, limit: limit)
        guard case .admitted(let admission) = decision else {
            Issue.record("\(connection) of \(user) was denied: \(decision)", sourceLocation: sourceLocation)
            throw LimiterError(code: .unexpectedReply, message: "denied")
        }
        return admission
    }
}

/// A limiter's ``ConnectionLimiter/events`` whose every wait is bounded: an event that never comes (a kick published
/// while its node re-subscribes, a lease Redis still held) fails the test after `timeout` instead of hanging the run.
struct LimiterEvents: Sendable {
    private enum Wait: Sendable {
        case event(LimiterEvent?)
        case timedOut
        case cancelled
    }

    let stream: AsyncStream<LimiterEvent>
    let timeout: Duration

    /// The stream buffers every event since the limiter was created, so nothing is missed by starting to read late.
    init(_ limiter: ConnectionLimiter, timeout: Duration = .seconds(30)) {
        stream = limiter.events
        self.timeout = timeout
    }

    /// The next event; nil when the limiter stopped, or (recording an issue) when none came within the timeout. A
    /// timed-out wait finishes the stream (cancelling an `AsyncStream` iteration does), so later calls return nil.
    func next(sourceLocation: SourceLocation = #_sourceLocation) async -> LimiterEvent? {
        let (stream, timeout) = (stream, timeout)
        return await withTaskGroup(of: Wait.self) { group in
            group.addTask {
                // One reader at a time: each call makes a fresh iterator over the same buffered stream.
                var iterator = stream.makeAsyncIterator()
                return .event(await iterator.next())
            }
            group.addTask {
                guard (try? await Task.sleep(for: timeout)) != nil else { return .cancelled }
                return .timedOut
            }
            defer { group.cancelAll() }
            while let wait = await group.next() {
                switch wait {
                case .event(let event):
                    return event
                case .timedOut:
                    Issue.record("no limiter event within \(timeout)", sourceLocation: sourceLocation)
                    return nil
                case .cancelled:
                    continue
                }
            }
            return nil
        }
    }
}

/// Whether `node`'s lease in the registry has run out on Redis's clock (or the node is gone), as heartbeat.lua
/// decides it.
func leaseHasRunOut(_ redis: RedisClient, _ configuration: LimiterConfiguration, node: String) async throws -> Bool {
    let script = """
        local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
        if not score then return 1 end
        local t = redis.call('TIME')
        return tonumber(score) <= tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) and 1 or 0
        """
    return try await redis.send("EVAL", script, 1, "\(configuration.keyPrefix):nodes", node).int == 1
}

extension LimiterEvents {
    /// The next kick, skipping other events (Redis down/up under load, re-registrations); nil as ``next()``.
    func nextKick(sourceLocation: SourceLocation = #_sourceLocation) async -> LimiterEvent? {
        while let event = await next(sourceLocation: sourceLocation) {
            if case .kick = event { return event }
        }
        return nil
    }
}

/// The key of a user's connection set for a test prefix (`t:abc:` → `t:abc:{u:alice}:conns`).
func connsKey(_ configuration: LimiterConfiguration, _ user: String) -> String {
    "\(configuration.keyPrefix):{u:\(user)}:conns"
}
