import ArgumentParser
import ConnectionLimiter
import Foundation

/// `fleetgate evict`: kick connections — their entries are removed and marked, their nodes close them with 4409.
struct Evict: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Kick connections: the entries are removed and marked in Redis, their nodes close the sockets with 4409.",
        discussion: """
            One of: --user <id> (every connection of the user), --user <id> --connection <node:conn or conn> (one), \
            --node <id> (every connection a node holds).
            """
    )

    @OptionGroup var options: OperatorOptions
    @Option(help: "The user whose connections to kick.") var user: String?
    @Option(help: "One connection of --user: node:connection as `user` shows it, or the connection id alone.") var connection: String?
    @Option(help: "A node id (as `nodes` shows it): kick every connection it holds.") var node: String?

    struct Report: Codable, Sendable {
        struct Kicked: Codable, Sendable {
            var user: String?
            var node: String
            var connection: String?
        }
        var kicked: Int
        var entries: [Kicked]
    }

    func validate() throws {
        switch (user, node) {
        case (nil, nil): throw ValidationError("say what to evict: --user, --user with --connection, or --node")
        case (.some, .some): throw ValidationError("--user and --node exclude each other")
        default: break
        }
        if connection != nil && user == nil { throw ValidationError("--connection goes with --user") }
    }

    func run() async throws {
        let (options, user, connection, node) = (options, user, connection, node)
        try await options.withLimiter { limiter in
            let report: Report
            if let node {
                let count = try await limiter.evict(node: node)
                report = Report(kicked: count, entries: [Report.Kicked(user: nil, node: node, connection: nil)])
            } else if let user, let connection {
                let entries = try await limiter.entries(user: user)
                let match = entries.first { "\($0.node):\($0.connection)" == connection || $0.connection == connection }
                guard let match else {
                    throw OperatorError("user \"\(user)\" has no connection \"\(connection)\" (see: fleetgate user \(user))")
                }
                try await limiter.kick(user: user, node: match.node, connection: match.connection)
                report = Report(kicked: 1, entries: [Report.Kicked(user: user, node: match.node, connection: match.connection)])
            } else {
                let kicked = try await limiter.evict(user: user ?? "")
                report = Report(kicked: kicked.count, entries: kicked.map { Report.Kicked(user: user, node: $0.node, connection: $0.connection) })
            }
            if options.json {
                try options.printJSON(report)
            } else if let node {
                print("kicked \(report.kicked) connection\(report.kicked == 1 ? "" : "s") of node \(node)")
            } else {
                print("kicked \(report.kicked) connection\(report.kicked == 1 ? "" : "s") of user \"\(user ?? "")\"")
                for entry in report.entries { print("  \(entry.node):\(entry.connection ?? "")") }
            }
        }
    }
}

/// `fleetgate sweep`: remove dead nodes' entries now.
struct Sweep: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove every entry of the nodes whose lease ran out, now (the live nodes do it within a heartbeat anyway).")

    @OptionGroup var options: OperatorOptions

    struct Report: Codable, Sendable {
        var nodes: [String: Int]
        var removed: Int
    }

    func run() async throws {
        let options = options
        try await options.withLimiter { limiter in
            let swept = try await limiter.sweepDeadNodes()
            let report = Report(nodes: swept, removed: swept.values.reduce(0, +))
            if options.json {
                try options.printJSON(report)
            } else if swept.isEmpty {
                print("no dead node to sweep")
            } else {
                var table = TextTable("DEAD NODE", "ENTRIES REMOVED")
                for (node, removed) in swept.sorted(by: { $0.key < $1.key }) { table.add(node, String(removed)) }
                print(table.rendered)
            }
        }
    }
}
