import ConnectionLimiter
import Foundation
import Glibc
import LoadGenerator
import LocalFleet
import Logging
import RedisClient
import Synchronization

/// What a chaos run does: fleet, load and scenario.
public struct ChaosConfiguration: Sendable {
    public var fleet: FleetOptions
    /// Users of the load, each making `attempts` connection attempts (reconnecting with jittered backoff).
    public var users = 60
    public var attempts = 25
    public var scenario: Scenario
    /// How long to wait for every user to reach the limit before the scenario starts anyway.
    public var loadTimeout: Duration = .seconds(60)
    /// Seconds within which, once a fault ends, lost entries must be back in Redis and users above the limit closed
    /// (plus a few seconds of margin): the nodes' early renewal round after a reconnect does it in about 1–4 s,
    /// whatever their regular renewal interval (2 min by default). Defaults to 10 s, the bound the fleet kept when
    /// it renewed every 10 s.
    public var recovery: Double = 10
    /// Progress lines (on stderr) as the run goes.
    public var progress: @Sendable (String) -> Void = { _ in }
    /// End the run as soon as every SIGKILLed node's entries are gone and its users are back (the demo), instead of
    /// at the scenario's end (which stays the upper bound).
    public var endWhenRecovered = false
    /// Attempts beyond the limit keep retrying after a denial (jittered backoff up to 5 s), so any over-admission
    /// shows; the demo turns this off (its clients give up when denied, as its report counts).
    public var pressure = true
    /// Called once the load is in place, before the first fault, with an inspector on the fleet's Redis.
    public var loaded: @Sendable (ConnectionLimiter) async -> Void = { _ in }
    /// Called with the report while the fleet still runs (the load has stopped); the fleet stops when it returns.
    public var finished: @Sendable (ChaosFleet, ChaosReport) async -> Void = { _, _ in }

    public init(fleet: FleetOptions, scenario: Scenario) {
        self.fleet = fleet
        self.scenario = scenario
    }
}

/// Runs a scenario against a local fleet under load and checks the invariant the whole time.
public struct ChaosRunner: Sendable {
    public let configuration: ChaosConfiguration

    public init(configuration: ChaosConfiguration) {
        self.configuration = configuration
    }

    /// Starts the fleet, loads it, plays the scenario, stops everything (also when cancelled) and reports.
    public func run() async throws -> ChaosReport {
        try configuration.scenario.validate(nodes: configuration.fleet.nodes, clusterPrimaries: configuration.fleet.clusterPrimaries)
        if configuration.scenario.faults.contains(where: { $0.kind == .clockJump }), configuration.fleet.clockLibrary == nil {
            throw ChaosError("scenario \(configuration.scenario.name) jumps Redis's clock: pass --clock-library (scripts/chaos builds it)")
        }
        let say = configuration.progress
        let fleet = try await ChaosFleet.start(configuration.fleet)
        say(
            "fleet: \(fleet.redisDescription); \(fleet.ports.count) gateway nodes at ws://127.0.0.1:{\(fleet.ports.map(String.init).joined(separator: ","))}/ws"
        )
        do {
            let report = try await play(fleet)
            await Self.uncancelled { await fleet.stop() }
            return report
        } catch {
            await Self.uncancelled { await fleet.stop() }
            throw error
        }
    }

    /// Runs `body` in a task of its own, so the caller's cancellation cannot cut short a clean-up that must finish.
    static func uncancelled(_ body: @escaping @Sendable () async -> Void) async {
        await Task { await body() }.value
    }

    private func play(_ fleet: ChaosFleet) async throws -> ChaosReport {
        let options = configuration.fleet
        let scenario = configuration.scenario
        let say = configuration.progress
        var redisConfiguration = try RedisClientConfiguration(url: fleet.redisURL)
        redisConfiguration.commandTimeout = .seconds(1)
        redisConfiguration.connectTimeout = .seconds(1)
        var quiet = Logger(label: "fleetgate.chaos")
        quiet.logLevel = .critical
        let redis = RedisClient(configuration: redisConfiguration, logger: quiet)
        var limiterConfiguration = LimiterConfiguration(nodeName: "fleetgate-chaos")
        limiterConfiguration.keyPrefix = options.keyPrefix
        limiterConfiguration.defaultLimit = options.limit
        let limiter = ConnectionLimiter(redis: redis, configuration: limiterConfiguration, logger: quiet)

        var loadConfiguration = LoadGeneratorConfiguration(
            targets: fleet.ports.map { LoadGeneratorConfiguration.Target(host: "127.0.0.1", port: $0) }, secret: options.secret)
        loadConfiguration.users = configuration.users
        loadConfiguration.attemptsPerUser = configuration.attempts
        loadConfiguration.reconnect = true
        loadConfiguration.retryDenied = configuration.pressure
        loadConfiguration.userPrefix = "\(options.keyPrefix)-u"
        loadConfiguration.hold = configuration.loadTimeout + .seconds(scenario.duration) + .seconds(60)
        loadConfiguration.connectTimeout = .seconds(5)
        let load = LoadGenerator(configuration: loadConfiguration)
        let users = (0..<configuration.users).map { "\(loadConfiguration.userPrefix)\($0)" }
        let started = ContinuousClock.now
        let events = EventLog()
        let clock = ContinuousClock()
        let event: @Sendable (String, String) -> Void = { label, kind in
            let t = seconds(started.duration(to: clock.now))
            events.append(.init(t: t, label: label, kind: kind))
            say(String(format: "%6.1fs  %@", t, label))
        }
        let checker = InvariantChecker(
            limiter: limiter, load: load, users: users, ports: fleet.ports, limit: options.limit, started: started,
            newIncarnation: { slot in event("\(fleet.name(slot)) has a new node id (re-registered or restarted)", "note") })

        let loadRun = Task { try await load.run() }
        defer { load.stop() }
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try? await redis.run() }
            group.addTask { await checker.run() }
            defer { group.cancelAll() }

            // The load in place: every user at its limit (or the timeout).
            let target = configuration.users * min(options.limit, configuration.attempts)
            say("load: \(configuration.users) users x \(configuration.attempts) attempts (limit \(options.limit)), held and reconnecting…")
            let loadDeadline = ContinuousClock.now + configuration.loadTimeout
            while load.openConnections().values.reduce(0, { $0 + $1.values.reduce(0, +) }) < target, ContinuousClock.now < loadDeadline {
                try await Task.sleep(for: .milliseconds(100))
            }
            event("load in place (\(load.openConnections().values.reduce(0) { $0 + $1.values.reduce(0, +) }) of \(target) connections)", "load")
            await configuration.loaded(limiter)
            let zero = checker.now

            // The scenario: each fault in a task of its own, so faults with a length may overlap later ones.
            try await withThrowingTaskGroup(of: Void.self) { faults in
                for fault in scenario.faults.sorted(by: { $0.at < $1.at }) {
                    faults.addTask {
                        try await Task.sleep(until: started + .seconds(zero + fault.at), clock: .continuous)
                        try await self.perform(fault, fleet: fleet, limiter: limiter, checker: checker, load: load, event: event)
                    }
                }
                try await faults.waitForAll()
            }
            let end = started + .seconds(zero + scenario.duration)
            while ContinuousClock.now < end {
                if configuration.endWhenRecovered, checker.allKillsRecovered { break }
                try await Task.sleep(for: .milliseconds(100))
            }
            event(configuration.endWhenRecovered && ContinuousClock.now < end ? "every killed node's users are back" : "end of the scenario", "end")
            // The figures before the load closes its sockets (the closing itself is no fault).
            let summary = checker.summary
            load.stop()
            let loadReport = try await loadRun.value
            let leftover = try? await limiter.nodes()
            var report = ChaosReport(
                configuration: configuration, scenarioStart: zero, events: events.all, summary: summary, load: loadReport,
                liveNodesAtEnd: leftover?.filter(\.isAlive).count)
            await configuration.finished(fleet, report)
            // Nothing may stay behind: after the drain, no connection entry and no key without a TTL (the killed
            // nodes' entries are swept by the others first; give it the node TTL and a little).
            await Self.uncancelled { await fleet.drainNodes() }
            let deadline = ContinuousClock.now + .seconds(30)
            var left = try? await Self.leftovers(redis, prefix: options.keyPrefix)
            while let current = left, current.entries > 0 || !current.keysWithoutTTL.isEmpty, ContinuousClock.now < deadline {
                try await Task.sleep(for: .seconds(1))
                left = try? await Self.leftovers(redis, prefix: options.keyPrefix)
            }
            report.recordLeftovers(entries: left?.entries, keysWithoutTTL: left?.keysWithoutTTL ?? [])
            return report
        }
    }

    /// What the fleet left under `prefix`: connection entries, and keys without a TTL (which would stay forever).
    static func leftovers(_ redis: RedisClient, prefix: String) async throws -> (entries: Int, keysWithoutTTL: [String]) {
        var entries = 0
        var forever: [String] = []
        try await redis.scan(matching: "\(prefix):*") { keys in
            let ttls = try await redis.pipeline(keys.map { RedisCommand("PTTL", $0) })
            for (key, ttl) in zip(keys, ttls) where (try? ttl.get())?.int == -1 { forever.append(key) }
            let conns = keys.filter { $0.hasSuffix(":conns") }
            if !conns.isEmpty {
                for count in try await redis.pipeline(conns.map { RedisCommand("ZCARD", $0) }) { entries += (try? count.get())?.int ?? 0 }
            }
        }
        return (entries, forever)
    }

    private func perform(
        _ fault: Scenario.Fault, fleet: ChaosFleet, limiter: ConnectionLimiter, checker: InvariantChecker, load: LoadGenerator,
        event: @Sendable (String, String) -> Void
    ) async throws {
        let prefix = configuration.fleet.keyPrefix
        let label = fault.label(prefix: prefix)
        let slot = (fault.node ?? 1) - 1
        let length = fault.for ?? 0
        let grace = configuration.recovery + 2
        // validate(nodes:clusterPrimaries:) keeps the single-server faults off a cluster and kill-primary off a server.
        let server = fleet.redis
        switch fault.kind {
        case .kill:
            let port = fleet.ports[slot]
            let node = try? await limiter.nodes().first { $0.isAlive && $0.address.hasSuffix(":\(port)") }?.id
            checker.killed(slot: slot, node: node, at: checker.now)
            await fleet.kill(slot)
            event(label, "kill")
        case .restart:
            try await fleet.restart(slot)
            event(label, "restart")
        case .term:
            event(label, "term")
            try await fleet.terminate(slot)
            event("\(fleet.name(slot)) drained and exited", "note")
        case .pause:
            checker.excuse(slot: slot, until: checker.now + length + grace)
            fleet.pause(slot)
            event(label, "pause")
            try await Task.sleep(for: .seconds(length))
            fleet.resume(slot)
            event("resume \(fleet.name(slot))", "heal")
        case .partition:
            checker.excuse(slot: slot, until: checker.now + length + grace)
            fleet.proxies[slot]?.stall()
            event(label, "partition")
            try await Task.sleep(for: .seconds(length))
            fleet.proxies[slot]?.restore()
            event("heal \(fleet.name(slot))", "heal")
        case .redisRestart:
            checker.excuse(slot: nil, until: checker.now + grace)
            try await server?.restart(keepData: false)
            event(label, "redis")
        case .redisStop:
            checker.excuse(slot: nil, until: checker.now + length + grace)
            await server?.kill()
            event(label, "redis")
            try await Task.sleep(for: .seconds(length))
            try await server?.restart(keepData: true)
            event("redis-server back", "heal")
        case .redisFull:
            guard let server else { return }
            let used = try await server.cli("INFO", "memory")
            let bytes =
                used.split(whereSeparator: \.isNewline).first { $0.hasPrefix("used_memory:") }.flatMap { Int($0.split(separator: ":")[1]) } ?? 0
            _ = try await server.cli("CONFIG", "SET", "maxmemory", String(max(1, bytes / 2)))
            event(label + " (maxmemory \(bytes / 2) bytes, used \(bytes))", "redis")
            try await Task.sleep(for: .seconds(length))
            _ = try await server.cli("CONFIG", "SET", "maxmemory", "0")
            event("redis maxmemory lifted", "heal")
        case .clockJump:
            try fleet.setRedisClockOffset(seconds: fault.offset ?? 0)
            event(label, "clock")
            try await Task.sleep(for: .seconds(length))
            try fleet.setRedisClockOffset(seconds: 0)
            event("redis clock back", "heal")
        case .storm:
            let dropped = load.dropAll()
            event("\(label) (\(dropped) connections dropped at once)", "storm")
        case .rollingRestart:
            event(label, "rolling")
            for slot in fleet.ports.indices {
                checker.excuse(slot: slot, until: checker.now + grace + 15)
                try await fleet.terminate(slot)
                try await fleet.restart(slot)
                event("\(fleet.name(slot)) restarted", "note")
            }
        case .killPrimary:
            guard let cluster = fleet.cluster else { return }
            let primaries = try await cluster.primaries()
            let index = (fault.node ?? 1) - 1
            guard primaries.indices.contains(index) else { throw ChaosError("\(label): the cluster has \(primaries.count) primaries") }
            let victim = primaries[index]
            // Writes the replica had not received yet are lost with the primary: the nodes' renewals put them back.
            checker.excuse(slot: nil, until: checker.now + grace + 10)
            let killedAt = ContinuousClock.now
            event("\(label) (\(victim.address))", "redis")
            let successor = try await cluster.killPrimary(victim)
            event(
                String(format: "replica %@ promoted, %.1f s after the kill", successor.address, seconds(killedAt.duration(to: ContinuousClock.now))),
                "heal")
            try await cluster.rejoin(victim)
            event("\(victim.address) rejoined as a replica", "note")
        }
    }
}

/// The run's events, appended from the fault tasks.
private final class EventLog: Sendable {
    private let events = Mutex<[ChaosReport.Event]>([])
    func append(_ event: ChaosReport.Event) { events.withLock { $0.append(event) } }
    var all: [ChaosReport.Event] { events.withLock { $0 } }
}
