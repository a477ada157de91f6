import Foundation
import JWTKit

/// Mints HS256 client tokens as `fleetgate serve --jwt-secret` verifies them (`sub`, `exp`, `iat`, optional
/// `conn_limit`): for the load generator and `fleetgate token`.
public struct ClientTokens: Sendable {
    struct Claims: JWTPayload {
        var sub: SubjectClaim
        var exp: ExpirationClaim
        var iat: IssuedAtClaim
        var conn_limit: Int?
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    private let keys: JWTKeyCollection

    /// Keys for `secret` (the fleet's HS256 secret).
    public init(secret: String) async {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        self.keys = keys
    }

    /// A token for `user`, valid until `expiry`, with a `conn_limit` claim when `connectionLimit` is given.
    public func mint(user: String, expiry: Date, connectionLimit: Int? = nil) async throws -> String {
        try await keys.sign(Claims(sub: .init(value: user), exp: .init(value: expiry), iat: .init(value: Date()), conn_limit: connectionLimit))
    }
}
