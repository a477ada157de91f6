import NIOCore
import Testing

@testable import RedisClient

@Suite("RESP encoding and decoding (hiredis)")
struct RESPTests {
    @Test("commands are encoded as RESP arrays of bulk strings, binary-safe")
    func encodeBinarySafe() throws {
        var buffer = ByteBuffer()
        let binary: [UInt8] = [0x00, 0x0D, 0x0A, 0xFF, 0xFE]
        try Hiredis.encode(RedisCommand("SET", "k", binary), into: &buffer)
        let expected: [UInt8] = Array("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\n".utf8) + binary + Array("\r\n".utf8)
        #expect(Array(buffer.readableBytesView) == expected)
    }

    @Test("empty arguments and numbers encode as bulk strings")
    func encodeEmptyAndNumbers() throws {
        var buffer = ByteBuffer()
        try Hiredis.encode(RedisCommand("ECHO", "", -42, 1.5), into: &buffer)
        #expect(String(buffer: buffer) == "*4\r\n$4\r\nECHO\r\n$0\r\n\r\n$3\r\n-42\r\n$3\r\n1.5\r\n")
    }

    @Test("a command without a name is refused")
    func encodeEmptyCommand() {
        var command = RedisCommand("X")
        command.storage = []
        command.lengths = []
        var buffer = ByteBuffer()
        #expect(throws: RedisError.self) { try Hiredis.encode(command, into: &buffer) }
    }

    @Test("the reader decodes every reply type, fed one byte at a time")
    func decodeAllTypes() throws {
        let wire = "+OK\r\n-ERR bad thing\r\n:-7\r\n$3\r\na\0b\r\n$-1\r\n*-1\r\n*2\r\n*1\r\n:1\r\n$0\r\n\r\n"
        let reader = Hiredis.Reader()
        var replies: [RESPValue] = []
        for byte in Array(wire.utf8) {
            try reader.feed(ByteBuffer(bytes: [byte]))
            while let reply = try reader.next() { replies.append(reply) }
        }
        #expect(
            replies == [
                .simpleString("OK"),
                .error("ERR bad thing"),
                .integer(-7),
                .bulkString([0x61, 0x00, 0x62]),
                .null,
                .null,
                .array([.array([.integer(1)]), .bulkString([])]),
            ])
    }

    @Test("garbage is a protocol error")
    func decodeGarbage() throws {
        let reader = Hiredis.Reader()
        try? reader.feed(ByteBuffer(string: "!nonsense\r\n"))
        #expect(throws: RedisError.self) { _ = try reader.next() }
    }

    @Test("RESPValue accessors")
    func accessors() {
        #expect(RESPValue.bulkString(Array("12".utf8)).int == 12)
        #expect(RESPValue.integer(5).string == "5")
        #expect(RESPValue.null.isNull)
        #expect(RESPValue.array([.integer(1)]).array == [.integer(1)])
        #expect(RESPValue.simpleString("OK").bytes == Array("OK".utf8))
        #expect(RESPValue.error("x").string == nil)
    }

    @Test("the script SHA1 is computed locally and matches Redis's")
    func scriptSHA() {
        #expect(RedisScript("return 1").sha1 == "e0e1f9fabfc9d4800c877a703b823ac0578ff8db")
    }

    @Test("error replies map to codes by their prefix")
    func errorCodes() {
        #expect(RedisError.serverReply("NOSCRIPT No matching script", address: nil).code == .noScript)
        #expect(RedisError.serverReply("MOVED 3999 127.0.0.1:6381", address: nil).code == .moved)
        #expect(RedisError.serverReply("ASK 3999 127.0.0.1:6381", address: nil).code == .ask)
        #expect(RedisError.serverReply("BUSY Redis is busy", address: nil).code == .busy)
        #expect(RedisError.serverReply("LOADING loading", address: nil).code == .loading)
        #expect(RedisError.serverReply("WRONGTYPE Operation", address: nil).code == .wrongType)
        #expect(RedisError.serverReply("WRONGPASS invalid", address: nil).code == .authenticationFailed)
        let other = RedisError.serverReply("ERR unknown command", address: "h:1")
        #expect(other.code == .server)
        #expect(other.serverErrorPrefix == "ERR")
        #expect(other.message.contains("h:1"))
    }
}
