import ConnectionLimiter
import Foundation
import LoadGenerator
import Synchronization

/// One 100 ms look at the fleet: what the clients hold and what Redis says.
public struct ChaosSample: Codable, Sendable {
    /// Seconds since the load started.
    public var t: Double
    /// Sockets the clients hold open, per node slot.
    public var sockets: [Int]
    /// Live entries in Redis (lease not run out) for the load's users; nil when Redis did not answer.
    public var entries: Int?
    /// Entries whose socket is closed: per user and node, entries beyond the sockets held there.
    public var stale: Int?
    /// Open sockets missing from Redis: per user and node, sockets beyond the entries there.
    public var lost: Int?
    /// Users holding more sockets than the limit.
    public var overLimit: Int
    /// The most sockets one user holds.
    public var maxPerUser: Int
}

/// Samples the fleet every 100 ms (sockets held by the load generator, entries in Redis per user and node) and
/// tracks the invariant: no user above the limit, stale entries gone within the promise, lost entries back within a
/// renewal interval, and per SIGKILL how long until the node's entries are gone and its users are back.
///
/// Entries and sockets are matched per user and node (the node's registered address is its port), not per
/// connection: the client does not learn the server's connection id. A discrepancy counts once it lasts: its age is
/// how long it has been there without a break.
final class InvariantChecker: Sendable {
    struct Kill: Sendable {
        var slot: Int
        var node: String?
        var at: Double
        var users: [String]
        var entriesGoneAfter: Double?
        var usersBackAfter: Double?
        /// Whether one of its users has been seen below the limit since (the clients notice the closed sockets a
        /// moment after the kill): "back" counts from then on.
        var dipped = false
    }

    struct Excuse: Sendable {
        var slot: Int?
        var until: Double
    }

    private struct State {
        var samples: [ChaosSample] = []
        var staleSince: [String: Double] = [:]
        var lostSince: [String: Double] = [:]
        var overSince: [String: Double] = [:]
        var maxStaleAge = 0.0
        var maxStaleWhere = ""
        var maxLostAge = 0.0
        var maxLostWhere = ""
        var maxOverAge = 0.0
        var peakPerUser = 0
        var kills: [Kill] = []
        var excuses: [Excuse] = []
        var failedSamples = 0
        /// The live node id seen at each port, to notice re-registrations (a new incarnation on the same port).
        var nodeAtPort: [Int: String] = [:]
        var reregistrations = 0
    }

    private let state = Mutex(State())
    let limiter: ConnectionLimiter
    let load: LoadGenerator
    let users: [String]
    let ports: [Int]
    let limit: Int
    let started: ContinuousClock.Instant
    /// Called with the slot whose node came back under a new id (a re-registration or a restart).
    let newIncarnation: @Sendable (Int) -> Void

    init(
        limiter: ConnectionLimiter, load: LoadGenerator, users: [String], ports: [Int], limit: Int, started: ContinuousClock.Instant,
        newIncarnation: @escaping @Sendable (Int) -> Void = { _ in }
    ) {
        self.newIncarnation = newIncarnation
        self.limiter = limiter
        self.load = load
        self.users = users
        self.ports = ports
        self.limit = limit
        self.started = started
    }

    var now: Double { seconds(started.duration(to: .now)) }

    /// Samples until cancelled.
    func run() async {
        let clock = ContinuousClock()
        var next = clock.now
        while !Task.isCancelled {
            await sample()
            next = max(next + .milliseconds(100), clock.now)
            try? await Task.sleep(until: next, clock: clock)
        }
    }

    /// Lost entries of `slot` (nil: every slot) do not count until `until` (a node that is paused or cut off cannot
    /// renew; Redis without its data needs a renewal round).
    func excuse(slot: Int?, until: Double) {
        state.withLock { $0.excuses.append(Excuse(slot: slot, until: until)) }
    }

    /// A node was SIGKILLed: follow its entries and its users.
    func killed(slot: Int, node: String?, at: Double) {
        let open = load.openConnections()
        let affected = open.filter { ($0.value[ports[slot]] ?? 0) > 0 }.map(\.key).sorted()
        var kill = Kill(slot: slot, node: node, at: at, users: affected)
        // A node that held nobody (its clients had all found room elsewhere): no user has to come back.
        if affected.isEmpty { kill.usersBackAfter = 0 }
        state.withLock { [kill] in $0.kills.append(kill) }
    }

    func sample() async {
        let t = now
        let open = load.openConnections()
        var sockets = Array(repeating: 0, count: ports.count)
        let slotOfPort = Dictionary(uniqueKeysWithValues: ports.enumerated().map { ($1, $0) })
        var perUser: [String: Int] = [:]
        for (user, byPort) in open {
            for (port, count) in byPort {
                if let slot = slotOfPort[port] { sockets[slot] += count }
                perUser[user, default: 0] += count
            }
        }
        let over = perUser.filter { $0.value > limit }
        let maxPerUser = perUser.values.max() ?? 0

        // Redis: the registry (node id -> port) and every user's entries, a few dozen users at a time.
        var redisAnswered = true
        var portOfNode: [String: Int] = [:]
        var liveAtPort: [Int: String] = [:]
        var entries: [String: [LimiterEntry]] = [:]
        do {
            for node in try await limiter.nodes() {
                if let port = node.address.split(separator: ":").last.flatMap({ Int($0) }) {
                    portOfNode[node.id] = port
                    if node.isAlive { liveAtPort[port] = node.id }
                }
            }
            try await withThrowingTaskGroup(of: (String, [LimiterEntry]).self) { group in
                var pending = users[...]
                func addNext() {
                    guard let user = pending.popFirst() else { return }
                    group.addTask { (user, try await self.limiter.entries(user: user)) }
                }
                for _ in 0..<64 { addNext() }
                while let (user, list) = try await group.next() {
                    entries[user] = list
                    addNext()
                }
            }
        } catch {
            redisAnswered = false
        }

        let renewed = state.withLock { state -> [Int] in
            var slots: [Int] = []
            for (port, id) in liveAtPort {
                if let previous = state.nodeAtPort[port], previous != id, let slot = slotOfPort[port] {
                    slots.append(slot)
                    state.reregistrations += 1
                }
                state.nodeAtPort[port] = id
            }
            return slots
        }
        for slot in renewed { newIncarnation(slot) }
        state.withLock { state in
            state.peakPerUser = max(state.peakPerUser, maxPerUser)
            // Over the limit: how long each user stays above it.
            for user in Array(state.overSince.keys) where over[user] == nil { state.overSince[user] = nil }
            for user in over.keys where state.overSince[user] == nil { state.overSince[user] = t }
            for since in state.overSince.values { state.maxOverAge = max(state.maxOverAge, t - since) }

            var sample = ChaosSample(t: t, sockets: sockets, overLimit: over.count, maxPerUser: maxPerUser)
            guard redisAnswered else {
                state.failedSamples += 1
                state.samples.append(sample)
                return
            }
            var total = 0
            var stale = 0
            var lost = 0
            var staleNow: Set<String> = []
            var lostNow: Set<String> = []
            for user in users {
                let live = (entries[user] ?? []).filter { $0.leaseRemaining > .zero }
                total += live.count
                var inRedis: [Int: Int] = [:]  // port (-1: a node no longer registered) -> entries
                for entry in live { inRedis[portOfNode[entry.node] ?? -1, default: 0] += 1 }
                let held = open[user] ?? [:]
                for port in Set(inRedis.keys).union(held.keys) {
                    let key = "\(user)@\(port)"
                    let difference = (inRedis[port] ?? 0) - (held[port] ?? 0)
                    if difference > 0 {
                        stale += difference
                        staleNow.insert(key)
                    } else if difference < 0 {
                        let slot = slotOfPort[port]
                        let excused = state.excuses.contains { ($0.slot == nil || $0.slot == slot) && t < $0.until }
                        lost -= difference
                        if !excused { lostNow.insert(key) }
                    }
                }
            }
            for key in Array(state.staleSince.keys) where !staleNow.contains(key) { state.staleSince[key] = nil }
            for key in staleNow where state.staleSince[key] == nil { state.staleSince[key] = t }
            for (key, since) in state.staleSince where t - since > state.maxStaleAge {
                state.maxStaleAge = t - since
                state.maxStaleWhere = "\(key) from \(String(format: "%.1f", since)) s"
            }
            for key in Array(state.lostSince.keys) where !lostNow.contains(key) { state.lostSince[key] = nil }
            for key in lostNow where state.lostSince[key] == nil { state.lostSince[key] = t }
            for (key, since) in state.lostSince where t - since > state.maxLostAge {
                state.maxLostAge = t - since
                state.maxLostWhere = "\(key) from \(String(format: "%.1f", since)) s"
            }
            // Each SIGKILL: the node's last entry gone (any lease), its users back at the limit.
            for index in state.kills.indices {
                var kill = state.kills[index]
                if kill.entriesGoneAfter == nil,
                    !entries.values.contains(where: { list in list.contains { $0.node == kill.node } })
                {
                    // A sample taken just before the kill may already see none (a node that held nobody).
                    kill.entriesGoneAfter = max(0, t - kill.at)
                }
                if !kill.dipped {
                    kill.dipped = kill.users.contains { (perUser[$0] ?? 0) < limit }
                } else if kill.usersBackAfter == nil, kill.users.allSatisfy({ (perUser[$0] ?? 0) >= limit }) {
                    kill.usersBackAfter = t - kill.at
                }
                state.kills[index] = kill
            }
            sample.entries = total
            sample.stale = stale
            sample.lost = lost
            state.samples.append(sample)
        }
    }

    /// Whether every SIGKILL so far has its eviction and recovery times (false before the first).
    var allKillsRecovered: Bool {
        state.withLock { state in
            !state.kills.isEmpty && state.kills.allSatisfy { $0.entriesGoneAfter != nil && $0.usersBackAfter != nil }
        }
    }

    struct Summary: Sendable {
        var samples: [ChaosSample]
        var maxStaleAge: Double
        var maxStaleWhere: String
        var maxLostAge: Double
        var maxLostWhere: String
        var maxOverAge: Double
        var peakPerUser: Int
        var kills: [Kill]
        var failedSamples: Int
        var reregistrations: Int
    }

    var summary: Summary {
        state.withLock {
            Summary(
                samples: $0.samples, maxStaleAge: $0.maxStaleAge, maxStaleWhere: $0.maxStaleWhere, maxLostAge: $0.maxLostAge,
                maxLostWhere: $0.maxLostWhere, maxOverAge: $0.maxOverAge, peakPerUser: $0.peakPerUser, kills: $0.kills,
                failedSamples: $0.failedSamples, reregistrations: $0.reregistrations)
        }
    }
}

func seconds(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}
