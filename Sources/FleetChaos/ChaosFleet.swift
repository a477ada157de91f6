import ChildProcesses
import Foundation
import Glibc
import LocalFleet
import Synchronization

/// How the chaos runner's (and the demo's) local fleet is set up.
public struct FleetOptions: Sendable {
    /// Gateway nodes.
    public var nodes = 3
    /// Every user's limit (`serve --default-limit`).
    public var limit = 20
    /// The `fleetgate` executable whose `serve` runs the nodes.
    public var executable: URL
    /// The fleet's key prefix.
    public var keyPrefix = "chaos"
    /// The nodes' HS256 secret (random by default).
    public var secret: String
    /// Extra `serve` flags for every node (policies, timings), e.g. `["--on-lease-loss", "close"]`.
    public var nodeArguments: [String] = []
    /// Each node reaches Redis through a TCP proxy of its own, so one node can be cut off (a partition).
    public var proxies = true
    /// The Redis server keeps its data across a stop (AOF); a `redis-restart` fault wipes it regardless.
    public var persistence = true
    /// The clock-offset library (`LD_PRELOAD`) for redis-server, needed by the `clock-jump` fault.
    public var clockLibrary: String?
    /// Run on a Redis Cluster of this many primaries (each with one replica) instead of one redis-server; nil = one
    /// server. The nodes then reach the cluster directly (no proxies: a cluster client follows the addresses the
    /// cluster announces), so the faults on one server (partition, Redis restart/stop/full, clock jumps) are not
    /// available; `kill-primary` is.
    public var clusterPrimaries: Int?

    /// Options with a fresh random secret.
    public init(executable: URL) {
        self.executable = executable
        secret = (0..<40).map { _ in "abcdefghijklmnopqrstuvwxyz0123456789".randomElement().map(String.init)! }.joined()
    }
}

/// A local fleet: one redis-server (or a Redis Cluster) and N `fleetgate serve` nodes on free loopback ports, every
/// process watched by the process watchdog (nothing outlives this process), with the means to break it: kill, pause,
/// drain and restart a node, cut a node off from Redis, stop, wipe, fill or shift the clock of Redis, kill a primary
/// of the cluster.
public final class ChaosFleet: Sendable {
    public let options: FleetOptions
    /// The Redis server (nil on a cluster).
    public let redis: RedisServer?
    /// The Redis Cluster (with ``FleetOptions/clusterPrimaries``).
    public let cluster: RedisCluster?
    /// Per node slot: the proxy it reaches Redis through (nil without ``FleetOptions/proxies``).
    public let proxies: [TCPProxy?]
    /// Per node slot: the port it listens on (kept across restarts, so clients find it again).
    public let ports: [Int]
    private let processes: Mutex<[GatewayProcess?]>
    /// The file the clock-offset library reads (seconds to add to Redis's clock); nil without the library.
    public let clockOffsetFile: String?

    private init(
        options: FleetOptions, redis: RedisServer?, cluster: RedisCluster?, proxies: [TCPProxy?], nodes: [GatewayProcess], clockOffsetFile: String?
    ) {
        self.options = options
        self.redis = redis
        self.cluster = cluster
        self.proxies = proxies
        ports = nodes.map(\.port)
        processes = Mutex(nodes.map { $0 })
        self.clockOffsetFile = clockOffsetFile
    }

    /// The nodes' names: `chaos-1` … `chaos-N`.
    public func name(_ slot: Int) -> String { "\(options.keyPrefix)-\(slot + 1)" }

    /// The fleet's Redis URL: the server's, or `redis+cluster://` with the cluster's primaries.
    public var redisURL: String { cluster?.seedURL ?? redis?.url ?? "" }

    /// Where Redis is, for a progress line.
    public var redisDescription: String {
        if let cluster { return "Redis Cluster \(cluster.seedURL) (\(cluster.servers.count) servers)" }
        return "redis-server at \(redis?.address ?? "?")"
    }

    /// Gateway URLs, one per slot.
    public var urls: [String] { ports.map { "ws://127.0.0.1:\($0)/ws" } }

    /// Starts Redis (noeviction, as the README asks of production), the proxies and every node; stops what it started
    /// if one part fails.
    public static func start(_ options: FleetOptions) async throws -> ChaosFleet {
        if let primaries = options.clusterPrimaries {
            guard options.clockLibrary == nil else { throw ChaosError("a fleet on a Redis Cluster cannot shift Redis's clock (--clock-library)") }
            guard primaries >= 3 else { throw ChaosError("a Redis Cluster needs at least 3 primaries, got \(primaries)") }
            let cluster = try await RedisCluster.start(
                primaries: primaries, replicasPerPrimary: 1, options: .init(extraArguments: ["--maxmemory-policy", "noeviction"]))
            var nodes: [GatewayProcess] = []
            do {
                for slot in 0..<options.nodes {
                    nodes.append(try await launch(options, slot: slot, port: 0, redisURL: cluster.seedURL))
                }
            } catch {
                for node in nodes { await node.kill() }
                await cluster.teardown()
                throw error
            }
            return ChaosFleet(
                options: options, redis: nil, cluster: cluster, proxies: nodes.map { _ in nil }, nodes: nodes, clockOffsetFile: nil)
        }
        var offsetFile: String?
        var environment: [String: String] = [:]
        if let library = options.clockLibrary {
            let file = try ProcessWatchdog.makeTemporaryDirectory(template: try ProcessWatchdog.rootDirectory() + "/clock-XXXXXX") + "/offset"
            try "0\n".write(toFile: file, atomically: true, encoding: .utf8)
            environment = ["LD_PRELOAD": library, "FLEETGATE_CLOCK_OFFSET_FILE": file]
            offsetFile = file
        }
        let redis = try await RedisServer.start(
            .init(persistence: options.persistence, extraArguments: ["--maxmemory-policy", "noeviction"], environment: environment))
        var proxies: [TCPProxy?] = []
        var nodes: [GatewayProcess] = []
        do {
            for slot in 0..<options.nodes {
                let proxy = options.proxies ? try await TCPProxy.start(upstreamPort: redis.port) : nil
                proxies.append(proxy)
                nodes.append(try await launch(options, slot: slot, port: 0, redisURL: proxy?.url ?? redis.url))
            }
        } catch {
            for node in nodes { await node.kill() }
            for proxy in proxies { await proxy?.stop() }
            await redis.kill()
            throw error
        }
        return ChaosFleet(options: options, redis: redis, cluster: nil, proxies: proxies, nodes: nodes, clockOffsetFile: offsetFile)
    }

    private static func launch(_ options: FleetOptions, slot: Int, port: Int, redisURL: String) async throws -> GatewayProcess {
        var environment = ["FLEETGATE_JWT_SECRET": options.secret]
        // Only the flags configure the nodes: FLEETGATE_* variables of this shell would make them differ.
        for name in ProcessInfo.processInfo.environment.keys where name.hasPrefix("FLEETGATE_") && environment[name] == nil {
            environment[name] = ""
        }
        let arguments =
            [
                "serve", "--host", "127.0.0.1", "--port", String(port), "--redis", redisURL, "--key-prefix", options.keyPrefix,
                "--default-limit", String(options.limit), "--node-name", "\(options.keyPrefix)-\(slot + 1)", "--log-level", "warning",
            ] + options.nodeArguments
        return try await GatewayProcess.start(executable: options.executable, arguments: arguments, environment: environment)
    }

    /// The node process of `slot`, nil while it is down (killed or drained and not restarted).
    public func process(_ slot: Int) -> GatewayProcess? {
        processes.withLock { $0[slot] }
    }

    /// The Redis URL a node of `slot` uses (its proxy's).
    public func redisURL(for slot: Int) -> String { proxies[slot]?.url ?? redisURL }

    /// SIGKILL; the slot stays down until ``restart(_:)``.
    public func kill(_ slot: Int) async {
        guard let node = processes.withLock({ $0[slot] }) else { return }
        await node.kill()
        processes.withLock { $0[slot] = nil }
    }

    /// SIGSTOP (returns once it is stopped).
    public func pause(_ slot: Int) {
        process(slot)?.signal(SIGSTOP)
    }

    /// SIGCONT.
    public func resume(_ slot: Int) {
        process(slot)?.signal(SIGCONT)
    }

    /// SIGTERM and wait for the drain; the slot stays down until ``restart(_:)``. Returns the exit status.
    @discardableResult
    public func terminate(_ slot: Int) async throws -> Int32? {
        guard let node = processes.withLock({ $0[slot] }) else { return nil }
        defer { processes.withLock { $0[slot] = nil } }
        return try await node.terminate()
    }

    /// Starts the slot's node again, on its port (retrying a few seconds while the old socket lets go).
    public func restart(_ slot: Int) async throws {
        guard process(slot) == nil else { return }
        var lastError: (any Error)?
        for _ in 0..<20 {
            do {
                let node = try await Self.launch(options, slot: slot, port: ports[slot], redisURL: redisURL(for: slot))
                processes.withLock { $0[slot] = node }
                return
            } catch {
                lastError = error
                try await Task.sleep(for: .milliseconds(250))
            }
        }
        throw lastError ?? LocalFleetError("cannot restart \(name(slot))")
    }

    /// Sets the clock offset redis-server sees (seconds, may be negative); needs ``FleetOptions/clockLibrary``.
    public func setRedisClockOffset(seconds: Double) throws {
        guard let clockOffsetFile else { throw ChaosError("Redis's clock cannot move: the fleet was started without --clock-library") }
        try "\(seconds)\n".write(toFile: clockOffsetFile, atomically: true, encoding: .utf8)
    }

    /// Drains every node still running (SIGTERM, SIGKILL after the drain deadline), proxies and Redis keep running.
    public func drainNodes() async {
        let nodes = processes.withLock { nodes -> [GatewayProcess] in
            defer { nodes = nodes.map { _ in nil } }
            return nodes.compactMap { $0 }
        }
        for node in nodes { node.signal(SIGCONT) }
        await withTaskGroup(of: Void.self) { group in
            for node in nodes { group.addTask { _ = try? await node.terminate(timeout: .seconds(15)) } }
        }
    }

    /// Stops everything: nodes drained (SIGTERM, SIGKILL after the drain deadline), proxies, Redis.
    public func stop() async {
        await drainNodes()
        for proxy in proxies { await proxy?.stop() }
        redis?.resume()
        await redis?.stop()
        await cluster?.teardown()
        if let clockOffsetFile { try? FileManager.default.removeItem(atPath: (clockOffsetFile as NSString).deletingLastPathComponent) }
    }
}
