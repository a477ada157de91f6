import Foundation
import Logging
import RedisClient

/// One workload's result: the client next to redis-benchmark.
public struct RedisBenchResult: Sendable {
    var workload: RedisBenchWorkload
    var mode: RedisBenchMode
    var client: Measurement
    var reference: Measurement
    var ratio: Double { client.requestsPerSecond / reference.requestsPerSecond }
}

/// A `bench redis` workload.
public enum RedisBenchWorkload: String, CaseIterable, Sendable {
    /// `SET key value` on random keys.
    case set
    /// `EVALSHA` of a one-line `INCR` script on random keys.
    case evalsha
}

/// How the client sends a workload's requests.
public enum RedisBenchMode: String, CaseIterable, Sendable {
    /// Independent concurrent callers; the client pipelines what they send (automatic pipelining).
    case automatic
    /// Batches through `pipeline()`.
    case explicit
}

/// Runs the `bench redis` workloads.
public struct RedisBenchRunner: Sendable {
    static let script = RedisScript("return redis.call('INCR', KEYS[1])")
    static let keyspace = 100_000

    var configuration: RedisClientConfiguration
    var clients: Int
    var requests: Int
    var pipeline: Int
    var redisBenchmarkPath: String
    /// Run the request tasks on the connection's event loop (``RedisClient/taskExecutor``) instead of the global executor.
    var onEventLoop = false
    var modes: [RedisBenchMode] = [.automatic, .explicit]
    /// Pin redis-server (a local one) to CPU 1, and this process and redis-benchmark to CPU 0, for the run: the ratio
    /// then measures the clients, not their competition with the server for two shared cores.
    var pin = false

    /// A runner: `clients` × `pipeline` concurrent tasks beside `redis-benchmark -c clients -P pipeline`.
    public init(
        configuration: RedisClientConfiguration, clients: Int, requests: Int, pipeline: Int, redisBenchmarkPath: String, onEventLoop: Bool,
        modes: [RedisBenchMode], pin: Bool = false
    ) {
        self.pin = pin
        self.configuration = configuration
        self.clients = clients
        self.requests = requests
        self.pipeline = pipeline
        self.redisBenchmarkPath = redisBenchmarkPath
        self.onEventLoop = onEventLoop
        self.modes = modes
    }

    /// Runs each workload in each mode next to redis-benchmark.
    public func run(_ workloads: [RedisBenchWorkload]) async throws -> [RedisBenchResult] {
        let client = RedisClient(configuration: configuration, logger: Logger(label: "fleetgate.bench"))
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            defer { group.cancelAll() }
            try await client.ping()
            try await client.load(Self.script)
            var serverPID: Int32?
            if pin {
                serverPID = try await pinServerAndSelf(client)
            }
            defer {
                if let serverPID {
                    try? CPUPinning.pin(serverPID, to: CPUPinning.allCPUs)
                    try? CPUPinning.pin(getpid(), to: CPUPinning.allCPUs)
                }
            }
            var results: [RedisBenchResult] = []
            for workload in workloads {
                let reference = try RedisBenchmarkTool.run(
                    path: redisBenchmarkPath,
                    configuration: configuration,
                    arguments: ["-c", "\(clients)", "-n", "\(requests)", "-P", "\(pipeline)", "-r", "\(Self.keyspace)"]
                        + Self.benchmarkCommand(workload),
                    cpus: pin ? "0" : nil
                )
                // Warm up (connection, caches, allocator) with a tenth of the requests, then measure.
                for mode in modes {
                    _ = try await measure(client, workload, mode: mode, requests: max(1_000, requests / 10))
                    let measured = try await measure(client, workload, mode: mode, requests: requests)
                    results.append(RedisBenchResult(workload: workload, mode: mode, client: measured, reference: reference))
                }
            }
            try await cleanUp(client)
            return results
        }
    }

    /// Pins the server (found by `INFO server`'s `process_id`; it must run on this machine) to CPU 1 and this process to
    /// CPU 0; returns the server's pid so the pinning can be undone.
    private func pinServerAndSelf(_ client: RedisClient) async throws -> Int32 {
        guard ["127.0.0.1", "localhost", "::1"].contains(configuration.host) else {
            throw CPUPinning.Failure(description: "--pin needs a redis-server on this machine (127.0.0.1), not \(configuration.address)")
        }
        guard ProcessInfo.processInfo.activeProcessorCount >= 2 else {
            throw CPUPinning.Failure(description: "--pin needs two CPUs; this machine has \(ProcessInfo.processInfo.activeProcessorCount)")
        }
        let info = try await client.send("INFO", "server").string ?? ""
        guard let line = info.split(whereSeparator: \.isNewline).first(where: { $0.hasPrefix("process_id:") }),
            let pid = Int32(line.dropFirst("process_id:".count).trimmingCharacters(in: .whitespaces))
        else {
            throw CPUPinning.Failure(description: "INFO server of \(configuration.address) names no process_id")
        }
        try CPUPinning.pin(pid, to: "1")
        try CPUPinning.pin(getpid(), to: "0")
        return pid
    }

    static func benchmarkCommand(_ workload: RedisBenchWorkload) -> [String] {
        switch workload {
        case .set: return ["SET", "fgbench:set:__rand_int__", "xxx"]
        case .evalsha: return ["EVALSHA", script.sha1, "1", "fgbench:eval:__rand_int__"]
        }
    }

    private func command(_ workload: RedisBenchWorkload, key: Int) -> RedisCommand {
        switch workload {
        case .set: return RedisCommand("SET", "fgbench:set:\(key)", "xxx")
        case .evalsha: return RedisCommand("EVALSHA", Self.script.sha1, 1, "fgbench:eval:\(key)")
        }
    }

    /// `clients x pipeline` tasks share `requests`; each records its latencies in its own histogram.
    private func measure(_ client: RedisClient, _ workload: RedisBenchWorkload, mode: RedisBenchMode, requests: Int) async throws -> Measurement {
        // Automatic pipelining: clients x pipeline independent callers, one command each at a time.
        // Explicit pipelining: `clients` callers, each sending batches of `pipeline` commands, like redis-benchmark.
        let tasks = mode == .automatic ? clients * pipeline : clients
        let batch = mode == .automatic ? 1 : pipeline
        let executor: EventLoopTaskExecutor? = onEventLoop ? client.taskExecutor : nil
        return try await measureConcurrently(tasks: tasks, requests: requests, executor: executor) { _, _, remaining, generator in
            if batch == 1 {
                try await client.send(command(workload, key: Int.random(in: 0..<Self.keyspace, using: &generator)))
                return 1
            }
            let count = min(batch, remaining)
            let commands = (0..<count).map { _ in command(workload, key: Int.random(in: 0..<Self.keyspace, using: &generator)) }
            for reply in try await client.pipeline(commands) { _ = try reply.get() }
            return count
        }
    }

    /// Deletes the benchmark's keys (SCAN + UNLINK, never FLUSHALL).
    private func cleanUp(_ client: RedisClient) async throws {
        try await client.unlinkKeys(matching: "fgbench:*")
    }

    /// The printed report.
    public static func report(_ results: [RedisBenchResult], clients: Int, pipeline: Int, requests: Int, pinned: Bool = false) -> String {
        var lines = [
            pinned
                ? "pinned: redis-server on CPU 1; this client and redis-benchmark on CPU 0 (taskset)"
                : "not pinned: redis-server, this client and redis-benchmark share every CPU (--pin separates them)",
            "fleetgate bench redis: \(requests) requests; redis-benchmark -c \(clients) -P \(pipeline); client on 1 connection with",
            "  automatic = \(clients * pipeline) concurrent callers, 1 command each; explicit = \(clients) callers, pipeline() batches of \(pipeline)",
            pad("command", 9) + pad("mode", 11) + pad("client req/s", 14) + pad("p50 ms", 9) + pad("p99 ms", 9)
                + pad("redis-benchmark req/s", 23) + pad("p50 ms", 9) + pad("p99 ms", 9) + pad("client CPU µs/req", 19) + "ratio",
        ]
        for result in results {
            lines.append(
                pad(result.workload.rawValue.uppercased(), 9) + pad(result.mode.rawValue, 11) + pad(format(result.client.requestsPerSecond, 0), 14)
                    + pad(format(result.client.p50Milliseconds, 3), 9) + pad(format(result.client.p99Milliseconds, 3), 9)
                    + pad(format(result.reference.requestsPerSecond, 0), 23) + pad(format(result.reference.p50Milliseconds, 3), 9)
                    + pad(format(result.reference.p99Milliseconds, 3), 9)
                    + pad(format(result.client.cpuMicrosecondsPerRequest ?? 0, 2), 19) + format(result.ratio, 2) + "x"
            )
        }
        return lines.joined(separator: "\n")
    }
}
