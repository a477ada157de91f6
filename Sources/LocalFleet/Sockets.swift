import Foundation
import Glibc

/// Tiny blocking POSIX TCP helpers for talking to loopback servers without any networking library.
///
/// Everything here blocks the calling thread (bounded by explicit timeouts); async callers should go through
/// ``BlockingWork/run(_:)``.
package enum Sockets {
    /// What came back from ``request(_:port:timeout:)``.
    package enum Reply: Equatable, Sendable {
        /// `connect` failed with this `errno` (e.g. `ECONNREFUSED` when nothing listens on the port).
        case connectFailed(errno: Int32)
        /// Connected and sent, but no complete reply line arrived before the timeout or the peer closed.
        case noReply
        /// The first reply line, without the trailing CRLF (e.g. `+PONG`, `-NOAUTH Authentication required.`).
        case line(String)
    }

    /// The loopback address every helper uses.
    package static let loopbackHost = "127.0.0.1"

    /// Picks a TCP port on 127.0.0.1 that is free right now, by binding port 0 and reading the port back.
    ///
    /// The socket is closed before returning, so another process can still grab the port; callers must retry on
    /// "Address already in use". With `needsClusterBusPort`, the port is also at most 55535 and port + 10000 is free
    /// (Redis Cluster listens on that second port).
    package static func reserveFreePort(needsClusterBusPort: Bool = false) throws -> Int {
        for _ in 0..<200 {
            let port = try bindEphemeralPort()
            guard needsClusterBusPort else { return port }
            if port + 10_000 <= 65_535, canBind(port: port + 10_000) {
                return port
            }
        }
        throw LocalFleetError("could not find a free port on \(loopbackHost) with a free cluster bus port (port + 10000)")
    }

    /// Whether a listening socket could be bound on 127.0.0.1:`port` right now (with `SO_REUSEADDR`, like Redis).
    package static func canBind(port: Int) -> Bool {
        guard let descriptor = try? makeSocket() else { return false }
        defer { close(descriptor) }
        var one: Int32 = 1
        _ = setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = loopbackAddress(port: port)
        return withSockaddr(&address) { bind(descriptor, $0, $1) } == 0
    }

    /// Connects to 127.0.0.1:`port` and immediately closes again; returns nil on success or the `connect` errno
    /// (`ECONNREFUSED` when nothing listens, `EINPROGRESS` if the connect timed out).
    package static func connectionError(port: Int, timeout: Duration = .seconds(1)) -> Int32? {
        switch connect(port: port, timeout: timeout) {
        case .success(let descriptor):
            close(descriptor)
            return nil
        case .failure(let failure):
            return failure.code
        }
    }

    /// Opens a connection to 127.0.0.1:`port`, sends `payload` and reads the first reply line.
    ///
    /// Connecting, sending and each receive are bounded by `timeout` (via `SO_SNDTIMEO`/`SO_RCVTIMEO`), so a stopped
    /// or wedged server yields ``Reply/noReply`` (or ``Reply/connectFailed(errno:)``) instead of hanging.
    package static func request(_ payload: String, port: Int, timeout: Duration) -> Reply {
        let descriptor: Int32
        switch connect(port: port, timeout: timeout) {
        case .success(let connected):
            descriptor = connected
        case .failure(let failure):
            return .connectFailed(errno: failure.code)
        }
        defer { close(descriptor) }

        let bytes = Array(payload.utf8)
        var sent = 0
        while sent < bytes.count {
            let result = bytes[sent...].withUnsafeBytes { send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if result < 0 {
                if errno == EINTR { continue }
                return .noReply
            }
            sent += result
        }

        var received: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 512)
        while received.count < 4096 {
            let count = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return .noReply }
            received.append(contentsOf: buffer[0..<count])
            if let end = received.firstIndex(of: UInt8(ascii: "\n")) {
                var line = received[..<end]
                if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
                return .line(String(decoding: line, as: UTF8.self))
            }
        }
        return .line(String(decoding: received, as: UTF8.self))
    }

    // MARK: - Plumbing

    private static func makeSocket() throws -> Int32 {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else {
            throw LocalFleetError("socket() failed: \(errnoDescription())")
        }
        return descriptor
    }

    /// `strerror` of `code` (the current `errno` by default).
    package static func errnoDescription(_ code: Int32 = errno) -> String {
        String(cString: strerror(code))
    }

    /// Connects to 127.0.0.1:`port` with `SO_SNDTIMEO`/`SO_RCVTIMEO` set to `timeout` *before* connecting, so even a
    /// listener whose accept backlog is full (a stopped server, a port squatter) cannot block us for minutes.
    private static func connect(port: Int, timeout: Duration) -> Result<Int32, ConnectFailure> {
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else {
            return .failure(ConnectFailure(code: errno))
        }
        var limit = timeval(duration: timeout)
        _ = setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        _ = setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var address = loopbackAddress(port: port)
        if withSockaddr(&address, { Glibc.connect(descriptor, $0, $1) }) == 0 {
            return .success(descriptor)
        }
        // A timed-out connect reports EINPROGRESS; an interrupted one EINTR. Either way: no connection.
        let code = errno
        close(descriptor)
        return .failure(ConnectFailure(code: code))
    }

    private struct ConnectFailure: Error {
        var code: Int32
    }

    private static func bindEphemeralPort() throws -> Int {
        let descriptor = try makeSocket()
        defer { close(descriptor) }
        var address = loopbackAddress(port: 0)
        guard withSockaddr(&address, { bind(descriptor, $0, $1) }) == 0 else {
            throw LocalFleetError("bind(\(loopbackHost):0) failed: \(errnoDescription())")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let result = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(descriptor, $0, &length) }
        }
        guard result == 0 else {
            throw LocalFleetError("getsockname() failed: \(errnoDescription())")
        }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    private static func loopbackAddress(port: Int) -> sockaddr_in {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
        return address
    }

    private static func withSockaddr(
        _ address: inout sockaddr_in,
        _ body: (UnsafePointer<sockaddr>, socklen_t) -> Int32
    ) -> Int32 {
        withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
}

extension timeval {
    /// A `timeval` holding `duration` (at least 1 ms, since a zero `SO_RCVTIMEO` means "wait forever").
    init(duration: Duration) {
        let (seconds, attoseconds) = duration.components
        let microseconds = max(Int(seconds) * 1_000_000 + Int(attoseconds / 1_000_000_000_000), 1_000)
        self.init(tv_sec: microseconds / 1_000_000, tv_usec: microseconds % 1_000_000)
    }
}
