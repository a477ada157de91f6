import Foundation

/// A timed list of faults, played against a loaded fleet. Times count from the moment the load is in place.
///
/// As JSON (`fleetgate chaos --scenario file.json`):
/// ```json
/// {"name": "pause", "duration": 40,
///  "faults": [{"at": 5, "kind": "pause", "node": 2, "for": 8}, {"at": 20, "kind": "kill", "node": 1}]}
/// ```
/// `node` is 1-based (for `kill-primary`: which primary of the cluster, in start order); `for` (seconds) ends a pause, a partition, a Redis stop, a full Redis or a clock jump; `offset`
/// is a clock jump's size in seconds (negative: back).
public struct Scenario: Codable, Sendable, Equatable {
    public var name: String
    /// Seconds from the load being in place to the end of the run (the faults must fit).
    public var duration: Double
    public var faults: [Fault]

    public init(name: String, duration: Double, faults: [Fault]) {
        self.name = name
        self.duration = duration
        self.faults = faults
    }

    /// One fault.
    public struct Fault: Codable, Sendable, Equatable {
        public var at: Double
        public var kind: Kind
        public var node: Int?
        public var `for`: Double?
        public var offset: Double?

        public init(at: Double, kind: Kind, node: Int? = nil, for duration: Double? = nil, offset: Double? = nil) {
            self.at = at
            self.kind = kind
            self.node = node
            self.for = duration
            self.offset = offset
        }

        /// How it reads in the report: `kill chaos-1`, `pause chaos-2 for 8s`.
        public func label(prefix: String) -> String {
            var text = kind.rawValue
            if let node { text += kind == .killPrimary ? " \(node)" : " \(prefix)-\(node)" }
            if let offset { text += " \(offset >= 0 ? "+" : "")\(Int(offset))s" }
            if let duration = self.for { text += " for \(Int(duration))s" }
            return text
        }
    }

    /// The faults a scenario can play.
    public enum Kind: String, Codable, Sendable, CaseIterable {
        /// SIGKILL a node (it stays down until a `restart`).
        case kill
        /// Start a killed or drained node again, on its port.
        case restart
        /// SIGSTOP a node, SIGCONT after `for` (past the node TTL, the pause that breaks naive leases).
        case pause
        /// SIGTERM: the node drains gracefully (stays down until a `restart`).
        case term
        /// Cut a node off from Redis (a black hole through its proxy) for `for`, then heal.
        case partition
        /// Redis restarted without its data.
        case redisRestart = "redis-restart"
        /// Redis stopped for `for`, then started again with its data.
        case redisStop = "redis-stop"
        /// Redis full: maxmemory lowered under the data set (noeviction) for `for`.
        case redisFull = "redis-full"
        /// Redis's clock jumps by `offset` seconds for `for` (needs the clock-offset library).
        case clockJump = "clock-jump"
        /// Every client drops its connection at once and reconnects.
        case storm
        /// Every node in turn: SIGTERM, wait for the drain, start again.
        case rollingRestart = "rolling-restart"
        /// On a Redis Cluster: SIGKILL primary `node` (default 1) under load; its replica is promoted (writes not yet
        /// replicated are lost), then the killed server rejoins as a replica.
        case killPrimary = "kill-primary"

        /// Faults on the one Redis server (or a node's path to it), which a fleet on a cluster does not have.
        var needsSingleServer: Bool {
            [.partition, .redisRestart, .redisStop, .redisFull, .clockJump].contains(self)
        }
    }

    /// Checks the faults against the fleet's size: nodes in range, durations where needed, everything within the run,
    /// cluster faults only on a cluster (`clusterPrimaries`) and single-server faults only without one.
    public func validate(nodes: Int, clusterPrimaries: Int? = nil) throws {
        guard duration > 0, duration <= 3600 else { throw ChaosError("scenario \(name): duration must be 1…3600 s, got \(duration)") }
        for fault in faults {
            let where_ = "scenario \(name), fault \(fault.kind.rawValue) at \(fault.at) s"
            guard fault.at >= 0, fault.at < duration else { throw ChaosError("\(where_): must start within the run (0…\(duration) s)") }
            switch fault.kind {
            case .kill, .restart, .term, .pause, .partition:
                guard let node = fault.node, (1...nodes).contains(node) else { throw ChaosError("\(where_): needs a node 1…\(nodes)") }
            default:
                break
            }
            switch fault.kind {
            case .pause, .partition, .redisStop, .redisFull, .clockJump:
                guard let length = fault.for, length > 0 else { throw ChaosError("\(where_): needs \"for\" (seconds, > 0)") }
            case .killPrimary:
                guard let primaries = clusterPrimaries else {
                    throw ChaosError("\(where_): kills a primary of a Redis Cluster; run with --cluster")
                }
                guard (1...primaries).contains(fault.node ?? 1) else { throw ChaosError("\(where_): needs a primary 1…\(primaries)") }
            default:
                break
            }
            if clusterPrimaries != nil, fault.kind.needsSingleServer {
                throw ChaosError("\(where_): needs one Redis server (a proxy per node, a server to stop, fill or shift); not with --cluster")
            }
            if fault.kind == .clockJump, fault.offset == nil { throw ChaosError("\(where_): needs \"offset\" (seconds)") }
        }
    }

    /// Reads a scenario from a JSON file.
    public static func load(file: String) throws -> Scenario {
        guard let data = FileManager.default.contents(atPath: file) else { throw ChaosError("cannot read the scenario file \(file)") }
        do {
            return try JSONDecoder().decode(Scenario.self, from: data)
        } catch {
            throw ChaosError("the scenario file \(file) is not a scenario: \(error)")
        }
    }

    /// The built-in scenarios, by name.
    public static func builtIn(_ name: String) -> Scenario? {
        switch name {
        case "demo":
            return Scenario(name: "demo", duration: 30, faults: [.init(at: 1, kind: .kill, node: 1)])
        case "kill":
            return Scenario(
                name: "kill", duration: 35, faults: [.init(at: 2, kind: .kill, node: 1), .init(at: 20, kind: .restart, node: 1)])
        case "pause":
            return Scenario(name: "pause", duration: 30, faults: [.init(at: 2, kind: .pause, node: 2, for: 8)])
        case "partition":
            return Scenario(name: "partition", duration: 30, faults: [.init(at: 2, kind: .partition, node: 3, for: 8)])
        case "redis":
            return Scenario(
                name: "redis", duration: 45,
                faults: [
                    .init(at: 2, kind: .redisRestart), .init(at: 12, kind: .redisStop, for: 5), .init(at: 28, kind: .redisFull, for: 6),
                ])
        case "storm":
            return Scenario(name: "storm", duration: 20, faults: [.init(at: 2, kind: .storm)])
        case "rolling":
            return Scenario(name: "rolling", duration: 45, faults: [.init(at: 2, kind: .rollingRestart)])
        case "clock":
            return Scenario(
                name: "clock", duration: 40,
                faults: [.init(at: 2, kind: .clockJump, for: 8, offset: 60), .init(at: 20, kind: .clockJump, for: 8, offset: -60)])
        case "all":
            return Scenario(
                name: "all", duration: 175,
                faults: [
                    .init(at: 2, kind: .kill, node: 1), .init(at: 17, kind: .restart, node: 1),
                    .init(at: 22, kind: .pause, node: 2, for: 8),
                    .init(at: 40, kind: .partition, node: 3, for: 8),
                    .init(at: 58, kind: .storm),
                    .init(at: 68, kind: .redisRestart),
                    .init(at: 78, kind: .redisStop, for: 5),
                    .init(at: 92, kind: .redisFull, for: 6),
                    .init(at: 106, kind: .term, node: 2), .init(at: 112, kind: .restart, node: 2),
                    .init(at: 118, kind: .rollingRestart),
                    .init(at: 140, kind: .clockJump, for: 6, offset: 60),
                    .init(at: 155, kind: .clockJump, for: 6, offset: -60),
                ])
        case "cluster":
            // A primary killed under load (its replica promoted, recent writes lost), a node killed and restarted
            // while the cluster has just failed over, and a second primary killed once the first has rejoined.
            return Scenario(
                name: "cluster", duration: 60,
                faults: [
                    .init(at: 2, kind: .killPrimary, node: 1),
                    .init(at: 20, kind: .kill, node: 1), .init(at: 35, kind: .restart, node: 1),
                    .init(at: 40, kind: .killPrimary, node: 2),
                ])
        default:
            return nil
        }
    }

    /// The scenario played again and again (faults shifted by its duration each time) until `total` seconds.
    public func repeated(until total: Double) -> Scenario {
        guard total > duration else { return self }
        var faults: [Fault] = []
        var offset = 0.0
        while offset < total {
            for var fault in self.faults where fault.at + offset < total {
                fault.at += offset
                faults.append(fault)
            }
            offset += duration
        }
        return Scenario(name: "\(name) (repeated for \(Int(total)) s)", duration: total, faults: faults)
    }

    /// The names ``builtIn(_:)`` knows.
    public static let builtInNames = ["demo", "kill", "pause", "partition", "redis", "storm", "rolling", "clock", "all", "cluster"]
}

/// A chaos run could not start or went wrong; the message says what.
public struct ChaosError: Error, CustomStringConvertible, Sendable {
    public var description: String
    public init(_ description: String) { self.description = description }
}
