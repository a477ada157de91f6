#if canImport(Glibc)
    import Glibc
#endif

/// A loopback port that refuses connections and that no other process can take while this object lives: a socket
/// bound to it that never listens. For tests of "nothing listens there" that must not race with servers other tests
/// start on free ports.
public final class ClosedPort: Sendable {
    /// The port.
    public let port: Int
    /// `127.0.0.1:<port>`.
    public var address: String { "127.0.0.1:\(port)" }
    private let descriptor: Int32

    /// Binds a socket to a free loopback port without listening.
    public init() throws {
        // Close-on-exec: a child launched meanwhile (a redis-server) must not keep the port bound after deinit.
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw TestSupportError("socket() failed: \(String(cString: strerror(errno)))") }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = 0
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else {
            close(fd)
            throw TestSupportError("bind(127.0.0.1:0) failed: \(String(cString: strerror(errno)))")
        }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let named = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard named == 0 else {
            close(fd)
            throw TestSupportError("getsockname failed: \(String(cString: strerror(errno)))")
        }
        descriptor = fd
        port = Int(UInt16(bigEndian: address.sin_port))
    }

    deinit {
        close(descriptor)
    }
}
