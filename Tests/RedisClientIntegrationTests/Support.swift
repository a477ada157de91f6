import Foundation
import Logging
import RedisClient
import TestSupport

/// Runs `body` with a client for `url` whose `run()` is active, and shuts the client down afterwards.
func withClient<T: Sendable>(
    _ url: String,
    configure: (inout RedisClientConfiguration) -> Void = { _ in },
    _ body: (RedisClient) async throws -> T
) async throws -> T {
    var configuration = try RedisClientConfiguration(url: url)
    configure(&configuration)
    let client = RedisClient(configuration: configuration, logger: Logger(label: "test.redis"))
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await client.run() }
        defer { group.cancelAll() }
        return try await body(client)
    }
}

/// A counter from the server's `INFO stats` (e.g. `total_connections_received`), read with redis-cli.
func statsCounter(_ server: RedisServer, _ name: String) async throws -> Int {
    let info = try await server.cli("INFO", "stats")
    let line = info.split(whereSeparator: \.isNewline).first { $0.hasPrefix("\(name):") }
    return Int(line?.split(separator: ":").last?.trimmingCharacters(in: .whitespaces) ?? "") ?? -1
}

/// Waits until `client` knows its server is gone: a PING fails as lost or refused, not one that merely timed out (on a
/// loaded machine the client may not have read the close yet, and a request could still be written to the dead
/// socket).
func clientNoticedLoss(_ client: RedisClient) async -> Bool {
    await eventually {
        do {
            try await client.send(RedisCommand("PING"), timeout: .milliseconds(100))
            return false
        } catch {
            return (error as? RedisError)?.code != .timeout
        }
    }
}
