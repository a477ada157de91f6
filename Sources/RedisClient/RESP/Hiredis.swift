internal import CHiredis
import NIOCore

/// The thin layer over hiredis: RESP encoding with `redisFormatSdsCommandArgv`, decoding with a `redisReader`.
///
/// `redisFormatSdsCommandArgv` is `redisFormatCommandArgv`'s twin that formats lengths with hiredis's own `sdscatfmt`
/// instead of a libc `sprintf` per argument; the bytes are the same (see `RESPTests`).
/// Nothing here leaks a C type to callers.
enum Hiredis {
    /// Encodes `command` as RESP and appends it to `buffer`.
    static func encode(_ command: RedisCommand, into buffer: inout ByteBuffer) throws(RedisError) {
        let _: Void = try withEncoded(command) { buffer.writeBytes($0) }
    }

    /// Encodes `command` as RESP with hiredis and lends the bytes to `body`.
    static func withEncoded<T>(_ command: RedisCommand, _ body: (UnsafeRawBufferPointer) -> T) throws(RedisError) -> T {
        let count = command.lengths.count
        guard count > 0, count <= Int(Int32.max) else {
            throw RedisError(code: .invalidArgument, message: "a Redis command needs a name and at most \(Int32.max) arguments")
        }
        var target: sds? = nil
        let length: Int32 = command.storage.withUnsafeBufferPointer { storage in
            command.lengths.withUnsafeBufferPointer { lengths in
                withUnsafeTemporaryAllocation(of: UnsafePointer<CChar>?.self, capacity: count) { argv in
                    // An empty argument still needs a valid pointer.
                    let base = UnsafeRawPointer(storage.baseAddress ?? UnsafePointer(bitPattern: 1)!)
                    var offset = 0
                    for index in 0..<count {
                        argv[index] = (base + offset).assumingMemoryBound(to: CChar.self)
                        offset += lengths[index]
                    }
                    return redisFormatSdsCommandArgv(&target, Int32(count), argv.baseAddress, lengths.baseAddress)
                }
            }
        }
        guard length >= 0, let target else {
            throw RedisError(code: .invalidArgument, message: "hiredis could not encode command \(command.name) (out of memory)")
        }
        defer { redisFreeSdsCommand(target) }
        return body(UnsafeRawBufferPointer(start: target, count: Int(length)))
    }

    /// A RESP decoder: feed it bytes as they arrive, take complete replies out.
    /// Not thread-safe: one per connection, used on that connection's event loop.
    final class Reader {
        private let reader: UnsafeMutablePointer<redisReader>

        init() {
            guard let reader = redisReaderCreate() else { fatalError("hiredis: redisReaderCreate failed (out of memory)") }
            // Keep up to 64 KiB of buffer between replies instead of hiredis's 16 KiB, to avoid reallocating under load.
            fg_reader_set_maxbuf(reader, 64 * 1024)
            self.reader = reader
        }

        deinit { redisReaderFree(reader) }

        /// Feeds received bytes.
        func feed(_ bytes: ByteBuffer) throws(RedisError) {
            let status = bytes.withUnsafeReadableBytes { raw in
                redisReaderFeed(reader, raw.baseAddress?.assumingMemoryBound(to: CChar.self), raw.count)
            }
            if status != REDIS_OK { throw protocolError() }
        }

        /// The next complete reply, or `nil` when more bytes are needed.
        func next() throws(RedisError) -> RESPValue? {
            var reply: UnsafeMutableRawPointer? = nil
            guard redisReaderGetReply(reader, &reply) == REDIS_OK else { throw protocolError() }
            guard let reply else { return nil }
            defer { freeReplyObject(reply) }
            return Self.convert(reply.assumingMemoryBound(to: redisReply.self))
        }

        private func protocolError() -> RedisError {
            let text = String(cString: fg_reader_errstr(reader))
            return RedisError(code: .protocolError, message: "invalid RESP from server: \(text)")
        }

        private static func convert(_ reply: UnsafeMutablePointer<redisReply>) -> RESPValue {
            let r = reply.pointee
            switch r.type {
            case REDIS_REPLY_STRING:
                return .bulkString(Array(UnsafeRawBufferPointer(start: r.str, count: r.len)))
            case REDIS_REPLY_STATUS:
                return .simpleString(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
            case REDIS_REPLY_ERROR:
                return .error(String(decoding: UnsafeRawBufferPointer(start: r.str, count: r.len), as: UTF8.self))
            case REDIS_REPLY_INTEGER:
                return .integer(r.integer)
            case REDIS_REPLY_NIL:
                return .null
            case REDIS_REPLY_ARRAY:
                var values: [RESPValue] = []
                values.reserveCapacity(r.elements)
                for index in 0..<r.elements {
                    if let element = r.element[index] { values.append(convert(element)) } else { values.append(.null) }
                }
                return .array(values)
            default:
                return .null
            }
        }
    }
}
