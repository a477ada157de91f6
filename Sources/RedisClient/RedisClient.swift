import Logging
import NIOCore
import ServiceLifecycle

/// An async Redis client: many concurrent callers share one connection, and their commands leave in one write per
/// event-loop turn (automatic pipelining). Pub/sub runs on a second connection, opened at the first subscription.
///
/// The client does nothing until ``run()`` runs (it is a swift-service-lifecycle `Service`); requests made before
/// that, or while it reconnects, wait up to their deadline.
///
/// ```swift
/// let client = RedisClient(configuration: try RedisClientConfiguration(url: "redis://127.0.0.1:6379"))
/// try await withThrowingDiscardingTaskGroup { group in
///     group.addTask { try await client.run() }
///     try await client.set("greeting", to: "hello")
///     print(try await client.get("greeting")?.string ?? "nil")
///     group.cancelAll()
/// }
/// ```
public final class RedisClient: Sendable, Service {
    /// The configuration the client was created with.
    public let configuration: RedisClientConfiguration
    let connection: RedisConnection
    let pubSub: PubSubRouter
    let pubSubConnection: RedisConnection
    /// Cluster mode (``RedisClientConfiguration/clusterSeeds``): the slot map and one connection per primary.
    let cluster: ClusterRouter?
    let logger: Logger
    let events = ConnectEvents()

    /// How many connections the client has established since it started (commands and pub/sub, every cluster node).
    /// A change means a server was reached anew — a restart, a failover, a healed network cut — and its data may
    /// differ from what was written to it before (a restart without persistence, writes a promoted replica never got).
    public var connectionsEstablished: UInt64 { events.value }

    /// Creates a client. It connects when ``run()`` starts.
    public init(configuration: RedisClientConfiguration, logger: Logger = Logger(label: "fleetgate.redis")) {
        self.configuration = configuration
        self.logger = logger
        self.connection = RedisConnection(configuration: configuration, mode: .commands, logger: logger, events: events)
        self.cluster = configuration.isCluster ? ClusterRouter(configuration: configuration, logger: logger, events: events) : nil
        let router = PubSubRouter(address: configuration.address, logger: logger)
        self.pubSub = router
        self.pubSubConnection = RedisConnection(
            configuration: configuration,
            mode: .pubSub(
                onPush: { [weak router] in router?.push($0) }, onReady: { [weak router] in router?.connected($0) },
                awaitsSubscribeAnswer: { [weak router] in (router?.unansweredSubscribes ?? 0) > 0 }),
            logger: logger, events: events
        )
        router.attach(pubSubConnection)
    }

    /// Runs the client's connections until the task is cancelled or a graceful shutdown is triggered; then every
    /// waiting request fails with ``RedisError/Code/clientShutdown`` and the connections close.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                if let cluster = self.cluster {
                    group.addTask {
                        await withTaskCancellationHandler {
                            await cluster.run()
                        } onCancel: {
                            cluster.shutdown()
                        }
                    }
                } else {
                    group.addTask { await self.connection.run() }
                }
                group.addTask {
                    guard await self.pubSub.waitUntilNeeded() else { return }
                    await withDiscardingTaskGroup { pubSub in
                        pubSub.addTask { await self.pubSubConnection.run() }
                        pubSub.addTask { await self.pubSubConnection.keepAlive(every: max(self.configuration.commandTimeout, .seconds(1))) }
                    }
                }
            }
        }
        pubSub.shutdown()
    }

    /// The deadline for a request made now.
    func deadline(_ timeout: Duration?) -> NIODeadline {
        .now() + TimeAmount(timeout ?? configuration.commandTimeout)
    }

    /// Sends a command and returns its reply.
    ///
    /// - Parameter timeout: the request's deadline, counted from now; defaults to the configuration's command timeout.
    /// - Throws: ``RedisError``: the server's error reply (``RedisError/Code/server``, ``RedisError/Code/noScript``, …),
    ///   a ``RedisError/Code/timeout``, a lost connection, or shutdown.
    @discardableResult
    public func send(_ command: RedisCommand, timeout: Duration? = nil) async throws -> RESPValue {
        if let cluster { return try await cluster.send(command, deadline: deadline(timeout)) }
        return try await connection.send(command, deadline: deadline(timeout))
    }

    /// Sends a command given by name and arguments, e.g. `send("HSET", key, "field", value)`.
    @discardableResult
    public func send(_ name: String, _ arguments: any RESPArgumentConvertible...) async throws -> RESPValue {
        try await send(RedisCommand(name, arguments: arguments))
    }

    /// Queues a command without waiting for its reply (which is dropped, as is any failure). It leaves on the
    /// connection before every command sent after this call returns, so a following `send` can rely on its effect
    /// unless the connection fails — and then that `send` fails too.
    ///
    /// In cluster mode that order holds only towards later commands to the same primary (the same slot, or the same
    /// hash tag); a command whose keys span slots is refused with ``RedisError/Code/crossSlot``.
    public func sendWithoutReply(_ command: RedisCommand, timeout: Duration? = nil) throws(RedisError) {
        if let cluster {
            try cluster.enqueueDiscarding(command, deadline: deadline(timeout))
            return
        }
        try connection.enqueueDiscarding(command, deadline: deadline(timeout))
    }

    /// Sends commands back to back in one write and returns each one's reply or error reply, in order.
    ///
    /// A connection failure or the deadline fails the whole batch (thrown); an error *reply* fails only its element.
    ///
    /// In cluster mode the commands are split per primary, every part sent at once, and the replies put back in
    /// order; a command redirected (`MOVED`, `ASK`) is sent again on its own, and one whose keys span slots fails
    /// alone with ``RedisError/Code/crossSlot``. Order holds only among commands to the same primary.
    public func pipeline(_ commands: [RedisCommand], timeout: Duration? = nil) async throws -> [Result<RESPValue, RedisError>] {
        if let cluster { return try await cluster.pipeline(commands, deadline: deadline(timeout)) }
        guard commands.count == 1 else { return try await connection.send(batch: commands, deadline: deadline(timeout)) }
        // One command: the plain request path is cheaper than a batch; an error *reply* stays a result.
        do {
            return [.success(try await connection.send(commands[0], deadline: deadline(timeout)))]
        } catch let error as RedisError where error.serverErrorPrefix != nil {
            return [.failure(error)]
        }
    }
}

extension RedisClient {
    /// Whether the client runs in Redis Cluster mode.
    public var isCluster: Bool { cluster != nil }

    /// The primaries of the cluster's current slot map (`host:port`), loading it if needed; for one server, its
    /// address.
    public func primaries(timeout: Duration? = nil) async throws -> [String] {
        guard let cluster else { return [configuration.address] }
        return try await cluster.primaries(deadline: deadline(timeout))
    }

    /// Sends `command` to every primary (one server: to it), e.g. `SCRIPT LOAD` or `DBSIZE`; the replies per
    /// primary, in the map's order. Only a failure to load the map is thrown.
    public func sendToEveryPrimary(_ command: RedisCommand, timeout: Duration? = nil) async throws -> [(
        address: String, reply: Result<RESPValue, RedisError>
    )] {
        guard let cluster else {
            do {
                return [(configuration.address, .success(try await send(command, timeout: timeout)))]
            } catch let error as RedisError {
                return [(configuration.address, .failure(error))]
            }
        }
        return try await cluster.sendToEveryPrimary(command, deadline: deadline(timeout))
    }

    /// Every key matching `pattern`, by `SCAN` — on every primary in cluster mode — `count` keys per page; `body`
    /// gets each page as it arrives.
    public func scan(matching pattern: String, count: Int = 1_000, timeout: Duration? = nil, _ body: ([String]) async throws -> Void) async throws {
        for address in try await primaries(timeout: timeout) {
            var cursor = "0"
            repeat {
                let command = RedisCommand("SCAN", cursor, "MATCH", pattern, "COUNT", count)
                let page: RESPValue
                if let cluster {
                    page = try await cluster.send(command, to: address, deadline: deadline(timeout))
                } else {
                    page = try await connection.send(command, deadline: deadline(timeout))
                }
                guard let parts = page.array, parts.count == 2, let next = parts[0].string else {
                    throw RedisError(code: .protocolError, message: "SCAN at \(address) answered \(page)", address: address)
                }
                cursor = next
                let keys = parts[1].array?.compactMap(\.string) ?? []
                if !keys.isEmpty { try await body(keys) }
            } while cursor != "0"
        }
    }

    /// The command connection's queue depth: requests not yet written, and written requests awaiting a reply.
    /// For tests and diagnostics.
    public var debugQueueDepth: (pending: Int, inflight: Int) { connection.queueDepth }
}
