/// One reply from Redis, as the RESP2 protocol types it.
///
/// Bulk strings are bytes: Redis values are binary-safe, so a value with a NUL byte, a CRLF or invalid UTF-8
/// comes back exactly as it was written. Use ``string`` when you know the value is text.
public enum RESPValue: Sendable, Hashable {
    /// A status reply such as `OK` or `PONG`.
    case simpleString(String)
    /// An error reply inside an array (for example one failed command of a `MULTI`/`EXEC`). A top-level error reply
    /// is thrown as a ``RedisError`` with code ``RedisError/Code/server`` (or a more precise code) instead.
    case error(String)
    /// An integer reply.
    case integer(Int64)
    /// A bulk string: arbitrary bytes.
    case bulkString([UInt8])
    /// The nil reply (a missing key, a nil bulk string or a nil array).
    case null
    /// An array reply; elements may be arrays themselves.
    case array([RESPValue])
}

extension RESPValue {
    /// The value as text: a simple string, or a bulk string decoded as UTF-8 (invalid sequences are repaired with
    /// U+FFFD); an integer is formatted in decimal. `nil` for null, arrays and errors.
    public var string: String? {
        switch self {
        case .simpleString(let s): return s
        case .bulkString(let bytes): return String(decoding: bytes, as: UTF8.self)
        case .integer(let i): return String(i)
        case .null, .array, .error: return nil
        }
    }

    /// The raw bytes of a bulk or simple string; `nil` otherwise.
    public var bytes: [UInt8]? {
        switch self {
        case .bulkString(let bytes): return bytes
        case .simpleString(let s): return Array(s.utf8)
        default: return nil
        }
    }

    /// The value as an integer: an integer reply, or a string that holds a decimal integer; `nil` otherwise.
    public var int: Int? {
        switch self {
        case .integer(let i): return Int(exactly: i)
        case .bulkString, .simpleString: return string.flatMap { Int($0) }
        default: return nil
        }
    }

    /// The elements of an array reply; `nil` otherwise.
    public var array: [RESPValue]? {
        if case .array(let values) = self { return values }
        return nil
    }

    /// Whether this is the nil reply.
    public var isNull: Bool {
        if case .null = self { return true }
        return false
    }
}

extension RESPValue: CustomStringConvertible {
    /// A short, human-readable rendering (bulk strings shown as text when they are valid UTF-8).
    public var description: String {
        switch self {
        case .simpleString(let s): return s
        case .error(let e): return "(error) \(e)"
        case .integer(let i): return "(integer) \(i)"
        case .bulkString(let bytes):
            if let text = String(validating: bytes, as: UTF8.self) { return "\"\(text)\"" }
            return "<\(bytes.count) bytes>"
        case .null: return "(nil)"
        case .array(let values): return "[" + values.map(\.description).joined(separator: ", ") + "]"
        }
    }
}
