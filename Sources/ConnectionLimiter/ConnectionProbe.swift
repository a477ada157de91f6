/// A liveness check of open connections, supplied by the embedder of a ``ConnectionLimiter`` (the gateway supplies
/// a WebSocket ping). Install it with ``ConnectionLimiter/useProbe(_:)``.
///
/// The emergency cleanup of a denial calls it on every owner of the user's entries: a connection the application
/// still holds open may belong to a client that vanished without a FIN (lost Wi-Fi, a frozen tab, a NAT that dropped
/// its state), and only a round trip tells. Without a probe such a connection keeps its slot until the embedder's
/// own keep-alive gives up on it.
public protocol ConnectionProbe: Sendable {
    /// Checks the given open connections of one user and returns those that failed.
    ///
    /// A connection that showed a sign of life recently may count as alive without a round trip. A connection that
    /// fails must be closed by the probe (with a reason that says why); the limiter releases its entry as soon as
    /// this returns, so the embedder's later ``ConnectionLimiter/release(connection:)`` is a no-op. The probe should
    /// answer within `timeout`; the limiter stops waiting 250 ms after it (the probe is cancelled and its late
    /// answer ignored) and then counts every connection as alive.
    /// - Parameters:
    ///   - connections: connection ids open on this node, all of `user`.
    ///   - user: their user, for logs.
    ///   - timeout: how long a client has to answer.
    /// - Returns: the ids that did not answer in time (or are already closing).
    func probe(connections: [String], user: String, timeout: Duration) async -> Set<String>
}
