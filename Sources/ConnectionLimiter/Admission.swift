/// The outcome of ``ConnectionLimiter/admit(user:connection:limit:)``.
public enum AdmissionDecision: Sendable {
    /// The connection may open.
    case admitted(Admission)
    /// The user is at the limit.
    case denied(Denial)

    /// Whether the connection may open.
    public var isAdmitted: Bool {
        if case .admitted = self { return true }
        return false
    }
}

/// An admitted connection.
public struct Admission: Sendable, Hashable {
    /// How the decision was made.
    public enum Basis: Sendable, Hashable {
        /// By the atomic admission script in Redis (the fleet-wide count).
        case redis
        /// Redis was unreachable; admitted by this node's own count (policy `onRedisDown: .local`).
        case localFallback
    }
    /// The user's live entries after this admission.
    public var count: Int
    /// The limit that applied.
    public var limit: Int
    /// How the decision was made.
    public var basis: Basis
    /// The connection was already admitted (an idempotent retry); its lease was refreshed.
    public var alreadyAdmitted: Bool
    /// Dry-run mode: the limit would have denied this connection.
    public var wouldHaveBeenDenied: Bool
    /// With the evict-oldest policy: the oldest connection (`node:connection`) removed to make room; its node is told
    /// to close it.
    public var evicted: String?
    /// Every connection evicted to make room (more than one after the user's limit was lowered), oldest first.
    public var evictedAll: [String]
}

/// A denied connection, with what the operator and the client need to know.
public struct Denial: Sendable, Hashable, CustomStringConvertible {
    /// One live entry of the user.
    public struct Holder: Sendable, Hashable {
        /// The node incarnation holding it.
        public var node: String
        /// The connection id on that node.
        public var connection: String
        /// Time left on its lease.
        public var leaseRemaining: Duration
    }
    /// The user.
    public var user: String
    /// The user's live entries.
    public var count: Int
    /// The limit that applied.
    public var limit: Int
    /// The current entries.
    public var holders: [Holder]
    /// When trying again may succeed: the soonest a holder's lease could end, at least one second and at most 30
    /// seconds (by then every stale entry is gone; live holders renew their leases).
    public var retryAfter: Duration
    /// How the decision was made. With ``Admission/Basis/localFallback`` (Redis unreachable), `count` is the user's
    /// connections on this node and `limit` this node's share of the user's limit.
    public var basis: Admission.Basis = .redis

    /// `connection limit exceeded for user "alice" (20/20)`.
    public var description: String { "connection limit exceeded for user \"\(user)\" (\(count)/\(limit))" }
}
