import ArgumentParser
import ConnectionLimiter
import Foundation

/// One node as `status`, `nodes` and `--json` show it.
struct NodeReport: Codable, Sendable {
    var id: String
    var name: String
    var address: String
    var alive: Bool
    var connections: Int
    var users: Int
    var version: String
    var pid: Int?
    var leaseRemainingMs: Int64
    var lastHeartbeatMsAgo: Int64?

    init(_ node: NodeStatus) {
        id = node.id
        name = node.name
        address = node.address
        alive = node.isAlive
        connections = node.connections
        users = node.users
        version = node.version
        pid = node.pid
        leaseRemainingMs = wholeMilliseconds(node.leaseRemaining)
        lastHeartbeatMsAgo = node.lastHeartbeatAgo.map(wholeMilliseconds)
    }

    /// The registry, live nodes first, by name.
    static func registry(_ limiter: ConnectionLimiter) async throws -> [NodeStatus] {
        try await limiter.nodes().sorted { ($0.isAlive ? 0 : 1, $0.name, $0.id) < ($1.isAlive ? 0 : 1, $1.name, $1.id) }
    }

    static func table(_ nodes: [NodeReport]) -> String {
        var table = TextTable("NODE", "NAME", "ADDRESS", "STATE", "CONNS", "USERS", "LAST BEAT", "VERSION", "PID")
        for node in nodes {
            table.add(
                node.id, node.name, node.address.isEmpty ? "-" : node.address, node.alive ? "live" : "dead", String(node.connections),
                String(node.users), node.lastHeartbeatMsAgo.map { humanDuration(.milliseconds($0)) + " ago" } ?? "-", node.version,
                node.pid.map(String.init) ?? "-")
        }
        return table.rendered
    }
}

/// What `fleetgate status` reports.
struct StatusReport: Codable, Sendable {
    struct Totals: Codable, Sendable {
        var liveNodes: Int
        var deadNodes: Int
        var connections: Int
        var userNodePairs: Int
    }
    struct OverLimit: Codable, Sendable {
        var user: String
        var count: Int
        var limit: Int
    }
    var nodes: [NodeReport]
    var totals: Totals
    var usersOverLimit: [OverLimit]

    static func gather(_ limiter: ConnectionLimiter) async throws -> StatusReport {
        let nodes = try await NodeReport.registry(limiter)
        let totals = LimiterTotals(nodes: nodes)
        let over = try await limiter.usersOverLimit(maximum: 100)
        return StatusReport(
            nodes: nodes.map(NodeReport.init),
            totals: Totals(
                liveNodes: totals.liveNodes, deadNodes: totals.deadNodes, connections: totals.connections, userNodePairs: totals.userNodePairs),
            usersOverLimit: over.map { OverLimit(user: $0.user, count: $0.count, limit: $0.limit) })
    }

    var text: String {
        var lines = [
            "nodes: \(totals.liveNodes) live, \(totals.deadNodes) dead   connections: \(totals.connections)   user-node pairs: \(totals.userNodePairs)",
            "",
            nodes.isEmpty ? "(no node registered)" : NodeReport.table(nodes),
        ]
        if usersOverLimit.isEmpty {
            lines += ["", "users over their limit: none"]
        } else {
            var table = TextTable("USER", "ENTRIES", "LIMIT")
            for user in usersOverLimit { table.add(user.user, String(user.count), String(user.limit)) }
            lines += ["", "users over their limit:", table.rendered]
        }
        return lines.joined(separator: "\n")
    }
}

/// `fleetgate status`: the fleet at a glance.
struct Status: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "The fleet at a glance: nodes (live or dead, connections, version, last heartbeat), totals, users over their limit.")

    @OptionGroup var options: OperatorOptions
    @Flag(help: "Refresh every second until Ctrl-C (in place on a terminal, like redis-cli --stat).") var watch = false
    @Option(help: "With --watch: stop after this many refreshes.") var count: Int?

    func validate() throws {
        if let count, count < 1 { throw ValidationError("--count must be at least 1") }
        if count != nil && !watch { throw ValidationError("--count goes with --watch") }
    }

    func run() async throws {
        let (options, watch, count) = (options, watch, count)
        try await options.withLimiter { limiter in
            let terminal = isatty(STDOUT_FILENO) == 1 && !options.json
            var shown = 0
            while true {
                let report = try await StatusReport.gather(limiter)
                if options.json {
                    try options.printJSON(report)
                } else {
                    // In place on a terminal: home the cursor and clear the screen first.
                    let prefix = terminal && watch ? "\u{1B}[H\u{1B}[2J" : (watch && shown > 0 ? "\n" : "")
                    let stamp = watch ? "fleetgate status — \(Date().formatted(date: .omitted, time: .standard))\n" : ""
                    // Unbuffered: a watching terminal or a pipe sees each refresh at once.
                    FileHandle.standardOutput.write(Data((prefix + stamp + report.text + "\n").utf8))
                }
                shown += 1
                guard watch, count.map({ shown < $0 }) ?? true else { return }
                try await Task.sleep(for: .seconds(1))
            }
        }
    }
}

/// `fleetgate nodes`: the node registry.
struct Nodes: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Every node in the registry, live and dead (not yet swept).")

    @OptionGroup var options: OperatorOptions

    func run() async throws {
        let options = options
        try await options.withLimiter { limiter in
            // The registry only: no scan of every user key (which `status` makes for users over their limit).
            let nodes = try await NodeReport.registry(limiter).map(NodeReport.init)
            if options.json {
                try options.printJSON(nodes)
            } else {
                print(nodes.isEmpty ? "(no node registered)" : NodeReport.table(nodes))
            }
        }
    }
}
