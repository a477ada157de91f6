/// Something the embedding gateway must act on, from ``ConnectionLimiter/events``.
public enum LimiterEvent: Sendable, Hashable {
    /// Why a connection must close.
    public enum KickReason: String, Sendable, Hashable {
        /// Evicted to make room for a newer connection of the user (evict-oldest policy). Close with 4409.
        case evicted
        /// An operator asked for it. Close with 4409.
        case operatorRequest
        /// After this node lost its lease, the user was full when it re-admitted the connection: this node yields.
        case deniedAfterLeaseLoss
        /// Its entry was gone at a lease renewal and the user was full by then.
        case lostAtRenewal
        /// Kicked (by an operator, or evicted by a newer connection) while the kick message did not reach this node:
        /// its lease renewal found the entry marked kicked in Redis. Close with 4409.
        case kickedAtRenewal
    }

    /// Close this connection now (4409 in the gateway); the limiter has already dropped its entry.
    case kick(connection: String, user: String, reason: KickReason)
    /// This node's lease may have run out (Redis unreachable); peers may purge its entries.
    case leaseLost(node: String)
    /// Policy `close`: close every connection now (1012 in the gateway), before the lease can expire.
    case fenced(node: String)
    /// The node registered as a new incarnation and re-admitted its connections.
    case reregistered(node: String, readmitted: Int, denied: Int)
    /// Redis stopped answering.
    case redisUnavailable(reason: String)
    /// Redis answers again.
    case redisAvailable
}
