import ChildProcesses
import ConnectionLimiter
import Foundation
import HTTPTypes
import HummingbirdWSClient
import LoadGenerator
import Logging
import NIOCore
import NIOPosix
import NIOWebSocket
import RedisClient
import Synchronization

/// What `bench gateway` measured.
public struct GatewayBenchResult: Sendable {
    /// One node driven through a number of connection cycles.
    struct Run: Sendable {
        var cycles: Int
        var measurement: Measurement
        /// Cycles that threw (upgrade refused, connection reset, …) or that the server closed with a code other than 1000.
        var failed: Int
        /// Up to five distinct failure messages with their counts.
        var failures: [(message: String, count: Int)]
        /// Cycles whose socket the server closed without answering the client's close frame with its own.
        var withoutCloseAnswer: Int
        /// CPU (user + system) the node's process spent per cycle, from `/proc/<pid>/stat` (10 ms ticks).
        var nodeCPUMicrosecondsPerCycle: Double
        /// CPU redis-server spent per cycle (INFO cpu), with whatever else it served meanwhile.
        var redisCPUMicrosecondsPerCycle: Double
        /// Calls per command name in the run (INFO commandstats, lowercase; `info` left out).
        var redisCalls: [String: Int]

        /// CPU per cycle of the client, the node and redis-server together.
        var totalCPUMicrosecondsPerCycle: Double {
            (measurement.cpuMicrosecondsPerRequest ?? 0) + nodeCPUMicrosecondsPerCycle + redisCPUMicrosecondsPerCycle
        }
    }

    /// The node without the limiter, then the node with it.
    struct Round: Sendable {
        var off: Run
        var limiter: Run
        var ratio: Double { limiter.measurement.requestsPerSecond / off.measurement.requestsPerSecond }
        /// What the ratio would be if the machine's CPU were the only limit: all CPU per cycle, off / limiter.
        var cpuRatio: Double { off.totalCPUMicrosecondsPerCycle / limiter.totalCPUMicrosecondsPerCycle }
    }

    var warmupOff: Run?
    var warmupLimiter: Run?
    var rounds: [Round]
    /// Connection entries (`<prefix>:{u:*}:conns` members) still in Redis once releases had time to finish.
    var entriesLeft: Int
    /// How long the releases took to reach Redis after the last cycle.
    var releaseSeconds: Double
    /// Keys under the prefix at that moment, with the limiter node still running (its registration).
    var keysWhileRunning: [String]
    /// The nodes' exit statuses after SIGTERM (nil: killed after the drain deadline).
    var limiterExit: Int32?
    var offExit: Int32?
    /// Keys under the prefix once both nodes had stopped (deleted afterwards).
    var keysAfterStop: [String]

    /// The median of the rounds' ratios.
    var medianRatio: Double { Self.median(rounds.map(\.ratio)) }

    static func median(_ values: [Double]) -> Double {
        let sorted = values.sorted()
        guard !sorted.isEmpty else { return 0 }
        let middle = sorted.count / 2
        return sorted.count % 2 == 1 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2
    }

    var allRuns: [Run] {
        [warmupOff, warmupLimiter].compactMap { $0 } + rounds.flatMap { [$0.off, $0.limiter] }
    }

    /// Why the command must fail after printing its report, or nil.
    public var problem: String? {
        var problems: [String] = []
        let failed = allRuns.reduce(0) { $0 + $1.failed }
        if failed > 0 {
            problems.append("\(failed) of \(allRuns.reduce(0) { $0 + $1.cycles }) connection cycles failed (see the report)")
        }
        if entriesLeft > 0 { problems.append("\(entriesLeft) connection entries were still in Redis after the run") }
        let userKeys = keysAfterStop.filter(GatewayBenchRunner.isUserKey)
        if !userKeys.isEmpty { problems.append("\(userKeys.count) user keys were left in Redis after the limiter node stopped") }
        if limiterExit != 0 || offExit != 0 {
            problems.append("a node did not exit cleanly on SIGTERM (limiter: \(Self.exitText(limiterExit)), off: \(Self.exitText(offExit)))")
        }
        return problems.isEmpty ? nil : problems.joined(separator: "; ")
    }

    static func exitText(_ status: Int32?) -> String {
        status.map { "exit status \($0)" } ?? "killed after the drain deadline"
    }
}

/// The client `bench gateway` drives both nodes with.
public enum GatewayBenchClient: String, CaseIterable, Sendable {
    /// One NIO channel handler per connection that writes the upgrade request as bytes and reads the 101 and the close
    /// answer itself: the client spends little CPU, so the nodes get most of the machine.
    case minimal
    /// HummingbirdWSClient, as an application would connect (HTTP client codec, upgrader, async channel, tasks).
    case hummingbird
}

/// Runs `bench gateway`: launches the two nodes, drives connection cycles through them, checks Redis, and stops the
/// nodes on every way out (also on errors and cancellation).
public struct GatewayBenchRunner: Sendable {
    /// The benchmark could not run, was interrupted, or a check failed; the message says what.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String

        public init(description: String) {
            self.description = description
        }
    }

    /// The limit every user gets on the limiter node: no cycle may ever be denied.
    static let limit = 1_000_000

    var configuration: RedisClientConfiguration
    var redisURL: String
    var connections: Int
    var concurrency: Int
    var users: Int
    var rounds: Int
    var warmup: Int
    var client: GatewayBenchClient
    /// The `fleetgate` executable whose `serve` runs the nodes.
    var executable: URL
    /// `fgbench-<random>`: the limiter node's key prefix.
    var prefix = "fgbench-" + randomText(6)
    /// The nodes' HS256 secret.
    var secret = randomText(40)

    /// A runner whose nodes run `executable serve`, the limiter node on Redis at `redisURL`.
    public init(
        configuration: RedisClientConfiguration, redisURL: String, connections: Int, concurrency: Int, users: Int, rounds: Int, warmup: Int,
        client: GatewayBenchClient, executable: URL
    ) {
        self.configuration = configuration
        self.redisURL = redisURL
        self.connections = connections
        self.concurrency = concurrency
        self.users = users
        self.rounds = rounds
        self.warmup = warmup
        self.client = client
        self.executable = executable
    }

    private var logger: Logger {
        var logger = Logger(label: "fleetgate.bench")
        logger.logLevel = .warning
        return logger
    }

    /// This process's own executable (`/proc/self/exe`, else the resolved `CommandLine.arguments[0]`).
    public static func locateExecutable() throws -> URL {
        if let path = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            return URL(fileURLWithPath: path)
        }
        let first = CommandLine.arguments.first ?? "fleetgate"
        if first.contains("/") {
            return URL(fileURLWithPath: first).resolvingSymlinksInPath()
        }
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "").split(separator: ":") {
            let candidate = URL(fileURLWithPath: String(directory)).appendingPathComponent(first)
            if FileManager.default.isExecutableFile(atPath: candidate.path) { return candidate.resolvingSymlinksInPath() }
        }
        throw Failure(description: "cannot find this executable (\(first)) to launch the gateway nodes")
    }

    public func run() async throws -> GatewayBenchResult {
        let nodes = GatewayBenchNodes()
        do {
            let admin = RedisClient(configuration: configuration, logger: logger)
            return try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await admin.run() }
                defer { group.cancelAll() }
                return try await measure(admin: admin, nodes: nodes)
            }
        } catch {
            // Also when cancelled (SIGINT): the nodes must not outlive this process, nor their keys the run.
            guard nodes.launched else { throw error }
            status("\nstopping the gateway nodes\n")
            await Self.uncancelled { [self] in
                await nodes.stopAll()
                await deleteKeysWithFreshClient()
            }
            throw error
        }
    }

    private func measure(admin: RedisClient, nodes: GatewayBenchNodes) async throws -> GatewayBenchResult {
        do {
            _ = try await admin.ping()
        } catch {
            throw Failure(description: "cannot reach Redis at \(configuration.address): \(error)")
        }
        status("bench gateway: keys under \(prefix):*, nodes from \(executable.path)\n")
        let off = try await nodes.launch(executable: executable, name: "off", arguments: nodeArguments(limiter: false))
        let limiter = try await nodes.launch(executable: executable, name: "limiter", arguments: nodeArguments(limiter: true))
        let registered = try await admin.send("ZCARD", "\(prefix):nodes").int ?? 0
        guard registered == 1 else {
            throw Failure(description: "the limiter node is not registered in Redis (\(prefix):nodes holds \(registered) nodes)")
        }

        let expiry = Date().addingTimeInterval(24 * 3600)
        let minter = await ClientTokens(secret: secret)
        var tokens: [String] = []
        for user in 0..<users { tokens.append(try await minter.mint(user: "bench-user-\(user)", expiry: expiry)) }
        var result = GatewayBenchResult(rounds: [], entriesLeft: 0, releaseSeconds: 0, keysWhileRunning: [], keysAfterStop: [])
        if warmup > 0 {
            status("warm-up: \(warmup) cycles per node")
            result.warmupOff = try await cycles(warmup, on: off, admin: admin, tokens: tokens)
            result.warmupLimiter = try await cycles(warmup, on: limiter, admin: admin, tokens: tokens)
            status("\n")
        }
        for round in 1...rounds {
            status("round \(round)/\(rounds): --limiter off ")
            let offRun = try await cycles(connections, on: off, admin: admin, tokens: tokens)
            status("\(format(offRun.measurement.requestsPerSecond, 0))/s, limiter ")
            let limiterRun = try await cycles(connections, on: limiter, admin: admin, tokens: tokens)
            let roundResult = GatewayBenchResult.Round(off: offRun, limiter: limiterRun)
            result.rounds.append(roundResult)
            status("\(format(limiterRun.measurement.requestsPerSecond, 0))/s, ratio \(format(roundResult.ratio, 2))\n")
        }

        // Releases run after each socket closed, asynchronously: give them time to reach Redis.
        let releasing = ContinuousClock.now
        var entries = try await liveEntries(admin)
        while entries > 0, releasing.duration(to: .now) < .seconds(10) {
            try await Task.sleep(for: .milliseconds(50))
            entries = try await liveEntries(admin)
        }
        result.entriesLeft = entries
        result.releaseSeconds = AdmitBenchRunner.seconds(releasing.duration(to: .now))
        result.keysWhileRunning = try await keys(admin)

        status("stopping the nodes (SIGTERM)\n")
        result.limiterExit = await limiter.stop()
        result.offExit = await off.stop()
        result.keysAfterStop = try await keys(admin)
        try await admin.unlinkKeys(matching: "\(prefix):*")
        return result
    }

    /// `fleetgate serve` arguments of one node.
    func nodeArguments(limiter: Bool) -> [String] {
        var arguments = [
            "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", "--jwt-secret", secret,
            "--node-name", "\(prefix)-\(limiter ? "limiter" : "off")", "--limiter", limiter ? "on" : "off",
        ]
        if limiter {
            arguments += ["--redis", redisURL, "--key-prefix", prefix, "--default-limit", "\(Self.limit)", "--on-redis-down", "reject"]
        }
        return arguments
    }

    /// Drives `count` cycles through `node` from up to `concurrency` tasks; cycle `i` is made by user `i % users`.
    private func cycles(_ count: Int, on node: GatewayBenchNode, admin: RedisClient, tokens: [String]) async throws -> GatewayBenchResult.Run {
        let failures = FailureLog()
        let withoutAnswer = Counter()
        let client = GatewayCycleClient(kind: client, port: node.port, tokens: tokens)
        let tasks = min(concurrency, count)
        let nodeBefore = node.cpuMicroseconds()
        let redisBefore = try await RedisSnapshot(admin)
        let measurement = try await measureConcurrently(tasks: tasks, requests: count) { task, done, _, _ in
            try Task.checkCancellation()
            do {
                switch try await client.cycle(user: (task + done * tasks) % tokens.count) {
                case .answered(1000, _): break
                case .answered(let code, let reason): failures.record("the server closed with \(code) \(reason)")
                case .noAnswer: withoutAnswer.add()
                }
            } catch {
                failures.record("\(error)")
            }
            return 1
        }
        let nodeCPU = node.cpuMicroseconds() - nodeBefore
        let redisAfter = try await RedisSnapshot(admin)
        return GatewayBenchResult.Run(
            cycles: count,
            measurement: measurement,
            failed: failures.total,
            failures: failures.samples,
            withoutCloseAnswer: withoutAnswer.value,
            nodeCPUMicrosecondsPerCycle: nodeCPU / Double(count),
            redisCPUMicrosecondsPerCycle: (redisAfter.cpuMicroseconds - redisBefore.cpuMicroseconds) / Double(count),
            redisCalls: redisAfter.calls(since: redisBefore)
        )
    }

    // MARK: Redis

    /// Members of every `<prefix>:{u:*}:conns` set.
    private func liveEntries(_ admin: RedisClient) async throws -> Int {
        var total = 0
        let names = try await keys(admin, matching: "\(prefix):{u:*}:conns")
        for chunk in stride(from: 0, to: names.count, by: 500) {
            let commands = names[chunk..<min(chunk + 500, names.count)].map { RedisCommand("ZCARD", $0) }
            for count in try await admin.pipeline(commands) { total += try count.get().int ?? 0 }
        }
        return total
    }

    /// Every key under the prefix (SCAN), sorted.
    private func keys(_ admin: RedisClient, matching pattern: String? = nil) async throws -> [String] {
        var names: [String] = []
        try await admin.scan(matching: pattern ?? "\(prefix):*") { names += $0 }
        return names.sorted()
    }

    /// A user's key (`…:{u:<user>}:…`), as opposed to the node's own registration keys.
    static func isUserKey(_ key: String) -> Bool {
        key.contains(":{u:")
    }

    /// Deletes the prefix's keys with a client of its own (the run's client may be gone after a cancellation).
    private func deleteKeysWithFreshClient() async {
        let client = RedisClient(configuration: configuration, logger: logger)
        await withTaskGroup(of: Void.self) { group in
            group.addTask { try? await client.run() }
            _ = try? await client.unlinkKeys(matching: "\(prefix):*")
            group.cancelAll()
        }
    }

    // MARK: Helpers

    /// Runs `body` in a task of its own and waits for it, so the caller's cancellation cannot cut short a clean-up
    /// that must finish (stopping child processes).
    static func uncancelled(_ body: @escaping @Sendable () async -> Void) async {
        await Task { await body() }.value
    }

    /// Progress for the operator, on standard error (standard output carries the report).
    private func status(_ text: String) {
        FileHandle.standardError.write(Data(text.utf8))
    }

    // MARK: Report

    /// The printed report.
    public func report(_ result: GatewayBenchResult) -> String {
        func row(_ round: String, _ node: String, _ run: GatewayBenchResult.Run) -> String {
            let measurement = run.measurement
            return pad(round, 7) + pad(node, 15) + pad(format(measurement.requestsPerSecond, 0), 10) + pad(format(measurement.p50Milliseconds, 2), 8)
                + pad(format(measurement.p99Milliseconds, 2), 8) + pad(format(measurement.cpuMicrosecondsPerRequest ?? 0, 0), 8)
                + pad(format(run.nodeCPUMicrosecondsPerCycle, 0), 8) + pad(format(run.redisCPUMicrosecondsPerCycle, 0), 8) + "\(run.failed)"
        }
        var lines = [
            "fleetgate bench gateway: 2 nodes on 127.0.0.1 (\(executable.lastPathComponent) serve), the limiter on \(configuration.address), "
                + "keys under \(prefix):* (deleted)",
            "cycle = TCP connect + upgrade with a token (101) + client close 1000 + server answer + socket closed; client: "
                + (client == .minimal ? "minimal (one NIO channel handler)" : "HummingbirdWSClient"),
            "\(connections) cycles per node and round from \(concurrency) concurrent tasks, \(users) users; warm-up \(warmup) cycles per node; "
                + "limiter node: --default-limit \(Self.limit) --on-redis-down reject",
            "",
            pad("", 7) + pad("", 15) + pad("", 10) + pad("", 8) + pad("", 8) + "CPU µs per cycle",
            pad("round", 7) + pad("node", 15) + pad("cycles/s", 10) + pad("p50 ms", 8) + pad("p99 ms", 8) + pad("client", 8) + pad("node", 8)
                + pad("redis", 8) + "failed",
        ]
        if let warmupOff = result.warmupOff, let warmupLimiter = result.warmupLimiter {
            lines += [row("warm", "--limiter off", warmupOff), row("warm", "limiter", warmupLimiter)]
        }
        for (index, round) in result.rounds.enumerated() {
            lines += [
                row("\(index + 1)", "--limiter off", round.off),
                row("\(index + 1)", "limiter", round.limiter),
                pad("", 7) + pad("ratio", 15) + pad(format(round.ratio, 2) + "x", 34) + "CPU per cycle, off / limiter: " + format(round.cpuRatio, 2)
                    + "x",
            ]
        }
        lines.append("")
        let limiterRuns = result.rounds.map(\.limiter)
        let limiterCycles = limiterRuns.reduce(0) { $0 + $1.cycles }
        var calls: [String: Int] = [:]
        for run in limiterRuns { calls.merge(run.redisCalls, uniquingKeysWith: +) }
        let perCycle = calls.filter { Double($0.value) / Double(max(limiterCycles, 1)) >= 0.01 }
            .sorted { $0.value == $1.value ? $0.key < $1.key : $0.value > $1.value }
            .map { "\($0.key) \(format(Double($0.value) / Double(max(limiterCycles, 1)), 2))" }
        lines.append(
            "Redis calls per limiter cycle (INFO commandstats, calls inside scripts included): "
                + (perCycle.isEmpty ? "none" : perCycle.joined(separator: ", ")))
        let withoutAnswer = result.allRuns.reduce(0) { $0 + $1.withoutCloseAnswer }
        if withoutAnswer > 0 {
            let total = result.allRuns.reduce(0) { $0 + $1.cycles }
            lines.append("note: in \(withoutAnswer) of \(total) cycles the server closed the socket without answering the client's close frame")
        }
        for run in result.allRuns {
            for failure in run.failures { lines.append("failed cycles: \(failure.count) x \(failure.message)") }
        }
        let ownKeys = result.keysWhileRunning.filter { !Self.isUserKey($0) }.map { String($0.dropFirst(prefix.count + 1)) }
        lines.append(
            "Redis after the last cycle: "
                + (result.entriesLeft == 0
                    ? "every connection entry released within \(format(result.releaseSeconds, 2)) s"
                    : "\(result.entriesLeft) connection entries still there after \(format(result.releaseSeconds, 1)) s")
                + "; the running node kept \(ownKeys.count) keys of its own (\(ownKeys.joined(separator: ", ")))")
        lines.append(
            "after SIGTERM: limiter node \(GatewayBenchResult.exitText(result.limiterExit)), --limiter off node "
                + "\(GatewayBenchResult.exitText(result.offExit)); keys left under the prefix: \(result.keysAfterStop.count)"
                + (result.keysAfterStop.isEmpty ? "" : " (\(result.keysAfterStop.prefix(5).joined(separator: ", ")), deleted)"))
        lines.append(
            "CPU per cycle (client + node + redis-server), --limiter off / limiter: "
                + "\(format(GatewayBenchResult.median(result.rounds.map(\.cpuRatio)), 2)) (median of \(result.rounds.count) rounds; "
                + "the throughput ratio if CPU were the only limit)")
        lines.append(
            "ratio (limiter / --limiter off): \(format(result.medianRatio, 2)) (median of \(result.rounds.count) rounds; goal >= 0.90)")
        return lines.joined(separator: "\n")
    }
}

/// `count` random letters and digits.
func randomText(_ count: Int) -> String {
    String((0..<count).map { _ in "0123456789abcdefghijklmnopqrstuvwxyz".randomElement()! })
}

/// Server-wide Redis counters at one moment.
private struct RedisSnapshot {
    var cpuMicroseconds: Double
    var stats: [String: RedisInfo.CommandStat]

    init(_ admin: RedisClient) async throws {
        let replies = try await admin.pipeline([RedisCommand("INFO", "commandstats"), RedisCommand("INFO", "cpu")])
        let cpu = RedisInfo(try replies[1].get().string ?? "")
        cpuMicroseconds = ((cpu.double("used_cpu_user") ?? 0) + (cpu.double("used_cpu_sys") ?? 0)) * 1e6
        stats = RedisInfo(try replies[0].get().string ?? "").commandStats
    }

    /// Calls per command since `earlier`, without this benchmark's own INFO.
    func calls(since earlier: RedisSnapshot) -> [String: Int] {
        var calls: [String: Int] = [:]
        for (command, stat) in stats where command != "info" {
            let delta = stat.calls - (earlier.stats[command]?.calls ?? 0)
            if delta > 0 { calls[command] = delta }
        }
        return calls
    }
}

/// Failures of concurrent cycles: a total and the first few distinct messages with their counts.
private final class FailureLog: Sendable {
    private struct State {
        var total = 0
        var samples: [(message: String, count: Int)] = []
    }

    private let state = Mutex(State())

    func record(_ message: String) {
        state.withLock { state in
            state.total += 1
            if let index = state.samples.firstIndex(where: { $0.message == message }) {
                state.samples[index].count += 1
            } else if state.samples.count < 5 {
                state.samples.append((message, 1))
            }
        }
    }

    var total: Int { state.withLock { $0.total } }
    var samples: [(message: String, count: Int)] { state.withLock { $0.samples } }
}

// MARK: - Client

/// How a connection cycle ended, after the upgrade.
enum GatewayCycleEnd: Sendable, Equatable {
    /// The server answered the client's close frame with this code and reason, then closed the socket.
    case answered(UInt16, String)
    /// The server closed the socket without a close frame.
    case noAnswer
}

/// The client side of the benchmark: one whole connection per ``cycle(user:)``, the same code for both nodes.
struct GatewayCycleClient: Sendable {
    let kind: GatewayBenchClient
    let url: String
    /// Per user: HummingbirdWSClient's configuration with `Authorization: Bearer <token>`.
    let configurations: [WebSocketClientConfiguration]
    /// Per user: the raw upgrade request.
    let requests: [[UInt8]]
    let port: Int
    let logger: Logger

    init(kind: GatewayBenchClient, port: Int, tokens: [String]) {
        self.kind = kind
        self.port = port
        url = "ws://127.0.0.1:\(port)/ws"
        switch kind {
        case .hummingbird:
            configurations = tokens.map { token in
                WebSocketClientConfiguration(additionalHeaders: [.authorization: "Bearer \(token)"], closeTimeout: .seconds(5))
            }
            requests = []
        case .minimal:
            configurations = []
            requests = tokens.map { Self.upgradeRequest(port: port, token: $0) }
        }
        var logger = Logger(label: "fleetgate.bench.client")
        logger.logLevel = .critical
        self.logger = logger
    }

    /// Connects, upgrades as `user`, closes with 1000 and waits until the server has closed the socket.
    func cycle(user: Int) async throws -> GatewayCycleEnd {
        switch kind {
        case .hummingbird:
            // The handler returns at once: the client sends its close frame (1000) and reads until the server has
            // answered and closed the socket.
            let answer = try await WebSocketClient.connect(url: url, configuration: configurations[user], logger: logger) { _, _, _ in }
            return answer.map { .answered(UInt16(webSocketErrorCode: $0.closeCode), $0.reason ?? "") } ?? .noAnswer
        case .minimal:
            let loop = MultiThreadedEventLoopGroup.singleton.next()
            let end = loop.makePromise(of: GatewayCycleEnd.self)
            let request = requests[user]
            do {
                _ = try await ClientBootstrap(group: loop)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            try channel.pipeline.syncOperations.addHandler(MinimalWebSocketCycle(request: request, end: end))
                        }
                    }
                    .connect(host: "127.0.0.1", port: port).get()
            } catch {
                end.fail(error)
            }
            return try await end.futureResult.get()
        }
    }

    /// `GET /ws` with the upgrade headers and `Authorization: Bearer <token>`.
    static func upgradeRequest(port: Int, token: String) -> [UInt8] {
        Array(
            ("GET /ws HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer \(token)\r\n\r\n").utf8)
    }
}

/// A whole connection in one channel handler: writes the upgrade request, reads the head of the answer (it must be a
/// 101), sends a masked close frame with 1000, reads the server's close frame, and completes `end` when the socket
/// closes. No HTTP codec, no upgrader, no async channel: the cheapest client that still completes the handshakes.
final class MinimalWebSocketCycle: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    struct Refused: Error, CustomStringConvertible {
        var description: String
    }

    /// The close frame 1000 with an empty reason, masked with 0x01020304.
    static let closeFrame: [UInt8] = [0x88, 0x82, 0x01, 0x02, 0x03, 0x04, 0x03 ^ 0x01, 0xE8 ^ 0x02]

    private let request: [UInt8]
    private let end: EventLoopPromise<GatewayCycleEnd>
    private var received: ByteBuffer?
    private var upgraded = false
    private var answer: GatewayCycleEnd = .noAnswer
    private var finished = false

    init(request: [UInt8], end: EventLoopPromise<GatewayCycleEnd>) {
        self.request = request
        self.end = end
    }

    func channelActive(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: request)), promise: nil)
        context.fireChannelActive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if received == nil {
            received = bytes
        } else {
            received!.writeBuffer(&bytes)
        }
        guard var buffer = received else { return }
        if !upgraded {
            guard let head = buffer.readableBytesView.firstRange(of: Array("\r\n\r\n".utf8)) else { return }
            let length = head.upperBound - buffer.readerIndex
            let text = buffer.readString(length: length) ?? ""
            guard text.hasPrefix("HTTP/1.1 101") else {
                let status = text.split(separator: "\r\n").first.map(String.init) ?? text
                finish(.failure(Refused(description: "upgrade refused: \(status)")), context: context)
                return
            }
            upgraded = true
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: Self.closeFrame)), promise: nil)
        }
        // Server frames are unmasked: a close frame is 0x88, a length below 126, then the code and the reason.
        while buffer.readableBytes >= 2, let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self),
            let second = buffer.getInteger(at: buffer.readerIndex + 1, as: UInt8.self)
        {
            let length = Int(second & 0x7F)
            guard length < 126, buffer.readableBytes >= 2 + length else { break }
            buffer.moveReaderIndex(forwardBy: 2)
            var payload = buffer.readSlice(length: length)!
            if first & 0x0F == 0x8 {
                let code = payload.readInteger(as: UInt16.self) ?? 1005
                answer = .answered(code, payload.readString(length: payload.readableBytes) ?? "")
            }
        }
        received = buffer
    }

    func channelInactive(context: ChannelHandlerContext) {
        if upgraded {
            finish(.success(answer), context: context)
        } else {
            finish(.failure(Refused(description: "the server closed the connection before answering the upgrade")), context: context)
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        finish(.failure(error), context: context)
    }

    private func finish(_ result: Result<GatewayCycleEnd, any Error>, context: ChannelHandlerContext) {
        guard !finished else { return }
        finished = true
        end.completeWith(result)
        if case .failure = result { context.close(promise: nil) }
    }
}

// MARK: - Nodes

/// The benchmark's `fleetgate serve` child processes, so every way out can stop them all.
final class GatewayBenchNodes: Sendable {
    private let nodes = Mutex<[GatewayBenchNode]>([])

    /// Launches a node and returns once it printed its listening line.
    func launch(executable: URL, name: String, arguments: [String]) async throws -> GatewayBenchNode {
        let node = try GatewayBenchNode(executable: executable, name: name, arguments: arguments)
        nodes.withLock { $0.append(node) }
        try await node.waitUntilListening(timeout: .seconds(30))
        return node
    }

    /// Whether a node was launched.
    var launched: Bool { nodes.withLock { !$0.isEmpty } }

    /// Stops every node still running (SIGTERM, SIGKILL after the drain deadline) and removes their files.
    func stopAll() async {
        for node in nodes.withLock({ $0 }) { _ = await node.stop() }
    }
}

/// One `fleetgate serve` child: stdout and stderr go to files in a temporary directory, which the process watchdog
/// removes (and the node it SIGKILLs) should this process die without stopping it.
final class GatewayBenchNode: Sendable {
    let name: String
    let pid: Int32
    private let child: LaunchedChild
    private let directory: String
    private let listening = Mutex<Int?>(nil)

    /// The port from the node's listening line (0 before ``waitUntilListening(timeout:)``).
    var port: Int { listening.withLock { $0 ?? 0 } }

    init(executable: URL, name: String, arguments: [String]) throws {
        do {
            directory = try ProcessWatchdog.makeTemporaryDirectory(template: try ProcessWatchdog.rootDirectory() + "/bench-\(name)-XXXXXX")
            // Only the flags configure the nodes: FLEETGATE_* variables of this shell would make them differ.
            let unset = ProcessInfo.processInfo.environment.keys.filter { $0.hasPrefix("FLEETGATE_") }.map { ($0, "") }
            child = try LaunchedChild.launch(
                executable, arguments: arguments, environment: Dictionary(uniqueKeysWithValues: unset),
                standardOutput: directory + "/stdout", standardError: directory + "/stderr", purpose: "for the \(name) gateway node")
        } catch {
            throw GatewayBenchRunner.Failure(description: "cannot launch the \(name) gateway node: \(error)")
        }
        self.name = name
        pid = child.pid
    }

    /// The exit status (128 + signal if killed), nil while running.
    var exitStatus: Int32? {
        child.watcher.termination.map { $0.signaled ? 128 + $0.status : $0.status }
    }
    var hasExited: Bool { child.watcher.hasExited }

    /// Waits for `fleetgate: listening on HOST:PORT node=NAME` on stdout.
    func waitUntilListening(timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            let exited = hasExited
            let output = Self.read(directory + "/stdout")
            if let line = output.split(separator: "\n").first(where: { $0.hasPrefix("fleetgate: listening on ") }),
                let address = line.split(separator: " ").dropFirst(3).first, let colon = address.lastIndex(of: ":"),
                let port = Int(address[address.index(after: colon)...])
            {
                listening.withLock { $0 = port }
                return
            }
            if exited {
                throw GatewayBenchRunner.Failure(description: "the \(name) node (pid \(pid)) exited before listening\n" + diagnostics())
            }
            guard ContinuousClock.now < deadline else {
                throw GatewayBenchRunner.Failure(
                    description: "the \(name) node (pid \(pid)) printed no listening line within \(timeout)\n" + diagnostics())
            }
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// CPU time (user + system) of the node so far, in microseconds (`/proc/<pid>/stat`, clock ticks).
    func cpuMicroseconds() -> Double {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let paren = stat.lastIndex(of: ")") else { return 0 }
        // After "pid (comm)": state is field 3, utime 14 and stime 15.
        let fields = stat[stat.index(after: paren)...].split(separator: " ")
        guard fields.count > 12, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
        return (user + system) * 1e6 / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// SIGTERM (the node drains: closes its WebSockets, releases its entries, deregisters), then SIGKILL if it is still
    /// running after `timeout`; removes the node's files. Returns the exit status, nil if it had to be killed.
    func stop(timeout: Duration = .seconds(15)) async -> Int32? {
        defer { try? FileManager.default.removeItem(atPath: directory) }
        if hasExited { return exitStatus }
        kill(pid, SIGTERM)
        if await child.watcher.wait(timeout: timeout) { return exitStatus }
        await child.kill()
        return nil
    }

    /// The last lines of the node's stderr and stdout, for error messages.
    private func diagnostics() -> String {
        ["stderr", "stdout"].map { file in
            let tail = Self.read(directory + "/" + file).split(separator: "\n").suffix(15).joined(separator: "\n")
            return "--- last lines of the \(name) node's \(file) ---\n" + tail
        }.joined(separator: "\n")
    }

    private static func read(_ path: String) -> String {
        LaunchedChild.readText(path)
    }
}
