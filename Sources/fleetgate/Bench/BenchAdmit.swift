import ArgumentParser
import FleetgateBench
import Foundation
import RedisClient

/// `fleetgate bench admit`: the limiter's admission throughput next to redis-benchmark running the same script, its
/// memory per live connection, and the Redis CPU it costs to keep connections alive.
struct BenchAdmit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "admit",
        abstract: "Limiter admission throughput vs redis-benchmark EVALSHA admit.lua; memory and Redis CPU per live connection.",
        discussion: """
            Every key is written under a fresh prefix fgbench-<random>: and deleted afterwards (SCAN + UNLINK). Use a \
            server with nothing else running: figures 2 and 3 read server-wide INFO counters.

            1. Admission throughput. redis-benchmark -c CLIENTS -P PIPELINE -r USERS runs EVALSHA of the limiter's own \
            admit.lua with keys and arguments shaped like the limiter's (keys <prefix>:{u:<random>}:conns, :limit, \
            :since, member benchnode:<random>, LIMIT, lease 30000 ms, "reject", "0"; redis-benchmark draws each \
            <random> independently, out of USERS). Then one ConnectionLimiter node admits REQUESTS \
            connections (random users out of USERS, unique connection ids, nothing released) from CLIENTS x PIPELINE \
            concurrent tasks, after a warm-up of a tenth as many. Printed: admissions/s, p50/p99 latency of \
            admit(user:connection:) (HdrHistogram), this process's CPU µs per admission, denials (users at LIMIT), and \
            the ratio limiter / redis-benchmark (goal >= 0.85). A limiter admission is the EVALSHA of admit.lua, \
            preceded in the same write by a SADD to the node's users index for a user's first connection on the node; \
            redis-benchmark sends the EVALSHA alone.

            2. Memory per live connection. used_memory (INFO memory) before and after MEMORY_USERS x \
            MEMORY_CONNECTIONS_PER_USER admissions: once with the admission script alone (EVALSHA pipelined \
            directly: the users' connection sets), once through a limiter node (adds the node's users index); the \
            difference is the users index. Bytes per connection, goal <= 80 for the limiter path. 0 skips 2 and 3.

            3. Redis CPU to keep connections alive. With those connections open on the node (lease renewal every \
            RENEW_INTERVAL seconds, heartbeat every second), INFO commandstats and INFO cpu are read at the end of one \
            renewal round and at the end of the next, so the window holds exactly one round and the heartbeats of one \
            period. Printed per second and per 100,000 connections: command execution time (EVALSHA of the renew, \
            heartbeat and sweeper-lock scripts including their inner calls; SADD and PEXPIRE of the users index; \
            HSET and PEXPIRE of the node hash) and the whole redis-server process CPU (also network I/O, background \
            expiry and this command's INFO polling).

            Then the node shuts down gracefully (releasing every entry) and the keys are deleted.
            """
    )

    @Option(help: "The Redis server, redis://[user:password@]host:port[/db].")
    var url: String = "redis://127.0.0.1:6379"

    @Option(help: "redis-benchmark connections (-c); the limiter is called from clients x pipeline concurrent tasks.")
    var clients: Int = 4

    @Option(help: "Pipeline depth for redis-benchmark (-P).")
    var pipeline: Int = 16

    @Option(help: "Admissions per throughput measurement (-n).")
    var requests: Int = 200_000

    @Option(help: "Users the throughput measurement picks from at random (-r).")
    var users: Int = 100_000

    @Option(help: "Limit per user in the throughput measurement (large enough that denials are rare).")
    var limit: Int = 20

    @Option(help: "Users for the memory and CPU measurements (0 skips them).")
    var memoryUsers: Int = 100_000

    @Option(help: "Connections per user for the memory and CPU measurements (0 skips them).")
    var memoryConnectionsPerUser: Int = 5

    @Option(help: "Lease renewal interval of the node in the CPU measurement, in seconds (the limiter's default: 120).")
    var renewInterval: Int = 120

    @Option(help: "Path of redis-benchmark (default: found on PATH).")
    var redisBenchmark: String?

    @OptionGroup var figureOptions: FigureOptions

    func validate() throws {
        guard (1...1_000).contains(clients) else { throw ValidationError("--clients must be between 1 and 1000") }
        guard (1...1_000).contains(pipeline) else { throw ValidationError("--pipeline must be between 1 and 1000") }
        guard clients * pipeline <= 100_000 else { throw ValidationError("--clients x --pipeline must be at most 100000") }
        guard (1_000...10_000_000).contains(requests) else { throw ValidationError("--requests must be between 1000 and 10000000") }
        guard (1...100_000_000).contains(users) else { throw ValidationError("--users must be between 1 and 100000000") }
        guard (1...1_000_000).contains(limit) else { throw ValidationError("--limit must be between 1 and 1000000") }
        guard (0...10_000_000).contains(memoryUsers) else { throw ValidationError("--memory-users must be between 0 and 10000000") }
        guard (0...1_000).contains(memoryConnectionsPerUser) else {
            throw ValidationError("--memory-connections-per-user must be between 0 and 1000")
        }
        guard memoryUsers * memoryConnectionsPerUser <= 20_000_000 else {
            throw ValidationError("--memory-users x --memory-connections-per-user must be at most 20000000")
        }
        guard (1...600).contains(renewInterval) else { throw ValidationError("--renew-interval must be between 1 and 600 seconds") }
        do {
            _ = try RedisClientConfiguration(url: url)
        } catch {
            throw ValidationError(error.message)
        }
    }

    func run() async throws {
        let runner = try makeRunner(redisBenchmarkPath: redisBenchmark ?? RedisBenchmarkTool.locate())
        let result = try await runner.run()
        print(runner.report(result))
        try figureOptions.finish(result.figures)
    }

    /// The runner for these options (0 for either memory size skips the memory and CPU measurements).
    func makeRunner(redisBenchmarkPath: String) throws -> AdmitBenchRunner {
        AdmitBenchRunner(
            configuration: try RedisClientConfiguration(url: url),
            clients: clients,
            pipeline: pipeline,
            requests: requests,
            users: users,
            limit: limit,
            memoryUsers: memoryConnectionsPerUser == 0 ? 0 : memoryUsers,
            memoryConnectionsPerUser: memoryUsers == 0 ? 0 : memoryConnectionsPerUser,
            renewInterval: .seconds(renewInterval),
            redisBenchmarkPath: redisBenchmarkPath
        )
    }
}
