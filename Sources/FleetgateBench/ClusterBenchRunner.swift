import ConnectionLimiter
import Foundation
import LocalFleet
import Logging
import RedisClient

/// What `bench cluster` measured: the limiter's admissions on one server, on a one-primary cluster (the same work
/// plus the cluster client's routing) and on three primaries, round by round, and how the users spread.
public struct ClusterBenchResult: Sendable {
    public enum Target: String, Sendable, CaseIterable {
        case server = "1 server (redis://)"
        case onePrimary = "cluster, 1 primary"
        case threePrimaries = "cluster, 3 primaries"
    }

    struct Run: Sendable {
        var target: Target
        var measurement: Measurement
        var denied: Int
        /// Keys per primary right after the admissions (`DBSIZE`), in the map's order.
        var keysPerPrimary: [(address: String, keys: Int)]
    }

    var rounds: [[Run]]
    var users: Int
    /// Distinct slots the users' keys fall in, and the most users in one slot.
    var slotsUsed: Int
    var mostUsersInOneSlot: Int

    func runs(of target: Target) -> [Run] { rounds.compactMap { $0.first { $0.target == target } } }

    func medianRate(of target: Target) -> Double {
        GatewayBenchResult.median(runs(of: target).map(\.measurement.requestsPerSecond))
    }

    /// What routing costs: a cluster client on one primary vs a plain client on one server (the same work otherwise).
    var routingRatio: Double { medianRate(of: .onePrimary) / medianRate(of: .server) }
    /// What three primaries give over one server, on this machine.
    var scalingRatio: Double { medianRate(of: .threePrimaries) / medianRate(of: .server) }

    /// `cluster.routing-ratio` and `cluster.scaling-ratio`.
    public var figures: [BenchFigure] {
        [
            BenchFigure(
                name: "cluster.routing-ratio", value: routingRatio, higherIsBetter: true,
                label: "admissions/s, cluster client on 1 primary / plain client on 1 server"),
            BenchFigure(
                name: "cluster.scaling-ratio", value: scalingRatio, higherIsBetter: true,
                label: "admissions/s, 3 primaries / 1 server (same machine)"),
        ]
    }
}

/// Runs `bench cluster`: starts its own servers (a plain one, a one-primary cluster, a three-primary cluster without
/// replicas, all on free loopback ports), measures the limiter's admission throughput on each in turn, round after
/// round, and stops them all.
public struct ClusterBenchRunner: Sendable {
    public var requests: Int
    public var users: Int
    public var clients: Int
    public var pipeline: Int
    public var limit: Int
    public var rounds: Int

    public init(requests: Int, users: Int, clients: Int, pipeline: Int, limit: Int, rounds: Int) {
        self.requests = requests
        self.users = users
        self.clients = clients
        self.pipeline = pipeline
        self.limit = limit
        self.rounds = rounds
    }

    public func run() async throws -> ClusterBenchResult {
        status("bench cluster: starting a redis-server, a one-primary cluster and a three-primary cluster\n")
        let server = try await RedisServer.start()
        var started: [RedisServer] = [server]
        var cluster: RedisCluster?
        do {
            let single = try await RedisServer.start(.init(extraArguments: ["--cluster-enabled", "yes"]))
            started.append(single)
            try await Self.assignAllSlots(to: single)
            cluster = try await RedisCluster.start(primaries: 3, replicasPerPrimary: 0)
            let urls: [(ClusterBenchResult.Target, String)] = [
                (.server, server.url), (.onePrimary, "redis+cluster://\(single.address)"), (.threePrimaries, cluster!.seedURL),
            ]
            var result = ClusterBenchResult(rounds: [], users: users, slotsUsed: 0, mostUsersInOneSlot: 0)
            for round in 1...rounds {
                var runs: [ClusterBenchResult.Run] = []
                for (target, url) in urls {
                    status("round \(round)/\(rounds): \(target.rawValue) ")
                    let runner = AdmitBenchRunner(
                        configuration: try RedisClientConfiguration(url: url), clients: clients, pipeline: pipeline, requests: requests,
                        users: users, limit: limit, memoryUsers: 0, memoryConnectionsPerUser: 0, renewInterval: .seconds(10),
                        redisBenchmarkPath: "")
                    let run = try await runner.limiterThroughput()
                    runs.append(ClusterBenchResult.Run(target: target, measurement: run.measurement, denied: run.denied, keysPerPrimary: run.keys))
                    status("\(format(run.measurement.requestsPerSecond, 0))/s\n")
                }
                result.rounds.append(runs)
            }
            // The slots of the users' connection sets (the limiter's keys `P:{u:<user>}:…`).
            var perSlot: [Int: Int] = [:]
            for user in 0..<users { perSlot[HashSlot.of("u:\(AdmitBenchRunner.digits(user))"), default: 0] += 1 }
            result.slotsUsed = perSlot.count
            result.mostUsersInOneSlot = perSlot.values.max() ?? 0
            await cluster?.teardown()
            for server in started { await server.kill() }
            return result
        } catch {
            await cluster?.teardown()
            for server in started { await server.kill() }
            throw error
        }
    }

    /// Makes a cluster-enabled server a cluster of its own: every slot assigned to it, then waits (at most 10 s) for
    /// `cluster_state:ok`.
    static func assignAllSlots(to server: RedisServer) async throws {
        let answer = try await server.cli("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        guard answer.contains("OK") else {
            throw AdmitBenchRunner.Failure(description: "CLUSTER ADDSLOTSRANGE 0 16383 on \(server.address) answered \(answer)")
        }
        let started = ContinuousClock.now
        while try await !server.cli("CLUSTER", "INFO").contains("cluster_state:ok") {
            guard started.duration(to: .now) < .seconds(10) else {
                throw AdmitBenchRunner.Failure(description: "the one-primary cluster at \(server.address) did not reach cluster_state:ok within 10 s")
            }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    private func status(_ text: String) {
        FileHandle.standardError.write(Data(text.utf8))
    }

    /// The printed report.
    public func report(_ result: ClusterBenchResult) -> String {
        var lines = [
            "fleetgate bench cluster: \(requests) admissions per run of random users out of \(users), limit \(limit), "
                + "one limiter node with \(clients * pipeline) concurrent admit() callers; \(rounds) rounds, the targets in turn",
            pad("round", 7) + pad("target", 24) + pad("admissions/s", 14) + pad("p50 ms", 9) + pad("p99 ms", 9) + pad("client CPU µs/adm", 19)
                + "keys per primary",
        ]
        for (index, runs) in result.rounds.enumerated() {
            for run in runs {
                let keys = run.keysPerPrimary.map { "\($0.keys)" }.joined(separator: " / ")
                lines.append(
                    pad("\(index + 1)", 7) + pad(run.target.rawValue, 24) + pad(format(run.measurement.requestsPerSecond, 0), 14)
                        + pad(format(run.measurement.p50Milliseconds, 2), 9) + pad(format(run.measurement.p99Milliseconds, 2), 9)
                        + pad(format(run.measurement.cpuMicrosecondsPerRequest ?? 0, 1), 19) + keys)
            }
        }
        let shares = result.runs(of: .threePrimaries).last.map { run -> String in
            let total = max(1, run.keysPerPrimary.reduce(0) { $0 + $1.keys })
            return run.keysPerPrimary.map { format(Double($0.keys) * 100 / Double(total), 1) + " %" }.joined(separator: " / ")
        }
        lines += [
            "routing: cluster client on 1 primary / plain client on 1 server: \(format(result.routingRatio, 2))x (median of the rounds; "
                + "the cluster client's cost: slot lookups, the users-index write and the script routed as a pipeline)",
            "scaling: 3 primaries / 1 server: \(format(result.scalingRatio, 2))x (median; on this machine the client, the node and "
                + "every redis-server share the same cores, so this measures the client's cost more than what more shards give: "
                + "on separate machines each primary adds its own CPU)",
            "spread: keys per primary \(shares ?? "-"); the \(result.users) users' keys fall in \(result.slotsUsed) of 16384 slots, "
                + "at most \(result.mostUsersInOneSlot) users in one slot",
        ]
        return lines.joined(separator: "\n")
    }
}

extension AdmitBenchRunner {
    /// The limiter's part of measurement 1 alone (no redis-benchmark, no memory or upkeep): a fresh node, a warm-up
    /// of a tenth, `requests` admissions of random users; the keys per primary right after; everything deleted.
    func limiterThroughput() async throws -> (measurement: Measurement, denied: Int, keys: [(address: String, keys: Int)]) {
        try await withClients { admin, redis in
            let node = nodeConfiguration(keyPrefix: "\(prefix):a", limit: limit, renewInterval: .seconds(15))
            let (result, _) = try await withNode(redis, admin: admin, configuration: node) { limiter, _ in
                let tasks = clients * pipeline
                _ = try await admitRandomUsers(limiter, tasks: tasks, count: max(1_000, requests / 10), base: 0, denied: Counter())
                let denied = Counter()
                let measured = try await admitRandomUsers(limiter, tasks: tasks, count: requests, base: requests, denied: denied)
                var keys: [(address: String, keys: Int)] = []
                for (address, reply) in try await admin.sendToEveryPrimary(RedisCommand("DBSIZE")) {
                    keys.append((address, (try? reply.get().int) ?? 0))
                }
                return (measured, denied.value, keys)
            }
            return result
        }
    }
}
