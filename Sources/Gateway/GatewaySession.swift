import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket

/// A WebSocket message from the client, reassembled from its frames.
public enum GatewayMessage: Sendable, Hashable {
    /// A text message (valid UTF-8; invalid text is closed with 1007 before it reaches a handler).
    case text(String)
    /// A binary message.
    case binary([UInt8])
}

/// What applications plug into the gateway: one call per admitted WebSocket connection.
///
/// The gateway owns the connection: it answers pings, enforces frame and message sizes, and closes the socket for
/// kicks (4409), fencing (1012) and shutdown (1001). When ``run(_:)`` returns, the connection is closed with 1000
/// (or with 1011 if it threw) and its admission released.
public protocol GatewaySessionHandler: Sendable {
    /// Serves one connection until its messages end or the handler is done.
    func run(_ session: GatewaySession) async throws
}

/// One admitted WebSocket connection, as a handler sees it.
public struct GatewaySession: Sendable {
    /// The user id (the token's `sub`).
    public let user: String
    /// The connection id registered in Redis.
    public let connectionID: String
    /// A logger with the user and connection as metadata.
    public let logger: Logger
    /// The client's messages, in order; the sequence ends when the connection closes.
    public let messages: GatewayMessages
    let connection: SessionConnection

    /// Sends a text message.
    /// - Throws: ``GatewaySessionClosed`` once the connection is closing.
    public func send(text: String) async throws {
        try await connection.send(opcode: .text, data: ByteBuffer(string: text))
    }

    /// Sends a binary message.
    /// - Throws: ``GatewaySessionClosed`` once the connection is closing.
    public func send(binary: [UInt8]) async throws {
        try await connection.send(opcode: .binary, data: ByteBuffer(bytes: binary))
    }

    /// Starts the closing handshake with `code` (1000, or 3000–4999 for applications) and a short reason.
    public func close(code: UInt16 = 1000, reason: String = "") {
        connection.close(code: code, reason: reason)
    }
}

/// Thrown by ``GatewaySession/send(text:)`` and ``GatewaySession/send(binary:)`` once the connection is closing.
public struct GatewaySessionClosed: Error, Sendable, CustomStringConvertible {
    /// The close code the connection is closing with.
    public var code: UInt16
    public var description: String { "the WebSocket connection is closing (code \(code))" }
}

/// The client's messages for one connection: a bounded queue between the gateway's reader and the handler.
///
/// The reader waits while the queue is full, so a slow handler slows the client down (TCP back-pressure) instead of
/// buffering without bound; pings are still accounted for (see ``SessionConnection``).
public struct GatewayMessages: AsyncSequence, Sendable {
    public typealias Element = GatewayMessage
    let queue: MessageQueue

    /// Iterates the messages.
    public struct AsyncIterator: AsyncIteratorProtocol {
        let queue: MessageQueue
        /// The next message, or nil once the connection is closed.
        public mutating func next() async -> GatewayMessage? { await queue.next() }
    }

    public func makeAsyncIterator() -> AsyncIterator { AsyncIterator(queue: queue) }
}

/// A small bounded single-consumer queue with suspension on both sides.
final class MessageQueue: Sendable {
    private struct State {
        var buffer: [GatewayMessage] = []
        var head = 0
        var finished = false
        var consumer: CheckedContinuation<GatewayMessage?, Never>?
        var producer: CheckedContinuation<Void, Never>?
        var count: Int { buffer.count - head }
    }

    private let state = NIOLockedValueBox(State())
    let capacity: Int

    init(capacity: Int = 16) {
        self.capacity = capacity
    }

    /// Whether the reader is waiting for the handler (the client is then not read, so missed pongs don't count).
    var isProducerWaiting: Bool { state.withLockedValue { $0.producer != nil } }

    /// Adds a message, waiting while the queue is full. Returns at once once finished, and when the task is
    /// cancelled (the message is then still queued).
    func push(_ message: GatewayMessage) async {
        let delivered = state.withLockedValue { state -> CheckedContinuation<GatewayMessage?, Never>? in
            guard !state.finished else { return nil }
            if let consumer = state.consumer {
                state.consumer = nil
                return consumer
            }
            state.buffer.append(message)
            return nil
        }
        if let delivered {
            delivered.resume(returning: message)
            return
        }
        while state.withLockedValue({ !$0.finished && $0.count > capacity }), !Task.isCancelled {
            await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLockedValue { state -> Bool in
                        if state.finished || state.count <= capacity || Task.isCancelled { return true }
                        state.producer = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            } onCancel: {
                let producer = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                    defer { state.producer = nil }
                    return state.producer
                }
                producer?.resume()
            }
        }
    }

    /// The next message, or nil once finished and empty (or when the task is cancelled).
    func next() async -> GatewayMessage? {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<GatewayMessage?, Never>) in
                let (result, producer, ready) = state.withLockedValue {
                    state -> (GatewayMessage?, CheckedContinuation<Void, Never>?, Bool) in
                    if state.count > 0 {
                        let message = state.buffer[state.head]
                        state.head += 1
                        if state.head > 64 && state.head * 2 > state.buffer.count {
                            state.buffer.removeFirst(state.head)
                            state.head = 0
                        }
                        let producer = state.producer
                        state.producer = nil
                        return (message, producer, true)
                    }
                    if state.finished || Task.isCancelled { return (nil, nil, true) }
                    state.consumer = continuation
                    return (nil, nil, false)
                }
                producer?.resume()
                if ready { continuation.resume(returning: result) }
            }
        } onCancel: {
            let consumer = state.withLockedValue { state -> CheckedContinuation<GatewayMessage?, Never>? in
                defer { state.consumer = nil }
                return state.consumer
            }
            consumer?.resume(returning: nil)
        }
    }

    /// Ends the sequence: the consumer gets nil after the buffered messages; a waiting producer returns.
    func finish() {
        let (consumer, producer) = state.withLockedValue {
            state -> (CheckedContinuation<GatewayMessage?, Never>?, CheckedContinuation<Void, Never>?) in
            state.finished = true
            defer {
                state.consumer = nil
                state.producer = nil
            }
            return (state.count == 0 ? state.consumer : nil, state.producer)
        }
        consumer?.resume(returning: nil)
        producer?.resume()
    }
}
