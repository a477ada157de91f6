import ArgumentParser
import ConnectionLimiter
import Testing

@testable import fleetgate

@Suite("Operator commands: parsing and validation")
struct OperatorCommandTests {
    @Test("every operator command parses, with --redis, --key-prefix and --json")
    func parsing() throws {
        let common = ["--redis", "redis://127.0.0.1:6390", "--key-prefix", "demo", "--json"]
        let status = try #require(try Fleetgate.parseAsRoot(["status", "--watch", "--count", "3"] + common) as? Status)
        #expect(status.watch && status.count == 3)
        #expect(status.options.redisURL([:]) == "redis://127.0.0.1:6390")
        #expect(try status.options.limiterConfiguration([:]).keyPrefix == "demo")
        #expect(status.options.json)
        let user = try #require(try Fleetgate.parseAsRoot(["user", "alice smith"] + common) as? User)
        #expect(user.id == "alice smith")
        #expect(try Fleetgate.parseAsRoot(["nodes"]) is Nodes)
        let set = try #require(try Fleetgate.parseAsRoot(["limit", "set", "bob", "5"]) as? Limit.Set)
        #expect(set.user == "bob" && set.limit == 5)
        #expect(try Fleetgate.parseAsRoot(["limit", "get", "bob"]) is Limit.Get)
        #expect(try Fleetgate.parseAsRoot(["limit", "clear", "bob"]) is Limit.Clear)
        let evict = try #require(try Fleetgate.parseAsRoot(["evict", "--user", "bob", "--connection", "n1:c1"]) as? Evict)
        #expect(evict.user == "bob" && evict.connection == "n1:c1")
        #expect(try Fleetgate.parseAsRoot(["evict", "--node", "n1"]) is Evict)
        #expect(try Fleetgate.parseAsRoot(["sweep"]) is Sweep)
        let token = try #require(try Fleetgate.parseAsRoot(["token", "--user", "u", "--conn-limit", "3", "--ttl", "5m"]) as? Token)
        #expect(token.connLimit == 3 && token.ttl.duration == .seconds(300))
    }

    @Test("the environment gives Redis, the prefix and the default limit when no flag does")
    func environment() throws {
        let status = try #require(try Fleetgate.parseAsRoot(["status"]) as? Status)
        let environment = ["FLEETGATE_REDIS_URL": "redis://10.1.2.3:7000", "FLEETGATE_KEY_PREFIX": "envp", "FLEETGATE_DEFAULT_LIMIT": "7"]
        #expect(status.options.redisURL(environment) == "redis://10.1.2.3:7000")
        #expect(status.options.redisURL([:]) == "redis://127.0.0.1:6379")
        let configuration = try status.options.limiterConfiguration(environment)
        #expect(configuration.keyPrefix == "envp" && configuration.defaultLimit == 7)
        #expect(throws: OperatorError.self) { try status.options.limiterConfiguration(["FLEETGATE_DEFAULT_LIMIT": "many"]) }
    }

    @Test(
        "invalid combinations are refused before anything runs",
        arguments: [
            ["evict"], ["evict", "--user", "a", "--node", "n"], ["evict", "--connection", "c"], ["limit", "set", "a", "-1"],
            ["status", "--count", "2"], ["status", "--watch", "--count", "0"],
        ])
    func refusals(arguments: [String]) {
        #expect(throws: (any Error).self) { try Fleetgate.parseAsRoot(arguments) }
    }

    @Test("tables align their columns")
    func tables() {
        var table = TextTable("A", "LONGER", "C")
        table.add("xxxx", "y", "z")
        #expect(table.rendered == "A     LONGER  C\nxxxx  y       z")
        #expect(humanDuration(.milliseconds(950)) == "950ms")
        #expect(humanDuration(.milliseconds(4200)) == "4.2s")
        #expect(humanDuration(.seconds(185)) == "3m05s")
    }
}
