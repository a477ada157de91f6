import ArgumentParser
import FleetgateBench

/// `fleetgate bench cluster`: the limiter's admissions on one server, on a one-primary cluster and on three
/// primaries, in the same run.
struct BenchCluster: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "cluster",
        abstract: "Limiter admissions/s on 1 server vs a 1-primary cluster (routing cost) vs 3 primaries (scaling), same run.",
        discussion: """
            Starts its own servers on free loopback ports (redis-server and redis-cli must be installed): a plain \
            redis-server, a cluster-enabled one holding all 16384 slots (a one-primary cluster: the same work as the \
            plain server, plus the cluster client's routing), and a cluster of three primaries without replicas \
            (redis-cli --cluster create). Each round measures, on each target in turn, one limiter node admitting \
            REQUESTS connections of random users out of USERS from CLIENTS x PIPELINE concurrent tasks after a \
            warm-up of a tenth as many. Printed per run: admissions/s, p50/p99 latency, this process's CPU µs per \
            admission, keys per primary (DBSIZE); then the routing ratio (1-primary cluster / 1 server), the scaling \
            ratio (3 primaries / 1 server; on one machine every server shares its cores, so read it as a floor), \
            and how the users' keys spread over slots and primaries. Every server is stopped afterwards.
            """
    )

    @Option(help: "Admissions per run.") var requests = 100_000
    @Option(help: "Users the admissions pick from at random.") var users = 100_000
    @Option(help: "Concurrent callers = clients x pipeline.") var clients = 4
    @Option(help: "Concurrent callers = clients x pipeline.") var pipeline = 16
    @Option(help: "Limit per user (large enough that denials are rare).") var limit = 20
    @Option(help: "Rounds, each measuring every target.") var rounds = 2
    @OptionGroup var figureOptions: FigureOptions

    func validate() throws {
        guard (1_000...10_000_000).contains(requests) else { throw ValidationError("--requests must be between 1000 and 10000000") }
        guard (1...100_000_000).contains(users) else { throw ValidationError("--users must be between 1 and 100000000") }
        guard (1...1_000).contains(clients), (1...1_000).contains(pipeline) else {
            throw ValidationError("--clients and --pipeline must be between 1 and 1000")
        }
        guard (1...1_000_000).contains(limit) else { throw ValidationError("--limit must be between 1 and 1000000") }
        guard (1...20).contains(rounds) else { throw ValidationError("--rounds must be between 1 and 20") }
    }

    func run() async throws {
        let runner = ClusterBenchRunner(requests: requests, users: users, clients: clients, pipeline: pipeline, limit: limit, rounds: rounds)
        let result = try await Chaos.runInterruptibly { try await runner.run() }
        print(runner.report(result))
        try figureOptions.finish(result.figures)
    }
}
