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
        // A fresh or restarted Redis has no scripts cached: load them all now rather than one NOSCRIPT at a time.
        try? await redis.load(scripts)
        let (previous, staleSubscription, ready) = state.withLock { state -> (String, RedisSubscription?, Bool) in
            let previous = state.node
            if state.registered, previous != node {
                state.previousIncarnations = Array((state.previousIncarnations + [previous]).suffix(8))
            }
            state.node = node
            state.registered = true
            state.everRegistered = true
            state.leaseLost = false
            state.fenced = false
            state.leaseDeadline = sent + configuration.heartbeat.nodeTTL
            state.deadNodes.formUnion(reply.strings(from: 2))
            let listening = state.listeningAs == node
            return (previous, listening ? nil : state.subscription, listening)
        }
        // The control loop moves to the new incarnation's channel when the old subscription ends.
        staleSubscription?.unsubscribe()
        firstRegistration.open()
        if ready { firstReady.open() }
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
            let expired = Set(reply.strings(from: 2)).subtracting([node])
            let regained = state.withLock { state -> Bool in
                guard state.node == node else { return false }
                state.leaseDeadline = sent + configuration.heartbeat.nodeTTL
                state.deadNodes = expired
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

    private func heartbeatFailed(_ error: any Error) {
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

    /// The registry says this incarnation is gone (expired, or lost in a Redis restart): re-register at once (so the
    /// heartbeats go on) and hand the re-admission of its connections to the maintenance loop.
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
        schedule(readmissionAfter: node)
    }

    // MARK: Maintenance (re-admission, sweeps), off the heartbeat's path

    private func schedule(readmissionAfter previous: String) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.pendingReadmission = previous
            defer { state.maintenanceWaiter = nil }
            return state.maintenanceWaiter
        }
        waiter?.resume()
    }

    private func schedule(sweep nodes: Set<String>) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.pendingSweep.formUnion(nodes)
            state.sweeping = true
            defer { state.maintenanceWaiter = nil }
            return state.maintenanceWaiter
        }
        waiter?.resume()
    }

    /// Runs re-admissions and sweeps the heartbeat asked for, one at a time, so a long one never delays a heartbeat.
    func maintenanceLoop() async {
        while !Task.isCancelled {
            await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let ready = state.withLock { state -> Bool in
                        if state.pendingReadmission != nil || !state.pendingSweep.isEmpty || Task.isCancelled { return true }
                        state.maintenanceWaiter = continuation
                        return false
                    }
                    if ready { continuation.resume() }
                }
            } onCancel: {
                let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                    defer { state.maintenanceWaiter = nil }
                    return state.maintenanceWaiter
                }
                waiter?.resume()
            }
            let (readmission, sweep) = state.withLock { state -> (String?, Set<String>) in
                defer {
                    state.pendingReadmission = nil
                    state.pendingSweep = []
                }
                return (state.pendingReadmission, state.pendingSweep)
            }
            if let previous = readmission { await readmitAll(previous: previous) }
            if !sweep.isEmpty {
                await self.sweep(sweep)
                state.withLock { $0.sweeping = false }
            }
        }
    }

    /// After re-registration: re-admit every open connection through the normal admission script, oldest first and
    /// many at a time (pipelined). A connection denied now (its user was filled meanwhile) is closed: the node that
    /// lost its lease yields. So the script runs with the "yield" policy under evict-oldest (admission times kept, no
    /// eviction): a re-admission never evicts the connections other nodes admitted while this node was away.
    private func readmitAll(previous: String) async {
        let (node, connections, dead) = state.withLock { state in
            (state.node, state.table.openOldestFirst().filter { $0.connection.node != state.node }, state.deadList)
        }
        var readmitted = 0
        var denied = 0
        let batch = 256
        for start in stride(from: 0, to: connections.count, by: batch) {
            let chunk = connections[start..<min(start + batch, connections.count)]
            let outcomes = await withTaskGroup(of: (String, LocalTable.Connection, AdmitReply?).self) { group in
                for (id, connection) in chunk {
                    group.addTask {
                        let reply = try? await self.runAdmit(
                            user: connection.user, connection: id, node: node, limit: connection.limit, dead: dead,
                            policy: self.configuration.policies.overflow == .evictOldest ? "yield" : "reject")
                        return (id, connection, reply)
                    }
                }
                var outcomes: [(String, LocalTable.Connection, AdmitReply?)] = []
                for await outcome in group { outcomes.append(outcome) }
                return outcomes
            }
            for (id, connection, reply) in outcomes {
                if reply?.status == .denied {
                    denied += 1
                    state.withLock { _ = removeLocally(id, from: &$0) }
                    emit(.kick(connection: id, user: connection.user.rawValue, reason: .deniedAfterLeaseLoss))
                } else if reply != nil {
                    readmitted += 1
                    if !state.withLock({ $0.table.adopt(id, node: node) }) {
                        await removeMembers([Member(node: node, connection: id).text], of: connection.user)
                    }
                }
                if reply == nil {
                    // Redis failed again: count it locally; the next renewal round re-adds it under this node.
                    state.withLock { $0.table.detach(id) }
                }
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
