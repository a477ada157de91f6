import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Releases `connection` (call when its socket closed). Unknown ids are ignored. A release Redis does not
    /// confirm is retried in the background; the lease is the backstop.
    public func release(connection: String) async {
        guard let entry = state.withLock({ $0.table.markReleasing(connection) }) else { return }
        // Still pending: the admission in flight sees the release and removes its member itself.
        if entry.state == .pending { return }
        await sendRelease(connection, entry)
    }

    /// Removes the member of a releasing connection, then the connection; on failure, queues it for a retry.
    private func sendRelease(_ connection: String, _ entry: LocalTable.Connection) async {
        guard let node = entry.node else {
            state.withLock { _ = removeLocally(connection, from: &$0) }
            metrics.activeConnections.record(localConnectionCount)
            return
        }
        // The user's last connection here leaves the node's users index in the same write as the release.
        let user = entry.user
        let leavesIndex = state.withLock { $0.table.byUser[user]?.count ?? 0 } <= 1
        var steps: [PipelineStep] = [
            .script(scripts.release, keys: [keys.conns(user), keys.since(user)], arguments: [Member(node: node, connection: connection).text])
        ]
        if leavesIndex { steps.append(.command(RedisCommand("SREM", keys.users(node), user.escaped))) }
        do {
            let results = try await redis.pipeline(steps, timeout: configuration.admissionTimeout)
            _ = try results[0].get()
        } catch {
            state.withLock { _ = $0.releaseRetries.insert(connection) }
            nodeLogger(node).debug("release failed; will retry", metadata: [LogKey.connection: "\(connection)", LogKey.error: "\(error)"])
            return
        }
        guard state.withLock({ $0.table.remove(connection) }) != nil else { return }
        metrics.activeConnections.record(localConnectionCount)
        // An admission of the same user may have sent its SADD before our SREM: put the user back if so, so the
        // sweeper still finds the user should this node die.
        if leavesIndex, state.withLock({ $0.table.hasConnections(of: user) }) {
            // With its TTL: the SREM may have removed the index's last member, deleting the key, and a key made by a
            // bare SADD would outlive this node (found by the chaos runner's leftovers check).
            _ = try? await redis.pipeline(
                [
                    RedisCommand("SADD", keys.users(node), user.escaped),
                    RedisCommand("PEXPIRE", keys.users(node), leaseMilliseconds + nodeTTLMilliseconds),
                ], timeout: configuration.admissionTimeout)
        }
    }

    /// Retries failed releases every second, and removes the entries of admissions that failed after their script
    /// may have run (a timeout, a cancellation) unless the same connection id has been admitted since.
    func releaseRetryLoop() async {
        while await pause(.seconds(1)) {
            let (pending, orphans) = state.withLock { state -> ([(String, LocalTable.Connection)], [String: Orphan]) in
                let ids = state.releaseRetries
                state.releaseRetries = []
                let orphans = state.orphans.filter { state.table.connection($0.key) == nil }
                return (ids.compactMap { id in state.table.connection(id).map { (id, $0) } }, orphans)
            }
            for (id, entry) in pending { await sendRelease(id, entry) }
            await retryUndeliveredKicks()
            for (connection, orphan) in orphans {
                // An admission with the same id may have started since the snapshot: its member must stay. (A purge
                // already on its way can still remove it; the next renewal then re-adds it.)
                let current = state.withLock { $0.orphans[connection]?.member == orphan.member && $0.table.connection(connection) == nil }
                guard current, await removeMembers([orphan.member], of: orphan.user) else { continue }
                state.withLock { state in
                    if state.orphans[connection]?.member == orphan.member { state.orphans[connection] = nil }
                }
            }
        }
    }
}
