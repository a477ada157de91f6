import ArgumentParser
import Foundation
import LoadGenerator
import UnixSignals

/// `fleetgate loadgen`: drive connection attempts through a fleet and report what happened.
struct Loadgen: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "WebSocket load: U users × C attempts over gateways, holding what is admitted; admitted/denied/failed and connect latency.",
        discussion: """
            Tokens are minted with the fleet's HS256 secret (--secret or FLEETGATE_JWT_SECRET). Attempts go to the \
            --url gateways round-robin (or at random), at most --concurrency in flight; admitted connections are held \
            for --hold, then closed. With --reconnect, a connection the server closes (a kick, a drain, a dead node) is \
            reopened with jittered exponential backoff (on the next gateway) until the hold ends. SIGINT or SIGTERM ends the \
            run early with its report. Progress is one line on a terminal, plain lines otherwise, on stderr; --json \
            prints the report as JSON.
            """
    )

    @Option(name: .customLong("url"), help: "A gateway: ws://host:port/ws, host:port or a port. Repeat for several.") var urls: [String] = []
    @Option(help: "Users.") var users = 10
    @Option(help: "Connection attempts per user.") var attempts = 5
    @Option(help: "How long admitted connections are held (ms, s, m or h).") var hold = DurationArgument(.seconds(10))
    @Option(help: "Attempts in flight at once.") var concurrency = 256
    @Option(help: "How attempts go over the gateways.") var spread = LoadGeneratorConfiguration.Spread.roundRobin
    @Flag(help: "Run the agent flow on each admitted connection.") var agentFlow = false
    @Flag(help: "Reopen connections the server closes, with jittered backoff, until the hold ends.") var reconnect = false
    @Option(help: "The fleet's HS256 secret. [env: FLEETGATE_JWT_SECRET]") var secret: String?
    @Option(help: "Prefix of the user ids.") var userPrefix = "load-"
    @Option(help: "A conn_limit claim in every token.") var connLimit: Int?
    @Option(help: "Local source addresses to spread connections over (comma-separated, e.g. 127.0.0.2,127.0.0.3).") var sourceAddresses: String?
    @Flag(help: "Print the report as JSON.") var json = false

    func validate() throws {
        guard users >= 1, attempts >= 1 else { throw ValidationError("--users and --attempts must be at least 1") }
        guard concurrency >= 1 else { throw ValidationError("--concurrency must be at least 1") }
        for url in urls where LoadGeneratorConfiguration.Target(url) == nil {
            throw ValidationError("invalid --url \"\(url)\": use ws://host:port/ws, host:port or a port")
        }
    }

    func makeConfiguration(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> LoadGeneratorConfiguration {
        guard !urls.isEmpty else { throw OperatorError("no gateway: pass --url (repeat it for several nodes)") }
        guard let secret = secret ?? environment["FLEETGATE_JWT_SECRET"].flatMap({ $0.isEmpty ? nil : $0 }) else {
            throw OperatorError("no secret: pass --secret or set FLEETGATE_JWT_SECRET (the one the gateways use)")
        }
        var configuration = LoadGeneratorConfiguration(targets: urls.compactMap(LoadGeneratorConfiguration.Target.init), secret: secret)
        configuration.users = users
        configuration.attemptsPerUser = attempts
        configuration.hold = hold.duration
        configuration.concurrency = concurrency
        configuration.spread = spread
        configuration.agentFlow = agentFlow
        configuration.reconnect = reconnect
        configuration.userPrefix = userPrefix
        configuration.limitClaim = connLimit
        configuration.sourceAddresses = sourceAddresses?.split(separator: ",").map(String.init) ?? []
        return configuration
    }

    func run() async throws {
        let generator = LoadGenerator(configuration: try makeConfiguration())
        let terminal = isatty(STDERR_FILENO) == 1
        let started = ContinuousClock.now
        let report = try await withThrowingTaskGroup(of: LoadReport?.self) { group in
            group.addTask { try await generator.run() }
            group.addTask {
                // SIGINT or SIGTERM ends the run early, with its report (every held connection closed first).
                for await _ in await UnixSignalsSequence(trapping: .sigint, .sigterm) {
                    generator.stop()
                    break
                }
                try await Task.sleep(for: .seconds(3600 * 24))
                return nil
            }
            group.addTask {
                // Progress on stderr: one line rewritten in place on a terminal, a plain line every 2 s otherwise.
                while !Task.isCancelled {
                    try await Task.sleep(for: .milliseconds(terminal ? 500 : 2000))
                    let line = Self.progressLine(generator.progress(since: started))
                    FileHandle.standardError.write(Data((terminal ? "\r\u{1B}[K" + line : line + "\n").utf8))
                }
                return nil
            }
            defer { group.cancelAll() }
            while let result = try await group.next() {
                if let report = result { return report }
            }
            throw LoadGeneratorError("the load run ended without a report")
        }
        if terminal { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            FileHandle.standardOutput.write(try encoder.encode(report) + Data("\n".utf8))
        } else {
            print(Self.text(report, users: users, attempts: attempts))
        }
    }

    static func progressLine(_ progress: LoadProgress) -> String {
        let seconds = Double(progress.elapsed.components.seconds) + Double(progress.elapsed.components.attoseconds) / 1e18
        return String(
            format: "loadgen %.1fs: %d attempts, %d admitted, %d denied, %d failed, %d open", seconds, progress.attempts, progress.admitted,
            progress.denied, progress.failed, progress.open)
    }

    static func text(_ report: LoadReport, users: Int, attempts: Int) -> String {
        var lines = [
            "loadgen: \(users) users × \(attempts) attempts = \(report.attempts) attempts in \(String(format: "%.1f", report.seconds)) s",
            "  admitted \(report.admitted), denied \(report.denied), failed \(report.failed)"
                + (report.reconnects > 0 ? ", reconnects \(report.reconnects)" : ""),
            String(
                format: "  connect latency p50 %.1f ms, p99 %.1f ms, max %.1f ms; %.0f attempts/s", report.connectP50Ms, report.connectP99Ms,
                report.connectMaxMs, report.connectRate),
            "  held at once: \(report.peakOpen) connections; most by one user: \(report.peakOpenPerUser)",
        ]
        if report.agentRunsCompleted > 0 { lines.append("  agent runs completed: \(report.agentRunsCompleted)") }
        if !report.closedByServer.isEmpty {
            lines.append(
                "  closed by the server before the hold ended: "
                    + report.closedByServer.sorted { $0.key < $1.key }.map { "\($0.value) × \($0.key)" }.joined(separator: ", "))
        }
        if !report.failureSamples.isEmpty { lines.append("  failures, e.g.: " + report.failureSamples.joined(separator: "; ")) }
        return lines.joined(separator: "\n")
    }
}
