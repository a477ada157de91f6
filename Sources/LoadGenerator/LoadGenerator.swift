import Foundation
import Histogram
import NIOCore
import NIOPosix
import Synchronization

/// What a load run does: U users × C attempts each over a list of gateways, holding what is admitted.
public struct LoadGeneratorConfiguration: Sendable {
    /// A gateway to connect to (`ws://host:port/ws`).
    public struct Target: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
        /// Parses `ws://host:port[/ws]`, `host:port` or a bare port.
        public init?(_ text: String) {
            var rest = Substring(text)
            if rest.hasPrefix("ws://") { rest = rest.dropFirst(5) }
            if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
            let parts = rest.split(separator: ":")
            switch parts.count {
            case 1:
                guard let port = Int(parts[0]), (1...65535).contains(port) else { return nil }
                self.init(host: "127.0.0.1", port: port)
            case 2:
                guard let port = Int(parts[1]), (1...65535).contains(port), !parts[0].isEmpty else { return nil }
                self.init(host: String(parts[0]), port: port)
            default:
                return nil
            }
        }
        public var description: String { "ws://\(host):\(port)/ws" }
    }

    /// How attempts are spread over the targets.
    public enum Spread: String, Sendable, CaseIterable {
        case roundRobin = "round-robin"
        case random
    }

    /// The gateways.
    public var targets: [Target]
    /// Users (`<userPrefix>0` … `<userPrefix>U-1`).
    public var users: Int = 10
    /// Connection attempts per user.
    public var attemptsPerUser: Int = 5
    /// How long an admitted connection is held before the client closes it. Defaults to 10 seconds.
    public var hold: Duration = .seconds(10)
    /// Run the agent flow (`{"type":"run"}`, wait for `agent_completed`) on each admitted connection.
    public var agentFlow = false
    /// Reconnect, with jittered exponential backoff, a connection the server closed (a kick, a drain, a node that
    /// died) or an attempt that failed, until the hold time is over.
    public var reconnect = false
    /// With `reconnect`: a denied attempt tries again too (with the same backoff), so users stay under pressure at
    /// their limit all run long — what makes over-admission visible to the chaos runner.
    public var retryDenied = false
    /// Attempts in flight at once (the connect rate's bound). Defaults to 256.
    public var concurrency = 256
    /// Round-robin or random over the targets.
    public var spread: Spread = .roundRobin
    /// The HS256 secret the gateways use.
    public var secret: String
    /// Prefix of the user ids. Defaults to `load-`.
    public var userPrefix = "load-"
    /// A `conn_limit` claim in every token (nil: the fleet's default applies).
    public var limitClaim: Int?
    /// Local addresses to connect from (e.g. 127.0.0.2, 127.0.0.3), round-robin: more ephemeral ports for very large
    /// runs. Empty: the system picks.
    public var sourceAddresses: [String] = []
    /// How long one upgrade may take. Defaults to 10 seconds.
    public var connectTimeout: Duration = .seconds(10)

    public init(targets: [Target], secret: String) {
        self.targets = targets
        self.secret = secret
    }
}

/// What a load run measured.
public struct LoadReport: Sendable, Codable {
    public var attempts = 0
    public var admitted = 0
    public var denied = 0
    public var failed = 0
    /// Reconnections made after the server closed a held connection (or an attempt failed), with `reconnect`.
    public var reconnects = 0
    /// Admitted connections the server closed before the hold time ended, by close code.
    public var closedByServer: [String: Int] = [:]
    /// Connections this generator closed itself before the hold ended (a storm, ``LoadGenerator/dropAll()``).
    public var closedByClient = 0
    /// Agent runs completed (with `agentFlow`).
    public var agentRunsCompleted = 0
    /// The most connections held open at once, in all and by any one user.
    public var peakOpen = 0
    public var peakOpenPerUser = 0
    /// Upgrade latency in milliseconds (HdrHistogram), over admitted and denied attempts.
    public var connectP50Ms = 0.0
    public var connectP99Ms = 0.0
    public var connectMaxMs = 0.0
    /// Attempts per second while connecting.
    public var connectRate = 0.0
    /// The run's wall time in seconds.
    public var seconds = 0.0
    /// A few of the failures, for the report.
    public var failureSamples: [String] = []

    /// An empty report (every count 0).
    public init() {}
}

/// A live view of a run, for a progress display.
public struct LoadProgress: Sendable {
    public var attempts: Int
    public var admitted: Int
    public var denied: Int
    public var failed: Int
    public var open: Int
    public var elapsed: Duration
}

/// The WebSocket load generator: drives U × C connection attempts through a fleet and reports what happened.
public final class LoadGenerator: Sendable {
    public let configuration: LoadGeneratorConfiguration
    private let state = Mutex(State())
    private let group: any EventLoopGroup
    private let stopped = Atomic<Bool>(false)

    private struct State {
        var report = LoadReport()
        var open = 0
        var openPerUser: [Int: Int] = [:]
        /// Open connections per user and gateway port: what the chaos runner's invariant checker compares with Redis.
        var openPerUserPort: [Int: [Int: Int]] = [:]
        /// The held connections, so a storm can close them all at once.
        var held: [ObjectIdentifier: (any EventLoop, LoadConnectionHandler)] = [:]
        var dropping = false
        /// Sockets this generator may have open at once (the descriptor limit less a reserve); connecting ones count.
        var descriptorBudget = Int.max
        var sockets = 0
        var histogram = Histogram<UInt64>(highestTrackableValue: 120_000_000, numberOfSignificantValueDigits: .three)
        var connectStarted: ContinuousClock.Instant?
        var connectEnded: ContinuousClock.Instant?
    }

    public init(configuration: LoadGeneratorConfiguration, eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton) {
        self.configuration = configuration
        self.group = eventLoopGroup
    }

    /// Ends the run early: attempts not started are skipped, held connections are closed now, and ``run()`` returns
    /// its report.
    public func stop() {
        stopped.store(true, ordering: .relaxed)
    }

    private var isStopped: Bool { stopped.load(ordering: .relaxed) }

    /// The connections open right now, per user id and gateway port (admitted and not yet closed by either side).
    public func openConnections() -> [String: [Int: Int]] {
        state.withLock { state in
            var result: [String: [Int: Int]] = [:]
            for (user, ports) in state.openPerUserPort {
                let open = ports.filter { $0.value > 0 }
                if !open.isEmpty { result["\(configuration.userPrefix)\(user)"] = open }
            }
            return result
        }
    }

    /// A connect storm: closes every held connection at once (a close frame from the client, as a network blip that
    /// every client notices together would); with `reconnect`, each one reconnects after its backoff. Returns how
    /// many were closed. These closes are counted in ``LoadReport/closedByClient``, not as closed by the server.
    @discardableResult
    public func dropAll() -> Int {
        let held = state.withLock { state -> [(any EventLoop, LoadConnectionHandler)] in
            state.dropping = true
            return Array(state.held.values)
        }
        for (eventLoop, handler) in held { eventLoop.execute { handler.close() } }
        return held.count
    }

    /// The counters so far.
    public func progress(since start: ContinuousClock.Instant) -> LoadProgress {
        state.withLock {
            LoadProgress(
                attempts: $0.report.attempts, admitted: $0.report.admitted, denied: $0.report.denied, failed: $0.report.failed, open: $0.open,
                elapsed: start.duration(to: .now))
        }
    }

    /// Runs every attempt, holds what is admitted for the hold time, closes everything and reports.
    public func run() async throws -> LoadReport {
        guard !configuration.targets.isEmpty else { throw LoadGeneratorError("no gateway to connect to") }
        guard configuration.users > 0, configuration.attemptsPerUser > 0 else { throw LoadGeneratorError("users and attempts must be at least 1") }
        guard configuration.secret.utf8.count >= 32 else { throw LoadGeneratorError("the HS256 secret must be at least 32 bytes") }
        // Sockets beyond the process's descriptor limit would fail everything else in it (a pipe, a log file, a
        // Redis reconnect); keep 1,024 descriptors for those, and count an attempt past the budget as failed.
        let budget = max(64, Self.raiseFileLimit() - 1_024)
        state.withLock { $0.descriptorBudget = budget }
        let tokens = try await Self.tokens(configuration)
        let started = ContinuousClock.now
        state.withLock { $0.connectStarted = started }
        let attempts = (0..<configuration.attemptsPerUser).flatMap { round in
            (0..<configuration.users).map { (user: $0, index: round * configuration.users + $0) }
        }
        let holdUntil = started + configuration.hold
        // Every attempt is a task; at most `concurrency` are connecting at once (holding does not count).
        let gate = ConnectGate(configuration.concurrency)
        await withDiscardingTaskGroup { group in
            for attempt in attempts {
                group.addTask {
                    await self.attempt(user: attempt.user, index: attempt.index, token: tokens[attempt.user], holdUntil: holdUntil, gate: gate)
                }
            }
        }
        let ended = ContinuousClock.now
        return state.withLock { state in
            var report = state.report
            let connectWindow = (state.connectStarted ?? started).duration(to: state.connectEnded ?? ended)
            report.connectP50Ms = Double(state.histogram.valueAtPercentile(50)) / 1000
            report.connectP99Ms = Double(state.histogram.valueAtPercentile(99)) / 1000
            report.connectMaxMs = Double(state.histogram.max) / 1000
            report.connectRate = Double(report.attempts) / max(0.001, Self.seconds(connectWindow))
            report.seconds = Self.seconds(started.duration(to: ended))
            return report
        }
    }

    /// One attempt of `user`: connect, and if admitted hold until `holdUntil` (reconnecting if told to).
    private func attempt(user: Int, index: Int, token: String, holdUntil: ContinuousClock.Instant, gate: ConnectGate) async {
        var backoff = Duration.milliseconds(100)
        var tries = 0
        var everAdmitted = false
        while true {
            let target: LoadGeneratorConfiguration.Target
            switch configuration.spread {
            // A reconnection goes to the next gateway: the one that closed it may be gone.
            case .roundRobin: target = configuration.targets[(index + tries) % configuration.targets.count]
            case .random: target = configuration.targets.randomElement()!
            }
            let outcome = await connectAndHold(user: user, target: target, token: token, holdUntil: holdUntil, gate: gate)
            if outcome.outcome == .admitted { everAdmitted = true }
            // A client that lost its connection retries also when denied (the slot it held may still count until
            // its node's entries are evicted); a first attempt that was denied does not.
            let retry = outcome.retry || ((everAdmitted || configuration.retryDenied) && outcome.outcome == .denied)
            guard configuration.reconnect, retry, ContinuousClock.now < holdUntil, !isStopped else { return }
            tries += 1
            state.withLock { $0.report.reconnects += 1 }
            // Jittered exponential backoff, as real clients do.
            let jitter = Double.random(in: 0.5...1.5)
            try? await Task.sleep(for: backoff * jitter)
            backoff = min(backoff * 2, .seconds(5))
        }
    }

    private func connectAndHold(
        user: Int, target: LoadGeneratorConfiguration.Target, token: String, holdUntil: ContinuousClock.Instant, gate: ConnectGate
    ) async -> (outcome: AttemptOutcome, retry: Bool) {
        await gate.acquire()
        var holdsSlot = true
        if isStopped {
            gate.release()
            return (.failed("stopped"), false)
        }
        defer { if holdsSlot { gate.release() } }
        let withinBudget = state.withLock { state -> Bool in
            guard state.sockets < state.descriptorBudget else { return false }
            state.sockets += 1
            return true
        }
        guard withinBudget else {
            record(.failed("no descriptor left for another socket (open-file limit); raise `ulimit -n`"), latency: nil)
            return (.failed("descriptor budget"), true)
        }
        defer { state.withLock { $0.sockets -= 1 } }
        let eventLoop = group.next()
        let handler = LoadConnectionHandler(request: upgradeRequest(host: target.host, port: target.port, token: token), eventLoop: eventLoop)
        var bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(.init(configuration.connectTimeout))
            .channelOption(.socketOption(.so_reuseaddr), value: 1)
            .channelInitializer { channel in channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(handler) } }
        if !configuration.sourceAddresses.isEmpty {
            let source = configuration.sourceAddresses[user % configuration.sourceAddresses.count]
            if let address = try? SocketAddress(ipAddress: source, port: 0) { bootstrap = bootstrap.bind(to: address) }
        }
        let clock = ContinuousClock()
        let started = clock.now
        let channel: any Channel
        do {
            channel = try await bootstrap.connect(host: target.host, port: target.port).get()
        } catch {
            record(.failed("connect to \(target): \(error)"), latency: nil)
            return (.failed("\(error)"), true)
        }
        let timeout = eventLoop.scheduleTask(in: .init(configuration.connectTimeout)) { channel.close(promise: nil) }
        let outcome = (try? await handler.upgraded.futureResult.get()) ?? .failed("no answer")
        timeout.cancel()
        let latency = started.duration(to: clock.now)
        gate.release()
        holdsSlot = false
        guard outcome == .admitted else {
            record(outcome, latency: latency)
            try? await channel.close()
            return (outcome, outcome != .denied)
        }
        // A close 4429 right after the upgrade is a denial in `--deny-mode close`.
        let early = await value(of: handler.closed.futureResult, within: .milliseconds(50))
        if early == .some(4429) {
            record(.denied, latency: latency)
            return (.denied, false)
        }
        record(.admitted, latency: latency)
        opened(user: user, port: target.port, delta: 1)
        // Counted closed on the event loop the moment the socket goes, not when this task next runs: on a loaded
        // machine that can be much later, after the server released the entry and admitted another of the user's
        // attempts, and the chaos runner's checker would count both sockets as held.
        let gone = Once()
        handler.closed.futureResult.whenComplete { _ in gone.run { self.opened(user: user, port: target.port, delta: -1) } }
        state.withLock { $0.held[ObjectIdentifier(handler)] = (eventLoop, handler) }
        defer {
            state.withLock { _ = $0.held.removeValue(forKey: ObjectIdentifier(handler)) }
            gone.run { opened(user: user, port: target.port, delta: -1) }
        }
        if configuration.agentFlow {
            eventLoop.execute { handler.sendText(#"{"type":"run","prompt":"load"}"#) }
            if await value(of: handler.runCompleted.futureResult, within: configuration.hold) == true {
                state.withLock { $0.report.agentRunsCompleted += 1 }
            }
        }
        // Hold until the end of the run (or a stop), or until the server closes the connection; in slices, so a stop
        // is noticed within half a second.
        while !isStopped {
            let left = min(ContinuousClock.now.duration(to: holdUntil), .milliseconds(500))
            guard left > .zero else { break }
            // The close code (nil inside: the socket ended without one); nil outside: the slice ran out first.
            if let ended = await value(of: handler.closed.futureResult, within: left) {
                state.withLock { state in
                    if state.dropping, handler.closedByClient {
                        state.report.closedByClient += 1
                    } else {
                        state.report.closedByServer[ended.map(String.init) ?? "none", default: 0] += 1
                    }
                }
                return (.admitted, true)
            }
        }
        eventLoop.execute { handler.close() }
        // The server answers the close frame and closes; give it a moment, then close regardless.
        _ = await value(of: handler.closed.futureResult, within: .seconds(2))
        try? await channel.close()
        return (.admitted, false)
    }

    private func record(_ outcome: AttemptOutcome, latency: Duration?) {
        state.withLock { state in
            state.connectEnded = .now
            if let latency {
                let micros = latency.components.seconds * 1_000_000 + latency.components.attoseconds / 1_000_000_000_000
                state.histogram.record(UInt64(max(0, micros)))
            }
            state.report.attempts += 1
            switch outcome {
            case .admitted: state.report.admitted += 1
            case .denied: state.report.denied += 1
            case .failed(let why):
                state.report.failed += 1
                if state.report.failureSamples.count < 5 { state.report.failureSamples.append(why) }
            }
        }
    }

    private func opened(user: Int, port: Int, delta: Int) {
        state.withLock { state in
            state.open += delta
            state.openPerUser[user, default: 0] += delta
            state.openPerUserPort[user, default: [:]][port, default: 0] += delta
            state.report.peakOpen = max(state.report.peakOpen, state.open)
            state.report.peakOpenPerUser = max(state.report.peakOpenPerUser, state.openPerUser[user] ?? 0)
        }
    }

    static func tokens(_ configuration: LoadGeneratorConfiguration) async throws -> [String] {
        let minter = await ClientTokens(secret: configuration.secret)
        let expiry = Date().addingTimeInterval(Self.seconds(configuration.hold) + 3600)
        var tokens: [String] = []
        tokens.reserveCapacity(configuration.users)
        for user in 0..<configuration.users {
            tokens.append(
                try await minter.mint(user: "\(configuration.userPrefix)\(user)", expiry: expiry, connectionLimit: configuration.limitClaim))
        }
        return tokens
    }

    /// Raises this process's open-file limit to its hard maximum (a run holds a descriptor per connection).
    /// Raises the open-file limit to the hard limit; returns the soft limit now in force.
    @discardableResult
    static func raiseFileLimit() -> Int {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 1024 }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
            _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit)
        }
        return Int(clamping: limit.rlim_cur)
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}

/// A load run that cannot start: one line.
public struct LoadGeneratorError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

/// The value of `future`, or nil if it is not complete within `timeout` (the future is left to complete later).
func value<T: Sendable>(of future: EventLoopFuture<T>, within timeout: Duration) async -> T? {
    let loop = future.eventLoop
    let promise = loop.makePromise(of: T?.self)
    let once = OnceFlag()
    let timer = loop.scheduleTask(in: .init(timeout)) {
        guard !once.done else { return }
        once.done = true
        promise.succeed(nil)
    }
    future.whenComplete { result in
        timer.cancel()
        guard !once.done else { return }
        once.done = true
        promise.succeed(try? result.get())
    }
    return (try? await promise.futureResult.get()) ?? nil
}

/// A flag touched only on one event loop.
private final class OnceFlag: @unchecked Sendable {
    var done = false
}

/// At most `permits` holders at once; the others wait in order.
final class ConnectGate: Sendable {
    private struct State {
        var available: Int
        var waiters: [CheckedContinuation<Void, Never>] = []
    }
    private let state: Mutex<State>

    init(_ permits: Int) { state = Mutex(State(available: permits)) }

    func acquire() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                if state.available > 0 {
                    state.available -= 1
                    return true
                }
                state.waiters.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    func release() {
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if state.waiters.isEmpty {
                state.available += 1
                return nil
            }
            return state.waiters.removeFirst()
        }
        next?.resume()
    }
}

/// Runs a body once, whichever caller comes first.
private final class Once: Sendable {
    private let done = Atomic<Bool>(false)

    func run(_ body: () -> Void) {
        if !done.exchange(true, ordering: .acquiringAndReleasing) { body() }
    }
}
