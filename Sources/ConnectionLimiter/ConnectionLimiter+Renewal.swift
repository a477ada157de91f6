import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Every renew interval: renew the lease of exactly the connections open here, batched per user key and
    /// pipelined; re-add entries that are missing while the user is under the limit; close the ones that cannot be.
    func renewalLoop() async {
        while await pause(configuration.lease.renewInterval) {
            await renewLeases()
        }
    }

    /// One renewal round (also used by tests).
    func renewLeases() async {
        let (node, usable, groups) = state.withLock { state in
            (state.node, state.registered && !state.leaseLost, state.table.openByUser())
        }
        guard usable, !groups.isEmpty else { return }
        let chunkSize = 256
        for start in stride(from: 0, to: groups.count, by: chunkSize) {
            let chunk = groups[start..<min(start + chunkSize, groups.count)]
            var steps: [PipelineStep] = chunk.map { user, connections in
                let members = connections.map { Member(node: node, connection: $0.id).text }
                let limit = connections.first?.connection.limit ?? configuration.defaultLimit
                return .script(
                    scripts.renew,
                    keys: keys.userKeys(user),
                    arguments: [String(leaseMilliseconds), String(limit), policyArgument] + members
                )
            }
            steps.append(.command(RedisCommand("SADD", arguments: [keys.users(node)] + chunk.map(\.0.escaped))))
            steps.append(.command(RedisCommand("PEXPIRE", keys.users(node), leaseMilliseconds + nodeTTLMilliseconds)))
            guard let results = try? await redis.pipeline(steps, timeout: configuration.lease.renewInterval) else {
                nodeLogger(node).debug("lease renewal failed; will retry next interval")
                return
            }
            for ((user, connections), result) in zip(chunk, results) {
                guard case .success(let reply) = result else { continue }
                let lost = Set(reply.strings(from: 2).compactMap { Member($0)?.connection })
                state.withLock { state in
                    for (id, _) in connections where !lost.contains(id) { state.table.markOpen(id, node: node) }
                    for id in lost { _ = state.table.remove(id) }
                }
                for id in lost {
                    emit(.kick(connection: id, user: user.rawValue, reason: .lostAtRenewal))
                }
            }
        }
    }
}
