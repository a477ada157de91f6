import Foundation
import Glibc
import TestSupport
import Testing

/// The operator commands, run as the built `fleetgate` binary against real gateway processes and a real Redis.
@Suite("Operator CLI: status, user, nodes, limit, evict, sweep, token against a real fleet", .timeLimit(.minutes(2)))
struct OperatorCLITests {
    @Test("status and user show what the fleet holds; nodes register their address and the binary's version")
    func statusAndUser() async throws {
        try await Fleet.with(2) { fleet in
            let token = try await Tokens.valid("sue")
            let first = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let second = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            let version = try await CLI.run(["--version"]).out.trimmingCharacters(in: .whitespacesAndNewlines)
            #expect(!version.isEmpty)

            // Heartbeats report connections once a second: wait for both nodes' reports.
            var status: [String: Any] = [:]
            let reported = try await eventually {
                status = try await fleet.cliJSON(["status"]) as? [String: Any] ?? [:]
                return (status["totals"] as? [String: Any])?["connections"] as? Int == 2
            }
            #expect(reported, "\(status)")
            let nodes = status["nodes"] as? [[String: Any]] ?? []
            #expect(nodes.count == 2)
            for (index, node) in fleet.nodes.enumerated() {
                let row = nodes.first { $0["name"] as? String == "node-\(index)" }
                #expect(row?["address"] as? String == "127.0.0.1:\(node.port)", "\(nodes)")
                #expect(row?["version"] as? String == version)
                #expect(row?["alive"] as? Bool == true)
            }
            let human = try await fleet.cli(["status"])
            #expect(human.contains("2 live, 0 dead"), "\(human)")
            #expect(human.contains("node-0") && human.contains("node-1"))

            let user = try #require(try await fleet.cliJSON(["user", "sue"]) as? [String: Any])
            #expect(user["count"] as? Int == 2)
            #expect(user["limit"] as? Int == 20)
            #expect(user["limitSource"] as? String == "default")
            let entries = user["entries"] as? [[String: Any]] ?? []
            #expect(Set(entries.compactMap { $0["node"] as? String }).count == 2)
            #expect(entries.allSatisfy { ($0["leaseRemainingMs"] as? Int ?? 0) > 0 })
            let table = try await fleet.cli(["user", "sue"])
            #expect(table.contains("user \"sue\": 2 entries, limit 20"), "\(table)")
            await first.close()
            await second.close()
        }
    }

    @Test("limit set changes admission at once on every node; clear lifts it; get and --json agree")
    func limitOverrides() async throws {
        try await Fleet.with(2) { fleet in
            let token = try await Tokens.valid("lim")
            #expect(try await fleet.cli(["limit", "set", "lim", "1"]).contains("limit 1 (override)"))
            let got = try #require(try await fleet.cliJSON(["limit", "get", "lim"]) as? [String: Any])
            #expect(got["override"] as? Int == 1)
            let first = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let denied = try await fleet.upgrade(on: 1, token: token)
            #expect(denied.status == 429)
            #expect(denied.json["limit"] as? Int == 1)
            _ = try await fleet.cli(["limit", "clear", "lim"])
            let cleared = try #require(try await fleet.cliJSON(["limit", "get", "lim"]) as? [String: Any])
            #expect(cleared["override"] == nil)
            let second = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            await first.close()
            await second.close()
        }
    }

    @Test("evict --connection closes that socket with 4409; evict --node removes and closes a node's connections")
    func evictions() async throws {
        try await Fleet.with(2) { fleet in
            let token = try await Tokens.valid("eva")
            let target = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let user = try #require(try await fleet.cliJSON(["user", "eva"]) as? [String: Any])
            let entry = try #require((user["entries"] as? [[String: Any]])?.first)
            let member = "\(entry["node"] as? String ?? ""):\(entry["connection"] as? String ?? "")"
            let evicted = try #require(try await fleet.cliJSON(["evict", "--user", "eva", "--connection", member]) as? [String: Any])
            #expect(evicted["kicked"] as? Int == 1)
            #expect(try await target.closedByServer()?.code == 4409)
            #expect(try await eventually { try await fleet.entries("eva").isEmpty })

            let bob = try await Tokens.valid("bo")
            let held = [
                try await HeldWebSocket.open(port: fleet.nodes[1].port, token: bob),
                try await HeldWebSocket.open(port: fleet.nodes[1].port, token: bob),
            ]
            let node1 = try await fleet.nodeID(1)
            let byNode = try #require(try await fleet.cliJSON(["evict", "--node", node1]) as? [String: Any])
            #expect(byNode["kicked"] as? Int == 2)
            for connection in held { #expect(try await connection.closedByServer()?.code == 4409) }
            #expect(try await eventually { try await fleet.entries("bo").isEmpty })
        }
    }

    @Test("sweep removes a dead node's entries at once")
    func sweepDeadNode() async throws {
        // One node, so no live peer sweeps it first.
        try await Fleet.with(1) { fleet in
            let token = try await Tokens.valid("dee")
            var held: [HeldWebSocket] = []
            for _ in 0..<3 { held.append(try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)) }
            let id = try await fleet.nodeID(0)
            fleet.nodes[0].signal(SIGKILL)
            let dead = try await eventually(timeout: .seconds(20)) {
                let nodes = try await fleet.cliJSON(["nodes"]) as? [[String: Any]] ?? []
                return nodes.contains { $0["id"] as? String == id && $0["alive"] as? Bool == false }
            }
            #expect(dead)
            let swept = try #require(try await fleet.cliJSON(["sweep"]) as? [String: Any])
            #expect(swept["removed"] as? Int == 3, "\(swept)")
            #expect((swept["nodes"] as? [String: Int])?[id] == 3)
            let entries = try await fleet.redis.cli("ZCARD", "\(fleet.prefix):{u:dee}:conns")
            #expect(entries == "0")
            #expect(try await fleet.cli(["sweep"]).contains("no dead node to sweep"))
            _ = held
        }
    }

    @Test("a token minted by the CLI is accepted by serve, with its conn_limit")
    func tokenAccepted() async throws {
        try await Fleet.with(1) { fleet in
            let minted = try await CLI.run(["token", "--secret", Tokens.secret, "--user", "tia", "--conn-limit", "1", "--ttl", "10m"])
            #expect(minted.status == 0, "\(minted.err)")
            let token = minted.out.trimmingCharacters(in: .whitespacesAndNewlines)
            let session = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let second = try await fleet.upgrade(on: 0, token: token)
            #expect(second.status == 429)
            #expect(second.json["limit"] as? Int == 1)
            let json = try await CLI.run(["token", "--secret", Tokens.secret, "--user", "tia", "--json"])
            let parsed = try JSONSerialization.jsonObject(with: Data(json.out.utf8)) as? [String: Any]
            #expect(parsed?["user"] as? String == "tia")
            #expect((parsed?["token"] as? String)?.split(separator: ".").count == 3)
            await session.close()
        }
    }

    @Test("errors are one line on stderr with a non-zero exit: Redis unreachable (with its address), bad input")
    func errors() async throws {
        let closed = try ClosedPort()
        let port = closed.port
        let unreachable = try await CLI.run(["status", "--redis", "redis://127.0.0.1:\(port)"])
        #expect(unreachable.status != 0)
        #expect(unreachable.err.hasPrefix("fleetgate: cannot reach Redis at 127.0.0.1:\(port)"), "\(unreachable.err)")
        #expect(unreachable.err.split(separator: "\n").count == 1)
        #expect(unreachable.out.isEmpty)
        let shortSecret = try await CLI.run(["token", "--secret", "short", "--user", "x"])
        #expect(shortSecret.status != 0)
        #expect(shortSecret.err.contains("at least 32 bytes"))
        let noTarget = try await CLI.run(["evict"])
        #expect(noTarget.status != 0)
        #expect(noTarget.err.contains("--user") && noTarget.err.contains("--node"), "\(noTarget.err)")
    }
}

// MARK: - Running the binary

/// The built `fleetgate` binary (TestSupport's ``FleetgateCommand``).
typealias CLI = FleetgateCommand

extension Fleet {
    /// Runs an operator command on this fleet (its Redis, its key prefix); fails the test on a non-zero exit.
    func cli(_ arguments: [String]) async throws -> String {
        let result = try await CLI.run(arguments, environment: ["FLEETGATE_REDIS_URL": redis.url, "FLEETGATE_KEY_PREFIX": prefix])
        try #require(result.status == 0, "fleetgate \(arguments.joined(separator: " ")) failed: \(result.err)")
        return result.out
    }

    /// ``cli(_:)`` with `--json`, parsed.
    func cliJSON(_ arguments: [String]) async throws -> Any {
        let text = try await cli(arguments + ["--json"])
        return try JSONSerialization.jsonObject(with: Data(text.utf8))
    }
}

/// The load generator, run as the built binary against a real fleet.
@Suite("Load generator against a real fleet", .timeLimit(.minutes(2)))
struct LoadgenTests {
    @Test("admitted + denied + failed = attempts, and no user ever holds more than its limit; agent runs complete")
    func smallRun() async throws {
        try await Fleet.with(2) { fleet in
            let urls = fleet.nodes.flatMap { ["--url", "127.0.0.1:\($0.port)"] }
            let run = try await CLI.run(
                ["loadgen"] + urls + [
                    "--users", "6", "--attempts", "8", "--conn-limit", "5", "--hold", "1s", "--agent-flow", "--secret", Tokens.secret,
                    "--user-prefix", "lg-", "--json",
                ])
            #expect(run.status == 0, "\(run.err)")
            let report = try #require(try JSONSerialization.jsonObject(with: Data(run.out.utf8)) as? [String: Any], "\(run.out)")
            let attempts = report["attempts"] as? Int ?? -1
            let admitted = report["admitted"] as? Int ?? -1
            let denied = report["denied"] as? Int ?? -1
            let failed = report["failed"] as? Int ?? -1
            #expect(attempts == 48)
            #expect(admitted + denied + failed == attempts)
            #expect(failed == 0, "\(report["failureSamples"] ?? "")")
            #expect(admitted == 30, "6 users × limit 5, every attempt in flight together")
            #expect((report["peakOpenPerUser"] as? Int ?? 99) <= 5)
            #expect(report["agentRunsCompleted"] as? Int == admitted)
            // Everything was closed at the end: no entry left.
            #expect(try await eventually { try await fleet.entries("lg-0").isEmpty })
        }
    }

    @Test("bad input is refused with one line: no gateway, a bad URL, no secret")
    func refusals() async throws {
        let noURL = try await CLI.run(["loadgen", "--secret", Tokens.secret])
        #expect(noURL.status != 0 && noURL.err.contains("--url"), "\(noURL.err)")
        let badURL = try await CLI.run(["loadgen", "--url", "ws://nowhere", "--secret", Tokens.secret])
        #expect(badURL.status != 0 && badURL.err.contains("invalid --url"), "\(badURL.err)")
        let noSecret = try await CLI.run(["loadgen", "--url", "127.0.0.1:1"])
        #expect(noSecret.status != 0 && noSecret.err.contains("secret"), "\(noSecret.err)")
    }
}
