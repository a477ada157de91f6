import Logging
import Metrics
import RedisClient
import ServiceLifecycle
import Synchronization

/// Fleet-wide per-user connection limits: one node of a gateway fleet.
///
/// Admission is one atomic Lua script in Redis; every entry is a lease the node keeps alive; dead nodes are swept;
/// a denial first cleans up zombies (this node's stale entries, other nodes' after a `verify`, dead nodes' entries)
/// and retries once. The limiter is a swift-service-lifecycle `Service`: it registers its node when ``run()``
/// starts, and a graceful shutdown releases every entry and deregisters the node. Cancellation stops it abruptly,
/// like a crash: peers sweep its entries within the node TTL.
///
/// ```swift
/// let limiter = ConnectionLimiter(redis: redis, configuration: .init(), logger: logger)
/// // in a ServiceGroup after the Redis client, or: group.addTask { try await limiter.run() }
/// switch try await limiter.admit(user: "alice", connection: "c1") {
/// case .admitted: ...              // open the socket; later: await limiter.release(connection: "c1")
/// case .denied(let denial): ...    // answer 429 with denial.description
/// }
/// ```
public final class ConnectionLimiter: Service, Sendable {
    struct Verification: Sendable {
        var waiting: Set<String>
        var continuation: CheckedContinuation<Void, Never>?
    }

    struct State: Sendable {
        /// The node's registration and lease: one state machine (see ``NodeLifecycle``).
        var life: NodeLifecycle
        var redisDown = false
        /// Since when admissions have met a full Redis (nil: the last one did not), so the warning is logged once.
        var redisFullSince: ContinuousClock.Instant?
        /// Nodes whose lease expired (they never come back); their members can be dropped at admission.
        var deadNodes: Set<String> = []
        /// Live nodes in the registry at the last good heartbeat (at least 1): the local fallback admits up to
        /// ⌈limit / liveNodes⌉ of a user by this node's own count (see the README's guarantee 11 for the bound).
        var liveNodes = 1
        /// Work the heartbeat hands to the maintenance loop, so heartbeats never wait for it.
        var pendingReadmission: String?
        var pendingSweep: Set<String> = []
        var sweeping = false
        /// A renewal round asked of the maintenance loop (after a forward jump of Redis's clock).
        var pendingRenewal = false
        /// An early renewal round the renewal loop runs at this time (once every peer has put its lease right after
        /// a jump of Redis's clock: a peer that saw this node dead meanwhile may have dropped its entries).
        var renewalDue: ContinuousClock.Instant?
        /// Redis's clock and this node's monotonic clock at the last heartbeat reply, to notice jumps of Redis's clock.
        var clockReading: ClockReading?
        /// After a jump of Redis's clock: no sweep and no node counted dead until then (live nodes need a heartbeat
        /// to put their leases right).
        var sweepsSuspendedUntil: ContinuousClock.Instant?
        var maintenanceWaiter: CheckedContinuation<Void, Never>?
        var table = LocalTable()
        /// Connections whose release failed, to retry.
        var releaseRetries: Set<String> = []
        /// Members that failed admissions may have left in Redis, by connection id (removed by the retry loop).
        var orphans: [String: Orphan] = [:]
        var verifications: [String: Verification] = [:]
        var undeliveredKicks: [UndeliveredKick] = []
        /// Where the embedder listens (``announce(address:)``), for operators; overrides the configuration's.
        var address: String?
        var subscription: RedisSubscription?
        /// The node id whose control channel is subscribed.
        var listeningAs: String?
        var stopWaiter: CheckedContinuation<Void, Never>?
        /// The current node incarnation id.
        var node: String { life.node }
        /// Dead node ids to pass to the scripts.
        var deadList: [String] { Array(deadNodes.union(life.deadIncarnations)) }
    }

    /// A kick message no node received, to publish again.
    struct UndeliveredKick: Sendable {
        var owner: String
        var user: UserID
        var message: String
        var attemptsLeft: Int
    }

    /// A member an unfinished admission may have written.
    struct Orphan: Sendable {
        var user: UserID
        var member: String
    }

    /// The configuration the limiter was created with.
    public let configuration: LimiterConfiguration
    let redis: RedisClient
    let logger: Logger
    let keys: LimiterKeys
    let scripts = LimiterScripts.shared
    let metrics: LimiterMetrics
    let state: Mutex<State>
    let clock = ContinuousClock()
    /// Opens at the first registration (or when ``run()`` ends): admissions right after start wait for it.
    let firstRegistration = Latch()
    /// Opens once the node is first registered and listening on its control channel (or when ``run()`` ends).
    let firstReady = Latch()
    /// The embedder's liveness probe (see ``useProbe(_:)``).
    private let probeSlot = Mutex<(any ConnectionProbe)?>(nil)
    private let eventStream: AsyncStream<LimiterEvent>
    let eventContinuation: AsyncStream<LimiterEvent>.Continuation

    /// Creates a limiter node on top of a Redis client (which must be running too). It registers when ``run()`` starts.
    public init(redis: RedisClient, configuration: LimiterConfiguration = .init(), logger: Logger = Logger(label: "fleetgate.limiter")) {
        self.redis = redis
        self.configuration = configuration
        self.keys = LimiterKeys(prefix: configuration.keyPrefix)
        self.metrics = LimiterMetrics(factory: configuration.metricsFactory)
        self.state = Mutex(
            State(
                life: NodeLifecycle(
                    node: ConnectionIDs.random(length: 8), heartbeatInterval: configuration.heartbeat.interval,
                    nodeTTL: configuration.heartbeat.nodeTTL, onLeaseLoss: configuration.policies.onLeaseLoss)))
        self.logger = logger
        (eventStream, eventContinuation) = AsyncStream.makeStream(bufferingPolicy: .unbounded)
    }

    /// What the gateway must act on: kicks, lease loss, fencing, Redis down and back. One consumer.
    public var events: AsyncStream<LimiterEvent> { eventStream }

    /// Installs the liveness probe the emergency cleanup runs on this node's silent connections of a user at the
    /// limit (see ``ConnectionProbe``), or removes it (`nil`). Call it before ``run()``; without one, connections
    /// open here always count as alive. The limiter holds the probe strongly: an embedder whose probe holds the
    /// limiter removes it when it stops (the ``Gateway`` does).
    public func useProbe(_ probe: (any ConnectionProbe)?) {
        probeSlot.withLock { $0 = probe }
    }

    var probe: (any ConnectionProbe)? { probeSlot.withLock { $0 } }

    /// The current node incarnation id (it changes when the node re-registers after losing its lease).
    public var nodeID: String { state.withLock { $0.node } }

    /// Whether the node is registered in Redis, its lease is current and it listens on its control channel (for
    /// readiness checks: only then can other nodes ask it to verify or close connections).
    public var isRegistered: Bool {
        state.withLock { $0.life.isCurrent && $0.listeningAs == $0.node }
    }

    /// Waits until the node is first registered and listening on its control channel (see ``isRegistered``), at
    /// most `timeout`; returns at once when ``run()`` has ended. For a gateway that announces itself only once it can
    /// admit for real.
    /// - Returns: whether the node is registered now.
    @discardableResult
    public func waitUntilRegistered(timeout: Duration) async -> Bool {
        await firstReady.wait(timeout: timeout)
        return isRegistered
    }

    /// Tells operators where this node can be reached (e.g. `10.0.0.5:8080`, once the listening port is known):
    /// written to the node's hash in Redis now if registered, and at every registration.
    public func announce(address: String) async {
        let (node, registered) = state.withLock { state -> (String, Bool) in
            state.address = address
            return (state.node, state.life.registered)
        }
        guard registered else { return }
        _ = try? await redis.send(RedisCommand("HSET", keys.node(node), "address", address), timeout: configuration.admissionTimeout)
    }

    /// Nodes holding a current lease at this node's last good heartbeat (at least 1): the local fallback's share
    /// of a limit is ⌈limit / liveNodeCount⌉.
    public var liveNodeCount: Int { state.withLock { $0.liveNodes } }

    /// Connections open on this node.
    public var localConnectionCount: Int { state.withLock { $0.table.openCount } }

    /// A new random connection id (12 base62 characters) for gateways that have none of their own.
    public static func makeConnectionID() -> String { ConnectionIDs.random(length: 12) }

    var nodeTTLMilliseconds: Int64 { configuration.heartbeat.nodeTTL.milliseconds }
    var leaseMilliseconds: Int64 { configuration.lease.ttl.milliseconds }
    var policyArgument: String { configuration.policies.overflow == .evictOldest ? "evict" : "reject" }
    var dryRunArgument: String { configuration.policies.dryRun ? "1" : "0" }

    /// Removes a connection from the local table, inside `state`'s lock. When it was its user's last connection here,
    /// the user leaves this node's users index: the SREM is queued on the Redis connection before the lock is released,
    /// so the SADD of an admission of the same user that starts afterwards is written after it. Best effort: a user
    /// left in the index only costs a sweep a look, and the index ends with the node. (A release pipelines its own
    /// SREM with the release script instead.)
    @discardableResult
    func removeLocally(_ id: String, from state: inout State) -> LocalTable.Connection? {
        guard let (connection, last) = state.table.remove(id) else { return nil }
        if last, state.life.registered {
            let leave = RedisCommand("SREM", keys.users(state.node), connection.user.escaped)
            try? redis.sendWithoutReply(leave, timeout: configuration.admissionTimeout)
        }
        return connection
    }

    func emit(_ event: LimiterEvent) {
        eventContinuation.yield(event)
    }

    func nodeLogger(_ node: String) -> Logger {
        var logger = logger
        logger[metadataKey: LogKey.node] = .string(node)
        return logger
    }

    // MARK: Life cycle

    /// Registers the node, then heartbeats, renews leases, sweeps dead nodes and answers control messages until a
    /// graceful shutdown (which releases every entry and deregisters) or cancellation (which just stops).
    public func run() async throws {
        try configuration.validate()
        if probe != nil, configuration.verifyTimeout < configuration.probe.timeout + .milliseconds(250) {
            logger.warning(
                "verifyTimeout is shorter than probe.timeout + 250 ms: other nodes' probes may not finish before a denial",
                metadata: ["fleetgate.verify-timeout": "\(configuration.verifyTimeout)", "fleetgate.probe-timeout": "\(configuration.probe.timeout)"])
        }
        let now = clock.now
        state.withLock { $0.life.start(at: now) }
        await withGracefulShutdownHandler {
            await withDiscardingTaskGroup { group in
                group.addTask { await self.heartbeatLoop() }
                group.addTask { await self.maintenanceLoop() }
                group.addTask { await self.leaseMonitorLoop() }
                group.addTask { await self.renewalLoop() }
                group.addTask { await self.releaseRetryLoop() }
                group.addTask { await self.controlLoop() }
                group.addTask { await self.checkEvictionPolicy() }
                await self.waitForStop()
                group.cancelAll()
            }
        } onGracefulShutdown: {
            self.shutdownGracefully()
        }
        let graceful = state.withLock { $0.life.shutdownRequested }
        if graceful && !Task.isCancelled { await drain() }
        state.withLock { $0.life.stop() }
        firstRegistration.open()
        firstReady.open()
        eventContinuation.finish()
    }

    /// Once registered: warns when Redis evicts keys under memory pressure. Every limiter key has a TTL, so even the
    /// `volatile-*` policies can drop entries (a user then exceeds the limit) or a node's registration.
    func checkEvictionPolicy() async {
        // Until the node stops (run() cancels this task then).
        guard await firstRegistration.wait(timeout: .seconds(365 * 86_400)), !Task.isCancelled,
            let reply = try? await redis.send(RedisCommand("CONFIG", "GET", "maxmemory-policy"), timeout: configuration.heartbeat.interval),
            let policy = reply.strings(from: 1).first
        else { return }
        if let message = Self.evictionWarning(policy: policy) {
            nodeLogger(nodeID).warning("\(message)", metadata: ["fleetgate.redis": "\(redis.configuration.address)"])
        }
    }

    /// The warning for a `maxmemory-policy`, nil for `noeviction` (the one the limiter needs).
    static func evictionWarning(policy: String) -> String? {
        guard policy != "noeviction" else { return nil }
        return
            "Redis evicts keys when full (maxmemory-policy \(policy)): entries can vanish and users exceed their limit; set maxmemory-policy noeviction (a full Redis then refuses new connections with 503 redis_full and keeps the existing ones)"
    }

    /// Ends ``run()`` gracefully: every entry of this node is released and the node deregistered.
    public func shutdownGracefully() {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            _ = state.life.requestShutdown()
            defer { state.stopWaiter = nil }
            return state.stopWaiter
        }
        waiter?.resume()
    }

    private func waitForStop() async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let stopNow = state.withLock { state -> Bool in
                    if state.life.shutdownRequested || Task.isCancelled { return true }
                    state.stopWaiter = continuation
                    return false
                }
                if stopNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                defer { state.stopWaiter = nil }
                return state.stopWaiter
            }
            waiter?.resume()
        }
    }

    /// Releases every entry of this node and removes the node from the registry.
    private func drain() async {
        let (node, registered, connections) = state.withLock { state in
            (state.node, state.life.registered, state.table.connections.filter { $0.value.node != nil })
        }
        guard registered else { return }
        let releases: [PipelineStep] = connections.map { id, connection in
            .script(scripts.release, keys: [keys.conns(connection.user), keys.since(connection.user)], arguments: ["\(connection.node!):\(id)"])
        }
        let deregistration: [PipelineStep] = [
            .command(RedisCommand("DEL", keys.users(node), keys.node(node))),
            .command(RedisCommand("ZREM", keys.nodes, node)),
            .script(scripts.sweeperLock, keys: [keys.sweeper], arguments: [node, "release"]),
        ]
        var failed = 0
        // In slices, so a large node neither builds one giant write nor loses everything to one deadline.
        for start in stride(from: 0, to: releases.count, by: 1000) {
            do {
                let results = try await redis.pipeline(Array(releases[start..<min(start + 1000, releases.count)]), timeout: .seconds(5))
                failed += results.filter { if case .failure = $0 { return true } else { return false } }.count
            } catch {
                failed += min(1000, releases.count - start)
            }
        }
        do {
            _ = try await redis.pipeline(deregistration, timeout: .seconds(5))
            nodeLogger(node).info(
                "node drained and deregistered", metadata: ["fleetgate.released": "\(connections.count - failed)", "fleetgate.failed": "\(failed)"])
        } catch {
            nodeLogger(node).info("deregistration failed; peers will sweep this node", metadata: [LogKey.error: "\(error)"])
        }
        state.withLock { state in
            state.life.deregistered()
            for id in connections.keys { state.table.remove(id) }
        }
        metrics.activeConnections.record(0)
    }

    /// Sleeps `duration`; `false` when cancelled.
    func pause(_ duration: Duration) async -> Bool {
        do {
            try await Task.sleep(for: duration)
            return true
        } catch {
            return false
        }
    }
}
