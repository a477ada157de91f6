import ArgumentParser
import ConnectionLimiter
import Foundation
import Gateway
import LoadGenerator

/// `fleetgate token`: mint an HS256 client token for trying a fleet.
struct Token: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Mint an HS256 client token (JWT) that `serve --jwt-secret` accepts, for trying things.")

    @Option(help: "The HS256 secret the nodes use, at least 32 bytes. [env: FLEETGATE_JWT_SECRET]") var secret: String?
    @Option(help: "The user (the token's sub).") var user: String
    @Option(help: "Lifetime, e.g. 30m, 1h (ms, s, m or h).") var ttl = DurationArgument(.seconds(3600))
    @Option(help: "A conn_limit claim: this user's limit for the connections the token opens (a Redis override still wins).")
    var connLimit: Int?
    @Flag(help: "Print JSON (token, user, expiry) instead of the bare token.") var json = false

    struct Report: Codable {
        var token: String
        var user: String
        var expiresAt: String
    }

    func run() async throws {
        guard let secret = secret ?? ProcessInfo.processInfo.environment["FLEETGATE_JWT_SECRET"].flatMap({ $0.isEmpty ? nil : $0 }) else {
            throw OperatorError("no secret: pass --secret or set FLEETGATE_JWT_SECRET (the same the nodes use)")
        }
        guard secret.utf8.count >= TokenVerifier.minimumSecretBytes else {
            throw OperatorError("the HS256 secret must be at least \(TokenVerifier.minimumSecretBytes) bytes (it has \(secret.utf8.count))")
        }
        let lifetime = ttl.duration
        guard lifetime > .zero else { throw OperatorError("invalid --ttl 0: a token must live a while, e.g. 30m") }
        do {
            _ = try UserID(user)
        } catch {
            throw OperatorError(error.message)
        }
        if let connLimit, !(0...1_000_000).contains(connLimit) {
            throw OperatorError("--conn-limit must be from 0 to 1000000, got \(connLimit)")
        }
        let now = Date()
        let expiry = now.addingTimeInterval(Double(wholeMilliseconds(lifetime)) / 1000)
        let token = try await ClientTokens(secret: secret).mint(user: user, expiry: expiry, connectionLimit: connLimit)
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            let report = Report(token: token, user: user, expiresAt: ISO8601DateFormatter().string(from: expiry))
            FileHandle.standardOutput.write(try encoder.encode(report) + Data("\n".utf8))
        } else {
            print(token)
        }
    }
}
