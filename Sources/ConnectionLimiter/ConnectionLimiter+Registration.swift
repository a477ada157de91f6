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
                .command(nodeHash(node, connections: 0, users: 0)),
                .command(RedisCommand("PEXPIRE", keys.node(node), ttl * 3)),
            ],
            timeout: configuration.heartbeat.interval
        )
        let reply = try results[0].get()
        guard reply.int(at: 0) == 1 else {
            throw LimiterError(code: .unexpectedReply, message: "registration of node \(node) refused (id already taken): \(reply)")
        }
        // A fresh or restarted Redis has no scripts cached: load them all now rather than one NOSCRIPT at a time. (On a
        // cluster, every primary gets them once the registration is in, below.)
        if !redis.isCluster { try? await redis.load(scripts) }
        let accepted = state.withLock { state -> (previous: String?, stale: RedisSubscription?, ready: Bool)? in
            guard state.life.acceptsRegistration else { return nil }
            let previous = state.life.registered(as: node, sentAt: sent)
            if previous == nil {
                state.deadNodes.formUnion(reply.strings(from: 3))
            } else {
                // A new incarnation after a lost lease: whatever cut this node off from Redis (Redis stopped or
                // restarted, a partition) most likely expired its peers too, and they are re-registering and
                // re-admitting their sockets right now. Counting them dead would drop their live entries and let
                // new connections in above the limit (seen in the chaos runner's big run after a Redis stop), so no
                // node counts as dead for a node TTL and an interval; a node that really died meanwhile is swept
                // that much later, within the 30 s promise.
                let until = clock.now + configuration.heartbeat.nodeTTL + configuration.heartbeat.interval
                state.sweepsSuspendedUntil = max(state.sweepsSuspendedUntil ?? until, until)
                state.deadNodes = []
            }
            state.liveNodes = max(1, reply.int(at: 2) ?? 1)
            let listening = state.listeningAs == node
            return (previous, listening ? nil : state.subscription, listening)
        }
        guard let (previous, staleSubscription, ready) = accepted else {
            // The node began to drain while this registration was on its way: take the new id out again.
            _ = try? await redis.pipeline(
                [.command(RedisCommand("ZREM", keys.nodes, node)), .command(RedisCommand("DEL", keys.node(node)))],
                timeout: configuration.heartbeat.interval)
            return
        }
        // The control loop moves to the new incarnation's channel when the old subscription ends.
        staleSubscription?.unsubscribe()
        firstRegistration.open()
        if ready { firstReady.open() }
        nodeLogger(node).info(
            "node registered", metadata: ["fleetgate.previous-node": "\(previous ?? "none")", "fleetgate.name": "\(configuration.nodeName)"])
        if redis.isCluster {
            // After the registration, so it never delays it: each script on every primary, all at once. A primary
            // missed here (down, or promoted later) answers NOSCRIPT once and gets the script with the EVAL fallback.
            await withDiscardingTaskGroup { group in
                for script in scripts.all { group.addTask { _ = try? await self.redis.load(script) } }
            }
        }
    }

    /// The HSET of a node's hash: what `status` shows of it.
    func nodeHash(_ node: String, connections: Int, users: Int) -> RedisCommand {
        RedisCommand(
            "HSET", keys.node(node),
            "name", configuration.nodeName,
            "address", state.withLock { $0.address } ?? configuration.nodeAddress,
            "pid", Int(ProcessInfo.processInfo.processIdentifier),
            "version", FleetgateVersion.current,
            "ttl", nodeTTLMilliseconds,
            "started", Int(Date().timeIntervalSince1970 * 1000),
            "conns", connections,
            "users", users
        )
    }

    /// The registry says this incarnation is gone (expired, or lost in a Redis restart): re-register at once (so the
    /// heartbeats go on) and hand the re-admission of its connections to the maintenance loop.
    func leaseExpired(node: String, status: Int) async {
        let actions = state.withLock { $0.life.heartbeatRefused(for: node) }
        if !actions.isEmpty {
            nodeLogger(node).info("node lease lost", metadata: ["fleetgate.status": "\(status == 0 ? "unknown" : "expired")"])
            // Fence (policy close) first; the loss itself is announced here, with Redis's word for it.
            perform(actions.filter { if case .fence = $0 { return true } else { return false } })
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

    /// After re-registration: re-admit every open connection through the normal admission script, oldest first and
    /// many at a time (pipelined). A connection denied now (its user was filled meanwhile) is closed: the node that
    /// lost its lease yields. So the script runs with the "yield" policy under evict-oldest (admission times kept, no
    /// eviction): a re-admission never evicts the connections other nodes admitted while this node was away.
    func readmitAll(previous: String) async {
        let (node, connections, dead) = state.withLock { state in
            (state.node, state.table.openOldestFirst().filter { $0.connection.node != state.node }, state.deadList)
        }
        var readmitted = 0
        var denied = 0
        let batch = 256
        var kicked = 0
        for start in stride(from: 0, to: connections.count, by: batch) {
            let chunk = connections[start..<min(start + batch, connections.count)]
            let outcomes = await withTaskGroup(of: (String, LocalTable.Connection, AdmitReply?).self) { group in
                for (id, connection) in chunk {
                    group.addTask {
                        // The old member goes along: a connection kicked while this node was away (its old member marked
                        // kicked in Redis) is answered "kicked" atomically instead of re-admitted under the new id.
                        let reply = try? await self.runAdmit(
                            user: connection.user, connection: id, node: node, limit: connection.limit, dead: dead,
                            policy: self.configuration.policies.overflow == .evictOldest ? "yield" : "reject",
                            previous: connection.node.map { Member(node: $0, connection: id).text })
                        return (id, connection, reply)
                    }
                }
                var outcomes: [(String, LocalTable.Connection, AdmitReply?)] = []
                for await outcome in group { outcomes.append(outcome) }
                return outcomes
            }
            for (id, connection, reply) in outcomes {
                if reply?.status == .kicked {
                    kicked += 1
                    state.withLock { _ = removeLocally(id, from: &$0) }
                    metrics.evictedKicked.increment()
                    emit(.kick(connection: id, user: connection.user.rawValue, reason: .kickedAtRenewal))
                } else if reply?.status == .denied {
                    denied += 1
                    state.withLock { _ = removeLocally(id, from: &$0) }
                    emit(.kick(connection: id, user: connection.user.rawValue, reason: .deniedAfterLeaseLoss))
                } else if reply != nil {
                    readmitted += 1
                    let (adopted, current) = state.withLock { ($0.table.adopt(id, node: node), $0.node) }
                    if !adopted {
                        await removeMembers([Member(node: node, connection: id).text], of: connection.user)
                    } else if current != node {
                        // Re-registered again meanwhile: the next re-admission takes it from this incarnation.
                        schedule(readmissionAfter: node)
                    }
                }
                if reply == nil {
                    // Redis failed again: count it locally; the next renewal round re-adds it under this node.
                    state.withLock { $0.table.detach(id) }
                }
            }
        }
        metrics.activeConnections.record(localConnectionCount)
        nodeLogger(node).info(
            "node re-registered",
            metadata: ["fleetgate.readmitted": "\(readmitted)", "fleetgate.denied": "\(denied)", "fleetgate.kicked": "\(kicked)"])
        emit(.reregistered(node: node, readmitted: readmitted, denied: denied))
    }
}
