import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Renews the lease of exactly the connections open here, batched per user key and pipelined; re-adds entries
    /// that are missing while the user is under the limit; closes the ones that cannot be. A round runs every renew
    /// interval, and early — at most one a second — when Redis may have lost entries or this node holds connections
    /// counted locally only: the Redis client established a connection since the last round (a restart, a failover,
    /// a healed cut: the server's data may be older than what was written), an admission or re-admission fell back
    /// to the local count, or Redis's clock jumped a while ago (peers may have counted this node dead meanwhile and
    /// dropped its entries). So the long interval costs nothing in how fast lost entries come back.
    func renewalLoop() async {
        var lastRound = clock.now
        var connects = redis.connectionsEstablished
        let check = min(Self.earlyRenewalSpacing, configuration.lease.renewInterval)
        while await pause(check) {
            let now = clock.now
            let sinceLast = lastRound.duration(to: now)
            let established = redis.connectionsEstablished
            let (unheld, due) = state.withLock { state -> (Bool, Bool) in
                let due = state.renewalDue.map { now >= $0 } ?? false
                if due { state.renewalDue = nil }
                return (state.table.unheldCount > 0, due)
            }
            let reconnected = established != connects
            guard sinceLast >= configuration.lease.renewInterval || reconnected || unheld || due else { continue }
            connects = established
            lastRound = now
            let departed = state.withLock { $0.table.rotateDepartures() }
            await renewLeases()
            if reconnected { await reconcileOwnMembers(departed: departed) }
        }
    }

    /// The shortest time between two renewal rounds started by the renewal loop (early rounds after a reconnect, or
    /// for connections counted locally only, retry this often while Redis does not answer).
    static let earlyRenewalSpacing = Duration.seconds(1)

    /// The deadline of one renewal pipeline: a round that Redis does not answer gives way to the next early one.
    var renewalTimeout: Duration { min(configuration.lease.renewInterval, .seconds(10)) }

    /// One renewal round. Connections still held under an earlier incarnation (a re-admission is under way) wait
    /// for it; connections counted only locally (admitted while Redis was down) are added now.
    func renewLeases() async {
        let (node, usable, groups, dead) = state.withLock { state in
            (state.node, state.life.isCurrent, state.table.openByUser(node: state.node), state.deadList)
        }
        guard usable, !groups.isEmpty else { return }
        // One script call per user and at most 1000 members (Lua's unpack limit is near 8000).
        var calls: [(user: UserID, connections: [(id: String, connection: LocalTable.Connection)])] = []
        for (user, connections) in groups {
            for start in stride(from: 0, to: connections.count, by: 1000) {
                calls.append((user, Array(connections[start..<min(start + 1000, connections.count)])))
            }
        }
        for start in stride(from: 0, to: calls.count, by: 256) {
            // A lease lost or a re-registration between two chunks: the new incarnation's re-admission owns the rest.
            guard state.withLock({ $0.node == node && $0.life.isCurrent }) else { return }
            let chunk = calls[start..<min(start + 256, calls.count)]
            var steps: [PipelineStep] = chunk.map { call in
                let members = call.connections.map { Member(node: node, connection: $0.id).text }
                let limit = call.connections.first?.connection.limit ?? configuration.defaultLimit
                return .script(
                    scripts.renew,
                    keys: keys.userKeys(call.user),
                    arguments: [String(leaseMilliseconds), String(limit), policyArgument, dryRunArgument, String(dead.count)] + dead + members
                )
            }
            steps.append(.command(RedisCommand("SADD", arguments: [keys.users(node)] + chunk.map(\.user.escaped))))
            steps.append(.command(RedisCommand("PEXPIRE", keys.users(node), leaseMilliseconds + nodeTTLMilliseconds)))
            let results: [Result<RESPValue, RedisError>]
            do {
                results = try await redis.pipeline(steps, timeout: renewalTimeout)
            } catch {
                // Leases run out after lease.ttl: a few failed rounds in a row put this node's connections at risk.
                nodeLogger(node).warning(
                    "lease renewal failed; will retry next interval",
                    metadata: [LogKey.error: "\(error)", "fleetgate.users": "\(calls.count)", "fleetgate.lease-ttl": "\(configuration.lease.ttl)"])
                return
            }
            for (call, result) in zip(chunk, results) {
                guard case .success(let reply) = result else { continue }
                // {renewed, readded, lost…, "|", readded…, "|", kicked…}
                let parts = reply.strings(from: 2).split(separator: "|", omittingEmptySubsequences: false)
                let lost = Set((parts.first ?? []).compactMap { Member($0)?.connection })
                let readded = (parts.count > 1 ? parts[1] : []).compactMap { Member($0) }
                let kickedHere = Set((parts.count > 2 ? parts[2] : []).compactMap { Member($0)?.connection })
                let (kicked, operatorKicked, released) = state.withLock { state -> ([String], [String], [String]) in
                    // A connection re-admitted under a newer incarnation while this round was on its way (the node
                    // lost its lease and re-registered): its member under `node` is gone on purpose, and the answer
                    // about it is stale — neither closed nor adopted back; a member the script re-added is a stray.
                    func heldElsewhere(_ id: String) -> Bool {
                        guard let held = state.table.connection(id)?.node else { return false }
                        return held != node
                    }
                    var kicked: [String] = []
                    for id in lost where state.table.connection(id)?.state == .open && !heldElsewhere(id) {
                        removeLocally(id, from: &state)
                        kicked.append(id)
                    }
                    // Kicked while the kick message did not reach this node: close it now.
                    var operatorKicked: [String] = []
                    for id in kickedHere where state.table.connection(id)?.state == .open && !heldElsewhere(id) {
                        removeLocally(id, from: &state)
                        operatorKicked.append(id)
                    }
                    var released: [String] = []
                    for (id, _) in call.connections where !lost.contains(id) && !kickedHere.contains(id) {
                        // Released while the renewal was in flight: the script may have put it back.
                        if heldElsewhere(id) || !state.table.adopt(id, node: node) { released.append(id) }
                    }
                    return (kicked, operatorKicked, released)
                }
                for id in operatorKicked {
                    metrics.evictedKicked.increment()
                    emit(.kick(connection: id, user: call.user.rawValue, reason: .kickedAtRenewal))
                }
                let stray = readded.filter { released.contains($0.connection) }.map(\.text)
                await removeMembers(stray, of: call.user)
                for id in kicked {
                    emit(.kick(connection: id, user: call.user.rawValue, reason: .lostAtRenewal))
                }
            }
        }
    }
}
