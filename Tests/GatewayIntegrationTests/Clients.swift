import Foundation
import HTTPTypes
import HummingbirdWSClient
import JWTKit
import Logging
import NIOCore
import NIOWebSocket
import Synchronization
import TestSupport
import Testing

// MARK: - Tokens

/// Signs client tokens the way an identity provider would, plus the forgeries a gateway must refuse.
enum Tokens {
    static let secret = "fleetgate-test-secret-with-32-bytes-or-more"

    struct Claims: JWTPayload {
        var sub: SubjectClaim?
        var exp: ExpirationClaim?
        var conn_limit: Int?
        func verify(using algorithm: some JWTAlgorithm) async throws {}
    }

    /// A valid HS256 token for `user` (expires in an hour), with an optional `conn_limit` claim.
    static func valid(_ user: String, limit: Int? = nil, expiresIn: TimeInterval = 3600, secret: String = secret) async throws -> String {
        let keys = JWTKeyCollection()
        await keys.add(hmac: HMACKey(from: secret), digestAlgorithm: .sha256)
        return try await keys.sign(Claims(sub: .init(value: user), exp: .init(value: Date().addingTimeInterval(expiresIn)), conn_limit: limit))
    }

    /// `alg: none` with no signature.
    static func unsigned(_ user: String) -> String {
        let header = base64url(#"{"alg":"none","typ":"JWT"}"#)
        let payload = base64url(#"{"sub":"\#(user)","exp":\#(Int(Date().timeIntervalSince1970) + 3600)}"#)
        return "\(header).\(payload)."
    }

    /// An HS256-signed token whose header claims RS256 (algorithm confusion).
    static func wrongAlgorithm(_ user: String) async throws -> String {
        let parts = try await valid(user).split(separator: ".")
        return "\(base64url(#"{"alg":"RS256","typ":"JWT"}"#)).\(parts[1]).\(parts[2])"
    }

    static func base64url(_ text: String) -> String {
        Data(text.utf8).base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }
}

// MARK: - Raw HTTP

/// One HTTP/1.1 exchange over a plain socket, for answers a WebSocket client library hides (401/429 bodies).
struct HTTPAnswer: Sendable, CustomStringConvertible {
    var status: Int
    var headers: [String: String]
    var body: String

    /// The body as a JSON object.
    var json: [String: Any] {
        (try? JSONSerialization.jsonObject(with: Data(body.utf8))) as? [String: Any] ?? [:]
    }

    var description: String { "HTTP \(status) \(headers) \(body)" }
}

enum RawHTTP {
    /// Sends a GET (an upgrade request when `upgrade` is true) and reads the answer until the server closes or the
    /// head and `Content-Length` bytes of body have arrived.
    static func get(port: Int, path: String, headers: [String: String] = [:], upgrade: Bool = false) async throws -> HTTPAnswer {
        var request = "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\n"
        if upgrade {
            request += "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        }
        for (name, value) in headers { request += "\(name): \(value)\r\n" }
        request += "\r\n"
        let socket = try await RawSocket.connect(port: port)
        defer { socket.close() }
        try socket.send(Array(request.utf8))
        var data: [UInt8] = []
        while true {
            if let answer = parse(data) { return answer }
            let chunk = try await socket.receive(timeout: .seconds(10))
            if chunk.isEmpty {
                guard let answer = parse(data, complete: true) else {
                    throw RawSocket.Failure("connection closed before a complete answer: \(String(decoding: data, as: UTF8.self))")
                }
                return answer
            }
            data += chunk
        }
    }

    static func parse(_ data: [UInt8], complete: Bool = false) -> HTTPAnswer? {
        let text = String(decoding: data, as: UTF8.self)
        guard let end = text.range(of: "\r\n\r\n") else { return nil }
        let lines = text[..<end.lowerBound].components(separatedBy: "\r\n")
        let statusParts = lines[0].split(separator: " ")
        guard statusParts.count >= 2, let status = Int(statusParts[1]) else { return nil }
        var headers: [String: String] = [:]
        for line in lines.dropFirst() {
            guard let colon = line.firstIndex(of: ":") else { continue }
            headers[line[..<colon].lowercased()] = line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)
        }
        let body = String(text[end.upperBound...])
        if let length = headers["content-length"].flatMap(Int.init) {
            guard body.utf8.count >= length else { return nil }
        } else if !complete, status != 101 {
            return nil
        }
        return HTTPAnswer(status: status, headers: headers, body: body)
    }
}

/// A blocking loopback TCP socket whose calls run on their own threads.
final class RawSocket: Sendable {
    struct Failure: Error, CustomStringConvertible {
        var description: String
        init(_ description: String) { self.description = description }
    }

    let descriptor: Int32
    private let closed = Atomic<Bool>(false)

    private init(descriptor: Int32) { self.descriptor = descriptor }

    /// Connects to the loopback port; `receiveBuffer` (bytes) shrinks the socket's receive buffer first, for a
    /// client that is meant to fall behind.
    static func connect(port: Int, receiveBuffer: Int32? = nil) async throws -> RawSocket {
        let result: Result<Int32, Failure> = await BlockingWork.run {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return .failure(Failure("socket() failed")) }
            if var size = receiveBuffer {
                _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
            }
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_port = in_port_t(UInt16(port).bigEndian)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            let status = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard status == 0 else {
                Glibc.close(fd)
                return .failure(Failure("cannot connect to 127.0.0.1:\(port): errno \(errno)"))
            }
            return .success(fd)
        }
        return RawSocket(descriptor: try result.get())
    }

    func send(_ bytes: [UInt8]) throws {
        var offset = 0
        while offset < bytes.count {
            let sent = bytes[offset...].withUnsafeBytes { Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard sent > 0 else { throw Failure("send failed: errno \(errno)") }
            offset += sent
        }
    }

    /// Up to 64 KiB; empty when the peer closed. Throws on timeout.
    func receive(timeout: Duration) async throws -> [UInt8] {
        let descriptor = descriptor
        let result: Result<[UInt8], Failure> = await BlockingWork.run {
            var poller = pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(timeout.components.seconds * 1000 + timeout.components.attoseconds / 1_000_000_000_000_000)
            guard poll(&poller, 1, milliseconds) > 0 else { return .failure(Failure("no data within \(timeout)")) }
            var buffer = [UInt8](repeating: 0, count: 65536)
            let count = recv(descriptor, &buffer, buffer.count, 0)
            guard count >= 0 else { return errno == ECONNRESET ? .success([]) : .failure(Failure("recv failed: errno \(errno)")) }
            return .success(Array(buffer[..<count]))
        }
        return try result.get()
    }

    /// Closes the socket, once: a second close would close whatever descriptor the process got under that number
    /// since (another test's NIO socket: NIO then meets a descriptor it still has registered and traps).
    func close() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        Glibc.close(descriptor)
    }

    /// Closes with a TCP reset (SO_LINGER 0): the peer's next read or write fails, as when a client vanishes.
    func reset() {
        guard !closed.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var linger = Glibc.linger(l_onoff: 1, l_linger: 0)
        _ = setsockopt(descriptor, SOL_SOCKET, SO_LINGER, &linger, socklen_t(MemoryLayout<Glibc.linger>.size))
        Glibc.close(descriptor)
    }

    /// Sends `chunk` over and over, without blocking, until `total` bytes are out or the peer has taken nothing for
    /// `idle` (it stopped reading, and every buffer on the way is full). Returns how many bytes went out.
    func flood(_ chunk: [UInt8], total: Int, idle: Duration) async -> Int {
        let descriptor = descriptor
        return await BlockingWork.run {
            let idleMilliseconds = Int32(idle.components.seconds * 1000 + idle.components.attoseconds / 1_000_000_000_000_000)
            var sent = 0
            var offset = 0
            while sent < total {
                let count = chunk[offset...].withUnsafeBytes {
                    Glibc.send(descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                }
                if count > 0 {
                    sent += count
                    offset = (offset + count) % chunk.count
                    continue
                }
                guard count < 0, errno == EAGAIN || errno == EWOULDBLOCK else { break }
                var poller = pollfd(fd: descriptor, events: Int16(POLLOUT), revents: 0)
                if poll(&poller, 1, idleMilliseconds) <= 0 { break }
            }
            return sent
        }
    }
}

/// A WebSocket client that completes the upgrade and then does only what the test says: it never answers pings
/// by itself (a dead peer), and it reports the frames the server sends.
final class RawWebSocket: Sendable {
    let socket: RawSocket
    let pending = Mutex<[UInt8]>([])

    private init(socket: RawSocket) { self.socket = socket }

    /// Connects and upgrades; throws with the HTTP answer if the server refuses.
    static func connect(port: Int, token: String, receiveBuffer: Int32? = nil) async throws -> RawWebSocket {
        let socket = try await RawSocket.connect(port: port, receiveBuffer: receiveBuffer)
        let request =
            "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:\(port)\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            + "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer \(token)\r\n\r\n"
        try socket.send(Array(request.utf8))
        var data: [UInt8] = []
        while true {
            let chunk = try await socket.receive(timeout: .seconds(10))
            guard !chunk.isEmpty else { throw RawSocket.Failure("closed during the upgrade: \(String(decoding: data, as: UTF8.self))") }
            data += chunk
            if let end = data.firstRange(of: Array("\r\n\r\n".utf8)) {
                let head = String(decoding: data[..<end.lowerBound], as: UTF8.self)
                guard head.hasPrefix("HTTP/1.1 101") else {
                    socket.close()
                    throw RawSocket.Failure("upgrade refused: \(String(decoding: data, as: UTF8.self))")
                }
                let webSocket = RawWebSocket(socket: socket)
                webSocket.pending.withLock { $0 = Array(data[end.upperBound...]) }
                return webSocket
            }
        }
    }

    /// A server frame: opcode and unmasked payload.
    struct Frame: Sendable {
        var opcode: UInt8
        var payload: [UInt8]
        /// For close frames: the code.
        var closeCode: UInt16? {
            opcode == 0x8 && payload.count >= 2 ? UInt16(payload[0]) << 8 | UInt16(payload[1]) : nil
        }
        var closeReason: String { String(decoding: payload.dropFirst(2), as: UTF8.self) }
    }

    /// The next frame from the server, or nil once the server closed the socket.
    func nextFrame(timeout: Duration) async throws -> Frame? {
        while true {
            if let frame = pending.withLock({ Self.takeFrame(&$0) }) { return frame }
            let chunk = try await socket.receive(timeout: timeout)
            if chunk.isEmpty { return nil }
            pending.withLock { $0 += chunk }
        }
    }

    private static func takeFrame(_ data: inout [UInt8]) -> Frame? {
        guard data.count >= 2 else { return nil }
        var length = Int(data[1] & 0x7F)
        var offset = 2
        if length == 126 {
            guard data.count >= 4 else { return nil }
            length = Int(data[2]) << 8 | Int(data[3])
            offset = 4
        } else if length == 127 {
            guard data.count >= 10 else { return nil }
            length = data[2..<10].reduce(0) { $0 << 8 | Int($1) }
            offset = 10
        }
        guard data.count >= offset + length else { return nil }
        let frame = Frame(opcode: data[0] & 0x0F, payload: Array(data[offset..<offset + length]))
        data.removeFirst(offset + length)
        return frame
    }

    /// Sends a masked frame.
    func send(opcode: UInt8, payload: [UInt8], fin: Bool = true, reservedBits: UInt8 = 0) throws {
        try socket.send(Self.frame(opcode: opcode, payload: payload, fin: fin, reservedBits: reservedBits))
    }

    /// A masked client frame (payload under 64 KiB); `reservedBits` are RSV1–3 (0x40, 0x20, 0x10).
    static func frame(opcode: UInt8, payload: [UInt8], fin: Bool = true, reservedBits: UInt8 = 0) -> [UInt8] {
        var frame: [UInt8] = [(fin ? 0x80 : 0) | reservedBits | opcode]
        if payload.count < 126 {
            frame.append(0x80 | UInt8(payload.count))
        } else {
            frame.append(0x80 | 126)
            frame += [UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        }
        let mask: [UInt8] = [0x12, 0x34, 0x56, 0x78]
        frame += mask
        frame += payload.enumerated().map { $0.element ^ mask[$0.offset % 4] }
        return frame
    }

    /// The close frame the server sent next, skipping other frames; nil if the socket closed without one.
    func closeFrame(timeout: Duration = .seconds(10)) async throws -> Frame? {
        while let frame = try await nextFrame(timeout: timeout) {
            if frame.opcode == 0x8 { return frame }
        }
        return nil
    }

    func close() { socket.close() }
}

// MARK: - A held WebSocket connection (HummingbirdWSClient)

/// A connection made with HummingbirdWSClient and held open by a background task: messages arrive on a stream,
/// texts can be sent, and the close frame the server sent is reported when the connection ends.
final class HeldWebSocket: Sendable {
    enum Command: Sendable {
        case text(String)
        case close
    }

    let messages: AsyncStream<String>
    private let commands: AsyncStream<Command>.Continuation
    private let task: Task<(code: UInt16, reason: String)?, any Error>

    /// Connects with `Authorization: Bearer token` and returns once the upgrade completed.
    /// - Throws: `WebSocketClientError.webSocketUpgradeFailed` if the server refused the upgrade.
    static func open(port: Int, token: String) async throws -> HeldWebSocket {
        let (messages, messageSink) = AsyncStream.makeStream(of: String.self)
        let (commands, commandSink) = AsyncStream.makeStream(of: Command.self)
        let (opened, openedSink) = AsyncStream.makeStream(of: Bool.self)
        var logger = Logger(label: "test.ws-client")
        logger.logLevel = .warning
        let task = Task<(code: UInt16, reason: String)?, any Error> {
            defer {
                openedSink.finish()
                messageSink.finish()
            }
            let frame = try await WebSocketClient.connect(
                url: "ws://127.0.0.1:\(port)/ws",
                configuration: .init(additionalHeaders: [.authorization: "Bearer \(token)"]),
                logger: logger
            ) { inbound, outbound, _ in
                openedSink.yield(true)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask {
                        for try await message in inbound.messages(maxSize: 1 << 20) {
                            if case .text(let text) = message { messageSink.yield(text) }
                        }
                    }
                    group.addTask {
                        for await command in commands {
                            switch command {
                            case .text(let text): try await outbound.write(.text(text))
                            case .close:
                                try await outbound.close(.normalClosure, reason: "bye")
                                return
                            }
                        }
                    }
                    try await group.next()
                    group.cancelAll()
                }
            }
            return frame.map { (UInt16(webSocketErrorCode: $0.closeCode), $0.reason ?? "") }
        }
        let upgraded = try await withTimeout(.seconds(20), "the WebSocket upgrade did not complete") {
            var iterator = opened.makeAsyncIterator()
            return await iterator.next() != nil
        } onTimeout: {
            task.cancel()
        }
        guard upgraded else {
            // The connection ended before the upgrade: surface the client's error.
            _ = try await task.value
            throw RawSocket.Failure("the WebSocket connection ended before the upgrade completed")
        }
        return HeldWebSocket(messages: messages, commands: commandSink, task: task)
    }

    private init(messages: AsyncStream<String>, commands: AsyncStream<Command>.Continuation, task: Task<(code: UInt16, reason: String)?, any Error>) {
        self.messages = messages
        self.commands = commands
        self.task = task
    }

    func send(_ text: String) { commands.yield(.text(text)) }

    /// Closes from the client side and waits for the end; a failure is recorded as an issue of the test.
    func close() async {
        do {
            try await closeOrThrow()
        } catch {
            Issue.record("\(error)")
        }
    }

    /// Closes from the client side and waits for the end; throws what went wrong (the server vanished, say).
    func closeOrThrow() async throws {
        commands.yield(.close)
        let task = task
        do {
            _ = try await withTimeout(.seconds(20), "the connection did not end after the client closed it") { try await task.value }
        } catch {
            task.cancel()
            throw error
        }
    }

    /// Waits (at most `timeout`) until the server closes the connection; returns its close code and reason (nil if
    /// there was none).
    func closedByServer(timeout: Duration = .seconds(20)) async throws -> (code: UInt16, reason: String)? {
        let task = task
        return try await withTimeout(timeout, "the server did not close the connection") {
            try await task.value
        } onTimeout: {
            task.cancel()
        }
    }

    /// The next text message, waiting at most `timeout`.
    func nextMessage(timeout: Duration = .seconds(10)) async throws -> String? {
        let messages = messages
        return try await withTimeout(timeout, "no message from the server") {
            var iterator = messages.makeAsyncIterator()
            return await iterator.next()
        }
    }

    deinit { task.cancel() }
}

/// Runs `body`, failing with `what` if it takes longer than `timeout`: the body is cancelled, and `onTimeout` runs
/// first so a body that awaits something cancellation cannot reach (an unstructured task's value) can be ended too.
func withTimeout<T: Sendable>(
    _ timeout: Duration,
    _ what: String,
    _ body: @escaping @Sendable () async throws -> T,
    onTimeout: @escaping @Sendable () -> Void = {}
) async throws -> T {
    try await withThrowingTaskGroup(of: T?.self) { group in
        group.addTask { try await body() }
        group.addTask {
            try await Task.sleep(for: timeout)
            return nil
        }
        defer { group.cancelAll() }
        guard let first = try await group.next(), let value = first else {
            onTimeout()
            throw RawSocket.Failure("\(what) within \(timeout)")
        }
        return value
    }
}
