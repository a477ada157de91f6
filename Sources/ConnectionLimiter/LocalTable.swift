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
    /// Connections in state `.open`, kept up to date by every change (read on every admission and heartbeat).
    private(set) var openCount = 0
    /// Open connections counted locally only (no member in Redis: admitted or re-added while Redis was away), kept
    /// up to date by every change: the renewal loop adds them as soon as Redis answers instead of at its next round.
    private(set) var unheldCount = 0
    /// Users who had a connection removed here since the renewal loop's last round, and in the round before: after
    /// a reconnect the node looks at their entries for releases Redis may have lost.
    private var departed: Set<UserID> = []
    private var departedBefore: Set<UserID> = []

    /// Applies `change` to connection `id` and keeps the counts true.
    private mutating func update(_ id: String, _ change: (inout Connection) -> Void) {
        guard var connection = connections[id] else { return }
        count(connection, -1)
        change(&connection)
        count(connection, 1)
        connections[id] = connection
    }

    private mutating func count(_ connection: Connection, _ sign: Int) {
        guard connection.state == .open else { return }
        openCount += sign
        if connection.node == nil { unheldCount += sign }
    }

    /// Adds a pending connection; returns `false` when the id is already in use by another user.
    mutating func addPending(_ id: String, user: UserID, limit: Int) -> Bool {
        if let existing = connections[id] { return existing.user == user }
        nextSequence += 1
        connections[id] = Connection(user: user, state: .pending, node: nil, limit: limit, sequence: nextSequence)
        byUser[user, default: []].insert(id)
        return true
    }

    /// The admission of a pending (or already open) connection succeeded under `node`. Returns `false` when the
    /// application released it meanwhile: the caller must remove the member it just added.
    mutating func admitted(_ id: String, node: String?) -> Bool {
        guard let state = connections[id]?.state, state == .pending || state == .open else { return false }
        update(id) {
            $0.state = .open
            $0.node = node
        }
        return true
    }

    /// A renewal or re-admission wrote this connection's member under `node`. Returns `false` when it is no longer
    /// open here (released meanwhile): the caller must remove that member again.
    mutating func adopt(_ id: String, node: String) -> Bool {
        guard connections[id]?.state == .open else { return false }
        update(id) { $0.node = node }
        return true
    }

    /// An open connection whose member could not be written: it is counted locally until a renewal re-adds it.
    mutating func detach(_ id: String) {
        guard connections[id]?.state == .open else { return }
        update(id) { $0.node = nil }
    }

    /// Marks a connection as released by the application; returns it as it was before.
    mutating func markReleasing(_ id: String) -> Connection? {
        guard let connection = connections[id] else { return nil }
        update(id) { $0.state = .releasing }
        return connection
    }

    /// Removes a connection; returns it and whether it was the user's last one here.
    @discardableResult
    mutating func remove(_ id: String) -> (Connection, lastOfUser: Bool)? {
        guard let connection = connections.removeValue(forKey: id) else { return nil }
        count(connection, -1)
        departed.insert(connection.user)
        byUser[connection.user]?.remove(id)
        let last = byUser[connection.user]?.isEmpty ?? true
        if last { byUser[connection.user] = nil }
        return (connection, last)
    }

    /// The users who had a connection removed in this round and the one before; starts a new round.
    mutating func rotateDepartures() -> Set<UserID> {
        defer {
            departedBefore = departed
            departed = []
        }
        return departed.union(departedBefore)
    }

    /// Every user with a connection here (pending, open or releasing).
    var users: Dictionary<UserID, Set<String>>.Keys { byUser.keys }

    /// Whether `id` is pending or open here (a `verify` must keep its entry).
    func isLive(_ id: String) -> Bool {
        guard let state = connections[id]?.state else { return false }
        return state == .pending || state == .open
    }

    func connection(_ id: String) -> Connection? { connections[id] }

    /// Whether `user` has any connection here (pending, open or releasing).
    func hasConnections(of user: UserID) -> Bool { !(byUser[user]?.isEmpty ?? true) }

    /// Open connections of `user` here (for the local fallback count).
    func openCount(of user: UserID) -> Int {
        (byUser[user] ?? []).reduce(0) { $0 + (connections[$1]?.state == .open ? 1 : 0) }
    }

    /// Open connections held under `node` (or only counted locally), grouped by user, each group oldest first.
    func openByUser(node: String) -> [(UserID, [(id: String, connection: Connection)])] {
        var groups: [(UserID, [(id: String, connection: Connection)])] = []
        for (user, ids) in byUser {
            var open: [(id: String, connection: Connection)] = []
            for id in ids {
                guard let connection = connections[id], connection.state == .open else { continue }
                if let held = connection.node, held != node { continue }
                open.append((id: id, connection: connection))
            }
            if open.isEmpty { continue }
            open.sort { $0.connection.sequence < $1.connection.sequence }
            groups.append((user, open))
        }
        return groups
    }

    /// Every open connection, oldest first.
    func openOldestFirst() -> [(id: String, connection: Connection)] {
        connections.filter { $0.value.state == .open }.map { (id: $0.key, connection: $0.value) }
            .sorted { $0.connection.sequence < $1.connection.sequence }
    }

    var userCount: Int { byUser.count }
}
