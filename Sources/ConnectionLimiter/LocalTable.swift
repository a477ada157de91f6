/// This node's own view of its connections: the source of truth for which of its entries in Redis are real.
///
/// A connection enters as `pending` before its admission is sent and leaves only after its release is confirmed, so
/// a `verify` never removes an entry that is pending or open here.
struct LocalTable: Sendable {
    enum State: Sendable, Hashable {
        case pending
        case open
        /// Closed by the application; the release is in flight or queued for retry.
        case releasing
    }

    struct Connection: Sendable, Hashable {
        var user: UserID
        var state: State
        /// The node incarnation whose member holds it in Redis (`nil` while it is counted locally only).
        var node: String?
        /// The limit that applied at admission (a token claim survives re-admissions).
        var limit: Int
        /// Admission order, for oldest-first re-admission.
        var sequence: UInt64
    }

    private(set) var connections: [String: Connection] = [:]
    private(set) var byUser: [UserID: Set<String>] = [:]
    private var nextSequence: UInt64 = 0

    /// Adds a pending connection; returns `false` when the id is already in use by another user.
    mutating func addPending(_ id: String, user: UserID, limit: Int) -> Bool {
        if let existing = connections[id] { return existing.user == user }
        nextSequence += 1
        connections[id] = Connection(user: user, state: .pending, node: nil, limit: limit, sequence: nextSequence)
        byUser[user, default: []].insert(id)
        return true
    }

    mutating func markOpen(_ id: String, node: String?) {
        connections[id]?.state = .open
        connections[id]?.node = node
    }

    mutating func markReleasing(_ id: String) -> Connection? {
        guard var connection = connections[id] else { return nil }
        connection.state = .releasing
        connections[id] = connection
        return connection
    }

    /// Removes a connection; returns it and whether it was the user's last one here.
    @discardableResult
    mutating func remove(_ id: String) -> (Connection, lastOfUser: Bool)? {
        guard let connection = connections.removeValue(forKey: id) else { return nil }
        byUser[connection.user]?.remove(id)
        let last = byUser[connection.user]?.isEmpty ?? true
        if last { byUser[connection.user] = nil }
        return (connection, last)
    }

    /// Whether `id` is pending or open here (a `verify` must keep its entry).
    func isLive(_ id: String) -> Bool {
        guard let state = connections[id]?.state else { return false }
        return state == .pending || state == .open
    }

    func connection(_ id: String) -> Connection? { connections[id] }

    /// Open connections of `user` here (for the local fallback count).
    func openCount(of user: UserID) -> Int {
        (byUser[user] ?? []).reduce(0) { $0 + (connections[$1]?.state == .open ? 1 : 0) }
    }

    /// Open connections grouped by user, each group oldest first (for renewals and re-admission).
    func openByUser() -> [(UserID, [(id: String, connection: Connection)])] {
        byUser.compactMap { user, ids in
            let open = ids.compactMap { id in connections[id].map { (id: id, connection: $0) } }
                .filter { $0.connection.state == .open }
                .sorted { $0.connection.sequence < $1.connection.sequence }
            return open.isEmpty ? nil : (user, open)
        }
    }

    /// Every open connection, oldest first.
    func openOldestFirst() -> [(id: String, connection: Connection)] {
        connections.filter { $0.value.state == .open }.map { (id: $0.key, connection: $0.value) }
            .sorted { $0.connection.sequence < $1.connection.sequence }
    }

    var openCount: Int { connections.values.reduce(0) { $0 + ($1.state == .open ? 1 : 0) } }
    var userCount: Int { byUser.count }
}
