import ArgumentParser
import ConnectionLimiter
import Foundation
import Logging
import RedisClient

/// What every operator command takes: where Redis is, which fleet (key prefix), and the output format.
struct OperatorOptions: ParsableArguments {
    @Option(help: "Redis URL, as for serve. [env: FLEETGATE_REDIS_URL] (default: redis://127.0.0.1:6379)") var redis: String?
    @Option(help: "Prefix of every Redis key, as for serve. [env: FLEETGATE_KEY_PREFIX] (default: fg)") var keyPrefix: String?
    @Option(help: "The default limit the fleet's nodes use, to show users' effective limits. [env: FLEETGATE_DEFAULT_LIMIT] (default: 20)")
    var defaultLimit: Int?
    @Flag(help: "Print JSON instead of a table.") var json = false

    /// The Redis URL: the flag, else `FLEETGATE_REDIS_URL`, else the default.
    func redisURL(_ environment: [String: String] = ProcessInfo.processInfo.environment) -> String {
        redis ?? environment["FLEETGATE_REDIS_URL"].flatMap { $0.isEmpty ? nil : $0 } ?? "redis://127.0.0.1:6379"
    }

    /// The limiter configuration of the fleet being inspected (prefix and default limit).
    func limiterConfiguration(_ environment: [String: String] = ProcessInfo.processInfo.environment) throws -> LimiterConfiguration {
        var configuration = LimiterConfiguration(nodeName: "fleetgate-cli")
        if let prefix = keyPrefix ?? environment["FLEETGATE_KEY_PREFIX"].flatMap({ $0.isEmpty ? nil : $0 }) { configuration.keyPrefix = prefix }
        if let limit = defaultLimit {
            configuration.defaultLimit = limit
        } else if let raw = environment["FLEETGATE_DEFAULT_LIMIT"], !raw.isEmpty {
            guard let limit = Int(raw) else { throw OperatorError("invalid FLEETGATE_DEFAULT_LIMIT=\"\(raw)\"") }
            configuration.defaultLimit = limit
        }
        do {
            try configuration.validate()
        } catch {
            throw OperatorError(error.message)
        }
        return configuration
    }

    /// Runs `body` with a limiter object on the fleet's Redis (it does not register as a node: it only reads and
    /// acts through Redis). A Redis that cannot be reached fails with one line naming its address.
    func withLimiter<T: Sendable>(_ body: @escaping @Sendable (ConnectionLimiter) async throws -> T) async throws -> T {
        let url = redisURL()
        var redisConfiguration: RedisClientConfiguration
        do {
            redisConfiguration = try RedisClientConfiguration(url: url)
        } catch {
            throw OperatorError(error.message)
        }
        redisConfiguration.connectTimeout = .seconds(2)
        redisConfiguration.commandTimeout = .seconds(3)
        redisConfiguration.clientName = "fleetgate-cli"
        var quiet = Logger(label: "fleetgate.cli")
        quiet.logLevel = .critical
        let client = RedisClient(configuration: redisConfiguration, logger: quiet)
        let limiter = ConnectionLimiter(redis: client, configuration: try limiterConfiguration(), logger: quiet)
        let address = redisConfiguration.address
        return try await withThrowingTaskGroup(of: T?.self) { group in
            group.addTask {
                try? await client.run()
                return nil
            }
            defer { group.cancelAll() }
            do {
                // Reachable at all? One clear line instead of the first command's error.
                _ = try await client.send(RedisCommand("PING"), timeout: .seconds(3))
            } catch {
                throw OperatorError("cannot reach Redis at \(address): \(Self.reason(error)); check --redis (FLEETGATE_REDIS_URL)")
            }
            do {
                return try await body(limiter)
            } catch let error as LimiterError {
                throw OperatorError(error.message)
            } catch let error as RedisError {
                throw OperatorError("Redis at \(address) failed: \(error.message)")
            }
        }
    }

    static func reason(_ error: any Error) -> String {
        (error as? RedisError)?.message ?? "\(error)"
    }

    /// Prints `value` as JSON (sorted keys, one document).
    func printJSON(_ value: some Encodable) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        let data = try encoder.encode(value)
        FileHandle.standardOutput.write(data + Data("\n".utf8))
    }
}

/// An operator command's failure: one line on stderr, exit 1.
struct OperatorError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// An aligned text table: a header and rows, columns padded to the widest cell.
struct TextTable {
    var header: [String]
    var rows: [[String]] = []

    init(_ header: String...) { self.header = header }

    mutating func add(_ cells: String...) { rows.append(cells) }

    var rendered: String {
        let all = [header] + rows
        let widths = header.indices.map { column in all.map { $0.indices.contains(column) ? $0[column].count : 0 }.max() ?? 0 }
        return all.map { row in
            row.enumerated().map { index, cell in
                index == row.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
            }.joined(separator: "  ")
        }.joined(separator: "\n")
    }
}

/// Durations for people: `950ms`, `4.2s`, `3m05s`.
func humanDuration(_ duration: Duration) -> String {
    let milliseconds = duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
    if abs(milliseconds) < 1000 { return "\(milliseconds)ms" }
    if abs(milliseconds) < 60_000 { return String(format: "%.1fs", Double(milliseconds) / 1000) }
    let seconds = milliseconds / 1000
    return String(format: "%dm%02ds", seconds / 60, abs(seconds % 60))
}

/// Whole milliseconds of a duration (for JSON).
func wholeMilliseconds(_ duration: Duration) -> Int64 {
    duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000
}
