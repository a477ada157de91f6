import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Emergency cleanup on a denial: drop this node's stale members and probe its own silent connections of the
    /// user, ask other live owners to do the same (bounded wait), count owners missing from the registry as dead, and
    /// retry once. Redis has already said "at the limit": a failure here answers with that denial, never with the
    /// Redis-down fallback.
    func cleanUpAndRetry(user: UserID, connection: String, node: String, limit: Int, denied: AdmitReply) async throws -> AdmitReply {
        do {
            return try await cleanUpAndRetryOnce(user: user, connection: connection, node: node, limit: limit, denied: denied)
        } catch {
            if error is CancellationError || (error as? RedisError)?.code == .cancelled {
                // The caller went away: the retry may have been written, so its member is queued for removal, and
                // the admission's own error handling takes the cancellation from here.
                forgetOrphan(user: user, member: Member(node: node, connection: connection).text, connection: connection)
                throw error
            }
            nodeLogger(node).warning(
                "emergency cleanup failed after a denial; the denial stands",
                metadata: [LogKey.user: "\(user)", LogKey.connection: "\(connection)", LogKey.count: "\(denied.count)", LogKey.error: "\(error)"])
            // The retry may have been sent and admitted before the failure was seen: its member must not stay.
            forgetOrphan(user: user, member: Member(node: node, connection: connection).text, connection: connection)
            return denied
        }
    }

    private func cleanUpAndRetryOnce(user: UserID, connection: String, node: String, limit: Int, denied: AdmitReply) async throws -> AdmitReply {
        let holders = denied.holders.map(\.member)
        let (staleOwn, liveOwn) = state.withLock { state -> ([String], [String]) in
            let own = holders.filter { $0.node == node && $0.connection != connection }
            return (
                own.filter { !state.table.isLive($0.connection) }.map(\.text),
                own.filter { state.table.connection($0.connection)?.state == .open }.map(\.connection)
            )
        }
        if !staleOwn.isEmpty {
            let removed =
                try await redis.eval(
                    scripts.purge,
                    keys: [keys.conns(user), keys.since(user)],
                    arguments: ["members"] + staleOwn,
                    timeout: configuration.admissionTimeout
                ).int ?? 0
            metrics.evictedZombie.increment(by: Int64(removed))
        }
        let owners = Set(holders.map(\.node)).subtracting([node])
        var dead = Set(state.withLock { $0.deadList })
        var liveOwners: Set<String> = []
        if !owners.isEmpty {
            // Read the registry after the holders: an owner missing from it, or expired, is dead for good. Expired by
            // the registry's own clock (read in the same script): on Redis Cluster the user's shard and the
            // registry's may be different servers whose clocks differ.
            let registry = try await redis.eval(scripts.registry, keys: [keys.nodes], timeout: configuration.admissionTimeout)
            let now = registry.array?.first?.int.map(Int64.init) ?? denied.now
            var expiries: [String: Int64] = [:]
            let flat = registry.array?.last?.array ?? []
            for pair in stride(from: 0, to: flat.count - 1, by: 2) {
                if let id = flat[pair].string, let score = flat[pair + 1].string.flatMap({ Double($0) }) { expiries[id] = Int64(score) }
            }
            let deadOwners = owners.filter { (expiries[$0] ?? 0) <= now }
            dead.formUnion(deadOwners)
            liveOwners = owners.subtracting(deadOwners)
        }
        // This node probes its own silent connections of the user while the other owners probe theirs.
        let verified = liveOwners
        await withTaskGroup(of: Void.self) { group in
            if !liveOwn.isEmpty {
                group.addTask { await self.probeOwn(user: user, connections: liveOwn) }
            }
            if !verified.isEmpty {
                group.addTask { await self.verify(user: user, with: verified, requester: node) }
            }
        }
        return try await runAdmit(user: user, connection: connection, node: node, limit: limit, dead: Array(dead), index: false)
    }

    /// Probes this node's open `connections` of `user` through the embedder's ``ConnectionProbe`` (none: nothing
    /// happens); the ones that fail leave the local table and Redis at once (`fleetgate_evictions_total{reason="probe"}`),
    /// and the probe closes their sockets. Bounded by the probe timeout plus a margin, whatever the probe does.
    func probeOwn(user: UserID, connections: [String]) async {
        guard let probe = probe, !connections.isEmpty else { return }
        let failed = await Self.boundedProbe(probe, connections: connections, user: user.rawValue, timeout: configuration.probe.timeout)
        guard !failed.isEmpty else { return }
        let removed = state.withLock { state -> [(id: String, connection: LocalTable.Connection)] in
            failed.filter { connections.contains($0) }.compactMap { id in
                removeLocally(id, from: &state).map { (id: id, connection: $0) }
            }
        }
        guard !removed.isEmpty else { return }
        metrics.activeConnections.record(localConnectionCount)
        metrics.evictedProbe.increment(by: Int64(removed.count))
        nodeLogger(nodeID).info(
            "liveness probe failed; connections released",
            metadata: [LogKey.user: "\(user)", "fleetgate.released": "\(removed.count)", "fleetgate.probed": "\(connections.count)"])
        let members = removed.compactMap { entry in entry.connection.node.map { Member(node: $0, connection: entry.id).text } }
        if !(await removeMembers(members, of: user)) {
            // The lease is the backstop; the next cleanup's verify finds them as stale (no longer live here).
            nodeLogger(nodeID).debug("could not remove the entries of failed probes", metadata: [LogKey.user: "\(user)"])
        }
    }

    /// Runs the embedder's probe, but waits for it at most `timeout` + 250 ms: a probe that overruns (or never
    /// returns, ignoring cancellation) decides nothing, and every connection stays. The probe runs in a task of its
    /// own, so a late probe is cancelled and left behind instead of awaited.
    static func boundedProbe(_ probe: any ConnectionProbe, connections: [String], user: String, timeout: Duration) async -> Set<String> {
        await withCheckedContinuation { (continuation: CheckedContinuation<Set<String>, Never>) in
            let race = FirstAnswer(continuation)
            race.add(Task { race.finish(await probe.probe(connections: connections, user: user, timeout: timeout)) })
            race.add(
                Task {
                    try? await Task.sleep(for: timeout + .milliseconds(250))
                    race.finish([])
                })
        }
    }
}

/// The first of several tasks to answer resumes the continuation; the others are cancelled and left behind.
private final class FirstAnswer: Sendable {
    private struct State {
        var continuation: CheckedContinuation<Set<String>, Never>?
        var tasks: [Task<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(_ continuation: CheckedContinuation<Set<String>, Never>) {
        state = Mutex(State(continuation: continuation))
    }

    func add(_ task: Task<Void, Never>) {
        let finished = state.withLock { state -> Bool in
            guard state.continuation != nil else { return true }
            state.tasks.append(task)
            return false
        }
        if finished { task.cancel() }
    }

    func finish(_ value: Set<String>) {
        let (continuation, tasks) = state.withLock { state -> (CheckedContinuation<Set<String>, Never>?, [Task<Void, Never>]) in
            defer {
                state.continuation = nil
                state.tasks = []
            }
            return (state.continuation, state.tasks)
        }
        guard let continuation else { return }
        continuation.resume(returning: value)
        for task in tasks { task.cancel() }
    }
}
