import ConnectionLimiter
import Foundation
import Logging
import RedisClient
import Synchronization

/// What `bench admit` measured.
public struct AdmitBenchResult: Sendable {
    /// 1. Admission throughput, the limiter next to redis-benchmark.
    struct Throughput: Sendable {
        var limiter: Measurement
        var reference: Measurement
        /// Admissions the limiter denied (users at the limit) in the measured run.
        var denied: Int
        /// The measurement lasted past the node's first lease renewal (which then competed with it).
        var renewalDuringMeasurement: Bool
        var ratio: Double { limiter.requestsPerSecond / reference.requestsPerSecond }
    }

    /// 1b. Redis server time per admission: admit.lua next to a minimal script, `redis-benchmark` running each in turn.
    struct ScriptCost: Sendable {
        /// Microseconds per EVALSHA (INFO commandstats, inner calls included), per run: admit.lua, then the minimal one.
        var admit: [Double]
        var minimal: [Double]
        var ratio: Double { median(admit) / max(median(minimal), 0.001) }

        func median(_ values: [Double]) -> Double {
            let sorted = values.sorted()
            return sorted.isEmpty ? 0 : sorted[sorted.count / 2]
        }
    }

    /// 2. Memory per live connection.
    struct Memory: Sendable {
        var users: Int
        var connectionsPerUser: Int
        /// `used_memory` growth through the limiter's admission path.
        var limiterBytes: Int
        /// `used_memory` growth with the admission script alone.
        var scriptBytes: Int
        /// Entries present in the users' sets right after the admissions (fewer than ``connections`` when leases ran
        /// out meanwhile); the bytes are divided by these.
        var limiterEntries: Int
        var scriptEntries: Int
        var limiterAdmissionsPerSecond: Double
        var scriptAdmissionsPerSecond: Double
        var limiterSeconds: Double
        var denied: Int
        var connections: Int { users * connectionsPerUser }
        var limiterBytesPerEntry: Double { Double(limiterBytes) / Double(max(limiterEntries, 1)) }
        var scriptBytesPerEntry: Double { Double(scriptBytes) / Double(max(scriptEntries, 1)) }
    }

    /// 3. Redis CPU spent keeping connections alive (one renewal round plus the heartbeats of one period).
    struct Upkeep: Sendable {
        var connections: Int
        var users: Int
        var seconds: Double
        /// SADD calls in the window (one per renewal pipeline) and how many one round sends.
        var renewalPipelines: Int
        var pipelinesPerRound: Int
        /// HSET calls in the window (one per heartbeat).
        var heartbeats: Int
        /// Command execution time in the window (µs): scripts with their inner calls, then top-level commands.
        var scripts: Double
        var sadd: Double
        var pexpire: Double
        var hset: Double
        /// redis-server's user + system CPU in the window (µs).
        var processCPU: Double
        var commandTime: Double { scripts + sadd + pexpire + hset }
        /// The naive reference, measured in the same run: µs of one `ZADD` (redis-benchmark on keys like the users'),
        /// of which a naive keep-alive sends one per connection every renewal interval.
        var naiveZADDMicroseconds: Double?
        /// The naive design's renewal interval (with 30 s leases, as the limiter had before its leases became a long
        /// backstop): one ZADD per connection every 10 s.
        static let naiveIntervalSeconds: Double = 10
        /// Command time of the naive design over the same window: connections / 10 s × window × µs per ZADD.
        var naiveCommandTime: Double? {
            naiveZADDMicroseconds.map { Double(connections) / Self.naiveIntervalSeconds * seconds * $0 }
        }
        /// Command time / the naive design's (the issue's goal: at most 0.3).
        var naiveRatio: Double? {
            naiveCommandTime.flatMap { $0 > 0 ? commandTime / $0 : nil }
        }
    }

    /// A node's graceful shutdown.
    struct Shutdown: Sendable {
        var entries: Int
        var seconds: Double
        /// The node left the registry (its drain pipeline succeeded).
        var deregistered: Bool
    }

    var throughput: Throughput
    var throughputShutdown: Shutdown
    var scriptCost: ScriptCost?
    var memory: Memory?
    var upkeep: Upkeep?
    var memoryShutdown: Shutdown?
}

/// Runs `bench admit`: every key lives under ``prefix`` and is deleted at the end, also on failure.
public struct AdmitBenchRunner: Sendable {
    /// The benchmark could not run or a check failed; the message says what and where.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// Lease of every entry written in the throughput measurement (also given to redis-benchmark).
    static let throughputLease = Duration.seconds(30)
    /// Users per renewal pipeline (see `ConnectionLimiter.renewLeases`).
    static let renewalChunk = 256

    var configuration: RedisClientConfiguration
    var clients: Int
    var pipeline: Int
    var requests: Int
    var users: Int
    var limit: Int
    var memoryUsers: Int
    var memoryConnectionsPerUser: Int
    var renewInterval: Duration
    var redisBenchmarkPath: String
    /// The limiter's own `Scripts/admit.lua`.
    var admitScript: RedisScript
    /// `fgbench-<random>`: throughput keys under `<prefix>:r` (redis-benchmark) and `:a` (limiter), memory keys under
    /// `:s` (script alone) and `:m` (limiter).
    var prefix = "fgbench-" + String((0..<6).map { _ in "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".randomElement()! })

    /// A runner; `memoryUsers` or `memoryConnectionsPerUser` 0 skips the memory and upkeep measurements, and
    /// `admitScript` is what redis-benchmark runs beside the limiter (by default the limiter's own admission script).
    public init(
        configuration: RedisClientConfiguration, clients: Int, pipeline: Int, requests: Int, users: Int, limit: Int, memoryUsers: Int,
        memoryConnectionsPerUser: Int, renewInterval: Duration, redisBenchmarkPath: String,
        admitScript: RedisScript = RedisScript(ConnectionLimiter.scriptSource(.admit))
    ) {
        self.configuration = configuration
        self.clients = clients
        self.pipeline = pipeline
        self.requests = requests
        self.users = users
        self.limit = limit
        self.memoryUsers = memoryUsers
        self.memoryConnectionsPerUser = memoryConnectionsPerUser
        self.renewInterval = renewInterval
        self.redisBenchmarkPath = redisBenchmarkPath
        self.admitScript = admitScript
    }

    var logger: Logger {
        var logger = Logger(label: "fleetgate.bench")
        logger.logLevel = .warning
        return logger
    }

    /// Runs the three measurements and cleans up; throws ``Failure`` (after cleaning up) when one cannot run.
    public func run() async throws -> AdmitBenchResult {
        try await withClients { admin, redis in try await measure(admin: admin, redis: redis) }
    }

    /// Runs `body` with two running clients (one for inspection, one for the limiter node) and deletes every key
    /// under ``prefix`` afterwards, also when `body` throws.
    func withClients<T: Sendable>(_ body: (_ admin: RedisClient, _ redis: RedisClient) async throws -> T) async throws -> T {
        let admin = RedisClient(configuration: configuration, logger: logger)
        let redis = RedisClient(configuration: configuration, logger: logger)
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await admin.run() }
            group.addTask { try await redis.run() }
            defer { group.cancelAll() }
            _ = try await admin.ping()
            do {
                let result = try await body(admin, redis)
                try await admin.unlinkKeys(matching: "\(prefix):*")
                return result
            } catch {
                _ = try? await admin.unlinkKeys(matching: "\(prefix):*")
                throw error
            }
        }
    }

    private func measure(admin: RedisClient, redis: RedisClient) async throws -> AdmitBenchResult {
        // 1. Throughput: redis-benchmark first, on an idle node-less server, then the limiter.
        status("bench admit: keys under \(prefix):*\n1/3 admission throughput: redis-benchmark EVALSHA admit.lua")
        let sha = try await admin.load(admitScript)
        guard sha == admitScript.sha1 else {
            throw Failure(description: "SCRIPT LOAD of admit.lua answered \(sha), expected \(admitScript.sha1)")
        }
        let reference = try RedisBenchmarkTool.run(path: redisBenchmarkPath, configuration: configuration, arguments: referenceArguments)
        try await admin.unlinkKeys(matching: "\(prefix):r:*")
        status(", limiter")
        // The first lease renewal comes 15 s after the start, normally after the measurement.
        let throughputNode = nodeConfiguration(keyPrefix: "\(prefix):a", limit: limit, renewInterval: .seconds(15))
        let (throughput, throughputShutdown) = try await withNode(redis, admin: admin, configuration: throughputNode) { limiter, started in
            let tasks = clients * pipeline
            let warmup = max(1_000, requests / 10)
            _ = try await admitRandomUsers(limiter, tasks: tasks, count: warmup, base: 0, denied: Counter())
            let denied = Counter()
            let measured = try await admitRandomUsers(limiter, tasks: tasks, count: requests, base: warmup, denied: denied)
            return AdmitBenchResult.Throughput(
                limiter: measured,
                reference: reference,
                denied: denied.value,
                renewalDuringMeasurement: started.duration(to: .now) >= throughputNode.lease.renewInterval
            )
        }
        try await admin.unlinkKeys(matching: "\(prefix):a:*")
        var result = AdmitBenchResult(throughput: throughput, throughputShutdown: throughputShutdown)
        status("\n1b server time per admission: admit.lua and a minimal script, in turn")
        result.scriptCost = try await measureScriptCost(admin)
        guard memoryUsers > 0, memoryConnectionsPerUser > 0 else {
            status("\n")
            return result
        }

        // 2. Memory: the admission script alone, then the limiter's admission path on a fresh node.
        let connections = memoryUsers * memoryConnectionsPerUser
        let memoryLimit = max(limit, memoryConnectionsPerUser)
        status("\n2/3 memory: \(connections) admissions with the script alone ")
        let scriptBefore = try await settledUsedMemory(admin)
        let scriptRun = try await admitWithScriptAlone(admin, keyPrefix: "\(prefix):s", limit: memoryLimit)
        let scriptBytes = try await settledUsedMemory(admin) - scriptBefore
        let scriptEntries = try await liveEntries(admin, keyPrefix: "\(prefix):s")
        try await admin.unlinkKeys(matching: "\(prefix):s:*")
        let memoryNode = nodeConfiguration(keyPrefix: "\(prefix):m", limit: memoryLimit, renewInterval: renewInterval)
        let ((memory, upkeep), memoryShutdown) = try await withNode(redis, admin: admin, configuration: memoryNode) { limiter, _ in
            status(", through the limiter ")
            let before = try await settledUsedMemory(admin)
            let progress = Progress(total: connections)
            let denied = Counter()
            let tasks = clients * pipeline
            let users = memoryUsers
            let run = try await measureConcurrently(tasks: tasks, requests: connections) { task, done, _, _ in
                let index = task + done * tasks
                if case .denied = try await limiter.admit(user: Self.digits(index % users), connection: Self.digits(index)) { denied.add() }
                progress.advance()
                return 1
            }
            let limiterBytes = try await settledUsedMemory(admin) - before
            let memory = AdmitBenchResult.Memory(
                users: memoryUsers,
                connectionsPerUser: memoryConnectionsPerUser,
                limiterBytes: limiterBytes,
                scriptBytes: scriptBytes,
                limiterEntries: try await liveEntries(admin, keyPrefix: "\(prefix):m"),
                scriptEntries: scriptEntries,
                limiterAdmissionsPerSecond: run.requestsPerSecond,
                scriptAdmissionsPerSecond: scriptRun.requestsPerSecond,
                limiterSeconds: Double(connections) / run.requestsPerSecond,
                denied: denied.value
            )
            // 3. Upkeep of those connections.
            status("\n3/3 Redis CPU of \(limiter.localConnectionCount) live connections: one renewal round (every \(renewInterval))")
            var upkeep = try await measureUpkeep(admin, connections: limiter.localConnectionCount)
            upkeep.naiveZADDMicroseconds = try await measureZADD(admin)
            status(", shutting down\n")
            return (memory, upkeep)
        }
        try await admin.unlinkKeys(matching: "\(prefix):m:*")
        result.memory = memory
        result.upkeep = upkeep
        result.memoryShutdown = memoryShutdown
        return result
    }

    /// A minimal admission script in the style of API gateways' limiters (APISIX's `limit-conn` on Redis): the
    /// caller's clock, no override, no idempotency, no eviction — the floor admit.lua is measured against.
    static let minimalScript = RedisScript(
        """
        local now = tonumber(ARGV[4])
        redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
        if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
        redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
        redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
        return 1
        """)

    /// `redis-benchmark` runs admit.lua and the minimal script in turn, twice each (random users out of `users`,
    /// fresh keys per run); `INFO commandstats` before and after each run gives EVALSHA's server time per call.
    private func measureScriptCost(_ admin: RedisClient) async throws -> AdmitBenchResult.ScriptCost {
        let minimalSHA = try await admin.load(Self.minimalScript)
        let lease = Self.throughputLease.components.seconds * 1000
        // The minimal script takes the caller's clock: redis-benchmark sends one fixed "now" (this run's start).
        let now = Int(Date().timeIntervalSince1970 * 1000)
        let runs = max(2_000, requests / 4)
        var cost = AdmitBenchResult.ScriptCost(admit: [], minimal: [])
        for round in 0..<2 {
            for minimal in [false, true] {
                let keys = "\(prefix):c\(round)\(minimal ? "m" : "a"):{u:__rand_int__}"
                let common = ["-c", "\(clients)", "-n", "\(runs)", "-P", "\(pipeline)", "-r", "\(users)"]
                let arguments =
                    minimal
                    ? common + ["EVALSHA", minimalSHA, "1", "\(keys):conns", "benchnode:__rand_int__", "\(limit)", "\(lease)", "\(now)"]
                    : common + [
                        "EVALSHA", admitScript.sha1, "4", "\(keys):conns", "\(keys):limit", "\(keys):since", "\(keys):kicked",
                        "benchnode:__rand_int__", "\(limit)", "\(lease)", "reject", "0",
                    ]
                let before = try await snapshot(admin)
                _ = try RedisBenchmarkTool.run(path: redisBenchmarkPath, configuration: configuration, arguments: arguments)
                let used = try await snapshot(admin).delta("evalsha", since: before)
                let perCall = used.calls > 0 ? Double(used.usec) / Double(used.calls) : 0
                if minimal { cost.minimal.append(perCall) } else { cost.admit.append(perCall) }
                try await admin.unlinkKeys(matching: "\(prefix):c\(round)\(minimal ? "m" : "a"):*")
                status(".")
            }
        }
        return cost
    }

    /// redis-benchmark running the limiter's admission script with keys and arguments shaped like the limiter's.
    var referenceArguments: [String] {
        let keys = "\(prefix):r:{u:__rand_int__}"
        return [
            "-c", "\(clients)", "-n", "\(requests)", "-P", "\(pipeline)", "-r", "\(users)",
            "EVALSHA", admitScript.sha1, "4", "\(keys):conns", "\(keys):limit", "\(keys):since", "\(keys):kicked",
            "benchnode:__rand_int__", "\(limit)", "\(Self.throughputLease.components.seconds * 1000)", "reject", "0",
        ]
    }

    func nodeConfiguration(keyPrefix: String, limit: Int, renewInterval: Duration) -> LimiterConfiguration {
        var configuration = LimiterConfiguration(nodeName: "fleetgate-bench")
        configuration.keyPrefix = keyPrefix
        configuration.defaultLimit = limit
        configuration.lease.renewInterval = renewInterval
        // The defaults' proportion (5 min leases renewed every 2 min), never under the throughput part's 30 s.
        configuration.lease.ttl = max(Self.throughputLease, renewInterval * 5 / 2)
        // An admission Redis does not answer fails the benchmark instead of being admitted by the local count.
        configuration.policies.onRedisDown = .reject
        configuration.admissionTimeout = .seconds(10)
        return configuration
    }

    /// Starts a limiter node (`run()` in a task group), waits until it is registered, runs `body` with it and the
    /// instant it started, then shuts it down gracefully (releasing every entry) and waits for that.
    func withNode<T: Sendable>(
        _ redis: RedisClient,
        admin: RedisClient,
        configuration nodeConfiguration: LimiterConfiguration,
        _ body: (ConnectionLimiter, ContinuousClock.Instant) async throws -> T
    ) async throws -> (T, AdmitBenchResult.Shutdown) {
        let limiter = ConnectionLimiter(redis: redis, configuration: nodeConfiguration, logger: logger)
        let started = ContinuousClock.now
        return try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await limiter.run() }
            do {
                while !limiter.isRegistered {
                    guard started.duration(to: .now) < .seconds(10) else {
                        throw Failure(description: "the limiter node did not register in Redis at \(configuration.address) within 10 s")
                    }
                    try await Task.sleep(for: .milliseconds(10))
                }
                let value = try await body(limiter, started)
                let node = limiter.nodeID
                let entries = limiter.localConnectionCount
                let stopping = ContinuousClock.now
                limiter.shutdownGracefully()
                try await group.waitForAll()
                let seconds = Self.seconds(stopping.duration(to: .now))
                let registered = try await admin.send("ZSCORE", "\(nodeConfiguration.keyPrefix):nodes", node)
                return (value, AdmitBenchResult.Shutdown(entries: entries, seconds: seconds, deregistered: registered.isNull))
            } catch {
                group.cancelAll()
                throw error
            }
        }
    }

    /// `count` admissions of random users (connection ids `base…`), from `tasks` concurrent callers; nothing released.
    func admitRandomUsers(_ limiter: ConnectionLimiter, tasks: Int, count: Int, base: Int, denied: Counter) async throws -> Measurement {
        let users = users
        return try await measureConcurrently(tasks: tasks, requests: count) { task, done, _, generator in
            let user = (Int.random(in: 0..<users, using: &generator) + base) % users
            if case .denied = try await limiter.admit(user: Self.digits(user), connection: Self.digits(base + task + done * tasks)) {
                denied.add()
            }
            return 1
        }
    }

    /// Every user gets `memoryConnectionsPerUser` entries written by EVALSHA admit.lua directly (no users index, no
    /// node), pipelined in batches of 256 from `clients` tasks. Members look like the limiter's (8-character node id).
    private func admitWithScriptAlone(_ admin: RedisClient, keyPrefix: String, limit: Int) async throws -> Measurement {
        let connections = memoryUsers * memoryConnectionsPerUser
        let progress = Progress(total: connections)
        let users = memoryUsers
        let tasks = clients
        let sha = admitScript.sha1
        let lease = Self.throughputLease.components.seconds * 1000
        let measurement = try await measureConcurrently(tasks: tasks, requests: connections) { task, done, remaining, _ in
            let batch = min(256, remaining)
            let commands = (0..<batch).map { offset in
                let index = task + (done + offset) * tasks
                let keys = "\(keyPrefix):{u:\(Self.digits(index % users))}"
                return RedisCommand(
                    "EVALSHA", sha, 4, "\(keys):conns", "\(keys):limit", "\(keys):since", "\(keys):kicked", "benchnd1:\(Self.digits(index))", limit,
                    lease,
                    "reject", "0")
            }
            for reply in try await admin.pipeline(commands) {
                guard try reply.get().array?.first?.int == 1 else {
                    throw Failure(description: "admit.lua did not admit a connection in the memory measurement: \(try reply.get())")
                }
            }
            progress.advance(by: batch)
            return batch
        }
        return measurement
    }

    // MARK: Upkeep

    private struct Snapshot {
        var time: ContinuousClock.Instant
        var stats: [String: RedisInfo.CommandStat]
        /// redis-server's used_cpu_user + used_cpu_sys, in seconds.
        var cpu: Double

        func calls(_ command: String) -> Int { stats[command]?.calls ?? 0 }

        /// The change of `command`'s stats since `earlier`.
        func delta(_ command: String, since earlier: Snapshot) -> RedisInfo.CommandStat {
            let now = stats[command] ?? .init()
            let then = earlier.stats[command] ?? .init()
            return .init(calls: now.calls - then.calls, usec: now.usec - then.usec)
        }
    }

    private func snapshot(_ admin: RedisClient) async throws -> Snapshot {
        let replies = try await admin.pipeline([RedisCommand("INFO", "commandstats"), RedisCommand("INFO", "cpu")])
        let time = ContinuousClock.now
        let cpu = RedisInfo(try replies[1].get().string ?? "")
        return Snapshot(
            time: time,
            stats: RedisInfo(try replies[0].get().string ?? "").commandStats,
            cpu: (cpu.double("used_cpu_user") ?? 0) + (cpu.double("used_cpu_sys") ?? 0)
        )
    }

    /// Reads the stats at the end of one renewal round and at the end of the next: the window holds exactly one
    /// round and the heartbeats of one renewal period (interval + round duration).
    ///
    /// Once the admissions are over only renewals send SADD (one per pipeline of up to 256 users), so a round has
    /// ended when the SADD count rose and then stayed unchanged for a moment.
    private func measureUpkeep(_ admin: RedisClient, connections: Int) async throws -> AdmitBenchResult.Upkeep {
        let quiet = min(Duration.milliseconds(500), renewInterval / 4)
        let deadline = ContinuousClock.now + (renewInterval + .seconds(5)) * 3 + .seconds(30)
        func endOfRound(after start: Snapshot) async throws -> Snapshot {
            var sadds = start.calls("sadd")
            var changed: ContinuousClock.Instant?
            while true {
                guard ContinuousClock.now < deadline else {
                    throw Failure(description: "no lease renewal round of the limiter node was seen in INFO commandstats (SADD calls)")
                }
                try await Task.sleep(for: .milliseconds(100))
                let current = try await snapshot(admin)
                if current.calls("sadd") != sadds {
                    sadds = current.calls("sadd")
                    changed = current.time
                } else if let changed, changed.duration(to: current.time) >= quiet {
                    return current
                }
            }
        }
        let first = try await endOfRound(after: try await snapshot(admin))
        status(".")
        let second = try await endOfRound(after: first)
        let sadd = second.delta("sadd", since: first)
        let hset = second.delta("hset", since: first)
        let pexpire = second.delta("pexpire", since: first)
        let evalsha = second.delta("evalsha", since: first)
        let eval = second.delta("eval", since: first)
        // PEXPIRE is sent by the renewal pipelines (after each SADD) and the heartbeats (after each HSET), and also
        // called inside the scripts (counted in their time already): keep the top-level share.
        let topLevelPexpires = min(sadd.calls + hset.calls, pexpire.calls)
        let pexpireTime = pexpire.calls > 0 ? Double(pexpire.usec) * Double(topLevelPexpires) / Double(pexpire.calls) : 0
        return AdmitBenchResult.Upkeep(
            connections: connections,
            users: memoryUsers,
            seconds: Self.seconds(first.time.duration(to: second.time)),
            renewalPipelines: sadd.calls,
            pipelinesPerRound: (memoryUsers + Self.renewalChunk - 1) / Self.renewalChunk,
            heartbeats: hset.calls,
            scripts: Double(evalsha.usec + eval.usec),
            sadd: Double(sadd.usec),
            pexpire: pexpireTime,
            hset: Double(hset.usec),
            processCPU: (second.cpu - first.cpu) * 1e6
        )
    }

    /// µs per `ZADD` of one member with a score (the naive keep-alive's command), `redis-benchmark` on random users'
    /// keys beside the live ones, from `INFO commandstats`.
    private func measureZADD(_ admin: RedisClient) async throws -> Double {
        let before = try await snapshot(admin)
        _ = try RedisBenchmarkTool.run(
            path: redisBenchmarkPath, configuration: configuration,
            arguments: [
                "-c", "\(clients)", "-n", "\(max(10_000, requests / 4))", "-P", "\(pipeline)", "-r", "\(memoryUsers)",
                "ZADD", "\(prefix):z:{u:__rand_int__}:conns", "9999999999999", "benchnode:__rand_int__",
            ])
        let zadd = try await snapshot(admin).delta("zadd", since: before)
        try await admin.unlinkKeys(matching: "\(prefix):z:*")
        return zadd.calls > 0 ? Double(zadd.usec) / Double(zadd.calls) : 0
    }

    // MARK: Helpers

    /// Members of every `<keyPrefix>:{u:*}:conns` set (SCAN + pipelined ZCARD).
    private func liveEntries(_ admin: RedisClient, keyPrefix: String) async throws -> Int {
        var total = 0
        try await admin.scan(matching: "\(keyPrefix):{u:*}:conns") { names in
            for count in try await admin.pipeline(names.map { RedisCommand("ZCARD", $0) }) { total += try count.get().int ?? 0 }
        }
        return total
    }

    /// `used_memory` once it stopped moving (Redis shrinks hash tables in the background after deletions).
    private func settledUsedMemory(_ admin: RedisClient) async throws -> Int {
        var previous = try await admin.info("memory").int("used_memory") ?? 0
        var stable = 0
        for _ in 0..<20 where stable < 4 {
            try await Task.sleep(for: .milliseconds(250))
            let current = try await admin.info("memory").int("used_memory") ?? 0
            stable = abs(current - previous) < 32 * 1024 ? stable + 1 : 0
            previous = current
        }
        return previous
    }

    /// `value` as 12 zero-padded digits, like redis-benchmark's `__rand_int__`.
    static func digits(_ value: Int) -> String {
        String(unsafeUninitializedCapacity: 12) { buffer in
            var rest = value
            for index in stride(from: 11, through: 0, by: -1) {
                buffer[index] = UInt8(ascii: "0") + UInt8(rest % 10)
                rest /= 10
            }
            return 12
        }
    }

    static func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }

    /// Progress for the operator, on standard error (standard output carries the report).
    private func status(_ text: String) {
        FileHandle.standardError.write(Data(text.utf8))
    }

    // MARK: Report

    /// The printed report.
    public func report(_ result: AdmitBenchResult) -> String {
        let throughput = result.throughput
        let limiter = throughput.limiter
        let reference = throughput.reference
        var lines = [
            "fleetgate bench admit: \(configuration.address), keys under \(prefix):* (deleted)",
            "",
            "1. Admission throughput: \(requests) admissions of random users out of \(users), limit \(limit), nothing released",
            "   limiter: 1 node, \(clients * pipeline) concurrent admit() callers; redis-benchmark: -c \(clients) -P \(pipeline) -r \(users), "
                + "EVALSHA of the same admit.lua",
            "   " + pad("", 26) + pad("admissions/s", 14) + pad("p50 ms", 9) + pad("p99 ms", 9) + pad("client CPU µs/adm", 19) + "denied",
            "   " + pad("limiter admit()", 26) + pad(format(limiter.requestsPerSecond, 0), 14) + pad(format(limiter.p50Milliseconds, 3), 9)
                + pad(format(limiter.p99Milliseconds, 3), 9) + pad(format(limiter.cpuMicrosecondsPerRequest ?? 0, 2), 19) + "\(throughput.denied)",
            "   " + pad("redis-benchmark EVALSHA", 26) + pad(format(reference.requestsPerSecond, 0), 14)
                + pad(format(reference.p50Milliseconds, 3), 9) + pad(format(reference.p99Milliseconds, 3), 9) + pad("-", 19) + "-",
            "   ratio limiter / redis-benchmark: \(format(throughput.ratio, 2))x (goal >= 0.85)",
            "   note: a limiter admission is EVALSHA admit.lua, plus a SADD to the node's users index in the same write for a "
                + "user's first connection on the node; redis-benchmark sends the EVALSHA alone",
        ]
        if throughput.renewalDuringMeasurement {
            lines.append("   note: the measurement outlasted the node's first lease renewal (15 s), which competed with it")
        }
        if let cost = result.scriptCost {
            lines += [
                "",
                "1b. Redis server time per admission (INFO commandstats, EVALSHA incl. inner calls; redis-benchmark runs each script "
                    + "in turn, twice, random users out of \(users)):",
                "   admit.lua (Redis clock, override, idempotency, kick marks): \(cost.admit.map { format($0, 2) }.joined(separator: " / ")) µs",
                "   minimal script (caller's clock: ZREMRANGEBYSCORE, ZCARD, ZADD, PEXPIRE): "
                    + "\(cost.minimal.map { format($0, 2) }.joined(separator: " / ")) µs",
                "   ratio admit.lua / minimal: \(format(cost.ratio, 2))x (medians; goal <= 1.4)",
            ]
        }
        if let memory = result.memory {
            func row(_ label: String, _ bytes: Int, perEntry: Double, _ rate: String) -> String {
                "   " + pad(label, 34) + pad(format(perEntry, 1), 15)
                    + pad(format(Double(bytes) / 1_048_576, 2) + " MiB", 21) + rate
            }
            lines += [
                "",
                "2. Memory per live connection: \(memory.users) users x \(memory.connectionsPerUser) connections = \(memory.connections) "
                    + "(INFO memory used_memory growth)",
                "   " + pad("", 34) + pad("B/connection", 15) + pad("used_memory growth", 21) + "admissions/s",
                row(
                    "limiter admission path", memory.limiterBytes, perEntry: memory.limiterBytesPerEntry,
                    format(memory.limiterAdmissionsPerSecond, 0)),
                row("admission script alone", memory.scriptBytes, perEntry: memory.scriptBytesPerEntry, format(memory.scriptAdmissionsPerSecond, 0)),
                "   difference, the node's users index: " + format(memory.limiterBytesPerEntry - memory.scriptBytesPerEntry, 1) + " B/connection",
                "   goal <= 80 B/connection for the limiter path: " + (memory.limiterBytesPerEntry <= 80 ? "met" : "missed")
                    + (memory.denied > 0 ? "; \(memory.denied) admissions were denied" : ""),
            ]
            for (label, entries) in [("limiter", memory.limiterEntries), ("script-alone", memory.scriptEntries)] where entries != memory.connections {
                lines.append(
                    "   note: \(entries) of \(memory.connections) \(label) entries were present afterwards (leases ran out during "
                        + "\(format(memory.limiterSeconds, 0)) s of admissions?); bytes are per present entry")
            }
        }
        if let upkeep = result.upkeep {
            let perSecond = 1 / upkeep.seconds
            let per100k = 100_000 / Double(max(upkeep.connections, 1))
            func row(_ label: String, _ micros: Double) -> String {
                "   " + pad(label, 52) + pad(format(micros * perSecond, 0), 8) + pad(format(micros * perSecond * per100k, 0), 22)
                    + format(micros * perSecond / 10_000, 2) + "%"
            }
            lines += [
                "",
                "3. Redis CPU to keep \(upkeep.connections) connections of \(upkeep.users) users alive: window of "
                    + "\(format(upkeep.seconds, 2)) s = 1 renewal round (every \(renewInterval)) + \(upkeep.heartbeats) heartbeat(s)",
                "   " + pad("", 52) + pad("µs/s", 8) + pad("µs/s per 100k conns", 22) + "of a core",
                row("command time (INFO commandstats), of which:", upkeep.commandTime),
                row("  EVALSHA renew/heartbeat/sweeper-lock scripts", upkeep.scripts),
                row("  SADD users index (renewal)", upkeep.sadd),
                row("  PEXPIRE users index and node hash (top level)", upkeep.pexpire),
                row("  HSET node hash (heartbeat)", upkeep.hset),
                row("redis-server process CPU (INFO cpu, with I/O)", upkeep.processCPU),
            ]
            if let naive = upkeep.naiveCommandTime, let zadd = upkeep.naiveZADDMicroseconds {
                lines += [
                    row("naive reference: 1 ZADD per connection every \(format(AdmitBenchResult.Upkeep.naiveIntervalSeconds, 0)) s", naive),
                    "   (ZADD measured in this run: \(format(zadd, 2)) µs per call)",
                    "   ratio command time / naive: \(format(upkeep.naiveRatio ?? 0, 2))x (goal <= 0.3)",
                ]
            }
            if upkeep.renewalPipelines != upkeep.pipelinesPerRound {
                lines.append(
                    "   note: the window saw \(upkeep.renewalPipelines) renewal pipelines, one round sends \(upkeep.pipelinesPerRound) "
                        + "(another client sending SADD?)")
            }
        }
        var shutdowns = [result.throughputShutdown]
        if let memoryShutdown = result.memoryShutdown { shutdowns.append(memoryShutdown) }
        lines += [
            "",
            "Graceful node shutdowns: "
                + shutdowns.map { shutdown in
                    "\(shutdown.entries) entries in \(format(shutdown.seconds, 2)) s"
                        + (shutdown.deregistered ? "" : " (drain failed: the node was still registered)")
                }.joined(separator: ", "),
        ]
        return lines.joined(separator: "\n")
    }
}

/// A counter shared by concurrent tasks.
final class Counter: Sendable {
    private let count = Atomic<Int>(0)

    func add(_ amount: Int = 1) { count.add(amount, ordering: .relaxed) }
    var value: Int { count.load(ordering: .relaxed) }
}

/// Prints a dot on standard error at every tenth of `total`.
final class Progress: Sendable {
    private let done = Atomic<Int>(0)
    private let step: Int

    init(total: Int) {
        step = max(1, total / 10)
    }

    func advance(by amount: Int = 1) {
        let now = done.add(amount, ordering: .relaxed).newValue
        if (now - amount) / step != now / step { FileHandle.standardError.write(Data(".".utf8)) }
    }
}
