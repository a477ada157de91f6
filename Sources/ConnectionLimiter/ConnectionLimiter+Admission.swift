import Logging
import Metrics
import RedisClient
import Synchronization

/// The admission script's answer.
struct AdmitReply: Sendable {
    enum Status: Int { case denied = 0, admitted = 1, evicted = 2, alreadyAdmitted = 3, dryRunOverLimit = 4, kicked = 5 }
    var status: Status
    var count: Int
    var limit: Int
    /// Redis's clock (ms) when the script ran.
    var now: Int64
    var expiredRemoved: Int
    var deadRemoved: Int
    /// Evicted member (status 2) or holders `member|expiry` (status 0).
    var extra: [String]

    init(_ reply: RESPValue, user: UserID) throws(LimiterError) {
        guard let raw = reply.int(at: 0), let status = Status(rawValue: raw), let count = reply.int(at: 1),
            let limit = reply.int(at: 2), let now = reply.int(at: 3), let expired = reply.int(at: 4), let dead = reply.int(at: 5)
        else {
            throw LimiterError(
                code: .unexpectedReply,
                message: "unexpected reply from the admission script for user \"\(user)\": \(reply); are all nodes on the same version?"
            )
        }
        self.status = status
        self.count = count
        self.limit = limit
        self.now = Int64(now)
        self.expiredRemoved = expired
        self.deadRemoved = dead
        self.extra = reply.strings(from: 6)
    }

    /// The holders of a denial: member and lease expiry.
    var holders: [(member: Member, expiry: Int64)] {
        extra.compactMap { text in
            guard let bar = text.lastIndex(of: "|"), let member = Member(String(text[..<bar])),
                let expiry = Int64(text[text.index(after: bar)...])
            else { return nil }
            return (member, expiry)
        }
    }
}

extension ConnectionLimiter {
    /// Asks to open `connection` for `user`.
    ///
    /// The connection enters this node's table before the admission script runs, so a concurrent cleanup never
    /// removes it. A retry with the same connection id is idempotent. On a denial, zombies are cleaned up and the
    /// admission is retried once before answering.
    ///
    /// - Parameters:
    ///   - user: the application's user id (1 to 256 bytes of UTF-8).
    ///   - connection: this node's id for the connection (1 to 64 of `A-Z a-z 0-9 _ - .`), unique on the node.
    ///   - limit: the limit for this user from the caller (e.g. a token claim); a Redis override wins; defaults to
    ///     the configuration's default.
    /// - Returns: admitted, or denied with the count, limit, holders and a retry hint.
    /// - Throws: ``LimiterError`` for invalid input, or ``LimiterError/Code/redisUnavailable`` when Redis is down
    ///   and the policy is `reject`.
    public func admit(user rawUser: String, connection: String, limit: Int? = nil) async throws -> AdmissionDecision {
        let user = try UserID(rawUser)
        try ConnectionIDs.validate(connection)
        let limit = limit ?? configuration.defaultLimit
        guard (0...1_000_000).contains(limit) else {
            throw LimiterError(code: .invalidLimit, message: "limit \(limit) for user \"\(user)\" must be between 0 and 1000000")
        }
        await waitForFirstRegistration()
        enum Entry {
            case refused(LimiterError)
            case taken(node: String)
            case added(node: String, viaRedis: Bool, dead: [String], first: Bool)
        }
        let entry = state.withLock { state -> Entry in
            // An earlier attempt with this id that timed out must not have its entry removed behind this one's back.
            state.orphans.removeValue(forKey: connection)
            var route = state.life.admissionRoute
            // Lost on this node's own clock (policy keep) while Redis answers (a slow heartbeat, or Redis said expired
            // and the re-registration is on its way): Redis still decides — a local count cannot see the other
            // nodes. Only a Redis that does not answer hands the admission to the onRedisDown policy.
            if case .unregistered(let node) = route, state.life.phase == .lost, state.life.registered, !state.redisDown {
                route = .redis(node: node)
            }
            switch route {
            case .notRunning(let node):
                return .refused(
                    LimiterError(
                        code: .notRunning,
                        message: "the limiter is not running (call run() first); connection \(connection) of user \"\(user)\" refused on node \(node)"
                    ))
            case .draining(let node):
                return .refused(
                    LimiterError(
                        code: .notRunning,
                        message: "node \(node) is shutting down; connection \(connection) of user \"\(user)\" refused (connect to another node)"))
            case .fenced(let node):
                return .refused(fencedError(node: node, user: user, connection: connection))
            case .redis(let node), .unregistered(let node):
                let first = !state.table.hasConnections(of: user)
                guard state.table.addPending(connection, user: user, limit: limit) else { return .taken(node: node) }
                if case .redis = route { return .added(node: node, viaRedis: true, dead: state.deadList, first: first) }
                return .added(node: node, viaRedis: false, dead: [], first: first)
            }
        }
        let (node, viaRedis, dead, first): (String, Bool, [String], Bool)
        switch entry {
        case .refused(let error):
            throw error
        case .taken(let taken):
            throw LimiterError(
                code: .invalidConnection,
                message: "connection id \"\(connection)\" is already in use on node \(taken) by another user (not \"\(user)\")"
            )
        case .added(let added, let redis, let deadNodes, let firstHere):
            (node, viaRedis, dead, first) = (added, redis, deadNodes, firstHere)
        }
        guard viaRedis else {
            // A caller that went away is never admitted on the local count.
            if Task.isCancelled {
                state.withLock { _ = removeLocally(connection, from: &$0) }
                throw CancellationError()
            }
            return try fallback(user: user, connection: connection, limit: limit, reason: "node \(node) is not registered in Redis", sent: nil)
        }
        let entryNode = node
        let member = Member(node: entryNode, connection: connection).text
        do {
            var reply = try await runAdmit(user: user, connection: connection, node: entryNode, limit: limit, dead: dead, index: first)
            if reply.status == .denied {
                // Redis has answered "at the limit": from here on every failure denies (never the Redis-down
                // fallback, whose local count would admit one over the limit).
                reply = try await cleanUpAndRetry(user: user, connection: connection, node: entryNode, limit: limit, denied: reply)
            }
            if reply.status != .denied, isFenced {
                // Fenced while the script ran: the gateway has been told to close everything, so this one must not
                // stay open either.
                state.withLock { _ = removeLocally(connection, from: &$0) }
                await removeMembers([member], of: user)
                // What the script evicted for it is gone from Redis all the same: its owners must close those.
                if reply.status == .evicted {
                    for evicted in reply.extra.compactMap({ Member($0) }) {
                        metrics.evictedTrimmed.increment()
                        await kick(evicted, user: user)
                    }
                }
                throw fencedError(node: entryNode, user: user, connection: connection)
            }
            state.withLock { $0.redisFullSince = nil }
            return await finishAdmission(user: user, connection: connection, node: entryNode, reply: reply)
        } catch let error as RedisError where error.serverErrorPrefix == "OOM" {
            // Redis is up but full: refuse (no local fallback, whose count would not see the other nodes). The
            // script did not run (it is not allowed to at the memory limit), so nothing is left in Redis.
            state.withLock { _ = removeLocally(connection, from: &$0) }
            metrics.redisFull.increment()
            let first = state.withLock { state -> Bool in
                defer { state.redisFullSince = state.redisFullSince ?? clock.now }
                return state.redisFullSince == nil
            }
            if first {
                nodeLogger(entryNode).warning(
                    "Redis is full: new connections are refused (503 redis_full) until memory is freed or maxmemory raised; existing connections keep their leases",
                    metadata: [LogKey.error: "\(error.message)", "fleetgate.redis": "\(redis.configuration.address)"])
            }
            throw LimiterError(
                code: .redisFull,
                message:
                    "Redis at \(redis.configuration.address) is out of memory (\(error.message)); connection \(connection) of user \"\(user)\" refused: raise maxmemory or free memory, existing connections keep their leases",
                underlying: error)
        } catch let error as RedisError where Self.isUnavailability(error) && !Task.isCancelled {
            do {
                return try fallback(user: user, connection: connection, limit: limit, reason: error.message, sent: member)
            } catch {
                // Refused (onRedisDown=reject, or fenced) after a timeout: the script may still run once Redis
                // answers, and its entry would then count against the user until its lease ran out. Remove it as soon
                // as Redis is back.
                forgetOrphan(user: user, member: member, connection: connection)
                throw error
            }
        } catch {
            // Cancelled, fenced, or an answer we do not understand: never admit on that. The script may have run: its
            // entry is removed in the background (and the lease is the backstop).
            state.withLock { _ = removeLocally(connection, from: &$0) }
            forgetOrphan(user: user, member: member, connection: connection)
            if error is CancellationError || error is LimiterError { throw error }
            if let redisError = error as? RedisError, redisError.code == .cancelled { throw error }
            throw LimiterError(
                code: .unexpectedReply,
                message:
                    "admission of connection \(connection) of user \"\(user)\" on node \(entryNode) failed: \(error); check the user's keys (\(keys.conns(user)), \(keys.limit(user))) and the script version",
                underlying: error)
        }
    }

    /// Whether the node has fenced itself (policy `onLeaseLoss: close`) and not re-registered since.
    var isFenced: Bool {
        state.withLock { $0.life.isFenced }
    }

    func fencedError(node: String, user: UserID, connection: String) -> LimiterError {
        LimiterError(
            code: .redisUnavailable,
            message:
                "node \(node) may have lost its lease (Redis unreachable); policy onLeaseLoss=close refuses connection \(connection) of user \"\(user)\" until it re-registers"
        )
    }

    /// Queues the removal of a member an unfinished admission may have left in Redis (see ``releaseRetryLoop()``).
    func forgetOrphan(user: UserID, member: String, connection: String) {
        state.withLock { $0.orphans[connection] = Orphan(user: user, member: member) }
    }

    /// Right after start the node is not registered yet: an admission then waits for the first registration
    /// instead of taking the Redis-down fallback, whose local count would not see other nodes — until
    /// `admissionTimeout` after ``run()`` started. With Redis down from the start, only the first admissions wait;
    /// later ones go straight to the `onRedisDown` policy.
    func waitForFirstRegistration() async {
        let deadline = state.withLock { state in state.life.isRunning && !state.life.everRegistered ? state.life.startedAt : nil }
        guard let deadline else { return }
        let left = clock.now.duration(to: deadline + configuration.admissionTimeout)
        guard left > .zero else { return }
        await firstRegistration.wait(timeout: left)
    }

    /// Errors that mean "Redis cannot answer now" (the `onRedisDown` policy applies), as opposed to cancellation or
    /// a reply that shows a bug.
    static func isUnavailability(_ error: RedisError) -> Bool {
        switch error.code {
        case .connectionRefused, .connectFailed, .connectionLost, .timeout, .clientShutdown, .loading, .busy, .authenticationFailed:
            return true
        default:
            return error.serverErrorPrefix == "READONLY" || error.serverErrorPrefix == "MASTERDOWN"
        }
    }

    /// One admission round trip: the user joins this node's users index, then the script runs (one write).
    ///
    /// `index`: add the user to this node's users index first (in the same write). Needed for the user's first
    /// connection here; while the user has another connection here, the index already holds it.
    ///
    /// `policy`: the overflow policy argument of the script (default: the configured one).
    ///
    /// `previous`: the member the connection was held under before (a re-admission): if it is marked kicked, the
    /// script answers ``AdmitReply/Status/kicked`` instead of admitting.
    func runAdmit(
        user: UserID, connection: String, node: String, limit: Int, dead: [String], index: Bool = true, policy: String? = nil,
        previous: String? = nil
    ) async throws -> AdmitReply {
        let member = Member(node: node, connection: connection).text
        let arguments = [member, String(limit), String(leaseMilliseconds), policy ?? policyArgument, dryRunArgument, previous ?? ""] + dead
        let started = clock.now
        let script = PipelineStep.script(scripts.admit, keys: keys.userKeys(user), arguments: arguments)
        var steps = [script]
        if index {
            let add = RedisCommand("SADD", strings: [keys.users(node), user.escaped])
            // The TTL (as the heartbeat sets it) keeps an index written after the node's drain deleted it from staying.
            let expire = RedisCommand("PEXPIRE", keys.users(node), leaseMilliseconds + nodeTTLMilliseconds)
            if redis.isCluster {
                // The index and the user's keys live on different shards, so nothing orders the two writes: they go
                // out together (one round trip, each to its shard) and the admission counts only once the index write
                // is confirmed too — an entry whose index write failed is taken out again before the error is thrown.
                // The index shard failing while this node crashes (a double fault) can leave an entry the index does
                // not name: a sweep cannot find it; the dead-owner cleanup of the user's next denial removes it at
                // once, and otherwise its lease ends it (lease.ttl, 5 minutes by default).
                steps = [.command(add), .command(expire), script]
            } else {
                // Queued ahead of the script on the same connection: if it cannot be written, neither can the script.
                try redis.sendWithoutReply(add, timeout: configuration.admissionTimeout)
                try redis.sendWithoutReply(expire, timeout: configuration.admissionTimeout)
            }
        }
        var results = try await redis.pipeline(steps, timeout: configuration.admissionTimeout)
        if steps.count == 3 {  // the index write went with the script (cluster)
            let indexed = results[0].flatMap { _ in results[1] }
            results.removeFirst(2)
            if case .failure(let error) = indexed {
                if let reply = try? AdmitReply(results[0].get(), user: user), [.admitted, .evicted, .dryRunOverLimit].contains(reply.status) {
                    await removeMembers([member], of: user)
                }
                throw error
            }
        }
        metrics.scriptLatency.record(duration: started.duration(to: clock.now))
        let reply = try AdmitReply(results[0].get(), user: user)
        if reply.expiredRemoved > 0 { metrics.evictedExpired.increment(by: Int64(reply.expiredRemoved)) }
        if reply.deadRemoved > 0 { metrics.evictedDeadNode.increment(by: Int64(reply.deadRemoved)) }
        return reply
    }

    private func finishAdmission(user: UserID, connection: String, node: String, reply: AdmitReply) async -> AdmissionDecision {
        let log = logger
        // Built only when a debug message is actually logged.
        func metadata(_ extra: Logger.Metadata) -> Logger.Metadata {
            extra.merging([LogKey.node: "\(node)", LogKey.user: "\(user)", LogKey.connection: "\(connection)"]) { first, _ in first }
        }
        switch reply.status {
        case .denied, .kicked:
            state.withLock { _ = removeLocally(connection, from: &$0) }
            metrics.denied.increment()
            let holders = reply.holders
            let soonest = holders.map(\.expiry).min().map { $0 - reply.now } ?? 1000
            // The earliest holder's lease, but no later than 30 s: any entry still stale by then is gone (README).
            let retry = Duration.milliseconds(min(max(soonest, 1000), leaseMilliseconds, 30_000))
            log.debug("admission denied", metadata: metadata([LogKey.count: "\(reply.count)", LogKey.limit: "\(reply.limit)"]))
            return .denied(
                Denial(
                    user: user.rawValue,
                    count: reply.count,
                    limit: reply.limit,
                    holders: holders.map {
                        .init(node: $0.member.node, connection: $0.member.connection, leaseRemaining: .milliseconds($0.expiry - reply.now))
                    },
                    retryAfter: retry
                )
            )
        case .admitted, .evicted, .alreadyAdmitted, .dryRunOverLimit:
            let (kept, open, current) = state.withLock { state -> (Bool, Int, String) in
                (state.table.admitted(connection, node: node), state.table.openCount, state.node)
            }
            metrics.activeConnections.record(open)
            if kept, current != node {
                // The node re-registered while this admission was in flight, and the re-admission may have run
                // without it: renewals skip members of earlier incarnations, so hand it to another re-admission.
                schedule(readmissionAfter: node)
            }
            if !kept {
                // Released while its admission was in flight: take the entry back out.
                await removeMembers([Member(node: node, connection: connection).text], of: user)
                state.withLock { _ = removeLocally(connection, from: &$0) }
            }
            if reply.status == .dryRunOverLimit {
                metrics.dryRunDenied.increment()
                log.debug(
                    "dry run: the limit would have denied this connection",
                    metadata: metadata([LogKey.count: "\(reply.count)", LogKey.limit: "\(reply.limit)"]))
            } else {
                metrics.admitted.increment()
            }
            var evicted: [String] = []
            if reply.status == .evicted {
                for text in reply.extra {
                    guard let member = Member(text) else { continue }
                    evicted.append(text)
                    metrics.evictedTrimmed.increment()
                    await kick(member, user: user)
                }
            }
            return .admitted(
                Admission(
                    count: reply.count,
                    limit: reply.limit,
                    basis: .redis,
                    alreadyAdmitted: reply.status == .alreadyAdmitted,
                    wouldHaveBeenDenied: reply.status == .dryRunOverLimit,
                    evicted: evicted.first,
                    evictedAll: evicted
                )
            )
        }
    }

    /// Removes exactly these members of `user` (best effort; the lease is the backstop). Returns whether Redis did.
    @discardableResult
    func removeMembers(_ members: [String], of user: UserID) async -> Bool {
        guard !members.isEmpty else { return true }
        do {
            _ = try await redis.eval(
                scripts.purge, keys: [keys.conns(user), keys.since(user)], arguments: ["members"] + members, timeout: configuration.admissionTimeout)
            return true
        } catch {
            return false
        }
    }

    /// Redis is unreachable (or the node unregistered): apply `onRedisDown`. A fenced node refuses (its gateway has
    /// closed everything). `sent`: the member an admission script already sent may still write (nil if none was sent).
    private func fallback(user: UserID, connection: String, limit: Int, reason: String, sent: String?) throws -> AdmissionDecision {
        if isFenced {
            let node = state.withLock { removeLocally(connection, from: &$0)?.node } ?? nodeID
            throw fencedError(node: node, user: user, connection: connection)
        }
        switch configuration.policies.onRedisDown {
        case .reject:
            state.withLock { _ = removeLocally(connection, from: &$0) }
            throw LimiterError(
                code: .redisUnavailable,
                message:
                    "Redis at \(redis.configuration.address) is unavailable (\(reason)); connection \(connection) of user \"\(user)\" refused by policy onRedisDown=reject; retry later"
            )
        case .local:
            // This node's share of the limit, ⌈limit / live nodes last seen⌉: no node admits past its share by its own
            // count, so a user holds at most Σ max(held_i, share) fleet-wide (under L + N from an even start).
            let decision = state.withLock { state -> (admitted: Bool, count: Int, share: Int) in
                let open = state.table.openCount(of: user)
                let share = Self.localShare(of: limit, liveNodes: state.liveNodes)
                if open < share || configuration.policies.dryRun {
                    if state.table.admitted(connection, node: nil) { return (true, open + 1, share) }
                    // Released while its admission was pending: the release left it to this admission to finish.
                    removeLocally(connection, from: &state)
                    return (true, open, share)
                }
                removeLocally(connection, from: &state)
                return (false, open, share)
            }
            if let sent, state.withLock({ $0.table.connection(connection) == nil }) {
                // Not open here (denied, or released meanwhile), but the script may still write its member once Redis
                // answers: remove it then.
                forgetOrphan(user: user, member: sent, connection: connection)
            }
            nodeLogger(nodeID).debug(
                "admission by local count", metadata: [LogKey.user: "\(user)", LogKey.error: "\(reason)", LogKey.limit: "\(decision.share)"])
            if decision.admitted {
                metrics.admittedLocal.increment()
                return .admitted(
                    Admission(
                        count: decision.count, limit: decision.share, basis: .localFallback, alreadyAdmitted: false, wouldHaveBeenDenied: false,
                        evicted: nil,
                        evictedAll: []))
            }
            metrics.denied.increment()
            return .denied(
                Denial(
                    user: user.rawValue, count: decision.count, limit: decision.share, holders: [], retryAfter: configuration.heartbeat.nodeTTL,
                    basis: .localFallback))
        }
    }

    /// This node's share of `limit` while Redis is unreachable: ⌈limit / liveNodes⌉ (`liveNodes` at least 1).
    static func localShare(of limit: Int, liveNodes: Int) -> Int {
        let nodes = max(1, liveNodes)
        return (limit + nodes - 1) / nodes
    }

}
