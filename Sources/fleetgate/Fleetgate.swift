import ArgumentParser

/// The `fleetgate` command: one thin binary for the gateway, operators and benchmarks.
@main
struct Fleetgate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fleetgate",
        abstract: "Fleet-wide per-user WebSocket connection limits on Redis.",
        version: "0.1.0",
        subcommands: [Bench.self]
    )
}

/// `fleetgate bench …`: measurements reported as ratios against a reference run in the same invocation.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks, each next to a reference measured in the same run.",
        subcommands: [BenchRedis.self, BenchAdmit.self]
    )
}
