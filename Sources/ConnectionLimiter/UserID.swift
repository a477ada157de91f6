/// An application user id, validated and escaped for use in Redis keys.
///
/// Any UTF-8 text of 1 to 256 bytes is accepted. In keys, `%`, `{`, `}` and control characters are percent-escaped,
/// so every key of a user stays in that user's Redis Cluster hash slot (`{u:<escaped>}`) and two different ids never
/// share a key. Longer or empty ids are refused, never truncated.
///
/// **One rule for identity: ids are compared as bytes** (their UTF-8 encoding), everywhere — this type's `==` and
/// hash (the node's local table), Redis keys, logs. Nothing is normalised: "é" (U+00E9, NFC) and "e\u{301}" (NFD)
/// are two users, as Redis sees them, and as RFC 7519 compares a token's `sub` (no transformation). Swift's own
/// `String ==` would call them equal (canonical equivalence) and let the local count disagree with Redis's; an
/// application that wants them to be one user normalises its ids before they reach the limiter.
public struct UserID: Sendable, Hashable, CustomStringConvertible {
    /// The most bytes (UTF-8) an id may have.
    public static let maximumBytes = 256

    /// The id as the application gave it.
    public let rawValue: String
    /// The escaped form used in keys and messages.
    public let escaped: String

    /// Validates and escapes `rawValue`.
    /// - Throws: ``LimiterError`` with code ``LimiterError/Code/invalidUser`` when empty or longer than 256 bytes.
    public init(_ rawValue: String) throws(LimiterError) {
        let bytes = rawValue.utf8.count
        guard bytes > 0 else {
            throw LimiterError(code: .invalidUser, message: "user id is empty")
        }
        guard bytes <= Self.maximumBytes else {
            throw LimiterError(
                code: .invalidUser, message: "user id is \(bytes) bytes long; the limit is \(Self.maximumBytes) (ids are never truncated)")
        }
        self.rawValue = rawValue
        self.escaped = Self.escape(rawValue)
    }

    /// Rebuilds an id from its escaped form (as found in keys and the users index); `nil` if it is not one.
    public init?(escaped: String) {
        guard let raw = Self.unescape(escaped), let id = try? UserID(raw), id.escaped.utf8.elementsEqual(escaped.utf8) else { return nil }
        self = id
    }

    public var description: String { rawValue }

    // Bytes, not Swift's canonical equivalence (see the type's documentation). The escaped form is a one-to-one
    // image of the raw bytes, so comparing it is comparing them.
    public static func == (lhs: UserID, rhs: UserID) -> Bool { lhs.escaped.utf8.elementsEqual(rhs.escaped.utf8) }
    public func hash(into hasher: inout Hasher) {
        var escaped = escaped
        escaped.withUTF8 { hasher.combine(bytes: UnsafeRawBufferPointer($0)) }
    }

    static func escape(_ text: String) -> String {
        var out: [UInt8] = []
        out.reserveCapacity(text.utf8.count)
        let hex = Array("0123456789ABCDEF".utf8)
        for byte in text.utf8 {
            switch byte {
            case UInt8(ascii: "%"), UInt8(ascii: "{"), UInt8(ascii: "}"), 0..<0x20, 0x7F:
                out += [UInt8(ascii: "%"), hex[Int(byte >> 4)], hex[Int(byte & 0xF)]]
            default:
                out.append(byte)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    static func unescape(_ text: String) -> String? {
        var out: [UInt8] = []
        var iterator = text.utf8.makeIterator()
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                out.append(byte)
                continue
            }
            guard let high = iterator.next(), let low = iterator.next(),
                let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16)
            else { return nil }
            out.append(value)
        }
        return String(validating: out, as: UTF8.self)
    }
}

/// Validates connection ids: 1 to 64 characters of `A-Z a-z 0-9 _ - .` (they are part of every member in Redis).
enum ConnectionIDs {
    static let maximumLength = 64
    private static let alphabet = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz".utf8)

    static func validate(_ id: String) throws(LimiterError) {
        let ok =
            !id.isEmpty && id.utf8.count <= maximumLength
            && id.utf8.allSatisfy { byte in
                (byte >= 0x30 && byte <= 0x39) || (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                    || byte == UInt8(ascii: "_") || byte == UInt8(ascii: "-") || byte == UInt8(ascii: ".")
            }
        guard ok else {
            throw LimiterError(
                code: .invalidConnection,
                message: "connection id \"\(id.prefix(80))\" must be 1 to \(maximumLength) characters of A-Z a-z 0-9 _ - ."
            )
        }
    }

    /// A random base62 id of `length` characters (node incarnations use 8: about 2^47 values).
    static func random(length: Int) -> String {
        var generator = SystemRandomNumberGenerator()
        return String(decoding: (0..<length).map { _ in alphabet[Int(generator.next() % 62)] }, as: UTF8.self)
    }
}
