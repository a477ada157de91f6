import ArgumentParser
import ConnectionLimiter
import FleetChaos
import Foundation
import LoadGenerator

/// The `fleetgate` command: one thin binary for the gateway, operators and benchmarks.
@main
struct Fleetgate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fleetgate",
        abstract: "Fleet-wide per-user WebSocket connection limits on Redis.",
        version: FleetgateVersion.current,
        subcommands: [
            Serve.self, Status.self, User.self, Nodes.self, Limit.self, Evict.self, Sweep.self, Token.self, Loadgen.self, Demo.self, Chaos.self,
            Bench.self,
        ]
    )

    /// Runs the command; a failure is one line on stderr (`fleetgate: <what went wrong>`), never a usage dump.
    static func main() async {
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            let code = exitCode(for: error)
            guard code != .success else { exit(withError: error) }
            let message =
                (error as? ServeError)?.description ?? (error as? OperatorError)?.description ?? (error as? LoadGeneratorError)?.description
                ?? (error as? ChaosError)?.description ?? message(for: error)
            FileHandle.standardError.write(Data("fleetgate: \(message)\n".utf8))
            Foundation.exit(code.rawValue)
        }
    }
}

/// `fleetgate bench …`: measurements reported as ratios against a reference run in the same invocation.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks, each next to a reference measured in the same run.",
        subcommands: [BenchRedis.self, BenchAdmit.self, BenchGateway.self, BenchCluster.self]
    )
}
