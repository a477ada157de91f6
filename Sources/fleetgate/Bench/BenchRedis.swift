import ArgumentParser
import FleetgateBench
import Foundation
import RedisClient

/// `fleetgate bench redis`: the client's throughput and latency next to `redis-benchmark` on the same server.
struct BenchRedis: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "redis",
        abstract: "Client throughput vs redis-benchmark (same command, same total concurrency, -P pipelining).",
        discussion: """
            Runs, against the same server: redis-benchmark with -c CLIENTS -P PIPELINE, then this client with \
            CLIENTS x PIPELINE concurrent tasks sharing one connection (automatic pipelining). Prints requests/s, \
            p50/p99 latency (HdrHistogram) and the ratio client / redis-benchmark. Keys are written under \
            fgbench:* and deleted afterwards.
            """
    )

    @Option(parsing: .upToNextOption, help: "Client modes: automatic (independent callers), explicit (pipeline() batches).")
    var mode: [RedisBenchMode] = [.automatic, .explicit]

    @Option(help: "The Redis server, redis://[user:password@]host:port[/db].")
    var url: String = "redis://127.0.0.1:6379"

    @Option(help: "redis-benchmark connections (-c); the client runs clients x pipeline concurrent tasks.")
    var clients: Int = 4

    @Option(help: "Requests per measurement (-n).")
    var requests: Int = 200_000

    @Option(help: "Pipeline depth for redis-benchmark (-P).")
    var pipeline: Int = 16

    @Option(parsing: .upToNextOption, help: "Workloads to run: set, evalsha.")
    var command: [RedisBenchWorkload] = [.set, .evalsha]

    @Flag(help: "Run the client's request tasks on its connection's event loop (RedisClient.taskExecutor).")
    var eventLoopExecutor = false

    @Option(help: "Path of redis-benchmark (default: found on PATH).")
    var redisBenchmark: String?

    @Flag(help: "Pin a local redis-server to CPU 1, and this client and redis-benchmark to CPU 0 (taskset), for the run.")
    var pin = false

    @OptionGroup var figureOptions: FigureOptions

    func validate() throws {
        guard clients >= 1, clients <= 10_000 else { throw ValidationError("--clients must be between 1 and 10000") }
        guard requests >= 1_000, requests <= 100_000_000 else { throw ValidationError("--requests must be between 1000 and 100000000") }
        guard pipeline >= 1, pipeline <= 1_000 else { throw ValidationError("--pipeline must be between 1 and 1000") }
        do {
            _ = try RedisClientConfiguration(url: url)
        } catch {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        let configuration = try RedisClientConfiguration(url: url)
        let benchmarkPath = try redisBenchmark ?? RedisBenchmarkTool.locate()
        let runner = RedisBenchRunner(
            configuration: configuration,
            clients: clients,
            requests: requests,
            pipeline: pipeline,
            redisBenchmarkPath: benchmarkPath,
            onEventLoop: eventLoopExecutor,
            modes: mode,
            pin: pin
        )
        let results = try await runner.run(command)
        print(RedisBenchRunner.report(results, clients: clients, pipeline: pipeline, requests: requests, pinned: pin))
        try figureOptions.finish(results.map(\.figure))
    }
}

extension RedisBenchMode: ExpressibleByArgument {}
extension RedisBenchWorkload: ExpressibleByArgument {}
