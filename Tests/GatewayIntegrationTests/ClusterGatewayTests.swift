import Foundation
import Glibc
import TestSupport
import Testing

/// `fleetgate serve` and the operator CLI on a real local Redis Cluster (3 primaries, 3 replicas), given the
/// `redis+cluster://` URL: the same behaviour as on one server, across shards.
@Suite("Gateway nodes and the operator CLI on a Redis Cluster", .timeLimit(.minutes(2)))
struct ClusterGatewayTests {
    @Test("two nodes on a cluster hold the limit across nodes; status, user, limit, evict and sweep work; a killed node's entries go")
    func gatewayAndCLIOnCluster() async throws {
        try await RedisCluster.withCluster { cluster in
            let prefix = uniqueKeyPrefix("cluster-gateway")
            func cli(_ arguments: [String]) async throws -> String {
                let result = try await CLI.run(arguments, environment: ["FLEETGATE_REDIS_URL": cluster.seedURL, "FLEETGATE_KEY_PREFIX": prefix])
                try #require(result.status == 0, "fleetgate \(arguments.joined(separator: " ")) failed: \(result.err)")
                return result.out
            }
            func cliJSON(_ arguments: [String]) async throws -> [String: Any] {
                try JSONSerialization.jsonObject(with: Data(try await cli(arguments + ["--json"]).utf8)) as? [String: Any] ?? [:]
            }
            try await withGatewayNodes(2, redisURL: cluster.seedURL, prefix: prefix, arguments: ["--default-limit", "3"]) { nodes in
                // One user per shard: the limit holds for each, across both nodes.
                let users = ["cleo", "dora", "egon"]
                let shards = Set(
                    try await users.asyncMap { try await cluster.primary(forSlot: RedisCluster.slot(of: "\(prefix):{u:\($0)}:conns")).port })
                #expect(shards.count == 3, "cleo, dora and egon hash to slots 2383, 14872 and 8653: one per primary")
                var held: [String: [HeldWebSocket]] = [:]
                for user in users {
                    let token = try await Tokens.valid(user)
                    for index in 0..<3 { held[user, default: []].append(try await HeldWebSocket.open(port: nodes[index % 2].port, token: token)) }
                    let denied = try await RawHTTP.get(
                        port: nodes[1].port, path: "/ws", headers: ["Authorization": "Bearer \(token)"], upgrade: true)
                    #expect(denied.status == 429, "\(user): \(denied)")
                    #expect(denied.json["limit"] as? Int == 3)
                    #expect(denied.json["current"] as? Int == 3)
                }

                // status: both nodes, their connections as reported by heartbeats (once a second).
                var status: [String: Any] = [:]
                let reported = try await eventually {
                    status = try await cliJSON(["status"])
                    return (status["totals"] as? [String: Any])?["connections"] as? Int == 9
                }
                #expect(reported, "\(status)")
                #expect((status["nodes"] as? [[String: Any]])?.count == 2)

                let cleo = try await cliJSON(["user", "cleo"])
                #expect(cleo["count"] as? Int == 3)
                let entries = cleo["entries"] as? [[String: Any]] ?? []
                #expect(Set(entries.compactMap { $0["node"] as? String }).count == 2)

                // limit set reaches every node at once: a 4th connection is admitted.
                #expect(try await cli(["limit", "set", "cleo", "4"]).contains("limit 4 (override)"))
                held["cleo", default: []].append(try await HeldWebSocket.open(port: nodes[0].port, token: try await Tokens.valid("cleo")))

                // evict one connection: its socket closes with 4409 and the entry is gone.
                let fred = try await HeldWebSocket.open(port: nodes[0].port, token: try await Tokens.valid("fred"))
                let entry = try #require(((try await cliJSON(["user", "fred"]))["entries"] as? [[String: Any]])?.first)
                let member = "\(entry["node"] as? String ?? ""):\(entry["connection"] as? String ?? "")"
                let evicted = try await cliJSON(["evict", "--user", "fred", "--connection", member])
                #expect(evicted["kicked"] as? Int == 1)
                #expect(try await fred.closedByServer()?.code == 4409)
                #expect(try await eventually { (try await cliJSON(["user", "fred"]))["count"] as? Int == 0 })

                // SIGKILL node 1: the other node sweeps its entries off every shard within the promise.
                let killedID = try #require(try await RawHTTP.get(port: nodes[1].port, path: "/readyz").json["node"] as? String)
                await nodes[1].kill()
                let swept = try await eventually(timeout: .seconds(30)) {
                    var remaining = 0
                    for user in users {
                        let answer = try await cliJSON(["user", user])
                        remaining += (answer["entries"] as? [[String: Any]] ?? []).filter { $0["node"] as? String == killedID }.count
                    }
                    return remaining == 0
                }
                #expect(swept, "entries of killed node \(killedID) still in Redis after 30 s")
                // `sweep` answers on a cluster too (nothing left to remove by now).
                _ = try await cli(["sweep"])

                for sockets in held.values { for socket in sockets { await socket.close() } }
                _ = try await nodes[0].terminate()
                // After the drain nothing is left: no entry, and no key without a TTL, on any primary.
                let leftovers = try await eventually {
                    var keys: [String] = []
                    for primary in try await cluster.primaries() {
                        keys += try await primary.cli("--scan", "--pattern", "\(prefix):*").split(separator: "\n").map(String.init)
                    }
                    return keys.filter { $0.hasSuffix(":conns") }.isEmpty
                }
                #expect(leftovers, "connection entries left on the cluster after the drain")
            }
        }
    }
}

extension Sequence where Element: Sendable {
    fileprivate func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}
