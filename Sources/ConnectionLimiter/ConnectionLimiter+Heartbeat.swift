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
            var reply = try results[0].get()
            markRedisAvailable()
            let jump = noticeClockJump(redisNow: reply.int(at: 1), sent: sent, received: clock.now)
            if reply.int(at: 0) != 1, let jump, jump > .zero, ownLeaseIsCurrent(node: node) {
                // Redis's clock jumped past this node's lease, but it has not run out in real time (this node's
                // monotonic clock): extend it instead of re-registering (which would close or re-admit everything).
                let revived = try await redis.pipeline(
                    [
                        .script(scripts.heartbeat, keys: [keys.nodes], arguments: [node, String(ttl), "revive"]),
                        // The jump may have expired the node's hash too.
                        .command(nodeHash(node, connections: open, users: users)),
                        .command(RedisCommand("PEXPIRE", keys.node(node), ttl * 3)),
                    ],
                    timeout: configuration.heartbeat.interval)
                reply = try revived[0].get()
                if reply.int(at: 0) == 1 {
                    nodeLogger(node).info("node lease kept across a jump of Redis's clock", metadata: ["fleetgate.jump": "\(jump)"])
                }
            }
            guard reply.int(at: 0) == 1 else {
                await leaseExpired(node: node, status: reply.int(at: 0) ?? 0)
                return
            }
            let suspended = state.withLock { state in state.sweepsSuspendedUntil.map { clock.now < $0 } ?? false }
            // While sweeps are suspended after a jump, no node counts as dead: their leases are off by the jump.
            let expired = suspended ? [] : Set(reply.strings(from: 3)).subtracting([node])
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

    /// Compares Redis's clock in a heartbeat reply with the time this node's monotonic clock says has passed since the
    /// previous reply; a difference beyond the round trip and a second is a jump of Redis's clock. A jump is logged and
    /// counted, suspends sweeps (and counting nodes dead) for a node TTL and an interval so live nodes can put their
    /// leases right, and — forward — renews every lease now, before admissions drop the entries as expired; in either
    /// direction every lease is renewed again once the peers have put theirs right (entries they dropped come back).
    /// - Returns: the jump (positive: forward), nil if none.
    @discardableResult
    func noticeClockJump(redisNow: Int?, sent: ContinuousClock.Instant, received: ContinuousClock.Instant) -> Duration? {
        guard let redisNow else { return nil }
        let now = ClockReading(redisMilliseconds: Int64(redisNow), sent: sent, received: received)
        let jump = state.withLock { state -> Duration? in
            defer { state.clockReading = now }
            guard let previous = state.clockReading, let jump = previous.jump(to: now) else { return nil }
            state.sweepsSuspendedUntil = received + configuration.heartbeat.nodeTTL + configuration.heartbeat.interval
            // Until every peer has noticed the jump too, a denial elsewhere may count this node dead by Redis's clock
            // and drop its entries: renew again once that window is over.
            state.renewalDue = received + configuration.heartbeat.nodeTTL + configuration.heartbeat.interval * 2
            return jump
        }
        guard let jump else { return nil }
        (jump > .zero ? metrics.clockJumpsForward : metrics.clockJumpsBackward).increment()
        let consequence = jump > .zero ? "this node's lease and entries put right now" : "a dead node may be swept up to the jump later"
        nodeLogger(nodeID).warning(
            "Redis's clock jumped \(jump > .zero ? "forward" : "backward") by \(jump): sweeps suspended for a node TTL; \(consequence)",
            metadata: ["fleetgate.jump": "\(jump)"])
        if jump > .zero { scheduleRenewal() }
        return jump
    }

    /// Whether this node's lease is current on its own monotonic clock.
    func ownLeaseIsCurrent(node: String) -> Bool {
        state.withLock { state in
            guard state.node == node, state.life.isCurrent, let deadline = state.life.leaseDeadline else { return false }
            return clock.now < deadline
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
