import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Removes every entry of dead nodes (their lease expired), user by user through their users index, then the
    /// nodes' own keys. Runs on the node that holds the sweeper lock.
    /// - Returns: the entries removed per node swept (a node whose sweep failed is missing).
    @discardableResult
    func sweep(_ deadNodes: Set<String>) async -> [String: Int] {
        var swept: [String: Int] = [:]
        for dead in deadNodes {
            let started = clock.now
            do {
                var removed = 0
                var cursor = "0"
                let timeout = configuration.heartbeat.nodeTTL
                repeat {
                    let page = try await redis.send(RedisCommand("SSCAN", keys.users(dead), cursor, "COUNT", 500), timeout: timeout)
                    cursor = page.array?.first?.string ?? "0"
                    let users = (page.array?.last?.array ?? []).compactMap(\.string).compactMap(UserID.init(escaped:))
                    if !users.isEmpty {
                        let results = try await redis.pipeline(
                            users.map { .script(scripts.purge, keys: [keys.conns($0), keys.since($0)], arguments: ["node", dead]) },
                            timeout: timeout
                        )
                        // Any failed purge keeps the node and its index for the next sweep.
                        removed += try results.reduce(0) { $0 + (try $1.get().int ?? 0) }
                    }
                } while cursor != "0"
                _ = try await redis.pipeline(
                    [
                        .command(RedisCommand("DEL", keys.users(dead), keys.node(dead))),
                        .command(RedisCommand("ZREM", keys.nodes, dead)),
                    ], timeout: timeout)
                metrics.sweeps.increment()
                swept[dead] = removed
                metrics.evictedDeadNode.increment(by: Int64(removed))
                let elapsed = started.duration(to: clock.now)
                metrics.sweepDuration.recordNanoseconds(elapsed.milliseconds * 1_000_000)
                nodeLogger(nodeID).info(
                    "swept dead node",
                    metadata: ["fleetgate.dead-node": "\(dead)", "fleetgate.removed": "\(removed)", "fleetgate.duration": "\(elapsed)"]
                )
            } catch {
                nodeLogger(nodeID).warning(
                    "sweep failed; next heartbeat retries", metadata: ["fleetgate.dead-node": "\(dead)", LogKey.error: "\(error)"])
            }
        }
        return swept
    }
}
