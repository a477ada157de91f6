/// The life of one limiter node — its registration in Redis and its lease — as one value.
///
/// Heartbeats, the lease monitor, admissions, renewals and the shutdown all drive this state machine; each
/// transition returns the actions to take (announce, fence), and the limiter performs them outside its lock. It does
/// no I/O and reads no clock: the caller passes the instants, so every transition is tested without Redis or time.
///
/// ```
///  stopped ──start──▶ registering ──registered──▶ live ◀──────────── heartbeat ok ─────────────┐
///                          ▲                      │  past deadline − interval                   │
///                          │                      ▼                                             │
///                          │     (keep) inDoubt ──┴── fenced (close: every connection closed)   │
///                          │                      │  past deadline, or Redis says expired       │
///                          │                      ▼                                             │
///                          └──── registered ◀── lost ──────────────────────────────────────────┘
///  any ──shutdown──▶ draining ──run() ends──▶ stopped
/// ```
struct NodeLifecycle: Sendable, Equatable {
    enum Phase: Sendable, Hashable {
        /// ``ConnectionLimiter/run()`` has not started, or has ended.
        case stopped
        /// Running, not registered yet (the first registration has not succeeded).
        case registering
        /// Registered; the lease is current on this node's monotonic clock.
        case live
        /// Less than one heartbeat interval is left on the lease (policy `keep`): admissions go on, Redis decides.
        case inDoubt
        /// Policy `close`: less than one heartbeat interval is left; every connection was told to close and
        /// admissions are refused until a heartbeat or registration succeeds.
        case fenced
        /// The lease ran out on this node's clock, or Redis said the incarnation is gone. Peers may purge its entries.
        case lost
        /// A graceful shutdown was asked for: admissions are refused; entries are released and the node deregisters.
        case draining
    }

    /// What the limiter must do after a transition.
    enum Action: Sendable, Hashable {
        /// Policy `close`: tell the embedder to close every connection of `node` now.
        case fence(node: String)
        /// Announce that the lease of `node` may be gone (log, event).
        case announceLeaseLost(node: String)
        /// A heartbeat found the lease still held in Redis after this node's clock had given up on it.
        case announceResumed(node: String)
    }

    /// Where an admission goes.
    enum AdmissionRoute: Sendable, Hashable {
        /// Not running: refuse.
        case notRunning(node: String)
        /// Shutting down: refuse, the client should connect to another node.
        case draining(node: String)
        /// Policy `close` and the lease may be gone: refuse.
        case fenced(node: String)
        /// The fleet-wide count in Redis decides, under this incarnation.
        case redis(node: String)
        /// Not registered (or the lease is lost, policy `keep`): the `onRedisDown` policy decides.
        case unregistered(node: String)
    }

    let heartbeatInterval: Duration
    let nodeTTL: Duration
    let onLeaseLoss: LimiterConfiguration.LeaseLossPolicy

    private(set) var phase: Phase = .stopped
    /// The current incarnation id (a fresh random one at each registration).
    private(set) var node: String
    /// Whether `node` has been registered in Redis (until the drain deregisters it).
    private(set) var registered = false
    /// Whether the node has registered at least once since ``start(at:)``.
    private(set) var everRegistered = false
    /// When the lease may run out: the sending of the last good heartbeat plus the node TTL (monotonic clock).
    private(set) var leaseDeadline: ContinuousClock.Instant?
    /// When ``start(at:)`` ran: admissions wait for the first registration until `admissionTimeout` after it.
    private(set) var startedAt: ContinuousClock.Instant?
    /// This process's last few earlier incarnations: their members in Redis are dead.
    private(set) var previousIncarnations: [String] = []
    /// Whether a graceful shutdown was asked for (also before ``start(at:)``: then `run()` returns at once).
    private(set) var shutdownRequested = false

    init(node: String, heartbeatInterval: Duration, nodeTTL: Duration, onLeaseLoss: LimiterConfiguration.LeaseLossPolicy) {
        self.node = node
        self.heartbeatInterval = heartbeatInterval
        self.nodeTTL = nodeTTL
        self.onLeaseLoss = onLeaseLoss
    }

    // MARK: Queries

    /// Whether `run()` is under way (admissions are possible or refused for a reason other than "not started").
    var isRunning: Bool { phase != .stopped }

    /// Registered, with a lease that has not run out: renewals may be sent and peers can reach the node.
    var isCurrent: Bool {
        guard registered else { return false }
        switch phase {
        case .live, .inDoubt, .fenced: return true
        case .stopped, .registering, .lost, .draining: return false
        }
    }

    /// Policy `close` and the lease may be gone: no admission, no connection kept.
    var isFenced: Bool {
        onLeaseLoss == .close && (phase == .fenced || phase == .lost)
    }

    var admissionRoute: AdmissionRoute {
        switch phase {
        case .stopped: return .notRunning(node: node)
        case .draining: return .draining(node: node)
        case .fenced: return .fenced(node: node)
        case .lost: return onLeaseLoss == .close ? .fenced(node: node) : .unregistered(node: node)
        case .live, .inDoubt: return registered ? .redis(node: node) : .unregistered(node: node)
        case .registering: return .unregistered(node: node)
        }
    }

    /// The node ids whose members are dead from this node's point of view: its own earlier incarnations.
    var deadIncarnations: [String] { previousIncarnations }

    // MARK: Transitions

    /// `run()` started.
    mutating func start(at now: ContinuousClock.Instant) {
        startedAt = now
        phase = shutdownRequested ? .draining : .registering
    }

    /// Whether a node may take a registration now: not while draining or stopped (the caller removes the id it
    /// just wrote instead).
    var acceptsRegistration: Bool { phase != .draining && phase != .stopped }

    /// A registration of `newNode` succeeded; the heartbeat that carried it was sent at `sentAt`. Ignored unless
    /// ``acceptsRegistration``.
    /// - Returns: the incarnation it replaces, if the node was registered before under another id.
    @discardableResult
    mutating func registered(as newNode: String, sentAt: ContinuousClock.Instant) -> String? {
        guard acceptsRegistration else { return nil }
        var replaced: String?
        if registered, node != newNode {
            previousIncarnations = Array((previousIncarnations + [node]).suffix(8))
            replaced = node
        }
        node = newNode
        registered = true
        everRegistered = true
        leaseDeadline = sentAt + nodeTTL
        phase = .live
        return replaced
    }

    /// Redis extended the lease of `beating`, for a heartbeat sent at `sentAt`.
    mutating func heartbeatSucceeded(for beating: String, sentAt: ContinuousClock.Instant) -> [Action] {
        guard beating == node, registered else { return [] }
        leaseDeadline = sentAt + nodeTTL
        switch phase {
        case .live, .inDoubt:
            phase = .live
            return []
        case .fenced, .lost:
            // This node's clock counts the lease from the heartbeat's sending, so it may give up before Redis does:
            // Redis still holding the lease means it was never lost.
            phase = .live
            return [.announceResumed(node: node)]
        case .stopped, .registering, .draining:
            return []
        }
    }

    /// Redis answered that `beating` is expired or unknown: the incarnation is gone for good.
    mutating func heartbeatRefused(for beating: String) -> [Action] {
        guard beating == node, registered else { return [] }
        switch phase {
        case .live, .inDoubt:
            phase = .lost
            // Policy close: the connections must go now, whether or not the re-registration succeeds.
            return onLeaseLoss == .close ? [.fence(node: node), .announceLeaseLost(node: node)] : [.announceLeaseLost(node: node)]
        case .fenced:
            phase = .lost
            return [.announceLeaseLost(node: node)]
        case .lost, .stopped, .registering, .draining:
            return []
        }
    }

    /// The lease monitor's tick at `now`: fences one heartbeat interval before the deadline (policy `close`; with
    /// `keep` the lease is only in doubt), and counts the lease as lost once the deadline passed.
    mutating func tick(at now: ContinuousClock.Instant) -> [Action] {
        guard registered, let deadline = leaseDeadline else { return [] }
        var actions: [Action] = []
        if phase == .live, now >= deadline - heartbeatInterval {
            if onLeaseLoss == .close {
                phase = .fenced
                actions.append(.fence(node: node))
            } else {
                phase = .inDoubt
            }
        }
        if phase == .inDoubt || phase == .fenced, now >= deadline {
            phase = .lost
            actions.append(.announceLeaseLost(node: node))
        }
        return actions
    }

    /// A graceful shutdown was asked for. Returns whether this is the first request.
    mutating func requestShutdown() -> Bool {
        defer { shutdownRequested = true }
        if phase != .stopped { phase = .draining }
        return !shutdownRequested
    }

    /// The drain released every entry and removed the node from the registry.
    mutating func deregistered() {
        registered = false
    }

    /// `run()` ended.
    mutating func stop() {
        phase = .stopped
    }
}

/// Redis's clock read in a heartbeat reply, with the monotonic instants the request was sent and answered.
struct ClockReading: Sendable, Equatable {
    var redisMilliseconds: Int64
    var sent: ContinuousClock.Instant
    var received: ContinuousClock.Instant

    /// How far Redis's clock moved beyond what passed on the monotonic clock between `self` and `later`, if more than
    /// the two round trips allow plus a second (so scheduling delays and slow replies never count as a jump).
    func jump(to later: ClockReading) -> Duration? {
        let redisElapsed = Duration.milliseconds(later.redisMilliseconds - redisMilliseconds)
        // Redis read its clock somewhere inside each round trip: the real time between the readings lies in
        // [later.sent - received, later.received - sent].
        let shortest = later.sent - received
        let longest = later.received - sent
        let slack = Duration.seconds(1)
        if redisElapsed > longest + slack { return redisElapsed - longest }
        if redisElapsed < shortest - slack { return redisElapsed - shortest }
        return nil
    }
}
