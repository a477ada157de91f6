import Synchronization

/// Counts the connections a client establishes (commands and pub/sub, every cluster node), so that its owner can tell
/// when a server was reached anew — after a restart, a failover or a healed network cut the server's data may differ
/// from what was written to it before.
final class ConnectEvents: Sendable {
    private let count = Atomic<UInt64>(0)

    /// A connection finished its handshake.
    func record() {
        count.add(1, ordering: .relaxed)
    }

    /// Connections established so far.
    var value: UInt64 { count.load(ordering: .relaxed) }
}
