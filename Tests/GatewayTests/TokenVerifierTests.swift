import Foundation
import JWTKit
import Testing

@testable import Gateway

@Suite("Token verification")
struct TokenVerifierTests {
    let secret = "a-test-secret-of-at-least-32-bytes!"

    struct Claims: JWTPayload {
        var sub: SubjectClaim?
        var exp: ExpirationClaim?
        var nbf: NotBeforeClaim?
        var conn_limit: Int?
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    private func sign(_ claims: Claims, secret: String? = nil) async throws -> String {
        let secret = secret ?? self.secret
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        return try await keys.sign(claims)
    }

    /// Claims of any JSON type, as a sloppy or hostile issuer might sign them.
    struct LooseClaims: JWTPayload {
        struct Key: CodingKey {
            var stringValue: String
            var intValue: Int? { nil }
            init(stringValue: String) { self.stringValue = stringValue }
            init?(intValue: Int) { nil }
        }
        enum Value { case string(String), number(Double) }
        var fields: [String: Value]

        init(_ fields: [String: Value]) { self.fields = fields }
        init(from decoder: any Decoder) throws { fields = [:] }
        func encode(to encoder: any Encoder) throws {
            var container = encoder.container(keyedBy: Key.self)
            for (name, value) in fields {
                switch value {
                case .string(let text): try container.encode(text, forKey: Key(stringValue: name))
                case .number(let number): try container.encode(number, forKey: Key(stringValue: name))
                }
            }
        }
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    private func sign(loose claims: LooseClaims) async throws -> String {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        return try await keys.sign(claims)
    }

    private func base64url(_ text: String) -> String {
        Data(text.utf8).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    private func expectRefusal(_ token: String?, _ check: TokenError.Check, sourceLocation: SourceLocation = #_sourceLocation) async throws {
        let verifier = try await TokenVerifier(key: .hs256(secret: secret), leeway: .seconds(5))
        do {
            let identity = try await verifier.verify(token)
            Issue.record("accepted: \(identity)", sourceLocation: sourceLocation)
        } catch {
            #expect(error.check == check, "\(error)", sourceLocation: sourceLocation)
            if let token, token.count > 20 { #expect(!error.message.contains(token), sourceLocation: sourceLocation) }
        }
    }

    @Test("a valid HS256 token gives the user and its conn_limit")
    func valid() async throws {
        let token = try await sign(Claims(sub: "alice", exp: .init(value: Date().addingTimeInterval(60)), conn_limit: 5))
        let identity = try await TokenVerifier(key: .hs256(secret: secret)).verify(token)
        #expect(identity == GatewayIdentity(user: "alice", connectionLimit: 5))
    }

    @Test("missing, malformed, expired, not-yet-valid, subject-less and bad-limit tokens are refused, each by its own check")
    func refusals() async throws {
        try await expectRefusal(nil, .missing)
        try await expectRefusal("", .missing)
        try await expectRefusal("abc.def", .malformed)
        try await expectRefusal("!!!.e30.x", .malformed)
        let expired = try await sign(Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(-60))))
        try await expectRefusal(expired, .expired)
        let noExpiry = try await sign(Claims(sub: "a"))
        try await expectRefusal(noExpiry, .expired)
        let early = try await sign(
            Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(600)), nbf: .init(value: Date().addingTimeInterval(300))))
        try await expectRefusal(early, .notYetValid)
        let anonymous = try await sign(Claims(exp: .init(value: Date().addingTimeInterval(60))))
        try await expectRefusal(anonymous, .subject)
        let huge = try await sign(Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(60)), conn_limit: 2_000_000))
        try await expectRefusal(huge, .connectionLimit)
    }

    @Test("a signed claim of the wrong type fails its own check, not the signature's")
    func wrongClaimTypes() async throws {
        let later = LooseClaims.Value.number(Date().addingTimeInterval(600).timeIntervalSince1970)
        try await expectRefusal(
            try await sign(loose: LooseClaims(["sub": .string("a"), "exp": later, "conn_limit": .string("5")])), .connectionLimit)
        try await expectRefusal(
            try await sign(loose: LooseClaims(["sub": .string("a"), "exp": later, "conn_limit": .number(1.5)])), .connectionLimit)
        try await expectRefusal(try await sign(loose: LooseClaims(["sub": .number(42), "exp": later])), .subject)
        try await expectRefusal(try await sign(loose: LooseClaims(["sub": .string("a"), "exp": .string("tomorrow")])), .malformed)
        let fine = try await sign(loose: LooseClaims(["sub": .string("a"), "exp": later, "conn_limit": .number(5)]))
        let identity = try await TokenVerifier(key: .hs256(secret: secret)).verify(fine)
        #expect(identity == GatewayIdentity(user: "a", connectionLimit: 5))
    }

    @Test("ES256 with a PEM public key: its tokens pass, an HS256 token signed with the PEM text as secret does not")
    func es256() async throws {
        let privateKey = ES256PrivateKey()
        let pem = privateKey.publicKey.pemRepresentation
        let signer = JWTKeyCollection()
        await signer.add(ecdsa: privateKey)
        let token = try await signer.sign(Claims(sub: "eve", exp: .init(value: Date().addingTimeInterval(60))))
        let verifier = try await TokenVerifier(key: .es256(publicKeyPEM: pem))
        #expect(try await verifier.verify(token).user == "eve")
        // Key confusion: an HS256 token whose secret is the public key's PEM must not pass.
        let confused = try await sign(Claims(sub: "eve", exp: .init(value: Date().addingTimeInterval(60))), secret: pem)
        await #expect(throws: TokenError.self) { try await verifier.verify(confused) }
    }

    @Test("a short HS256 secret is refused at start-up")
    func shortSecret() async throws {
        await #expect(throws: TokenError.self) { try await TokenVerifier(key: .hs256(secret: "short")) }
    }

    @Test("clock skew within the leeway is tolerated")
    func leeway() async throws {
        let justExpired = try await sign(Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(-2))))
        let identity = try await TokenVerifier(key: .hs256(secret: secret), leeway: .seconds(5)).verify(justExpired)
        #expect(identity.user == "a")
    }

    @Test("a wrong signature, alg none, and an RS256 header on an HS256 gateway are refused")
    func algorithmAndSignature() async throws {
        let forged = try await sign(Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(60))), secret: "another-secret-of-at-least-32-bytes")
        try await expectRefusal(forged, .signature)
        let payload = base64url(#"{"sub":"a","exp":\#(Int(Date().timeIntervalSince1970) + 60)}"#)
        try await expectRefusal(base64url(#"{"alg":"none","typ":"JWT"}"#) + "." + payload + ".", .algorithm)
        let valid = try await sign(Claims(sub: "a", exp: .init(value: Date().addingTimeInterval(60))))
        let parts = valid.split(separator: ".")
        try await expectRefusal(base64url(#"{"alg":"RS256","typ":"JWT"}"#) + "." + parts[1] + "." + parts[2], .algorithm)
    }
}
