import ArgumentParser
import ConnectionLimiter
import Foundation

/// `fleetgate limit set|get|clear`: per-user overrides in Redis, which win on every node at once.
struct Limit: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Per-user limit overrides in Redis (they win over token claims and the default, on every node at once).",
        subcommands: [Set.self, Get.self, Clear.self]
    )

    struct Report: Codable, Sendable {
        var user: String
        var override: Int?
        var effective: Int
    }

    static func show(_ report: Report, _ options: OperatorOptions) throws {
        if options.json {
            try options.printJSON(report)
        } else if let override = report.override {
            print("user \"\(report.user)\": limit \(override) (override)")
        } else {
            print("user \"\(report.user)\": no override; the default \(report.effective) applies (or a token's conn_limit claim)")
        }
    }

    struct Set: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Set a user's limit (0 to 1000000).")
        @OptionGroup var options: OperatorOptions
        @Argument(help: "The user id.") var user: String
        @Argument(help: "The new limit.") var limit: Int

        func validate() throws {
            guard (0...1_000_000).contains(limit) else { throw ValidationError("the limit must be from 0 to 1000000, got \(limit)") }
        }

        func run() async throws {
            let (options, user, limit) = (options, user, limit)
            try await options.withLimiter { limiter in
                try await limiter.setLimitOverride(user: user, to: limit)
                try Limit.show(Report(user: user, override: limit, effective: limit), options)
            }
        }
    }

    struct Get: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Show a user's override, if any.")
        @OptionGroup var options: OperatorOptions
        @Argument(help: "The user id.") var user: String

        func run() async throws {
            let (options, user) = (options, user)
            try await options.withLimiter { limiter in
                let override = try await limiter.limitOverride(user: user)
                try Limit.show(Report(user: user, override: override, effective: override ?? limiter.configuration.defaultLimit), options)
            }
        }
    }

    struct Clear: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove a user's override (the default or a claim applies again).")
        @OptionGroup var options: OperatorOptions
        @Argument(help: "The user id.") var user: String

        func run() async throws {
            let (options, user) = (options, user)
            try await options.withLimiter { limiter in
                try await limiter.clearLimitOverride(user: user)
                try Limit.show(Report(user: user, override: nil, effective: limiter.configuration.defaultLimit), options)
            }
        }
    }
}
