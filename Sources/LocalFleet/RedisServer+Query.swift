import Foundation
import Glibc

extension RedisServer {
    /// Sends one command straight over a loopback socket (no `redis-cli` process) and returns the reply as text, as
    /// ``cli(_:)`` would print it: a status or bulk string, an integer's digits, an error reply's message
    /// (`"ERR …"`, returned like `redis-cli` prints it), `""` for nil. Array replies are refused.
    ///
    /// For the polls that wait on a cluster (`CLUSTER INFO`, `CLUSTER NODES`, `INFO replication`, every 100 ms): each
    /// `redis-cli` run is a `Process.run()`, and Foundation's on Linux scans `/proc/self/fd` with a 256-byte copy per
    /// entry that over-reads glibc's `readdir` buffer (swift-corelibs-foundation PR #5472). With thousands of sockets
    /// open — the chaos runner's load — that crashed the runner within a few launches.
    /// - Throws: ``LocalFleetError`` if the server cannot be reached or does not answer within 10 s.
    public func query(_ arguments: String...) async throws -> String {
        let port = self.port
        let address = self.address
        return try await withCheckedThrowingContinuation { continuation in
            // A thread of its own: the socket blocks (up to 10 s for a paused server), the concurrency pool must not.
            let thread = Thread {
                continuation.resume(
                    with: Result {
                        do {
                            return try Self.blockingQuery(arguments, port: port)
                        } catch {
                            throw LocalFleetError("`\(arguments.joined(separator: " "))` against \(address) failed: \(error)")
                        }
                    })
            }
            thread.start()
        }
    }

    private struct QueryFailure: Error, CustomStringConvertible {
        var description: String
    }

    private static func blockingQuery(_ arguments: [String], port: Int) throws -> String {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard descriptor >= 0 else { throw QueryFailure(description: "socket(): \(String(cString: strerror(errno)))") }
        defer { close(descriptor) }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = in_port_t(UInt16(port).bigEndian)
        target.sin_addr.s_addr = inet_addr("127.0.0.1")
        let connected = withUnsafePointer(to: &target) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard connected == 0 else { throw QueryFailure(description: "connect(): \(String(cString: strerror(errno)))") }
        var request = "*\(arguments.count)\r\n"
        for argument in arguments { request += "$\(argument.utf8.count)\r\n\(argument)\r\n" }
        let bytes = Array(request.utf8)
        var sent = 0
        while sent < bytes.count {
            let count = bytes.withUnsafeBytes { write(descriptor, $0.baseAddress! + sent, $0.count - sent) }
            guard count > 0 else { throw QueryFailure(description: "write(): \(String(cString: strerror(errno)))") }
            sent += count
        }
        var reply: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 16_384)
        func fill() throws {
            let count = chunk.withUnsafeMutableBytes { read(descriptor, $0.baseAddress!, $0.count) }
            guard count > 0 else {
                throw QueryFailure(description: count == 0 ? "the server closed the connection" : "read(): \(String(cString: strerror(errno)))")
            }
            reply += chunk[..<count]
        }
        // The first line: its type and, for a bulk string, the length that follows.
        var lineEnd: Int?
        while lineEnd == nil {
            try fill()
            lineEnd = reply.indices.dropLast().first { reply[$0] == 13 && reply[$0 + 1] == 10 }
        }
        let line = String(decoding: reply[1..<lineEnd!], as: UTF8.self)
        switch reply[0] {
        case UInt8(ascii: "+"), UInt8(ascii: "-"), UInt8(ascii: ":"):
            return line
        case UInt8(ascii: "$"):
            guard let length = Int(line) else { throw QueryFailure(description: "a malformed bulk length: \(line)") }
            if length < 0 { return "" }
            let start = lineEnd! + 2
            while reply.count < start + length { try fill() }
            return String(decoding: reply[start..<start + length], as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        default:
            throw QueryFailure(description: "a reply query() does not read (\(String(decoding: reply.prefix(20), as: UTF8.self)))")
        }
    }
}
