import Foundation
import NIOCore
import NIOPosix

/// How one connection attempt ended its upgrade.
public enum AttemptOutcome: Sendable, Hashable {
    /// `101`: the connection is open.
    case admitted
    /// `429` (or a close 4429 right after the upgrade): the user is at the limit.
    case denied
    /// Anything else: refused with another status, reset, timed out.
    case failed(String)
}

/// One WebSocket client connection, on a plain NIO channel: the upgrade as raw HTTP, then frames (masked, as a
/// client must), answering pings, reading the agent flow's events, and the closing handshake. Small on purpose: a
/// load generator holds tens of thousands of them.
final class LoadConnectionHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    enum Phase { case upgrading, open, closing, done }

    private let request: [UInt8]
    /// Completed once the upgrade is answered.
    let upgraded: EventLoopPromise<AttemptOutcome>
    /// Completed when the connection is gone, with the close code the server sent (nil if none).
    let closed: EventLoopPromise<UInt16?>
    /// Completed when an agent run's `agent_completed` arrives (or the connection ends first: false).
    let runCompleted: EventLoopPromise<Bool>
    private var phase = Phase.upgrading
    private var runDone = false
    private var buffer: ByteBuffer?
    private var serverCloseCode: UInt16?
    private var context: ChannelHandlerContext?

    init(request: [UInt8], eventLoop: any EventLoop) {
        self.request = request
        upgraded = eventLoop.makePromise()
        closed = eventLoop.makePromise()
        runCompleted = eventLoop.makePromise()
    }

    func handlerAdded(context: ChannelHandlerContext) { self.context = context }

    func channelActive(context: ChannelHandlerContext) {
        var bytes = context.channel.allocator.buffer(capacity: request.count)
        bytes.writeBytes(request)
        context.writeAndFlush(NIOAny(bytes), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var chunk = unwrapInboundIn(data)
        if buffer == nil { buffer = chunk } else { buffer!.writeBuffer(&chunk) }
        if phase == .upgrading {
            guard let headLength = buffer.flatMap(Self.headLength) else {
                if (buffer?.readableBytes ?? 0) > 16_384 { fail(context, "an upgrade answer over 16 KiB") }
                return
            }
            let head = buffer!.readString(length: headLength) ?? ""
            let status = head.split(separator: " ", maxSplits: 2).dropFirst().first.flatMap { Int($0) } ?? 0
            switch status {
            case 101:
                phase = .open
                upgraded.succeed(.admitted)
            case 429:
                upgraded.succeed(.denied)
                phase = .done
                context.close(promise: nil)
                return
            default:
                upgraded.succeed(.failed("HTTP \(status)"))
                phase = .done
                context.close(promise: nil)
                return
            }
        }
        readFrames(context)
    }

    /// The length of the HTTP head (through its blank line) at the start of `buffer`, if it has all of it.
    static func headLength(_ buffer: ByteBuffer) -> Int? {
        buffer.withUnsafeReadableBytes { bytes -> Int? in
            guard bytes.count >= 4 else { return nil }
            for index in 0...(bytes.count - 4)
            where bytes[index] == 13 && bytes[index + 1] == 10 && bytes[index + 2] == 13 && bytes[index + 3] == 10 {
                return index + 4
            }
            return nil
        }
    }

    private func readFrames(_ context: ChannelHandlerContext) {
        while var data = buffer, data.readableBytes >= 2 {
            guard let first = data.readInteger(as: UInt8.self), let second = data.readInteger(as: UInt8.self) else { return }
            var length = Int(second & 0x7F)
            if length == 126 {
                guard let extended = data.readInteger(as: UInt16.self) else { return }
                length = Int(extended)
            } else if length == 127 {
                guard let extended = data.readInteger(as: UInt64.self) else { return }
                length = Int(clamping: extended)
            }
            guard data.readableBytes >= length, let payload = data.readSlice(length: length) else { return }
            buffer = data
            handleFrame(opcode: first & 0x0F, payload: payload, context: context)
        }
    }

    private func handleFrame(opcode: UInt8, payload: ByteBuffer, context: ChannelHandlerContext) {
        switch opcode {
        case 0x9:  // ping: answer with its payload
            send(opcode: 0xA, payload: Array(payload.readableBytesView), context: context)
        case 0x8:  // close
            var payload = payload
            serverCloseCode = payload.readInteger(as: UInt16.self)
            if phase == .open {
                // The server closes (a kick, a denial in close mode, a drain): echo and go.
                send(opcode: 0x8, payload: serverCloseCode.map { [UInt8($0 >> 8), UInt8($0 & 0xFF)] } ?? [], context: context)
            }
            phase = .done
            context.close(promise: nil)
        case 0x1:
            if String(buffer: payload).contains(#""agent_completed""#) { finishRun(true) }
        default:
            break
        }
    }

    /// Whether this side started the closing handshake (set on the event loop; read after ``closed`` completes).
    private(set) var closedByClient = false

    /// Sends a text message (masked).
    func sendText(_ text: String) {
        guard let context, phase == .open else { return }
        send(opcode: 0x1, payload: Array(text.utf8), context: context)
    }

    /// Starts the closing handshake (1000); the server's answer (or its closing the socket) ends the connection.
    func close() {
        guard let context, phase == .open else { return }
        phase = .closing
        closedByClient = true
        send(opcode: 0x8, payload: [0x03, 0xE8], context: context)
    }

    private func send(opcode: UInt8, payload: [UInt8], context: ChannelHandlerContext) {
        var frame = context.channel.allocator.buffer(capacity: payload.count + 14)
        frame.writeInteger(0x80 | opcode)
        if payload.count < 126 {
            frame.writeInteger(UInt8(0x80 | payload.count))
        } else if payload.count <= 0xFFFF {
            frame.writeInteger(UInt8(0x80 | 126))
            frame.writeInteger(UInt16(payload.count))
        } else {
            frame.writeInteger(UInt8(0x80 | 127))
            frame.writeInteger(UInt64(payload.count))
        }
        let mask: [UInt8] = (0..<4).map { _ in UInt8.random(in: 0...255) }
        frame.writeBytes(mask)
        frame.writeBytes(payload.enumerated().map { $0.element ^ mask[$0.offset & 3] })
        context.writeAndFlush(NIOAny(frame), promise: nil)
    }

    private func fail(_ context: ChannelHandlerContext, _ reason: String) {
        upgraded.succeed(.failed(reason))
        phase = .done
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if phase == .upgrading { upgraded.succeed(.failed("closed during the upgrade")) }
        phase = .done
        finishRun(false)
        closed.succeed(serverCloseCode)
        self.context = nil
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if phase == .upgrading {
            upgraded.succeed(.failed("\(error)"))
            phase = .done
        }
        context.close(promise: nil)
    }

    /// Each promise is completed once (NIO traps on a second completion).
    private func finishRun(_ completed: Bool) {
        guard !runDone else { return }
        runDone = true
        runCompleted.succeed(completed)
    }
}

/// The raw upgrade request of one attempt.
func upgradeRequest(host: String, port: Int, token: String) -> [UInt8] {
    var key = [UInt8](repeating: 0, count: 16)
    for index in key.indices { key[index] = UInt8.random(in: 0...255) }
    let request =
        "GET /ws HTTP/1.1\r\nHost: \(host):\(port)\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        + "Sec-WebSocket-Key: \(Data(key).base64EncodedString())\r\nAuthorization: Bearer \(token)\r\n\r\n"
    return Array(request.utf8)
}
