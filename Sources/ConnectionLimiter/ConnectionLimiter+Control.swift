import Logging
import Metrics
import RedisClient
import Synchronization

extension ConnectionLimiter {
    /// Listens on this node's control channel (`P:{n:<node>}:ctl`) for `verify`, `ack` and `kick`, and moves to the
    /// new channel when the node re-registers.
    func controlLoop() async {
        while !Task.isCancelled {
            let node = nodeID
            let subscription: RedisSubscription
            do {
                subscription = try await redis.subscribe(to: [keys.control(node)])
            } catch {
                guard await pause(configuration.heartbeat.interval) else { return }
                continue
            }
            let (stale, ready) = state.withLock { state -> (Bool, Bool) in
                state.subscription = subscription
                state.listeningAs = node
                return (state.node != node, state.node == node && state.life.registered)
            }
            if stale {
                subscription.unsubscribe()
                continue
            }
            // Registration and subscription can finish in either order; whichever comes second opens the latch.
            if ready { firstReady.open() }
            await withTaskCancellationHandler {
                // Each message is handled on its own: a verify that probes for up to the probe timeout must not hold
                // back the kicks and acks behind it. Every handler is bounded by Redis and probe timeouts.
                await withDiscardingTaskGroup { group in
                    for await message in subscription {
                        let text = message.string
                        group.addTask { await self.handleControl(text, node: node) }
                    }
                }
            } onCancel: {
                subscription.unsubscribe()
            }
            state.withLock { state in
                if state.listeningAs == node { state.listeningAs = nil }
            }
        }
    }

    private func handleControl(_ text: String, node: String) async {
        let parts = text.split(separator: " ", maxSplits: 3, omittingEmptySubsequences: false).map(String.init)
        switch parts.first {
        case "verify" where parts.count == 4:
            guard let user = UserID(escaped: parts[3]) else { return }
            await verifyOwn(user: user, node: node)
            _ = try? await redis.publish("ack \(parts[1]) \(node)", to: keys.control(parts[2]))
        case "ack" where parts.count >= 3:
            acknowledge(request: parts[1], from: parts[2])
        case "kick" where parts.count >= 2:
            let connection = parts[1]
            guard let entry = state.withLock({ removeLocally(connection, from: &$0) }) else { return }
            metrics.evictedKicked.increment()
            let reason: LimiterEvent.KickReason = parts.count >= 3 && parts[2] == "operator" ? .operatorRequest : .evicted
            emit(.kick(connection: connection, user: entry.user.rawValue, reason: reason))
            // The sender removed the entry, but a renewal of ours may have put it back since: remove it again.
            if let held = entry.node { await removeMembers([Member(node: held, connection: connection).text], of: entry.user) }
        default:
            nodeLogger(node).debug("ignored control message", metadata: ["fleetgate.message": "\(text.prefix(100))"])
        }
    }

    /// Removes this node's members of `user` that are not pending or open here (zombies), and probes its open
    /// connections of the user (``probeOwn(user:connections:)``): the ones that fail are closed and removed too.
    func verifyOwn(user: UserID, node: String) async {
        do {
            let members = try await redis.send(RedisCommand("ZRANGE", keys.conns(user), 0, -1), timeout: configuration.admissionTimeout).array ?? []
            let (stale, open) = state.withLock { state -> ([String], [String]) in
                let own = members.compactMap(\.string).compactMap(Member.init).filter { $0.node == node }
                return (
                    own.filter { !state.table.isLive($0.connection) }.map(\.text),
                    own.filter { state.table.connection($0.connection)?.state == .open }.map(\.connection)
                )
            }
            if !stale.isEmpty {
                let removed =
                    try await redis.eval(
                        scripts.purge, keys: [keys.conns(user), keys.since(user)], arguments: ["members"] + stale,
                        timeout: configuration.admissionTimeout
                    ).int ?? 0
                metrics.evictedZombie.increment(by: Int64(removed))
            }
            await probeOwn(user: user, connections: open)
        } catch {
            nodeLogger(node).debug("verify failed", metadata: [LogKey.user: "\(user)", LogKey.error: "\(error)"])
        }
    }

    /// Asks `owners` to verify their entries of `user` and waits for their acks, at most `verifyTimeout`.
    func verify(user: UserID, with owners: Set<String>, requester: String) async {
        let request = ConnectionIDs.random(length: 10)
        // Registered before anything can answer or time out, so neither side can miss the other.
        state.withLock { $0.verifications[request] = Verification(waiting: owners, continuation: nil) }
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let waiting = self.state.withLock { state -> Bool in
                        guard state.verifications[request] != nil else { return false }
                        state.verifications[request]?.continuation = continuation
                        return true
                    }
                    if !waiting { continuation.resume() }
                }
            }
            group.addTask {
                for owner in owners {
                    let receivers = try? await self.redis.send(
                        self.redis.publishCommand("verify \(request) \(requester) \(user.escaped)", to: self.keys.control(owner)),
                        timeout: self.configuration.verifyTimeout)
                    // Nobody listens on that channel (a node that crashed before its lease ran out): no ack will come.
                    if receivers?.int == 0 { self.acknowledge(request: request, from: owner) }
                }
                try? await Task.sleep(for: self.configuration.verifyTimeout)
            }
            await group.next()
            let waiter = state.withLock { $0.verifications.removeValue(forKey: request) }
            waiter?.continuation?.resume()
            group.cancelAll()
        }
    }

    func acknowledge(request: String, from node: String) {
        let done = state.withLock { state -> CheckedContinuation<Void, Never>? in
            guard var verification = state.verifications[request] else { return nil }
            verification.waiting.remove(node)
            // Once everyone answered, wake the waiter (if it is not waiting yet, it finds the entry gone and goes on).
            if verification.waiting.isEmpty {
                state.verifications[request] = nil
                return verification.continuation
            }
            state.verifications[request] = verification
            return nil
        }
        done?.resume()
    }

    /// Tells the owner of `member` to close it (evict-oldest, operator kick); a local one is announced directly. A
    /// member written under one of this process's earlier incarnations is local too (nobody listens on its channel).
    ///
    /// The caller has already removed the entry and left a kick marker beside it (`kick.lua`, `admit.lua`), so the
    /// owner's renewal never re-adds it and closes the connection itself if the message is lost. A message no node
    /// received (the owner is reconnecting its pub/sub link) is sent again a few times.
    func kick(_ member: Member, user: UserID, reason: LimiterEvent.KickReason = .evicted) async {
        let (local, removed) = state.withLock { state -> (Bool, LocalTable.Connection?) in
            guard state.node == member.node || state.life.deadIncarnations.contains(member.node) else { return (false, nil) }
            // Only the connection held under exactly this member (or not held in Redis yet) is the one to close: a
            // stale member of an earlier incarnation, whose connection was re-admitted under the current id since,
            // is already gone with the caller's removal.
            if let held = state.table.connection(member.connection)?.node, held != member.node { return (true, nil) }
            return (true, removeLocally(member.connection, from: &state))
        }
        if local {
            guard let entry = removed else { return }
            metrics.evictedKicked.increment()
            emit(.kick(connection: member.connection, user: user.rawValue, reason: reason))
            // The caller removed the entry, but a renewal may have put it back since: remove it again.
            if let held = entry.node { await removeMembers([Member(node: held, connection: member.connection).text], of: user) }
            return
        }
        let message = "kick \(member.connection) \(reason == .operatorRequest ? "operator" : "evicted")"
        if await publishKick(message, to: member.node) { return }
        // Nobody received it (the owner is re-subscribing, or gone): the retry loop sends it again, off this path.
        state.withLock { state in
            guard state.undeliveredKicks.count < Self.undeliveredKickLimit else { return }
            state.undeliveredKicks.append(UndeliveredKick(owner: member.node, user: user, message: message, attemptsLeft: Self.kickRetries))
        }
    }

    /// Publishes a kick to its owner's control channel; whether a node received it.
    func publishKick(_ message: String, to owner: String) async -> Bool {
        let receivers = try? await redis.send(redis.publishCommand(message, to: keys.control(owner)), timeout: configuration.admissionTimeout)
        return (receivers?.int ?? 0) > 0
    }

    /// Sends again the kicks nobody received, once a second (from the release-retry loop), at most
    /// ``kickRetries`` times each; the kick marker in Redis holds the kick whether or not one gets through.
    func retryUndeliveredKicks() async {
        let kicks = state.withLock { state -> [UndeliveredKick] in
            defer { state.undeliveredKicks = [] }
            return state.undeliveredKicks
        }
        for var kick in kicks {
            if await publishKick(kick.message, to: kick.owner) { continue }
            kick.attemptsLeft -= 1
            if kick.attemptsLeft > 0 {
                state.withLock { $0.undeliveredKicks.append(kick) }
            } else {
                nodeLogger(nodeID).info(
                    "kick not delivered; its node closes the connection at its next lease renewal",
                    metadata: [LogKey.node: "\(kick.owner)", LogKey.user: "\(kick.user)", "fleetgate.message": "\(kick.message)"])
            }
        }
    }

    /// How many more times a kick nobody received is published (one second apart).
    static let kickRetries = 3
    /// The most undelivered kicks kept for retries (more are left to the kick markers alone).
    static let undeliveredKickLimit = 10_000

    /// Removes `members` of `user` and marks them kicked (`kick.lua`): a renewal never re-adds a kicked member, and
    /// answers it to its owner as kicked instead. Returns how many were removed.
    @discardableResult
    func removeKicked(_ members: [String], of user: UserID) async throws -> Int {
        guard !members.isEmpty else { return 0 }
        return try await redis.eval(
            scripts.kick, keys: [keys.conns(user), keys.since(user), keys.kicked(user)], arguments: [String(kickMarkerMilliseconds)] + members,
            timeout: configuration.admissionTimeout
        ).int ?? 0
    }

    /// How long a kick marker stays: two leases, longer than any renewal interval of a node that is still alive.
    var kickMarkerMilliseconds: Int64 { leaseMilliseconds * 2 }
}
