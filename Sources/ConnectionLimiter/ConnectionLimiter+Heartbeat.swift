import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Every heartbeat interval: extend the lease, refresh the view of dead and live nodes, sweep when holding the
    /// lock. An expired or unknown node re-registers as a new incarnation and re-admits its connections.
    func heartbeatLoop() async {
        repeat {
            await heartbeat()
        } while await pause(configuration.heartbeat.interval)
    }

    private func heartbeat() async {
        let (node, registered) = state.withLock { ($0.node, $0.life.registered) }
        if !registered {
            do {
                try await register()
                markRedisAvailable()
            } catch {
                heartbeatFailed(error)
            }
            return
        }
        let sent = clock.now
        let (open, users, address) = state.withLock { ($0.table.openCount, $0.table.userCount, $0.address ?? configuration.nodeAddress) }
        let ttl = nodeTTLMilliseconds
        do {
            let results = try await redis.pipeline(
                [
                    .script(scripts.heartbeat, keys: [keys.nodes], arguments: [node, String(ttl), "beat"]),
                    // The address too: an announcement can cross the registration that it should have joined.
                    .command(RedisCommand("HSET", keys.node(node), "conns", open, "users", users, "address", address)),
                    .command(RedisCommand("PEXPIRE", keys.node(node), ttl * 3)),
                    // The users index outlives the node by a lease, so a sweeper can still walk it.
                    .command(RedisCommand("PEXPIRE", keys.users(node), leaseMilliseconds + ttl)),
                ],
                timeout: configuration.heartbeat.interval
            )
            let reply = try results[0].get()
            markRedisAvailable()
            guard reply.int(at: 0) == 1 else {
                await leaseExpired(node: node, status: reply.int(at: 0) ?? 0)
                return
            }
            let expired = Set(reply.strings(from: 3)).subtracting([node])
            let actions = state.withLock { state -> [NodeLifecycle.Action] in
                guard state.node == node else { return [] }
                state.deadNodes = expired
                state.liveNodes = max(1, reply.int(at: 2) ?? 1)
                return state.life.heartbeatSucceeded(for: node, sentAt: sent)
            }
            perform(actions)
            // Only a node whose lease is current may take the sweeper lock.
            if !expired.isEmpty, state.withLock({ !$0.sweeping }) {
                // The heartbeat itself succeeded: a failed lock request is not "Redis down", the next beat retries.
                do {
                    let lock = try await redis.eval(
                        scripts.sweeperLock, keys: [keys.sweeper], arguments: [node, String(configuration.heartbeat.interval.milliseconds * 3)],
                        timeout: configuration.heartbeat.interval)
                    if lock.int == 1 { schedule(sweep: expired) }
                } catch {
                    nodeLogger(node).warning(
                        "could not request the sweeper lock; the next heartbeat retries",
                        metadata: [LogKey.error: "\(error)", "fleetgate.dead-nodes": "\(expired.count)"])
                }
            }
        } catch {
            heartbeatFailed(error)
        }
    }

    func heartbeatFailed(_ error: any Error) {
        // Cancelled by the node's own shutdown: not a Redis failure.
        if error is CancellationError || (error as? RedisError)?.code == .cancelled { return }
        metrics.heartbeatFailures.increment()
        let becameDown = state.withLock { state -> Bool in
            defer { state.redisDown = true }
            return !state.redisDown
        }
        if becameDown {
            nodeLogger(nodeID).info("Redis unavailable", metadata: [LogKey.error: "\(error)"])
            emit(.redisUnavailable(reason: "\(error)"))
        }
    }

    private func markRedisAvailable() {
        let becameUp = state.withLock { state -> Bool in
            defer { state.redisDown = false }
            return state.redisDown
        }
        if becameUp {
            nodeLogger(nodeID).info("Redis available again")
            emit(.redisAvailable)
        }
    }
}
