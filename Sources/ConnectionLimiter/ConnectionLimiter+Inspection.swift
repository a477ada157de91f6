import Foundation
import RedisClient

/// One entry of a user in Redis.
public struct LimiterEntry: Sendable, Hashable {
    /// The node incarnation that holds it.
    public var node: String
    /// The connection id on that node.
    public var connection: String
    /// Time left on its lease (negative: expired, not yet purged).
    public var leaseRemaining: Duration
    /// How long ago it was admitted (only kept with the evict-oldest policy).
    public var admittedAgo: Duration?
}

/// One node in the registry.
public struct NodeStatus: Sendable, Hashable {
    /// The incarnation id.
    public var id: String
    /// Its name (host name by default), address, process id and version, as it registered them.
    public var name: String
    public var address: String
    public var pid: Int?
    public var version: String
    /// Time left on its lease; a dead node's is zero or negative.
    public var leaseRemaining: Duration
    /// Its lease is current.
    public var isAlive: Bool { leaseRemaining > .zero }
    /// Connections and users it reported at its last heartbeat.
    public var connections: Int
    public var users: Int
    /// The node TTL it registered with (nil for nodes of older versions).
    public var ttl: Duration?
    /// How long ago its last successful heartbeat was (TTL minus the lease left; nil without a TTL).
    public var lastHeartbeatAgo: Duration? { ttl.map { $0 - leaseRemaining } }
}

/// Fleet-wide totals, from the node registry.
public struct LimiterTotals: Sendable, Hashable {
    /// Nodes whose lease is current.
    public var liveNodes: Int
    /// Nodes whose lease ran out and that are not swept yet.
    public var deadNodes: Int
    /// Connections the live nodes reported at their last heartbeat.
    public var connections: Int
    /// Users with connections, summed over live nodes (a user on two nodes counts twice).
    public var userNodePairs: Int

    /// The totals of a registry listing (``ConnectionLimiter/nodes()``), for a caller that already has one.
    public init(nodes: [NodeStatus]) {
        let live = nodes.filter(\.isAlive)
        liveNodes = live.count
        deadNodes = nodes.count - live.count
        connections = live.reduce(0) { $0 + $1.connections }
        userNodePairs = live.reduce(0) { $0 + $1.users }
    }
}

/// A user with more live entries than its limit (possible only transiently, e.g. after a Redis failover).
public struct UserOverLimit: Sendable, Hashable {
    public var user: String
    public var count: Int
    public var limit: Int
}

extension ConnectionLimiter {
    /// The user's entries in Redis, oldest lease first.
    public func entries(user rawUser: String) async throws -> [LimiterEntry] {
        let user = try UserID(rawUser)
        let results = try await redis.pipeline([
            RedisCommand("TIME"),
            RedisCommand("ZRANGE", keys.conns(user), 0, -1, "WITHSCORES"),
            RedisCommand("ZRANGE", keys.since(user), 0, -1, "WITHSCORES"),
        ])
        let now = try Self.milliseconds(fromTime: results[0].get())
        let admitted = Dictionary(try Self.pairs(results[2].get()), uniquingKeysWith: { first, _ in first })
        return try Self.pairs(results[1].get()).compactMap { member, expiry in
            guard let parsed = Member(member) else { return nil }
            return LimiterEntry(
                node: parsed.node,
                connection: parsed.connection,
                leaseRemaining: .milliseconds(expiry - now),
                admittedAgo: admitted[member].map { .milliseconds(now - $0) }
            )
        }
    }

    /// Every node in the registry, live and dead (not yet swept), with what they reported.
    public func nodes() async throws -> [NodeStatus] {
        let results = try await redis.pipeline([RedisCommand("TIME"), RedisCommand("ZRANGE", keys.nodes, 0, -1, "WITHSCORES")])
        let now = try Self.milliseconds(fromTime: results[0].get())
        let registry = try Self.pairs(results[1].get())
        let hashes = try await redis.pipeline(registry.map { RedisCommand("HGETALL", keys.node($0.0)) })
        return zip(registry, hashes).map { entry, hash in
            var fields: [String: String] = [:]
            let flat = (try? hash.get().array) ?? []
            for index in stride(from: 0, to: flat.count - 1, by: 2) {
                if let key = flat[index].string, let value = flat[index + 1].string { fields[key] = value }
            }
            return NodeStatus(
                id: entry.0,
                name: fields["name"] ?? "",
                address: fields["address"] ?? "",
                pid: fields["pid"].flatMap { Int($0) },
                version: fields["version"] ?? "",
                leaseRemaining: .milliseconds(entry.1 - now),
                connections: fields["conns"].flatMap { Int($0) } ?? 0,
                users: fields["users"].flatMap { Int($0) } ?? 0,
                ttl: fields["ttl"].flatMap { Int64($0) }.map { .milliseconds($0) }
            )
        }
    }

    /// Totals over the node registry.
    public func totals() async throws -> LimiterTotals {
        LimiterTotals(nodes: try await nodes())
    }

    /// Users whose live entries exceed their limit (an operator check; scans every user key).
    public func usersOverLimit(maximum: Int = 1000) async throws -> [UserOverLimit] {
        var found: [UserOverLimit] = []
        // On Redis Cluster the scan visits every primary.
        try await redis.scan(matching: keys.allConnsPattern, count: 1000) { page in
            guard found.count < maximum else { return }
            let users = page.compactMap(keys.user(fromConnsKey:))
            guard !users.isEmpty else { return }
            let replies = try await redis.pipeline(users.flatMap { [RedisCommand("ZCARD", keys.conns($0)), RedisCommand("GET", keys.limit($0))] })
            for (index, user) in users.enumerated() {
                let count = (try? replies[index * 2].get().int) ?? 0
                let limit = (try? replies[index * 2 + 1].get().int) ?? configuration.defaultLimit
                if count > limit { found.append(UserOverLimit(user: user.rawValue, count: count, limit: limit)) }
            }
        }
        return found
    }

    // MARK: Overrides

    /// Sets a per-user limit in Redis; it wins over the default and the per-call limit on every node.
    public func setLimitOverride(user rawUser: String, to limit: Int) async throws {
        let user = try UserID(rawUser)
        guard (0...1_000_000).contains(limit) else {
            throw LimiterError(code: .invalidLimit, message: "limit \(limit) for user \"\(user)\" must be between 0 and 1000000")
        }
        try await redis.send("SET", keys.limit(user), limit)
    }

    /// The per-user limit override, or `nil` when none is set.
    public func limitOverride(user rawUser: String) async throws -> Int? {
        let user = try UserID(rawUser)
        return try await redis.get(keys.limit(user))?.int
    }

    /// Removes the per-user override.
    public func clearLimitOverride(user rawUser: String) async throws {
        let user = try UserID(rawUser)
        try await redis.delete(keys.limit(user))
    }

    /// An operator kick: removes the entry now and tells its node to close the socket (4409).
    ///
    /// The kick holds until the owner has closed the socket: the entry is marked kicked in Redis, so the owner's
    /// lease renewal never puts it back and closes the connection itself when the kick message was lost (its pub/sub
    /// link was down); a message nobody received is sent again a few times.
    public func kick(user rawUser: String, node: String, connection: String) async throws {
        let user = try UserID(rawUser)
        let member = Member(node: node, connection: connection)
        try await removeKicked([member.text], of: user)
        await kick(member, user: user, reason: .operatorRequest)
    }

    // MARK: Operator actions

    /// Removes every entry of the nodes whose lease has run out, now, instead of waiting for the next heartbeat's
    /// sweep (`fleetgate sweep`). Safe beside the nodes' own sweeper: each removal is idempotent.
    /// - Returns: the entries removed per dead node.
    public func sweepDeadNodes() async throws -> [String: Int] {
        let results = try await redis.pipeline([RedisCommand("TIME"), RedisCommand("ZRANGE", keys.nodes, 0, -1, "WITHSCORES")])
        let now = try Self.milliseconds(fromTime: results[0].get())
        let dead = try Self.pairs(results[1].get()).filter { $0.1 <= now }.map(\.0)
        guard !dead.isEmpty else { return [:] }
        let swept = await sweep(Set(dead))
        if swept.count < dead.count {
            let failed = Set(dead).subtracting(swept.keys).sorted()
            throw LimiterError(
                code: .redisUnavailable,
                message: "the sweep of dead node(s) \(failed.joined(separator: ", ")) failed (Redis at \(redis.configuration.address)); run it again")
        }
        return swept
    }

    /// Kicks every entry of a user (`fleetgate evict --user`): each is removed and marked, and its node closes the
    /// socket with 4409. Returns the entries kicked.
    @discardableResult
    public func evict(user rawUser: String) async throws -> [LimiterEntry] {
        let entries = try await entries(user: rawUser)
        for entry in entries { try await kick(user: rawUser, node: entry.node, connection: entry.connection) }
        return entries
    }

    /// Kicks every entry a node holds (`fleetgate evict --node`), user by user through its users index. Returns how
    /// many were kicked.
    @discardableResult
    public func evict(node: String) async throws -> Int {
        var kicked = 0
        var cursor = "0"
        repeat {
            let page = try await redis.send(RedisCommand("SSCAN", keys.users(node), cursor, "COUNT", 500))
            cursor = page.array?.first?.string ?? "0"
            for user in (page.array?.last?.array ?? []).compactMap(\.string).compactMap(UserID.init(escaped:)) {
                for entry in try await entries(user: user.rawValue) where entry.node == node {
                    try await kick(user: user.rawValue, node: node, connection: entry.connection)
                    kicked += 1
                }
            }
        } while cursor != "0"
        return kicked
    }

    static func milliseconds(fromTime reply: RESPValue) throws -> Int64 {
        guard let seconds = reply.int(at: 0), let micros = reply.int(at: 1) else {
            throw LimiterError(code: .unexpectedReply, message: "unexpected TIME reply: \(reply)")
        }
        return Int64(seconds) * 1000 + Int64(micros / 1000)
    }

    /// `[member, score, member, score…]` as pairs.
    static func pairs(_ reply: RESPValue) throws -> [(String, Int64)] {
        let flat = reply.array ?? []
        return stride(from: 0, to: flat.count - 1, by: 2).compactMap { index in
            guard let member = flat[index].string, let score = flat[index + 1].string.flatMap({ Double($0) }) else { return nil }
            return (member, Int64(score))
        }
    }
}
