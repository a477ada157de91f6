import ArgumentParser
import Foundation
import Gateway
import TestSupport
import Testing

@testable import fleetgate

/// `docker-compose.yml` and the `Dockerfile` cannot run here (no Docker engine): `scripts/test` checks them against
/// the Compose specification and hadolint; these tests check that every command line in them is one the binary
/// accepts, with the environment the compose file gives it.
@Suite("docker-compose.yml and Dockerfile: their commands are ones fleetgate accepts")
struct ComposeFileTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func text(_ name: String) throws -> String {
        try String(contentsOf: root.appendingPathComponent(name), encoding: .utf8)
    }

    /// The JSON array after `key` on each line that has one (`command: [...]`, `CMD [...]`).
    static func arrays(in text: String, after key: String) throws -> [[String]] {
        try text.split(separator: "\n").compactMap { line -> [String]? in
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            guard trimmed.hasPrefix(key), let open = trimmed.firstIndex(of: "[") else { return nil }
            let array = try JSONSerialization.jsonObject(with: Data(trimmed[open...].utf8))
            return try #require(array as? [String], "not an array of strings: \(line)")
        }
    }

    /// The node environment of the compose file: `KEY: value` lines of the `x-node` block, `${VAR:-default}` taken
    /// at its default.
    static func nodeEnvironment(_ compose: String) -> [String: String] {
        var environment: [String: String] = [:]
        var inNode = false
        for line in compose.split(separator: "\n") {
            if line.hasPrefix("x-node:") { inNode = true } else if !line.hasPrefix(" ") && !line.isEmpty { inNode = false }
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            guard inNode, trimmed.hasPrefix("FLEETGATE_"), let colon = trimmed.firstIndex(of: ":") else { continue }
            var value = trimmed[trimmed.index(after: colon)...].trimmingCharacters(in: .whitespaces)
            if value.hasPrefix("${"), let dash = value.range(of: ":-") { value = String(value[dash.upperBound...].dropLast()) }
            environment[String(trimmed[..<colon])] = value.trimmingCharacters(in: ["\""])
        }
        return environment
    }

    @Test("every fleetgate command in docker-compose.yml parses, and serve's settings are valid with the compose environment")
    func composeCommands() throws {
        let compose = try Self.text("docker-compose.yml")
        let commands = try Self.arrays(in: compose, after: "command:").filter { $0.first != "redis-server" }
        #expect(commands.filter { $0.first == "serve" }.count == 3, "three gateway nodes")
        #expect(commands.contains { $0.first == "loadgen" }, "a loadgen service")
        let environment = Self.nodeEnvironment(compose)
        #expect(environment["FLEETGATE_REDIS_URL"] == "redis://redis:6379")
        for command in commands {
            let parsed = try Fleetgate.parseAsRoot(command)
            if let serve = parsed as? Serve {
                let settings = try ServeSettings(serve, environment: environment)
                #expect(settings.gateway.host == "0.0.0.0")
                #expect(settings.redisURL == "redis://redis:6379")
            }
            if let loadgen = parsed as? Loadgen {
                _ = try loadgen.makeConfiguration(environment: environment)
                #expect(loadgen.urls.count == 3)
            }
        }
        // Redis must not evict entries (an evicted entry would undercount a user).
        let redis = try Self.arrays(in: compose, after: "command:").first { $0.first == "redis-server" }
        #expect(redis?.contains("noeviction") == true)
        #expect(compose.contains("/readyz"), "health checks on /readyz")
    }

    @Test("the Dockerfile builds the fleetgate product, copies what it needs, and runs a command the binary accepts")
    func dockerfile() throws {
        let dockerfile = try Self.text("Dockerfile")
        #expect(dockerfile.contains("swift build -c release --product fleetgate"))
        #expect(try Self.text("Package.swift").contains(#".executable(name: "fleetgate""#))
        // The Lua scripts travel in this resource bundle, which SwiftPM puts beside the binary.
        let bundle = "fleetgate_ConnectionLimiter.resources"
        #expect(dockerfile.contains(bundle))
        let binary = try GatewayProcess.fleetgateExecutable()
        #expect(FileManager.default.fileExists(atPath: binary.deletingLastPathComponent().appendingPathComponent(bundle).path))
        #expect(try Self.arrays(in: dockerfile, after: "ENTRYPOINT") == [["fleetgate"]])
        let command = try #require(try Self.arrays(in: dockerfile, after: "CMD").last)
        let serve = try #require(try Fleetgate.parseAsRoot(command) as? Serve)
        let settings = try ServeSettings(serve, environment: ["FLEETGATE_JWT_SECRET": String(repeating: "s", count: 32)])
        #expect(settings.gateway.port == 8080)
        #expect(dockerfile.contains("libhiredis"))
    }
}
