import ArgumentParser
import ConnectionLimiter
import Foundation

/// What `fleetgate user <id>` reports.
struct UserReport: Codable, Sendable {
    struct Entry: Codable, Sendable {
        var node: String
        var connection: String
        var nodeAlive: Bool
        var leaseRemainingMs: Int64
        var admittedMsAgo: Int64?
    }
    var user: String
    var count: Int
    var limit: Int
    /// `override` (set in Redis, wins everywhere) or `default` (the fleet's; a token's `conn_limit` claim may set
    /// another for the connections it opens).
    var limitSource: String
    var entries: [Entry]

    var text: String {
        let source =
            limitSource == "override"
            ? "override in Redis (wins over claims and the default)"
            : "default (a token's conn_limit claim sets another for its connections)"
        var lines = ["user \"\(user)\": \(count) entr\(count == 1 ? "y" : "ies"), limit \(limit) — \(source)"]
        if !entries.isEmpty {
            var table = TextTable("NODE", "CONNECTION", "NODE STATE", "LEASE LEFT", "AGE")
            for entry in entries {
                table.add(
                    entry.node, entry.connection, entry.nodeAlive ? "live" : "dead", humanDuration(.milliseconds(entry.leaseRemainingMs)),
                    entry.admittedMsAgo.map { humanDuration(.milliseconds($0)) } ?? "-")
            }
            lines += ["", table.rendered]
        }
        return lines.joined(separator: "\n")
    }
}

/// `fleetgate user <id>`: one user's entries and effective limit.
struct User: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "One user's entries (node, connection, lease left, age) and the effective limit with where it comes from.")

    @OptionGroup var options: OperatorOptions
    @Argument(help: "The user id (a token's sub), compared as bytes.") var id: String

    func run() async throws {
        let (options, id) = (options, id)
        try await options.withLimiter { limiter in
            let entries = try await limiter.entries(user: id)
            let override = try await limiter.limitOverride(user: id)
            let alive = Dictionary(try await limiter.nodes().map { ($0.id, $0.isAlive) }, uniquingKeysWith: { first, _ in first })
            let report = UserReport(
                user: id, count: entries.count, limit: override ?? limiter.configuration.defaultLimit,
                limitSource: override == nil ? "default" : "override",
                entries: entries.map {
                    .init(
                        node: $0.node, connection: $0.connection, nodeAlive: alive[$0.node] ?? false,
                        leaseRemainingMs: wholeMilliseconds($0.leaseRemaining), admittedMsAgo: $0.admittedAgo.map(wholeMilliseconds))
                })
            if options.json { try options.printJSON(report) } else { print(report.text) }
        }
    }
}
