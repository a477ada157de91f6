import Foundation
import Glibc
import TestSupport
import Testing

/// The admin token every test node gets.
let adminToken = "test-admin-token-0123456789"

/// Gateway nodes started as real `fleetgate serve` processes on one Redis, each under its own key prefix per test.
struct Fleet: Sendable {
    let nodes: [GatewayProcess]
    let redis: RedisServer
    let prefix: String

    /// Starts `count` nodes against `redis` (the shared server unless given) and runs `body`; every node is stopped
    /// afterwards (SIGKILL if the test failed, so nothing outlives it).
    static func with(
        _ count: Int,
        redis: RedisServer? = nil,
        arguments: [String] = [],
        label: String = #function,
        _ body: (Fleet) async throws -> Void
    ) async throws {
        let server: RedisServer
        if let redis {
            server = redis
        } else {
            server = try await SharedRedisServer.get()
        }
        let prefix = uniqueKeyPrefix(label)
        try await withGatewayNodes(count, redisURL: server.url, prefix: prefix, arguments: arguments) { nodes in
            try await body(Fleet(nodes: nodes, redis: server, prefix: prefix))
        }
    }

    /// The Redis keys under this fleet's prefix.
    func keys() async throws -> [String] {
        try await redis.cli("--scan", "--pattern", "\(prefix)*").split(separator: "\n").map(String.init).filter { !$0.isEmpty }
    }

    /// A user's entries as the admin API of `node` reports them.
    func entries(_ user: String, on node: Int = 0) async throws -> [[String: Any]] {
        let answer = try await RawHTTP.get(
            port: nodes[node].port, path: "/admin/users/\(user)", headers: ["Authorization": "Bearer \(adminToken)"])
        try #require(answer.status == 200, "\(answer)")
        return answer.json["entries"] as? [[String: Any]] ?? []
    }

    /// An upgrade attempt over a raw socket, to read refusals (status, headers, JSON body).
    func upgrade(on node: Int, token: String?) async throws -> HTTPAnswer {
        try await RawHTTP.get(
            port: nodes[node].port, path: "/ws", headers: token.map { ["Authorization": "Bearer \($0)"] } ?? [:], upgrade: true)
    }
}

/// Starts `count` `fleetgate serve` nodes (`node-0`…) on `redisURL` under `prefix` and runs `body` with them; every
/// node is stopped afterwards — on an error with SIGKILL, printing the last lines each wrote to stderr (the best clue
/// to why the test failed) — so nothing outlives the test.
func withGatewayNodes(
    _ count: Int, redisURL: String, prefix: String, arguments: [String] = [], _ body: ([GatewayProcess]) async throws -> Void
) async throws {
    let executable = try GatewayProcess.fleetgateExecutable()
    var nodes: [GatewayProcess] = []
    do {
        for index in 0..<count {
            nodes.append(
                try await GatewayProcess.start(
                    executable: executable,
                    arguments: [
                        "serve", "--port", "0", "--redis", redisURL, "--key-prefix", prefix, "--node-name", "node-\(index)",
                        "--jwt-secret", Tokens.secret, "--admin-token", adminToken, "--log-level", "debug",
                    ] + arguments
                ))
        }
        try await body(nodes)
    } catch {
        for node in nodes {
            await node.kill()
            print("--- \(node), last lines of stderr:\n\(node.standardError().split(separator: "\n").suffix(40).joined(separator: "\n"))")
        }
        throw error
    }
    for node in nodes where !node.hasExited { await node.kill() }
}
