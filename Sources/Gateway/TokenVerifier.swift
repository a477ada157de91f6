import Foundation
import JWTKit

/// Who a WebSocket client is, from its token.
public struct GatewayIdentity: Sendable, Hashable {
    /// The user id (the token's `sub`).
    public var user: String
    /// The user's limit from the token's `conn_limit` claim, if it has one (a Redis override still wins).
    public var connectionLimit: Int?
}

/// Why a token was refused: every check names itself, so the 401 body can say which one failed.
public struct TokenError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The check that failed.
    public struct Check: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// No token in `Authorization: Bearer …` nor `?access_token=…`.
        public static let missing = Check("missing")
        /// Not three base64url parts with a JSON header and payload.
        public static let malformed = Check("malformed")
        /// The header's `alg` is not the one this gateway accepts (`none`, or HS/RS confusion).
        public static let algorithm = Check("algorithm")
        /// The signature does not verify with the configured key.
        public static let signature = Check("signature")
        /// `exp` is missing or in the past (beyond the leeway).
        public static let expired = Check("expired")
        /// `nbf` is in the future (beyond the leeway).
        public static let notYetValid = Check("not_yet_valid")
        /// `sub` is missing or empty.
        public static let subject = Check("subject")
        /// `conn_limit` is not an integer from 0 to 1,000,000.
        public static let connectionLimit = Check("conn_limit")

        public var description: String { name }
    }

    /// The check that failed.
    public var check: Check
    /// A sentence for the client and the logs (never the token itself).
    public var message: String

    public var description: String { "token refused (\(check)): \(message)" }
}

/// Verifies client tokens: a JWT signed with HS256 (a shared secret) or RS256/ES256 (a PEM public key), with the
/// algorithm pinned to the configured one, `exp` required and `nbf` honoured with a small leeway.
public struct TokenVerifier: Sendable {
    /// The key tokens must be signed with; it also fixes the one algorithm accepted.
    public enum Key: Sendable {
        /// HS256 with this shared secret.
        case hs256(secret: String)
        /// RS256 with this PEM public key.
        case rs256(publicKeyPEM: String)
        /// ES256 with this PEM public key.
        case es256(publicKeyPEM: String)

        var algorithm: String {
            switch self {
            case .hs256: return "HS256"
            case .rs256: return "RS256"
            case .es256: return "ES256"
            }
        }
    }

    /// The shortest HS256 secret accepted: as long as the hash (RFC 7518 §3.2).
    public static let minimumSecretBytes = 32

    let keys: JWTKeyCollection
    /// The only `alg` accepted.
    public let algorithm: String
    /// Clock tolerance for `exp` and `nbf`. Defaults to 30 seconds.
    public let leeway: Duration

    /// Creates a verifier for `key`.
    /// - Throws: when the key cannot be used (an empty secret, a PEM that is not a public key of that kind).
    public init(key: Key, leeway: Duration = .seconds(30)) async throws {
        let keys = JWTKeyCollection()
        switch key {
        case .hs256(let secret):
            // RFC 7518: an HS256 key must be at least as long as the hash (32 bytes); jwt-kit traps on shorter ones.
            guard secret.utf8.count >= Self.minimumSecretBytes else {
                throw TokenError(
                    check: .signature, message: "the HS256 secret has \(secret.utf8.count) bytes; it needs at least \(Self.minimumSecretBytes)")
            }
            await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        case .rs256(let pem):
            await keys.add(rsa: try Insecure.RSA.PublicKey(pem: pem), digestAlgorithm: .sha256)
        case .es256(let pem):
            await keys.add(ecdsa: try ES256PublicKey(pem: pem))
        }
        self.keys = keys
        self.algorithm = key.algorithm
        self.leeway = leeway
    }

    /// Checks `token` and returns who it names.
    /// - Throws: ``TokenError`` naming the check that failed.
    public func verify(_ token: String?, now: Date = Date()) async throws(TokenError) -> GatewayIdentity {
        guard let token, !token.isEmpty else {
            throw TokenError(check: .missing, message: "no token: send Authorization: Bearer <jwt> or ?access_token=<jwt>")
        }
        let header = try Self.header(of: token)
        guard let alg = header["alg"] as? String, alg == algorithm else {
            let found = (header["alg"] as? String).map { "\"\($0)\"" } ?? "no alg"
            throw TokenError(check: .algorithm, message: "the token's algorithm is \(found); this gateway accepts \(algorithm) only")
        }
        // The signature first, with no claim read: a forged token learns nothing about our claim checks.
        do {
            _ = try await keys.verify(token, as: SignatureOnly.self)
        } catch {
            throw TokenError(check: .signature, message: "the signature does not verify with the configured \(algorithm) key")
        }
        let payload = try Self.claims(of: token)
        let seconds = Double(leeway.components.seconds) + Double(leeway.components.attoseconds) / 1e18
        guard let expiry = payload.exp?.value else {
            throw TokenError(check: .expired, message: "the token has no exp claim")
        }
        guard expiry.addingTimeInterval(seconds) > now else {
            throw TokenError(check: .expired, message: "the token expired at \(ISO8601DateFormatter().string(from: expiry))")
        }
        if let notBefore = payload.nbf?.value, notBefore.addingTimeInterval(-seconds) > now {
            throw TokenError(check: .notYetValid, message: "the token is valid from \(ISO8601DateFormatter().string(from: notBefore)) only")
        }
        guard let subject = payload.sub?.value, !subject.isEmpty else {
            throw TokenError(check: .subject, message: "the token has no sub (user id)")
        }
        if let limit = payload.connLimit, !(0...1_000_000).contains(limit) {
            throw TokenError(check: .connectionLimit, message: "conn_limit \(limit) must be between 0 and 1000000")
        }
        return GatewayIdentity(user: subject, connectionLimit: payload.connLimit)
    }

    /// The JSON header, decoded without trusting it (to pin the algorithm before verifying).
    static func header(of token: String) throws(TokenError) -> [String: Any] {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3 else {
            throw TokenError(check: .malformed, message: "a JWT has three dot-separated parts, this one has \(parts.count)")
        }
        guard let data = base64URLDecoded(parts[0]), let object = try? JSONSerialization.jsonObject(with: data),
            let header = object as? [String: Any]
        else {
            throw TokenError(check: .malformed, message: "the token's header is not base64url-encoded JSON")
        }
        return header
    }

    /// One base64url part of a JWT (no padding), decoded.
    static func base64URLDecoded(_ part: Substring) -> Data? {
        var base64 = part.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        base64 += String(repeating: "=", count: (4 - base64.count % 4) % 4)
        return Data(base64Encoded: base64)
    }

    /// The claims of a token whose signature verified; a claim of the wrong type fails its own check.
    static func claims(of token: String) throws(TokenError) -> Claims {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard let data = base64URLDecoded(parts[1]) else {
            throw TokenError(check: .malformed, message: "the token's payload is not base64url-encoded")
        }
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .secondsSince1970  // NumericDate, as jwt-kit reads it
        do {
            return try decoder.decode(Claims.self, from: data)
        } catch let DecodingError.typeMismatch(_, context), let DecodingError.dataCorrupted(context) {
            switch context.codingPath.first?.stringValue {
            case "conn_limit"?:
                throw TokenError(check: .connectionLimit, message: "conn_limit must be an integer between 0 and 1000000")
            case "sub"?:
                throw TokenError(check: .subject, message: "the token's sub (user id) must be a string")
            case let claim?:
                throw TokenError(check: .malformed, message: "the token's \(claim) claim has the wrong type (exp and nbf are NumericDates)")
            case nil:
                throw TokenError(check: .malformed, message: "the token's payload is not a JSON object")
            }
        } catch {
            throw TokenError(check: .malformed, message: "the token's payload cannot be read: \(error)")
        }
    }

    /// What the signature check decodes: nothing (claims are read by ``claims(of:)``).
    struct SignatureOnly: JWTPayload {
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    /// The claims read from a token; time checks are done by ``verify(_:now:)`` with the leeway.
    struct Claims: JWTPayload {
        var sub: SubjectClaim?
        var exp: ExpirationClaim?
        var nbf: NotBeforeClaim?
        var connLimit: Int?

        enum CodingKeys: String, CodingKey {
            case sub, exp, nbf
            case connLimit = "conn_limit"
        }

        init(from decoder: any Decoder) throws {
            let container = try decoder.container(keyedBy: CodingKeys.self)
            sub = try container.decodeIfPresent(SubjectClaim.self, forKey: .sub)
            exp = try container.decodeIfPresent(ExpirationClaim.self, forKey: .exp)
            nbf = try container.decodeIfPresent(NotBeforeClaim.self, forKey: .nbf)
            // A JSON number with no fraction (5 and 5.0 alike); "5", 1.5 and 1e30 are not limits.
            if container.contains(.connLimit), try !container.decodeNil(forKey: .connLimit) {
                guard let number = try? container.decode(Double.self, forKey: .connLimit), number == number.rounded(), abs(number) < 1e15 else {
                    throw DecodingError.typeMismatch(
                        Int.self, .init(codingPath: [CodingKeys.connLimit], debugDescription: "conn_limit is not an integer"))
                }
                connLimit = Int(number)
            }
        }

        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }
}
