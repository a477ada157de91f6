import Foundation
import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Registers this node as a new incarnation (fresh random id) and writes its hash.
    func register() async throws {
        let node = ConnectionIDs.random(length: 8)
        let sent = clock.now
        let ttl = nodeTTLMilliseconds
        let results = try await redis.pipeline(
            [
                .script(scripts.heartbeat, keys: [keys.nodes], arguments: [node, String(ttl), "register"]),
                .command(
                    RedisCommand(
                        "HSET", keys.node(node),
                        "name", configuration.nodeName,
                        "address", configuration.nodeAddress,
                        "pid", Int(ProcessInfo.processInfo.processIdentifier),
                        "version", "0.1.0",
                        "started", Int(Date().timeIntervalSince1970 * 1000),
                        "conns", 0,
                        "users", 0
                    )
                ),
                .command(RedisCommand("PEXPIRE", keys.node(node), ttl * 3)),
            ],
            timeout: configuration.heartbeat.interval
        )
        let reply = try results[0].get()
        guard reply.int(at: 0) == 1 else {
            throw LimiterError(code: .unexpectedReply, message: "registration of node \(node) refused (id already taken): \(reply)")
        }
        let (previous, staleSubscription) = state.withLock { state -> (String, RedisSubscription?) in
            let previous = state.node
            if state.registered, previous != node { state.deadNodes.insert(previous) }
            state.node = node
            state.registered = true
            state.leaseLost = false
            state.fenced = false
            state.leaseDeadline = sent + configuration.heartbeat.nodeTTL
            state.deadNodes.formUnion(reply.strings(from: 2))
            return (previous, state.listeningAs == node ? nil : state.subscription)
        }
        // The control loop moves to the new incarnation's channel when the old subscription ends.
        staleSubscription?.unsubscribe()
        nodeLogger(node).info("node registered", metadata: ["fleetgate.previous-node": "\(previous)", "fleetgate.name": "\(configuration.nodeName)"])
    }

    /// Every heartbeat interval: extend the lease, refresh the view of dead nodes, sweep when holding the lock.
    /// An expired or unknown node re-registers as a new incarnation and re-admits its connections.
    func heartbeatLoop() async {
        repeat {
            await heartbeat()
        } while await pause(configuration.heartbeat.interval)
    }

    private func heartbeat() async {
        let (node, registered) = state.withLock { ($0.node, $0.registered) }
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
        let (open, users) = state.withLock { ($0.table.openCount, $0.table.userCount) }
        let ttl = nodeTTLMilliseconds
        do {
            let results = try await redis.pipeline(
                [
                    .script(scripts.heartbeat, keys: [keys.nodes], arguments: [node, String(ttl), "beat"]),
                    .command(RedisCommand("HSET", keys.node(node), "conns", open, "users", users)),
                    .command(RedisCommand("PEXPIRE", keys.node(node), ttl * 3)),
                    .script(scripts.sweeperLock, keys: [keys.sweeper], arguments: [node, String(configuration.heartbeat.interval.milliseconds * 3)]),
                ],
                timeout: configuration.heartbeat.interval
            )
            let reply = try results[0].get()
            markRedisAvailable()
            guard reply.int(at: 0) == 1 else {
                await leaseExpired(node: node, status: reply.int(at: 0) ?? 0)
                return
            }
            let expired = Set(reply.strings(from: 2))
            let regained = state.withLock { state -> Bool in
                guard state.node == node else { return false }
                state.leaseDeadline = sent + configuration.heartbeat.nodeTTL
                state.deadNodes = expired.union(state.deadNodes.filter { expired.contains($0) })
                // Our own clock counts the lease from the heartbeat's sending, so it may give up before Redis does:
                // Redis still holding the lease means it was never lost.
                defer {
                    state.leaseLost = false
                    state.fenced = false
                }
                return state.leaseLost
            }
            if regained {
                nodeLogger(node).info("node lease still held in Redis; resuming")
            }
            if (try? results[3].get().int) == 1, !expired.isEmpty {
                await sweep(expired.subtracting([node]))
            }
        } catch {
            heartbeatFailed(error)
        }
    }

    private func heartbeatFailed(_ error: any Error) {
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

    /// The registry says this incarnation is gone (expired, or lost in a Redis restart): re-register and re-admit.
    private func leaseExpired(node: String, status: Int) async {
        let announce = state.withLock { state -> Bool in
            defer { state.leaseLost = true }
            return !state.leaseLost && state.node == node
        }
        if announce {
            nodeLogger(node).info("node lease lost", metadata: ["fleetgate.status": "\(status == 0 ? "unknown" : "expired")"])
            emit(.leaseLost(node: node))
        }
        do {
            try await register()
        } catch {
            heartbeatFailed(error)
            return
        }
        await readmitAll(previous: node)
    }

    /// After re-registration: re-admit every open connection, oldest first, through the normal admission script.
    /// A connection denied now (its user was filled meanwhile) is closed: the node that lost its lease yields.
    private func readmitAll(previous: String) async {
        let (node, connections, dead) = state.withLock { state in
            (state.node, state.table.openOldestFirst(), Array(state.deadNodes.union([previous])))
        }
        var readmitted = 0
        var denied = 0
        for (id, connection) in connections {
            do {
                let reply = try await runAdmit(user: connection.user, connection: id, node: node, limit: connection.limit, dead: dead)
                if reply.status == .denied {
                    denied += 1
                    state.withLock { _ = $0.table.remove(id) }
                    emit(.kick(connection: id, user: connection.user.rawValue, reason: .deniedAfterLeaseLoss))
                } else {
                    readmitted += 1
                    state.withLock { $0.table.markOpen(id, node: node) }
                }
            } catch {
                // Redis failed again: the connection stays, and the renewal re-adds it under the new node.
                state.withLock { $0.table.markOpen(id, node: node) }
            }
        }
        metrics.activeConnections.record(localConnectionCount)
        nodeLogger(node).info("node re-registered", metadata: ["fleetgate.readmitted": "\(readmitted)", "fleetgate.denied": "\(denied)"])
        emit(.reregistered(node: node, readmitted: readmitted, denied: denied))
    }

    /// Watches this node's own lease on the monotonic clock. With `onLeaseLoss: close`, fences (asks the gateway to
    /// close every connection) one heartbeat interval before the lease can run out.
    func leaseMonitorLoop() async {
        let step = min(configuration.heartbeat.interval / 4, .milliseconds(100))
        while await pause(step) {
            let now = clock.now
            let (fence, lost, node) = state.withLock { state -> (Bool, Bool, String) in
                guard state.registered, let deadline = state.leaseDeadline else { return (false, false, state.node) }
                var fence = false
                var lost = false
                if configuration.policies.onLeaseLoss == .close, !state.fenced, now >= deadline - configuration.heartbeat.interval {
                    state.fenced = true
                    fence = true
                }
                if !state.leaseLost, now >= deadline {
                    state.leaseLost = true
                    lost = true
                }
                return (fence, lost, state.node)
            }
            if fence {
                metrics.fencingEvents.increment()
                nodeLogger(node).info("fencing: closing every connection before the node lease can expire")
                emit(.fenced(node: node))
            }
            if lost {
                nodeLogger(node).info("node lease lost (no successful heartbeat within the node TTL)")
                emit(.leaseLost(node: node))
            }
        }
    }
}
