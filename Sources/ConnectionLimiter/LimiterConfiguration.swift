import Metrics

/// How a ``ConnectionLimiter`` node behaves. Every node of a fleet should use the same prefix, TTLs and policies.
public struct LimiterConfiguration: Sendable {
    /// Node liveness: how often a node proves it is alive, and how long that proof lasts.
    public struct Heartbeat: Sendable, Hashable {
        /// Time between heartbeats. Defaults to 1 second.
        public var interval: Duration = .seconds(1)
        /// A node whose last heartbeat is older than this is dead; its entries are swept. Defaults to 5 seconds.
        public var nodeTTL: Duration = .seconds(5)
        /// Creates the defaults.
        public init() {}
    }

    /// Connection leases: the backstop that expires entries nobody owns any more.
    ///
    /// Every stale entry the fleet can make has a faster remover than the lease — the sweeper for a dead node's
    /// entries (within about ``Heartbeat/nodeTTL``), the release retry and the orphan cleanup for a live node's
    /// unconfirmed writes (every second once Redis answers), the emergency cleanup with its verify and probe at a
    /// denial (within ``LimiterConfiguration/verifyTimeout``) — so the lease is long and its renewal rare; entries
    /// lost by Redis come back at the early renewal that follows every reconnect, not at the next interval. What
    /// only the lease ends is listed in the README (guarantees): double faults such as a cluster node crashing
    /// between its index write and its admission.
    public struct Lease: Sendable, Hashable {
        /// Lease of each connection entry. Defaults to 5 minutes.
        public var ttl: Duration = .seconds(300)
        /// Time between renewals of every open connection's lease (early rounds come after a reconnect). Defaults to
        /// 2 minutes.
        public var renewInterval: Duration = .seconds(120)
        /// Creates the defaults.
        public init() {}
    }

    /// The liveness probe of the emergency cleanup (used when the embedder supplies a ``ConnectionProbe``).
    public struct Probe: Sendable, Hashable {
        /// How long a probed client has to answer (a WebSocket pong, in the gateway). Defaults to 500 ms.
        public var timeout: Duration = .milliseconds(500)
        /// Creates the defaults.
        public init() {}
    }

    /// What to do when a user is at the limit.
    public enum OverflowPolicy: String, Sendable, Hashable, CaseIterable {
        /// Deny the new connection (the default).
        case rejectNew
        /// Admit it and evict the oldest admitted connection of the user; its node is told to close it.
        case evictOldest
    }

    /// What to do when Redis cannot be reached at admission.
    public enum RedisDownPolicy: String, Sendable, Hashable, CaseIterable {
        /// Admit up to the limit counting this node's connections only (fail open per node; the default).
        case local
        /// Refuse the connection (``LimiterError/Code/redisUnavailable``); the gateway answers "try again later".
        case reject
    }

    /// What to do when this node may have lost its lease (Redis unreachable for about a node TTL).
    public enum LeaseLossPolicy: String, Sendable, Hashable, CaseIterable {
        /// Keep connections open; re-register as a new incarnation and re-admit them when Redis answers again.
        /// Connections denied then are closed (the default).
        case keep
        /// Close every connection before the lease can expire, so the fleet-wide limit is never exceeded.
        case close
    }

    /// Policies.
    public struct Policies: Sendable, Hashable {
        /// Defaults to ``OverflowPolicy/rejectNew``.
        public var overflow: OverflowPolicy = .rejectNew
        /// Defaults to ``RedisDownPolicy/local``.
        public var onRedisDown: RedisDownPolicy = .local
        /// Defaults to ``LeaseLossPolicy/keep``.
        public var onLeaseLoss: LeaseLossPolicy = .keep
        /// Shadow mode: admit everyone, record what the limit would have denied. Defaults to `false`.
        public var dryRun: Bool = false
        /// Creates the defaults.
        public init() {}
    }

    /// Key prefix `P` of every key. Defaults to `fg`.
    public var keyPrefix: String = "fg"
    /// Limit when neither the call nor a Redis override gives one. Defaults to 20.
    public var defaultLimit: Int = 20
    /// Node name in the registry (for operators). Defaults to the host name.
    public var nodeName: String
    /// Address shown in the registry (for operators), e.g. `10.0.0.5:8080`. Defaults to empty.
    public var nodeAddress: String = ""
    /// Heartbeat settings.
    public var heartbeat = Heartbeat()
    /// Lease settings.
    public var lease = Lease()
    /// Policies.
    public var policies = Policies()
    /// The liveness probe's settings.
    public var probe = Probe()
    /// How long a denial waits for other nodes to verify their entries (and probe their silent connections) before
    /// the one retry; with a probe, at least ``Probe/timeout`` + 250 ms (a node warns at start otherwise). Defaults
    /// to 1 second.
    public var verifyTimeout: Duration = .seconds(1)
    /// Deadline of one admission round trip; past it Redis counts as down for this admission. Defaults to 1 second.
    public var admissionTimeout: Duration = .seconds(1)
    /// Where metrics go. Defaults to the process-wide `MetricsSystem.factory`.
    public var metricsFactory: any MetricsFactory = MetricsSystem.factory

    /// Creates a configuration with defaults.
    public init(nodeName: String = LimiterConfiguration.hostName()) {
        self.nodeName = nodeName
    }

    /// This machine's host name.
    public static func hostName() -> String {
        var buffer = [CChar](repeating: 0, count: 256)
        guard gethostname(&buffer, buffer.count) == 0 else { return "unknown" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// Checks that the settings are usable (``ConnectionLimiter/run()`` does too).
    /// - Throws: ``LimiterError`` with code `invalidLimit` naming the bad setting.
    public func validate() throws(LimiterError) {
        func invalid(_ why: String) -> LimiterError { LimiterError(code: .invalidLimit, message: "invalid limiter configuration: \(why)") }
        guard (0...1_000_000).contains(defaultLimit) else { throw invalid("defaultLimit \(defaultLimit) must be 0...1000000") }
        guard !keyPrefix.isEmpty, !keyPrefix.contains("{"), !keyPrefix.contains("}") else {
            throw invalid("keyPrefix must be non-empty and free of { }")
        }
        guard heartbeat.interval > .zero, heartbeat.nodeTTL >= heartbeat.interval * 2 else {
            throw invalid("heartbeat.nodeTTL (\(heartbeat.nodeTTL)) must be at least twice heartbeat.interval (\(heartbeat.interval))")
        }
        guard lease.renewInterval > .zero, lease.ttl >= lease.renewInterval * 2 else {
            throw invalid("lease.ttl (\(lease.ttl)) must be at least twice lease.renewInterval (\(lease.renewInterval))")
        }
        guard probe.timeout > .zero, verifyTimeout > .zero else {
            throw invalid("probe.timeout (\(probe.timeout)) and verifyTimeout (\(verifyTimeout)) must be positive")
        }
    }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Darwin)
    import Darwin
#endif

extension Duration {
    /// Whole milliseconds (rounded down).
    var milliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }
}
