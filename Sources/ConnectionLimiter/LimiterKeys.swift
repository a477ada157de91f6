/// The Redis key layout (see DESIGN.md, "Data model in Redis"). Every key of one user shares the hash tag
/// `{u:<user>}`, so each per-user script touches a single Redis Cluster slot.
struct LimiterKeys: Sendable {
    let prefix: String

    func conns(_ user: UserID) -> String { "\(prefix):{u:\(user.escaped)}:conns" }
    func since(_ user: UserID) -> String { "\(prefix):{u:\(user.escaped)}:since" }
    func limit(_ user: UserID) -> String { "\(prefix):{u:\(user.escaped)}:limit" }
    func kicked(_ user: UserID) -> String { "\(prefix):{u:\(user.escaped)}:kicked" }
    /// The four keys the admission and renewal scripts take, in script order (conns, limit, since, kicked).
    func userKeys(_ user: UserID) -> [String] { [conns(user), limit(user), since(user), kicked(user)] }

    var nodes: String { "\(prefix):nodes" }
    var sweeper: String { "\(prefix):sweeper" }
    /// A node's keys share the hash tag `{n:<node>}`: its hash and its users index go in one `DEL` on Redis Cluster.
    func node(_ node: String) -> String { "\(prefix):{n:\(node)}:info" }
    func users(_ node: String) -> String { "\(prefix):{n:\(node)}:users" }
    /// The node's control channel; on Redis Cluster its slot is the node's (a sharded channel lives on that shard).
    func control(_ node: String) -> String { "\(prefix):{n:\(node)}:ctl" }

    /// The pattern matching every user's connection set, for operator scans.
    var allConnsPattern: String { "\(prefix):{u:*}:conns" }

    /// The user of a `…:{u:<user>}:conns` key.
    func user(fromConnsKey key: String) -> UserID? {
        let head = "\(prefix):{u:"
        let tail = "}:conns"
        guard key.hasPrefix(head), key.hasSuffix(tail) else { return nil }
        return UserID(escaped: String(key.dropFirst(head.count).dropLast(tail.count)))
    }
}

/// A member of a user's set: `<node>:<connection>`.
struct Member: Hashable, Sendable {
    var node: String
    var connection: String

    var text: String { "\(node):\(connection)" }

    init(node: String, connection: String) {
        self.node = node
        self.connection = connection
    }

    init?(_ text: String) {
        guard let colon = text.firstIndex(of: ":") else { return nil }
        node = String(text[..<colon])
        connection = String(text[text.index(after: colon)...])
    }
}
