import Glibc
import Synchronization
import Testing

@testable import LocalFleet
@testable import TestSupport

/// Tests of ``TCPProxy`` in front of real `redis-server` processes, talking to the proxy with plain blocking sockets.
@Suite("TCPProxy", .timeLimit(.minutes(2)))
struct TCPProxyTests {
    @Test("PING through the proxy answers PONG, and large payloads pass unchanged both ways")
    func forwards() async throws {
        try await withProxiedServer { server, proxy throws in
            #expect(proxy.address == "127.0.0.1:\(proxy.port)")
            #expect(proxy.url == "redis://127.0.0.1:\(proxy.port)")
            #expect(proxy.port != server.port)
            let reply = await BlockingWork.run { Sockets.request("PING\r\n", port: proxy.port, timeout: .seconds(5)) }
            #expect(reply == .line("+PONG"))

            let client = try TestClient.connect(port: proxy.port)
            let key = uniqueKeyPrefix() + "big"
            let value = String((0..<300_000).map { index in Character(UnicodeScalar(UInt8(97 + index % 26))) })
            #expect(await client.send("*3\r\n$3\r\nSET\r\n$\(key.utf8.count)\r\n\(key)\r\n$\(value.utf8.count)\r\n\(value)\r\n"))
            #expect(await client.readLine() == .line("+OK"))
            #expect(try await server.cli("STRLEN", key) == "300000")
            #expect(await client.send("GET \(key)\r\n"))
            #expect(await client.readLine() == .line("$300000"))
            #expect(await client.readLine() == .line(value))
        }
    }

    @Test("cut closes open connections and refuses new ones until restore; direct clients are unaffected")
    func cutAndRestore() async throws {
        try await withProxiedServer { server, proxy throws in
            let open = try TestClient.connect(port: proxy.port)
            #expect(await open.ping() == .line("+PONG"))
            #expect(proxy.connectionCount == 1)

            proxy.cut()
            #expect(await open.readLine(timeout: .seconds(3)) == .closed)
            #expect(await eventually { proxy.connectionCount == 0 })

            let refused = try TestClient.connect(port: proxy.port)
            _ = await refused.send("PING\r\n")
            #expect(await refused.readLine(timeout: .seconds(3)) == .closed)
            #expect(proxy.connectionCount == 0)
            #expect(try await server.cli("PING") == "PONG")

            proxy.restore()
            let fresh = try TestClient.connect(port: proxy.port)
            #expect(await fresh.ping() == .line("+PONG"))
        }
    }

    @Test("stall holds requests without closing anything, restore delivers them in order")
    func stallAndRestore() async throws {
        try await withProxiedServer { _, proxy throws in
            let early = try TestClient.connect(port: proxy.port)
            #expect(await early.ping() == .line("+PONG"))

            proxy.stall()
            #expect(await early.send("ECHO first\r\n"))
            #expect(await early.send("ECHO second\r\n"))
            let late = try TestClient.connect(port: proxy.port)
            #expect(await late.send("PING\r\n"))
            #expect(await early.readLine(timeout: .milliseconds(300)) == .timedOut)
            #expect(await late.readLine(timeout: .milliseconds(50)) == .timedOut)
            #expect(await eventually { proxy.connectionCount == 2 })

            proxy.restore()
            #expect(await early.readLine() == .line("$5"))
            #expect(await early.readLine() == .line("first"))
            #expect(await early.readLine() == .line("$6"))
            #expect(await early.readLine() == .line("second"))
            #expect(await late.readLine() == .line("+PONG"))
            #expect(await early.ping() == .line("+PONG"))
        }
    }

    @Test("delay slows both directions and keeps the order when the delay shrinks")
    func delay() async throws {
        try await withProxiedServer { _, proxy throws in
            let client = try TestClient.connect(port: proxy.port)
            #expect(await client.ping() == .line("+PONG"))

            proxy.delay(.milliseconds(200))
            let clock = ContinuousClock()
            let start = clock.now
            #expect(await client.ping() == .line("+PONG"))
            let roundTrip = clock.now - start
            #expect(roundTrip >= .milliseconds(400), "round trip through a 200 ms delay took only \(roundTrip)")
            #expect(roundTrip < .seconds(5))

            // The second request overtakes nothing even though it is due earlier than the first.
            #expect(await client.send("ECHO slow\r\n"))
            try await Task.sleep(for: .milliseconds(20))
            proxy.delay(.zero)
            try await Task.sleep(for: .milliseconds(20))
            #expect(await client.send("ECHO fast\r\n"))
            #expect(await client.readLine() == .line("$4"))
            #expect(await client.readLine() == .line("slow"))
            #expect(await client.readLine() == .line("$4"))
            #expect(await client.readLine() == .line("fast"))
        }
    }

    @Test("connectionCount follows clients connecting and disconnecting")
    func connectionCount() async throws {
        try await withProxiedServer { _, proxy throws in
            #expect(proxy.connectionCount == 0)
            let first = try TestClient.connect(port: proxy.port)
            let second = try TestClient.connect(port: proxy.port)
            #expect(await first.ping() == .line("+PONG"))
            #expect(await second.ping() == .line("+PONG"))
            #expect(proxy.connectionCount == 2)
            first.close()
            #expect(await eventually { proxy.connectionCount == 1 })
            second.close()
            #expect(await eventually { proxy.connectionCount == 0 })
        }
    }

    @Test("the upstream closing a connection closes the client's side")
    func upstreamCloses() async throws {
        try await withProxiedServer { _, proxy throws in
            let client = try TestClient.connect(port: proxy.port)
            #expect(await client.send("QUIT\r\n"))
            #expect(await client.readLine() == .line("+OK"))
            #expect(await client.readLine(timeout: .seconds(3)) == .closed)
            #expect(await eventually { proxy.connectionCount == 0 })
        }
    }

    @Test("a client closing right after a delayed request still gets the request delivered, then both sides closed")
    func closeAfterDelayedRequest() async throws {
        try await withProxiedServer { server, proxy throws in
            let client = try TestClient.connect(port: proxy.port)
            #expect(await client.ping() == .line("+PONG"))
            proxy.delay(.milliseconds(100))
            let key = uniqueKeyPrefix() + "last-words"
            #expect(await client.send("SET \(key) delivered\r\n"))
            client.close()
            #expect(await eventually { proxy.connectionCount == 0 })
            #expect(try await server.cli("GET", key) == "delivered")
        }
    }

    @Test("an unreachable upstream closes the client's connection at once")
    func unreachableUpstream() async throws {
        let proxy = try await TCPProxy.start(upstreamPort: try Sockets.reserveFreePort())
        let client = try TestClient.connect(port: proxy.port)
        _ = await client.send("PING\r\n")
        #expect(await client.readLine(timeout: .seconds(3)) == .closed)
        #expect(await eventually { proxy.connectionCount == 0 })
        await proxy.stop()
    }

    @Test("a stalled connection holding more than 16 MiB is closed")
    func stallBufferLimit() async throws {
        try await withProxiedServer { _, proxy throws in
            let client = try TestClient.connect(port: proxy.port)
            #expect(await client.ping() == .line("+PONG"))
            proxy.stall()
            let chunk = [UInt8](repeating: UInt8(ascii: "x"), count: 1 << 16)
            let sentEverything = await BlockingWork.run {
                for _ in 0..<(17 * 16) {
                    guard client.sendBlocking(chunk) else { return false }
                }
                return true
            }
            if sentEverything {
                #expect(await client.readLine(timeout: .seconds(3)) == .closed)
            }
            #expect(await eventually { proxy.connectionCount == 0 })
        }
    }

    @Test("stop closes every connection, makes the port refuse connections and is idempotent")
    func stop() async throws {
        try await withProxiedServer { _, proxy throws in
            let client = try TestClient.connect(port: proxy.port)
            #expect(await client.ping() == .line("+PONG"))
            await proxy.stop()
            #expect(proxy.connectionCount == 0)
            #expect(Sockets.connectionError(port: proxy.port) == ECONNREFUSED)
            #expect(await client.readLine(timeout: .seconds(3)) == .closed)
            await proxy.stop()
            proxy.cut()
            proxy.restore()
        }
    }

    @Test("dropping the last reference closes the listener")
    func deinitCloses() async throws {
        var proxy: TCPProxy? = try await TCPProxy.start(upstreamPort: try Sockets.reserveFreePort())
        let port = try #require(proxy?.port)
        #expect(Sockets.connectionError(port: port) == nil)
        proxy = nil
        #expect(await eventually { Sockets.connectionError(port: port) == ECONNREFUSED })
    }
}

/// Starts a server and a proxy in front of it, runs `body`, and stops both on every path.
private func withProxiedServer(_ body: (RedisServer, TCPProxy) async throws -> Void) async throws {
    try await RedisServer.withServer { server throws in
        let proxy = try await TCPProxy.start(upstreamPort: server.port)
        do {
            try await body(server, proxy)
            await proxy.stop()
        } catch {
            await proxy.stop()
            throw error
        }
    }
}

/// A blocking TCP client socket to 127.0.0.1; reads wait at most a given timeout (via `poll`) and run on their own
/// thread through ``BlockingWork``.
private final class TestClient: Sendable {
    /// What a read came back with.
    enum Read: Equatable, Sendable {
        /// A line, without its CRLF.
        case line(String)
        /// The peer closed the connection (EOF) or reset it.
        case closed
        /// Nothing (complete) arrived within the timeout; the connection is still open.
        case timedOut
    }

    private let descriptor: Int32
    /// Bytes received but not returned yet.
    private let pending = Mutex<[UInt8]>([])

    private init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    deinit {
        Glibc.close(descriptor)
    }

    /// Connects to 127.0.0.1:`port` (sends time out after 2 s).
    static func connect(port: Int) throws -> TestClient {
        let address = "\(Sockets.loopbackHost):\(port)"
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard descriptor >= 0 else {
            throw TestSupportError("socket() for \(address) failed: \(Sockets.errnoDescription())")
        }
        var limit = timeval(duration: .seconds(2))
        _ = setsockopt(descriptor, SOL_SOCKET, SO_SNDTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var target = sockaddr_in()
        target.sin_family = sa_family_t(AF_INET)
        target.sin_port = in_port_t(UInt16(port).bigEndian)
        target.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
        let result = withUnsafePointer(to: &target) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Glibc.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        guard result == 0 else {
            let message = Sockets.errnoDescription()
            Glibc.close(descriptor)
            throw TestSupportError("cannot connect to \(address): \(message)")
        }
        return TestClient(descriptor: descriptor)
    }

    /// Shuts the connection down in both directions (the descriptor is closed on deinit).
    func close() {
        _ = shutdown(descriptor, Int32(SHUT_RDWR))
    }

    /// Sends `text`; false if the connection is closed or the send timed out.
    func send(_ text: String) async -> Bool {
        let bytes = Array(text.utf8)
        return await BlockingWork.run { self.sendBlocking(bytes) }
    }

    /// Sends `bytes`, blocking (at most 2 s per `send` call); false if the connection is closed or a send timed out.
    func sendBlocking(_ bytes: [UInt8]) -> Bool {
        var sent = 0
        while sent < bytes.count {
            let result = bytes[sent...].withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if result < 0 {
                if errno == EINTR { continue }
                return false
            }
            sent += result
        }
        return true
    }

    /// Sends a PING and reads the reply line.
    func ping() async -> Read {
        guard await send("PING\r\n") else { return .closed }
        return await readLine()
    }

    /// Reads the next line; waits at most `timeout` in all.
    func readLine(timeout: Duration = .seconds(5)) async -> Read {
        await BlockingWork.run { self.readLineBlocking(timeout: timeout) }
    }

    private func readLineBlocking(timeout: Duration) -> Read {
        let deadline = ContinuousClock.now + timeout
        while true {
            let line = pending.withLock { pending -> String? in
                guard let end = pending.firstIndex(of: UInt8(ascii: "\n")) else { return nil }
                var line = pending[..<end]
                if line.last == UInt8(ascii: "\r") { line = line.dropLast() }
                let text = String(decoding: line, as: UTF8.self)
                pending.removeSubrange(...end)
                return text
            }
            if let line {
                return .line(line)
            }
            let remaining = deadline - ContinuousClock.now
            guard remaining > .zero else { return .timedOut }
            var request = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(max(1, remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000))
            let ready = poll(&request, 1, milliseconds)
            if ready < 0, errno == EINTR { continue }
            if ready < 0 { return .closed }
            if ready == 0 { continue }
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            let count = buffer.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress, $0.count, 0) }
            if count < 0, errno == EINTR { continue }
            guard count > 0 else { return .closed }
            pending.withLock { $0.append(contentsOf: buffer[0..<count]) }
        }
    }
}
