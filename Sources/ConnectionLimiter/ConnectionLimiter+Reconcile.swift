import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// After the Redis client reconnected: removes this node's members that are neither pending nor open here —
    /// releases that a restarted server (its last second of AOF) or a promoted replica (replication lag) never got.
    /// Nobody else would remove them before their lease ends, since this node is alive and its renewals skip them.
    /// Looks at the users of this node's index, of its table, and the ones it released a connection of since the
    /// renewal round before last (`departed`). A member is read from Redis before the table is asked about it, and an
    /// admission puts its connection in the table before its script is sent: a member being admitted is never taken.
    func reconcileOwnMembers(departed: Set<UserID>) async {
        let (node, usable, tableUsers) = state.withLock { state in (state.node, state.life.isCurrent, Set(state.table.users)) }
        guard usable else { return }
        var users = tableUsers.union(departed)
        let timeout = renewalTimeout
        var removed = 0
        do {
            var cursor = "0"
            repeat {
                let page = try await redis.send(RedisCommand("SSCAN", keys.users(node), cursor, "COUNT", 500), timeout: timeout)
                cursor = page.array?.first?.string ?? "0"
                users.formUnion((page.array?.last?.array ?? []).compactMap(\.string).compactMap(UserID.init(escaped:)))
            } while cursor != "0"
            let all = Array(users)
            for start in stride(from: 0, to: all.count, by: 256) {
                guard state.withLock({ $0.node == node && $0.life.isCurrent }) else { return }
                let chunk = Array(all[start..<min(start + 256, all.count)])
                let replies = try await redis.pipeline(chunk.map { RedisCommand("ZRANGE", keys.conns($0), 0, -1) }, timeout: timeout)
                let stale = state.withLock { state -> [(UserID, [String])] in
                    zip(chunk, replies).compactMap { user, reply in
                        guard case .success(let members) = reply else { return nil }
                        let own = (members.array ?? []).compactMap(\.string).compactMap(Member.init).filter { $0.node == node }
                        let zombies = own.filter { !state.table.isLive($0.connection) }.map(\.text)
                        return zombies.isEmpty ? nil : (user, zombies)
                    }
                }
                guard !stale.isEmpty else { continue }
                let results = try await redis.pipeline(
                    stale.map { user, members in
                        .script(scripts.purge, keys: [keys.conns(user), keys.since(user)], arguments: ["members"] + members)
                    }, timeout: timeout)
                removed += results.reduce(0) { $0 + ((try? $1.get())?.int ?? 0) }
            }
        } catch {
            nodeLogger(node).warning(
                "could not look for entries Redis kept after their release (after a reconnect); their lease ends them",
                metadata: [LogKey.error: "\(error)", "fleetgate.lease-ttl": "\(configuration.lease.ttl)"])
        }
        guard removed > 0 else { return }
        metrics.evictedZombie.increment(by: Int64(removed))
        nodeLogger(node).info(
            "removed entries of connections closed here that Redis still held after a reconnect",
            metadata: ["fleetgate.removed": "\(removed)", "fleetgate.users": "\(users.count)"])
    }
}
