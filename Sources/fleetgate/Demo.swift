import ArgumentParser
import FleetChaos
import FleetgateBench
import Foundation
import LoadGenerator
import LocalFleet

/// `fleetgate demo` (what `scripts/demo` runs): a local fleet, load through it, a node crash, and how fast its users
/// get back in — the chaos runner with one SIGKILL, told as a story.
struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "A local fleet under load, one node killed with SIGKILL, and how fast its users get back in.",
        discussion: """
            Starts a redis-server and --nodes gateway nodes of this executable on free loopback ports, runs the load \
            generator (--users x --attempts, limit --limit, holding what is admitted and reconnecting like real \
            clients), prints `fleetgate status`, kills one node with SIGKILL, measures how long until its entries are \
            gone and its users are back at their limit on the surviving nodes, prints a report and stops everything it \
            started (also on Ctrl-C). With --keep the fleet stays up until Ctrl-C, and the report says how to reach it.
            """
    )

    @Option(help: "Users of the load.") var users = 300
    @Option(help: "Gateway nodes (one is killed).") var nodes = 3
    @Option(help: "Connection attempts per user.") var attempts = 25
    @Option(help: "Every user's limit.") var limit = 20
    @Flag(help: "Leave the fleet running until Ctrl-C and print how to reach it.") var keep = false

    func validate() throws {
        guard (2...16).contains(nodes) else { throw ValidationError("--nodes must be 2…16 (one is killed)") }
        guard (1...5_000).contains(users) else { throw ValidationError("--users must be 1…5000") }
        guard (1...1_000).contains(attempts), (1...1_000).contains(limit) else { throw ValidationError("--attempts and --limit must be 1…1000") }
    }

    func makeConfiguration(executable: URL) -> ChaosConfiguration {
        var fleet = FleetOptions(executable: executable)
        fleet.nodes = nodes
        fleet.limit = limit
        fleet.keyPrefix = "demo"
        var configuration = ChaosConfiguration(
            fleet: fleet, scenario: Scenario(name: "demo", duration: 60, faults: [.init(at: 1, kind: .kill, node: 1)]))
        configuration.users = users
        configuration.attempts = attempts
        configuration.endWhenRecovered = true
        configuration.pressure = false
        return configuration
    }

    func run() async throws {
        var configuration = makeConfiguration(executable: try GatewayBenchRunner.locateExecutable())
        let (keep, limit) = (keep, limit)
        configuration.progress = { line in Self.say(line) }
        let target = users * min(limit, attempts)
        configuration.loaded = { limiter in
            // The registry learns the nodes' counts and addresses from their heartbeats (every second): wait for them.
            var status = try? await StatusReport.gather(limiter)
            for _ in 0..<30 {
                if let current = status, current.totals.connections >= target, current.nodes.allSatisfy({ !$0.address.isEmpty }) { break }
                try? await Task.sleep(for: .milliseconds(200))
                status = try? await StatusReport.gather(limiter)
            }
            if let status { Self.say("\n" + status.text + "\n") }
        }
        configuration.finished = { fleet, report in
            Self.say("\nreport")
            Self.say(
                "  attempts \(report.load.attempts): admitted \(report.load.admitted), denied \(report.load.denied), failed \(report.load.failed), reconnects \(report.load.reconnects)"
            )
            Self.say("  the most connections any user held at once: \(report.peakPerUser) (limit \(limit))")
            for kill in report.kills {
                let gone = kill.entriesGoneAfter.map { String(format: "%.1f s", $0) } ?? "more than the run"
                let back = kill.usersBackAfter.map { String(format: "%.1f s", $0) } ?? "more than the run"
                Self.say("  node crash (\(kill.node)): entries gone after \(gone) (promise: 30 s), users back at their limit after \(back)")
            }
            Self.say(String(format: "  connect latency p50 %.1f ms, p99 %.1f ms", report.load.connectP50Ms, report.load.connectP99Ms))
            guard keep else { return }
            let live = fleet.ports.indices.filter { fleet.process($0) != nil }
            Self.say("\nthe fleet keeps running (demo-1 was killed) until Ctrl-C:")
            Self.say(
                "  export FLEETGATE_REDIS_URL=\(fleet.redisURL) FLEETGATE_KEY_PREFIX=demo FLEETGATE_DEFAULT_LIMIT=\(limit) FLEETGATE_JWT_SECRET=\(fleet.options.secret)"
            )
            Self.say("  fleetgate status --watch")
            Self.say(
                "  fleetgate token --user alice   # then connect to ws://127.0.0.1:\(fleet.ports[live.first ?? 0])/ws with Authorization: Bearer <token>"
            )
            while !Task.isCancelled { try? await Task.sleep(for: .seconds(3600)) }
        }
        let runner = ChaosRunner(configuration: configuration)
        let report: ChaosReport
        do {
            report = try await Chaos.runInterruptibly { try await runner.run() }
        } catch let error as ChaosError where keep && error.description.hasPrefix("interrupted") {
            Self.say("stopped everything the demo started")
            return
        }
        if report.peakPerUser > limit { throw ChaosError("FAILED: a user held \(report.peakPerUser) connections, more than its limit \(limit)") }
        if report.kills.contains(where: { ($0.entriesGoneAfter ?? .infinity) > 30 }) {
            throw ChaosError("FAILED: the killed node's entries were not evicted within 30 s")
        }
    }

    /// A line on stdout, at once (a pipe sees the demo as it goes).
    static func say(_ line: String) {
        FileHandle.standardOutput.write(Data((line + "\n").utf8))
    }
}
