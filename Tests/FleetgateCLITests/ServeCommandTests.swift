import ArgumentParser
import ConnectionLimiter
import Foundation
import Gateway
import TestSupport
import Testing

@testable import fleetgate

@Suite("fleetgate serve: flags, environment, start-up errors")
struct ServeCommandTests {
    let secret = "a-serve-test-secret-of-32-bytes-or-more"

    private func settings(_ arguments: [String], environment: [String: String] = [:]) throws -> ServeSettings {
        let command = try #require(try Fleetgate.parseAsRoot(["serve"] + arguments) as? Serve)
        return try ServeSettings(command, environment: environment)
    }

    @Test("defaults, and a flag wins over its environment variable")
    func precedence() throws {
        let defaults = try settings(["--jwt-secret", secret])
        #expect(defaults.gateway.host == "127.0.0.1")
        #expect(defaults.gateway.port == 8080)
        #expect(defaults.redisURL == "redis://127.0.0.1:6379")
        #expect(defaults.limiter.defaultLimit == 20)
        #expect(defaults.gateway.denyMode == .http)
        #expect(defaults.gateway.pingInterval == .seconds(15))
        #expect(defaults.gateway.adminToken == nil)

        let environment = [
            "FLEETGATE_JWT_SECRET": secret, "FLEETGATE_PORT": "9000", "FLEETGATE_REDIS_URL": "redis://10.0.0.1:6380",
            "FLEETGATE_DEFAULT_LIMIT": "5", "FLEETGATE_DENY_MODE": "close", "FLEETGATE_PING_INTERVAL": "500ms",
            "FLEETGATE_OVERFLOW": "evict-oldest",
        ]
        let fromEnvironment = try settings([], environment: environment)
        #expect(fromEnvironment.gateway.port == 9000)
        #expect(fromEnvironment.redisURL == "redis://10.0.0.1:6380")
        #expect(fromEnvironment.limiter.defaultLimit == 5)
        #expect(fromEnvironment.gateway.denyMode == .close)
        #expect(fromEnvironment.gateway.pingInterval == .milliseconds(500))
        #expect(fromEnvironment.limiter.policies.overflow == .evictOldest)

        let flagsWin = try settings(["--port", "9001", "--default-limit", "7", "--deny-mode", "http"], environment: environment)
        #expect(flagsWin.gateway.port == 9001)
        #expect(flagsWin.limiter.defaultLimit == 7)
        #expect(flagsWin.gateway.denyMode == .http)
        #expect(flagsWin.redisURL == "redis://10.0.0.1:6380")
    }

    @Test("the probe flags and their environment variables; the verify wait must leave room for the probe")
    func probeSettings() throws {
        let defaults = try settings(["--jwt-secret", secret])
        #expect(defaults.gateway.probeEnabled)
        #expect(defaults.limiter.probe.timeout == .milliseconds(500))
        #expect(defaults.gateway.probeIdle == .seconds(1))
        #expect(defaults.limiter.verifyTimeout == .seconds(1))

        let flags = try settings(["--jwt-secret", secret, "--probe-timeout", "300ms", "--probe-idle", "2s", "--verify-timeout", "800ms"])
        #expect(flags.limiter.probe.timeout == .milliseconds(300))
        #expect(flags.gateway.probeIdle == .seconds(2))
        #expect(flags.limiter.verifyTimeout == .milliseconds(800))

        let environment = [
            "FLEETGATE_JWT_SECRET": secret, "FLEETGATE_PROBE": "off", "FLEETGATE_PROBE_TIMEOUT": "200ms", "FLEETGATE_PROBE_IDLE": "0s",
        ]
        let fromEnvironment = try settings([], environment: environment)
        #expect(!fromEnvironment.gateway.probeEnabled)
        #expect(fromEnvironment.limiter.probe.timeout == .milliseconds(200))
        #expect(fromEnvironment.gateway.probeIdle == .zero)

        // The old default verify wait (250 ms) is too short for a 500 ms probe: refused, naming both flags.
        do {
            _ = try settings(["--jwt-secret", secret, "--verify-timeout", "250ms"])
            Issue.record("a verify wait shorter than the probe was accepted")
        } catch {
            #expect("\(error)".contains("--verify-timeout"))
            #expect("\(error)".contains("--probe-timeout"))
        }
        // Without the probe it is fine.
        #expect(try settings(["--jwt-secret", secret, "--verify-timeout", "250ms", "--probe", "off"]).limiter.verifyTimeout == .milliseconds(250))
    }

    @Test(
        "bad values and a missing key are refused with one clear line",
        arguments: [
            ([String](), "no token key"),
            (["--jwt-secret", "short"], "at least 32 bytes"),
            (["--jwt-secret", "a-serve-test-secret-of-32-bytes-or-more", "--jwt-public-key", "/x.pem"], "exclude each other"),
            (["--jwt-public-key", "/nonexistent/key.pem"], "cannot read the public key file"),
            (["--jwt-secret", "a-serve-test-secret-of-32-bytes-or-more", "--port", "70000"], "port 70000"),
            (["--jwt-secret", "a-serve-test-secret-of-32-bytes-or-more", "--redis", "http://x"], "Redis URL"),
            (["--jwt-secret", "a-serve-test-secret-of-32-bytes-or-more", "--node-ttl", "1s"], "nodeTTL"),
            (["--jwt-secret", "a-serve-test-secret-of-32-bytes-or-more", "--admin-token", "short"], "admin token"),
        ])
    func refuses(arguments: [String], mentions: String) throws {
        do {
            _ = try settings(arguments)
            Issue.record("accepted \(arguments)")
        } catch let error as ServeError {
            #expect(error.description.contains(mentions), "\(error)")
            #expect(!error.description.contains("\n"))
        }
    }

    @Test(
        "a flag with a value of the wrong kind is refused by the parser, naming the flag and what it takes",
        arguments: [
            (["--deny-mode", "silent"], ["--deny-mode", "http", "close"]),
            (["--overflow", "rejectNew"], ["--overflow", "reject-new", "evict-oldest"]),
            (["--on-redis-down", "maybe"], ["--on-redis-down", "local", "reject"]),
            (["--log-level", "loud"], ["--log-level", "critical"]),
            (["--ping-interval", "soon"], ["--ping-interval"]),
            (["--probe", "sometimes"], ["--probe", "on", "off"]),
            (["--port", "eighty"], ["--port"]),
        ])
    func parserRefuses(arguments: [String], mentions: [String]) {
        do {
            _ = try Fleetgate.parseAsRoot(["serve", "--jwt-secret", secret] + arguments)
            Issue.record("parsed \(arguments)")
        } catch {
            let message = Fleetgate.message(for: error)
            for phrase in mentions { #expect(message.contains(phrase), "\(message)") }
        }
    }

    @Test(
        "an environment variable with a bad value is refused in one line naming it and what it takes",
        arguments: [
            ("FLEETGATE_DENY_MODE", "silent", "one of http, close"),
            ("FLEETGATE_OVERFLOW", "rejectNew", "one of reject-new, evict-oldest"),
            ("FLEETGATE_PING_INTERVAL", "soon", "250ms"),
            ("FLEETGATE_PROBE", "sometimes", "one of on, off"),
            ("FLEETGATE_PORT", "eighty", "a whole number"),
            ("FLEETGATE_LOG_LEVEL", "loud", "critical"),
        ])
    func environmentRefuses(variable: String, value: String, mentions: String) throws {
        do {
            _ = try settings(["--jwt-secret", secret], environment: [variable: value])
            Issue.record("accepted \(variable)=\(value)")
        } catch let error as ServeError {
            #expect(error.description.contains("\(variable)=\"\(value)\""), "\(error)")
            #expect(error.description.contains(mentions), "\(error)")
            #expect(!error.description.contains("\n"))
        }
    }

    @Test("durations: ms, s, m, h and bare seconds; the same parser for flags and environment variables")
    func durations() throws {
        #expect(DurationArgument(argument: "250ms")?.duration == .milliseconds(250))
        #expect(DurationArgument(argument: "1.5s")?.duration == .milliseconds(1500))
        #expect(DurationArgument(argument: "2m")?.duration == .seconds(120))
        #expect(DurationArgument(argument: "1h")?.duration == .seconds(3600))
        #expect(DurationArgument(argument: "3")?.duration == .seconds(3))
        #expect(DurationArgument(argument: "-1s") == nil)
        #expect(DurationArgument(argument: "fast") == nil)
        #expect(DurationArgument(argument: "infs") == nil)
        #expect(try settings(["--jwt-secret", secret, "--drain-timeout", "1.5s"]).gateway.drainTimeout == .milliseconds(1500))
        #expect(try settings(["--jwt-secret", secret], environment: ["FLEETGATE_DRAIN_TIMEOUT": "1.5s"]).gateway.drainTimeout == .milliseconds(1500))
    }

    @Test("the binary: --help documents every option with its variable; a bad flag or no key stops with one line")
    func binary() async throws {
        func run(_ arguments: [String]) async throws -> (status: Int32, out: String, err: String) {
            let result = try await FleetgateCommand.run(arguments)
            return (result.status, result.out, result.err)
        }
        let help = try await run(["serve", "--help"])
        #expect(help.status == 0)
        let mirror = Mirror(reflecting: try #require(try Fleetgate.parseAsRoot(["serve"]) as? Serve))
        for child in mirror.children {
            let name = try #require(child.label).dropFirst()  // "_host" -> "host"
            // As ArgumentParser spells it: nodeName -> node-name, nodeTTL -> node-ttl.
            let flag = "--" + name.replacing(/([a-z])([A-Z]+)/) { "\($0.output.1)-\($0.output.2)" }.lowercased()
            #expect(help.out.contains(flag), "\(flag) missing from --help")
        }
        #expect(help.out.contains("FLEETGATE_REDIS_URL") && help.out.contains("FLEETGATE_JWT_SECRET"))

        let badFlag = try await run(["serve", "--no-such-flag"])
        #expect(badFlag.status != 0)
        #expect(badFlag.err.split(separator: "\n").count == 1, "\(badFlag.err)")
        #expect(badFlag.err.contains("--no-such-flag"))

        let noKey = try await run(["serve", "--port", "0"])
        #expect(noKey.status != 0)
        #expect(
            noKey.err
                == "fleetgate: no token key: set --jwt-secret (or FLEETGATE_JWT_SECRET) for HS256, or --jwt-public-key <pem file> for RS256/ES256\n")
    }
}
