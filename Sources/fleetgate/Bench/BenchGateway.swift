import ArgumentParser
import FleetgateBench
import Foundation
import RedisClient
import UnixSignals

/// `fleetgate bench gateway`: connections per second through one gateway node with the limiter, next to the same node
/// with `--limiter off`, in the same run.
struct BenchGateway: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "gateway",
        abstract: "Connections/s through a gateway node with the limiter vs the same node with --limiter off (goal >= 0.9x).",
        discussion: """
            Launches two `fleetgate serve` nodes of this very executable on 127.0.0.1 (--port 0, --log-level warning, \
            a random HS256 secret): one with the limiter on Redis at URL (keys under a fresh prefix fgbench-<random>, \
            --default-limit 1000000 so nobody is ever denied, --on-redis-down reject so a Redis problem shows as a \
            failure instead of a local admission), and one with --limiter off (no Redis).

            One cycle is a whole connection: TCP connect, HTTP upgrade with a token for one of USERS users \
            (Authorization: Bearer), the 101, the client's close frame (1000), the server's answer and the end of the \
            socket. The same client code drives both nodes: by default a minimal one (one NIO channel handler writing \
            the request bytes and reading the answers itself), or HummingbirdWSClient with --client hummingbird, which \
            spends about twice as much CPU per connection and so leaves the nodes less of a shared machine. After a \
            warm-up of WARMUP cycles on each \
            node, every round measures CONNECTIONS cycles from CONCURRENCY concurrent tasks on the node without the \
            limiter, then on the node with it. Printed per run: cycles/s, p50/p99 cycle latency (HdrHistogram), CPU \
            per cycle of this client, of the node (/proc/<pid>/stat) and of redis-server (INFO cpu), and failed cycles; \
            per round the ratio limiter / --limiter off, and at the end the median ratio over the rounds (goal >= 0.90). \
            Next to it, the ratio of all CPU per cycle (client + node + redis-server), off / limiter: what the \
            throughput ratio is when the machine's CPU is the only limit, and steadier than throughput on a shared \
            machine. The limiter's Redis calls per cycle come from INFO commandstats.

            Afterwards: every connection entry must be gone from Redis while the node still runs (releases are \
            asynchronous; only the node's own registration may remain), then both nodes get SIGTERM and the limiter \
            node must leave no key behind; whatever is left under the prefix is deleted. A failed cycle or a leftover \
            entry makes the command exit non-zero after printing the report. On SIGINT or SIGTERM the nodes are \
            stopped before exiting. Figures read server-wide counters: use a Redis server with nothing else running.
            """
    )

    @Option(help: "The Redis server of the limiter node, redis://[user:password@]host:port[/db].")
    var url: String = "redis://127.0.0.1:6379"

    @Option(help: "Connection cycles per node in each round.")
    var connections: Int = 20_000

    @Option(help: "Concurrent client tasks, each running one cycle after another.")
    var concurrency: Int = 64

    @Option(help: "Distinct users the cycles take turns with (one signed token each).")
    var users: Int = 1_000

    @Option(help: "Rounds, each measuring the node without the limiter and then the node with it.")
    var rounds: Int = 3

    @Option(help: "Warm-up cycles on each node before the first round.")
    var warmup: Int = 1_000

    @Option(help: "The client: minimal (one NIO channel handler, raw upgrade bytes) or hummingbird (HummingbirdWSClient).")
    var client: GatewayBenchClient = .minimal

    @OptionGroup var figureOptions: FigureOptions

    func validate() throws {
        guard (1...10_000_000).contains(connections) else { throw ValidationError("--connections must be between 1 and 10000000") }
        guard (1...5_000).contains(concurrency) else { throw ValidationError("--concurrency must be between 1 and 5000") }
        guard (1...1_000_000).contains(users) else { throw ValidationError("--users must be between 1 and 1000000") }
        guard (1...100).contains(rounds) else { throw ValidationError("--rounds must be between 1 and 100") }
        guard (0...10_000_000).contains(warmup) else { throw ValidationError("--warmup must be between 0 and 10000000") }
        do {
            _ = try RedisClientConfiguration(url: url)
        } catch {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        let runner = try makeRunner(executable: GatewayBenchRunner.locateExecutable())
        // SIGINT or SIGTERM cancels the run; the runner stops its nodes on the way out.
        let signals = await UnixSignalsSequence(trapping: .sigint, .sigterm)
        let result = try await withThrowingTaskGroup(of: GatewayBenchResult?.self) { group in
            group.addTask {
                for await signal in signals {
                    throw GatewayBenchRunner.Failure(description: "interrupted by \(signal); the gateway nodes were stopped")
                }
                return nil
            }
            group.addTask { try await runner.run() }
            defer { group.cancelAll() }
            while let next = try await group.next() {
                if let result = next { return result }
            }
            throw GatewayBenchRunner.Failure(description: "the benchmark ended without a result")
        }
        print(runner.report(result))
        if let problem = result.problem { throw GatewayBenchRunner.Failure(description: problem) }
        try figureOptions.finish(result.figures)
    }

    /// The runner for these options, launching `executable serve` for its nodes.
    func makeRunner(executable: URL) throws -> GatewayBenchRunner {
        GatewayBenchRunner(
            configuration: try RedisClientConfiguration(url: url),
            redisURL: url,
            connections: connections,
            concurrency: concurrency,
            users: users,
            rounds: rounds,
            warmup: warmup,
            client: client,
            executable: executable
        )
    }
}

extension GatewayBenchClient: ExpressibleByArgument {}
