import ArgumentParser
import FleetChaos
import FleetgateBench
import Foundation
import UnixSignals

/// `fleetgate chaos`: a local fleet under load, a scenario of faults, the invariant checked every 100 ms.
struct Chaos: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Break a local fleet under load (kill, pause, partition, Redis restart/stop/full, clock jumps, storms) and check the limit holds.",
        discussion: """
            Starts a redis-server (noeviction) and --nodes `fleetgate serve` nodes of this executable on free loopback \
            ports, each reaching Redis through a TCP proxy of its own (so it can be cut off), runs the load generator \
            (--users x --attempts, limit --limit, clients that reconnect with jittered backoff), waits until every user \
            holds its limit, then plays the scenario: a built-in one (\(Scenario.builtInNames.joined(separator: ", "))) \
            or a JSON file (see the README). Every 100 ms it compares, per user and node, the sockets the clients hold \
            with the entries in Redis: users above the limit, stale entries (no socket), lost entries (a socket without \
            an entry), and per SIGKILL the time until the node's entries are gone and its users are back. It writes \
            report.json and timeline.svg to --results, prints the report (or JSON with --json) and exits non-zero if a \
            check failed. SIGINT or SIGTERM stops everything it started. With --cluster the fleet runs on a local Redis \
            Cluster (3 primaries, each with a replica; nodes reach it directly, no proxies) and the scenario may kill \
            primaries (kill-primary; built-in scenario "cluster"); the faults of one server (partition, redis-*, \
            clock-jump) are refused there.
            """
    )

    @Option(help: "A built-in scenario or a JSON scenario file.") var scenario = "kill"
    @Option(help: "Gateway nodes.") var nodes = 3
    @Option(help: "Users of the load.") var users = 60
    @Option(help: "Connection attempts per user (more than the limit: the rest are denied, and retried after a loss).") var attempts = 25
    @Option(help: "Every user's limit.") var limit = 20
    @Option(help: "Where report.json and timeline.svg go.") var results = "chaos-results"
    @Option(help: "Play the scenario again and again for this long (e.g. 10m) instead of once.") var duration: DurationArgument?
    @Option(help: "The nodes' --on-lease-loss (keep or close).") var onLeaseLoss: String?
    @Option(help: "The nodes' --on-redis-down (local or reject).") var onRedisDown: String?
    @Option(help: "The nodes' --lease-renew-interval (default: serve's, 2m).") var leaseRenewInterval: DurationArgument?
    @Option(help: "Lost entries must be back, and users over the limit closed, this long after a fault ends (+ 3 s).")
    var recovery = DurationArgument(.seconds(10))
    @Option(parsing: .singleValue, help: "Another `serve` flag for every node, e.g. --node-arg=--lease-ttl --node-arg=20s.") var nodeArg: [String] =
        []
    @Option(help: "The clock-offset library for redis-server (LD_PRELOAD), needed by clock-jump faults; scripts/chaos builds it.")
    var clockLibrary: String?
    @Flag(help: "Run on a local Redis Cluster (--cluster-primaries primaries, each with one replica) instead of one redis-server.")
    var cluster = false
    @Option(help: "Primaries of the --cluster (3…8).") var clusterPrimaries = 3
    @Flag(help: "Print the report as JSON.") var json = false
    @Option(help: "Run nothing: draw DIR/timeline.svg again from DIR/report.json (a report of an earlier run).") var redraw: String?

    func validate() throws {
        guard (2...16).contains(nodes) else { throw ValidationError("--nodes must be 2…16") }
        guard (1...5_000).contains(users) else { throw ValidationError("--users must be 1…5000") }
        guard (1...1_000).contains(attempts), (1...1_000).contains(limit) else { throw ValidationError("--attempts and --limit must be 1…1000") }
        if let onLeaseLoss, !["keep", "close"].contains(onLeaseLoss) { throw ValidationError("--on-lease-loss is keep or close") }
        if let onRedisDown, !["local", "reject"].contains(onRedisDown) { throw ValidationError("--on-redis-down is local or reject") }
        guard (3...8).contains(clusterPrimaries) else { throw ValidationError("--cluster-primaries must be 3…8 (Redis Cluster needs 3)") }
    }

    /// The scenario: a built-in name or a file.
    func loadScenario() throws -> Scenario {
        if let builtIn = Scenario.builtIn(scenario) { return builtIn }
        guard FileManager.default.fileExists(atPath: scenario) else {
            throw ChaosError("no scenario \"\(scenario)\": use one of \(Scenario.builtInNames.joined(separator: ", ")) or a JSON file")
        }
        return try Scenario.load(file: scenario)
    }

    func makeConfiguration(executable: URL) throws -> ChaosConfiguration {
        var fleet = FleetOptions(executable: executable)
        fleet.nodes = nodes
        fleet.limit = limit
        // scripts/chaos always passes the clock library; a cluster has no one clock to shift (clock-jump is refused).
        fleet.clockLibrary = cluster ? nil : clockLibrary
        if cluster {
            fleet.clusterPrimaries = clusterPrimaries
            fleet.proxies = false
        }
        var arguments: [String] = []
        if let leaseRenewInterval { arguments += ["--lease-renew-interval", "\(wholeMilliseconds(leaseRenewInterval.duration))ms"] }
        if let onLeaseLoss { arguments += ["--on-lease-loss", onLeaseLoss] }
        if let onRedisDown { arguments += ["--on-redis-down", onRedisDown] }
        fleet.nodeArguments = arguments + nodeArg
        var scenario = try loadScenario()
        if let duration { scenario = scenario.repeated(until: Double(wholeMilliseconds(duration.duration)) / 1000) }
        var configuration = ChaosConfiguration(fleet: fleet, scenario: scenario)
        configuration.users = users
        configuration.attempts = attempts
        configuration.recovery = Double(wholeMilliseconds(recovery.duration)) / 1000
        configuration.progress = { line in FileHandle.standardError.write(Data((line + "\n").utf8)) }
        return configuration
    }

    func run() async throws {
        if let redraw {
            let path = redraw + "/report.json"
            let report: ChaosReport
            do {
                report = try JSONDecoder().decode(ChaosReport.self, from: Data(contentsOf: URL(fileURLWithPath: path)))
            } catch {
                throw ChaosError("cannot read the chaos report \(path): \(error)")
            }
            try Data(report.svg.utf8).write(to: URL(fileURLWithPath: redraw + "/timeline.svg"))
            print("drawn: \(redraw)/timeline.svg")
            return
        }
        let runner = ChaosRunner(configuration: try makeConfiguration(executable: try GatewayBenchRunner.locateExecutable()))
        let report = try await Self.runInterruptibly { try await runner.run() }
        try FileManager.default.createDirectory(atPath: results, withIntermediateDirectories: true)
        try report.json().write(to: URL(fileURLWithPath: results + "/report.json"))
        try Data(report.svg.utf8).write(to: URL(fileURLWithPath: results + "/timeline.svg"))
        if json {
            FileHandle.standardOutput.write(try report.json() + Data("\n".utf8))
        } else {
            print(report.text)
            print("results: \(results)/report.json, \(results)/timeline.svg")
        }
        guard report.passed else {
            throw ChaosError("checks failed: \(report.checks.filter { !$0.passed }.map(\.name).joined(separator: ", "))")
        }
    }

    /// Runs `body`; SIGINT or SIGTERM cancels it (the runner stops its fleet on the way out) and fails the command.
    static func runInterruptibly<T: Sendable>(_ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                for await signal in signals {
                    throw ChaosError("interrupted by \(signal); everything it started was stopped")
                }
                return nil
            }
            group.addTask { try await body() }
            defer { group.cancelAll() }
            while let next = try await group.next() {
                if let result = next { return result }
            }
            throw ChaosError("the run ended without a report")
        }
    }
}
