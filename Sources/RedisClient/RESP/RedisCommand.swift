import NIOCore

/// A value that can be sent as one argument of a Redis command (binary-safe).
public protocol RESPArgumentConvertible: Sendable {
    /// Appends the argument's bytes.
    func appendRESPArgument(to bytes: inout [UInt8])
}

extension String: RESPArgumentConvertible {
    public func appendRESPArgument(to bytes: inout [UInt8]) { bytes.append(contentsOf: utf8) }
}

extension Substring: RESPArgumentConvertible {
    public func appendRESPArgument(to bytes: inout [UInt8]) { bytes.append(contentsOf: utf8) }
}

extension Array: RESPArgumentConvertible where Element == UInt8 {
    public func appendRESPArgument(to bytes: inout [UInt8]) { bytes.append(contentsOf: self) }
}

extension ArraySlice: RESPArgumentConvertible where Element == UInt8 {
    public func appendRESPArgument(to bytes: inout [UInt8]) { bytes.append(contentsOf: self) }
}

extension ByteBuffer: RESPArgumentConvertible {
    public func appendRESPArgument(to bytes: inout [UInt8]) { bytes.append(contentsOf: readableBytesView) }
}

extension Int: RESPArgumentConvertible {
    public func appendRESPArgument(to bytes: inout [UInt8]) { String(self).appendRESPArgument(to: &bytes) }
}

extension Int64: RESPArgumentConvertible {
    public func appendRESPArgument(to bytes: inout [UInt8]) { String(self).appendRESPArgument(to: &bytes) }
}

extension Double: RESPArgumentConvertible {
    /// Formatted the way Redis parses doubles (`inf`, `-inf` for infinities).
    public func appendRESPArgument(to bytes: inout [UInt8]) {
        if isInfinite {
            (self > 0 ? "inf" : "-inf").appendRESPArgument(to: &bytes)
        } else {
            String(self).appendRESPArgument(to: &bytes)
        }
    }
}

/// One Redis command: its name and arguments, held in one contiguous byte array.
///
/// ```swift
/// let command = RedisCommand("SET", "user:1", "alice")
/// ```
public struct RedisCommand: Sendable, Hashable {
    /// All arguments (the command name first), back to back.
    var storage: [UInt8]
    /// The length of each argument in `storage`.
    var lengths: [Int]

    /// Creates a command from its name and arguments.
    public init(_ name: String, _ arguments: any RESPArgumentConvertible...) {
        self.init(name, arguments: arguments)
    }

    /// Creates a command from its name and text arguments (no existential boxing: the fast path for hot loops).
    public init(_ name: String, strings: some Collection<String>) {
        storage = []
        lengths = []
        lengths.reserveCapacity(strings.count + 1)
        append(name)
        for argument in strings { append(argument) }
    }

    /// Creates a command from its name and an array of arguments.
    public init(_ name: String, arguments: [any RESPArgumentConvertible]) {
        storage = []
        storage.reserveCapacity(name.utf8.count + arguments.count * 16)
        lengths = []
        lengths.reserveCapacity(arguments.count + 1)
        append(name)
        for argument in arguments { append(argument) }
    }

    /// Appends one more argument.
    public mutating func append(_ argument: some RESPArgumentConvertible) {
        let before = storage.count
        argument.appendRESPArgument(to: &storage)
        lengths.append(storage.count - before)
    }

    /// Appends one more argument.
    public mutating func append(_ argument: any RESPArgumentConvertible) {
        let before = storage.count
        argument.appendRESPArgument(to: &storage)
        lengths.append(storage.count - before)
    }

    /// The command name as written (for logs and errors).
    public var name: String {
        String(decoding: storage.prefix(lengths.first ?? 0), as: UTF8.self)
    }
}

extension RedisCommand {
    /// The number of arguments after the command name.
    var argumentCount: Int { max(0, lengths.count - 1) }

    /// The bytes of argument `index` (0 is the first argument after the name).
    func argument(_ index: Int) -> ArraySlice<UInt8> {
        var start = lengths[0]
        for length in lengths[1..<(index + 1)] { start += length }
        return storage[start..<(start + lengths[index + 1])]
    }

    /// Every argument after the name, as byte slices.
    var arguments: [ArraySlice<UInt8>] {
        var result: [ArraySlice<UInt8>] = []
        result.reserveCapacity(argumentCount)
        var start = lengths.first ?? 0
        for length in lengths.dropFirst() {
            result.append(storage[start..<(start + length)])
            start += length
        }
        return result
    }
}
