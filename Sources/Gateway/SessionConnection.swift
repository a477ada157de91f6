import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket

/// What a liveness probe found.
enum ProbeOutcome: String, Sendable, CaseIterable {
    /// The client sent a frame within the probe's idle time: alive without a round trip.
    case recentlyActive = "recent"
    /// The client answered the probe's ping in time.
    case answered
    /// The reader is parked behind a slow handler, so the client's pongs sit unread: counted as alive.
    case busy
    /// No answer within the deadline (or the connection was already closing).
    case failed
}

/// The gateway's side of one WebSocket connection: frame I/O, pings, the closing handshake.
///
/// Three tasks share it: the reader (``GatewayCore/serve(_:admitted:logger:)``), the handler (through
/// ``GatewaySession``) and the pinger. Writes go through one `NIOAsyncChannelOutboundWriter`, which accepts
/// concurrent writers; the close state decides, under a lock, which frames may still go out.
final class SessionConnection: Sendable {
    struct State {
        /// The close code we sent, once we started closing.
        var closingWith: UInt16?
        /// Pings sent since the last pong (or any frame) from the client.
        var unansweredPings = 0
        var closeTimer: Scheduled<Void>?
        /// Writes our close frame (and, without waiting for an answer, closes the socket after it).
        var closeWrite: Task<Void, Never>?
        /// Data frames being written; our close frame waits for them (no data frame may follow it, RFC 6455 §5.5.1).
        var dataWritesInFlight = 0
        var closeWaitingForData: CheckedContinuation<Void, Never>?
        /// Whether a pong write is in flight; `nextPong` holds the latest ping's data to answer after it.
        var pongInFlight = false
        var nextPong: ByteBuffer?
        /// Whether our last ping is still waiting to be written (the client does not read).
        var pingInFlight = false
        /// Client pings in the current one-second window (a flood is closed with 1008).
        var pingWindowStart: ContinuousClock.Instant = .now
        var pingsInWindow = 0
        /// The last frame from the client (or the upgrade): a probe skips a connection that spoke recently.
        var lastSignOfLife: ContinuousClock.Instant = .now
        /// Liveness probes waiting for any frame from the client after the probe's ping.
        var probeWaiters: [CheckedContinuation<Bool, Never>] = []
        /// Ends the probe under way (answers its waiters "dead") at its deadline.
        var probeTimer: Scheduled<Void>?
        /// Which probe the timer belongs to: a timer whose cancellation lost the race must not end the next probe.
        var probeGeneration: UInt64 = 0
        /// Whether the reader is parked on a full message queue (a slow handler): then the client's pongs sit unread
        /// in the socket, and a probe must not take their absence for death.
        var readerBlocked: (@Sendable () -> Bool)?
    }

    /// Client pings per second above which the connection is closed with 1008 (policy violation).
    static let maxPingsPerSecond = 50

    let channel: any Channel
    let outbound: NIOAsyncChannelOutboundWriter<WebSocketFrame>
    let configuration: GatewayConfiguration
    let state = NIOLockedValueBox(State())
    let logger: Logger

    init(channel: any Channel, outbound: NIOAsyncChannelOutboundWriter<WebSocketFrame>, configuration: GatewayConfiguration, logger: Logger) {
        self.channel = channel
        self.outbound = outbound
        self.configuration = configuration
        self.logger = logger
    }

    /// The code we are closing with, if we are.
    var closingCode: UInt16? { state.withLockedValue { $0.closingWith } }

    /// Sends a data frame unless the connection is closing. A close started meanwhile writes its frame after this one.
    func send(opcode: WebSocketOpcode, data: ByteBuffer) async throws {
        let closing = state.withLockedValue { state -> UInt16? in
            if let code = state.closingWith { return code }
            state.dataWritesInFlight += 1
            return nil
        }
        if let closing { throw GatewaySessionClosed(code: closing) }
        defer {
            let waiter = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                state.dataWritesInFlight -= 1
                guard state.dataWritesInFlight == 0 else { return nil }
                defer { state.closeWaitingForData = nil }
                return state.closeWaitingForData
            }
            waiter?.resume()
        }
        do {
            try await outbound.write(WebSocketFrame(fin: true, opcode: opcode, data: data))
        } catch {
            throw GatewaySessionClosed(code: closingCode ?? 1006)
        }
    }

    /// Returns once no data frame is being written (new ones are refused once closing).
    private func dataWritesFinished() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLockedValue { state -> Bool in
                if state.dataWritesInFlight == 0 { return true }
                state.closeWaitingForData = continuation
                return false
            }
            if now { continuation.resume() }
        }
    }

    /// Answers a client ping. At most one pong is in flight: pings that arrive meanwhile are answered once, with the
    /// latest one's data (RFC 6455 §5.5.3 allows that), so a client that floods pings without reading its pongs costs
    /// one buffer, not a task per ping. More than ``maxPingsPerSecond`` pings in a second close the connection (1008).
    func pong(_ data: ByteBuffer) {
        enum Action { case none, write, flood }
        let action = state.withLockedValue { state -> Action in
            guard state.closingWith == nil else { return .none }
            let now = ContinuousClock.now
            if now - state.pingWindowStart >= .seconds(1) {
                state.pingWindowStart = now
                state.pingsInWindow = 0
            }
            state.pingsInWindow += 1
            if state.pingsInWindow > Self.maxPingsPerSecond { return .flood }
            if state.pongInFlight {
                state.nextPong = data
                return .none
            }
            state.pongInFlight = true
            return .write
        }
        switch action {
        case .none:
            return
        case .flood:
            logger.info("closing a connection that sent more than \(Self.maxPingsPerSecond) pings in a second")
            close(code: GatewayCloseCode.policyViolation, reason: "too many pings", waitForAnswer: false)
        case .write:
            let outbound = outbound
            let connection = self
            Task {
                var data = data
                while true {
                    try? await outbound.write(WebSocketFrame(fin: true, opcode: .pong, data: data))
                    let next = connection.state.withLockedValue { state -> ByteBuffer? in
                        defer { state.nextPong = nil }
                        if state.nextPong == nil || state.closingWith != nil { state.pongInFlight = false }
                        return state.closingWith == nil ? state.nextPong : nil
                    }
                    guard let next else { return }
                    data = next
                }
            }
        }
    }

    /// Records a close that happened without us sending a close frame: NIO answered a broken frame itself (1009,
    /// 1002), or the socket went away (1006). Later closes then send nothing.
    func noteClosed(code: UInt16) {
        state.withLockedValue { state in
            if state.closingWith == nil { state.closingWith = code }
        }
    }

    /// Records that the client is alive (a pong, or any frame); answers a probe under way.
    func clientIsAlive() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Bool, Never>] in
            state.unansweredPings = 0
            state.lastSignOfLife = .now
            guard !state.probeWaiters.isEmpty else { return [] }
            defer {
                state.probeWaiters = []
                state.probeTimer?.cancel()
                state.probeTimer = nil
            }
            return state.probeWaiters
        }
        for waiter in waiters { waiter.resume(returning: true) }
    }

    /// The liveness probe of an emergency cleanup: whether the client is alive. A client that sent a frame within
    /// `idle` is alive without a round trip; otherwise it gets a ping and must send something (its pong) within
    /// `timeout`. Concurrent probes of one connection share one ping and its deadline. A connection that is already
    /// closing counts as gone. The caller closes a connection that failed.
    func probe(idle: Duration, timeout: Duration) async -> ProbeOutcome {
        enum Start { case gone, wait(sendPing: Bool) }
        let now = ContinuousClock.now
        let eventLoop = channel.eventLoop
        let (recent, blocked) = state.withLockedValue { state in
            (state.closingWith == nil && now - state.lastSignOfLife < idle, state.readerBlocked)
        }
        if recent { return .recentlyActive }
        if blocked?() == true { return .busy }
        let answered = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let start = state.withLockedValue { state -> Start in
                if state.closingWith != nil { return .gone }
                state.probeWaiters.append(continuation)
                guard state.probeTimer == nil else { return .wait(sendPing: false) }
                state.probeGeneration &+= 1
                let generation = state.probeGeneration
                let timer = eventLoop.scheduleTask(in: .init(timeout)) { [self] in self.probeExpired(generation) }
                // An event loop that is shutting down never runs the timer: answer at once instead of never.
                timer.futureResult.whenFailure { [self] error in
                    if let error = error as? EventLoopError, case .cancelled = error { return }
                    self.probeExpired(generation)
                }
                state.probeTimer = timer
                return .wait(sendPing: true)
            }
            switch start {
            case .gone:
                continuation.resume(returning: false)
            case .wait(let sendPing):
                guard sendPing else { return }
                var data = channel.allocator.buffer(capacity: 5)
                data.writeString("probe")
                let (outbound, frame) = (outbound, WebSocketFrame(fin: true, opcode: .ping, data: data))
                // The deadline runs on the event loop whatever the write does (a client that reads nothing blocks it).
                Task { try? await outbound.write(frame) }
            }
        }
        if answered { return .answered }
        // The reader may have been parked on a full queue since the ping went out: the pong is unread, not missing.
        return state.withLockedValue { $0.readerBlocked }?() == true ? .busy : .failed
    }

    /// Tells the probe how to see that the reader is parked behind a slow handler.
    func setReaderBlocked(_ check: @escaping @Sendable () -> Bool) {
        state.withLockedValue { $0.readerBlocked = check }
    }

    /// The deadline of probe `generation` passed without a frame from the client.
    private func probeExpired(_ generation: UInt64) {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Bool, Never>] in
            guard state.probeGeneration == generation, state.probeTimer != nil else { return [] }
            defer {
                state.probeWaiters = []
                state.probeTimer = nil
            }
            return state.probeWaiters
        }
        for waiter in waiters { waiter.resume(returning: false) }
    }

    /// Starts the closing handshake: sends a close frame with `code` and `reason` (once; later calls do nothing) and
    /// closes the socket if the client has not answered within the close timeout (or right after the frame is out,
    /// with `waitForAnswer: false`, for a peer that is gone).
    func close(code: UInt16, reason: String, waitForAnswer: Bool = true) {
        // A close reason must fit a control frame (125 bytes including the code): cut at a character boundary.
        var shortReason = Substring(reason)
        while shortReason.utf8.count > 123 { shortReason = shortReason.dropLast() }
        var data = channel.allocator.buffer(capacity: 2 + shortReason.utf8.count)
        data.writeInteger(code)
        data.writeString(String(shortReason))
        let frame = WebSocketFrame(fin: true, opcode: .connectionClose, data: data)
        let channel = channel
        let outbound = outbound
        let timeout = configuration.closeTimeout
        // One lock for the decision and the bookkeeping, so closeFrameWritten() never misses a write in flight.
        state.withLockedValue { state in
            guard state.closingWith == nil else { return }
            state.closingWith = code
            state.closeWrite = Task {
                // A data write that began before this close goes first (the close timer bounds the wait).
                await self.dataWritesFinished()
                try? await outbound.write(frame)
                outbound.finish()
                if !waitForAnswer { try? await channel.close() }
            }
            state.closeTimer = channel.eventLoop.scheduleTask(in: .init(timeout)) { channel.close(promise: nil) }
        }
    }

    /// Waits until our close frame, if any, has been written (or failed to be: the socket is gone).
    func closeFrameWritten() async {
        await state.withLockedValue { $0.closeWrite }?.value
    }

    /// Closes the socket without a handshake (the client is gone or broke the protocol after our close frame).
    func abort() {
        channel.close(promise: nil)
    }

    /// Sends pings every interval until cancelled; closes the connection once the client has missed too many.
    ///
    /// While the reader waits for a slow handler (`readerBlocked`), the client's pongs sit unread in the socket, so
    /// those intervals do not count against it — unless the last ping is still unwritten a whole interval later: the
    /// socket stayed unwritable (the client reads nothing, or is gone), which counts like a missed pong whatever the
    /// reader does. A ping write never blocks the pinger: no new ping while the last one waits.
    func runPinger(readerBlocked: @escaping @Sendable () -> Bool) async {
        let interval = configuration.pingInterval
        var sequence: UInt64 = 0
        while !Task.isCancelled {
            do { try await Task.sleep(for: interval) } catch { return }
            if closingCode != nil { return }
            // The last ping still unwritten a whole interval later: the socket stayed unwritable (the client reads
            // nothing). Otherwise a reader waiting for a slow handler leaves the client's pongs unread: no count.
            let blocked = readerBlocked()
            let (missed, sendPing, stuck) = state.withLockedValue { state -> (Int, Bool, Bool) in
                let stuck = state.pingInFlight
                if blocked && !stuck { state.unansweredPings = 0 }
                defer { state.unansweredPings += 1 }
                if !stuck { state.pingInFlight = true }
                return (state.unansweredPings, !stuck, stuck)
            }
            if missed >= configuration.missedPongLimit {
                let what = stuck ? "the client reads nothing" : "\(missed) pings unanswered"
                logger.info("closing a connection: ping timeout, \(what)", metadata: ["fleetgate.missed-pongs": "\(missed)"])
                // The peer is probably gone: don't wait for its close frame.
                close(code: GatewayCloseCode.pingTimeout, reason: "ping timeout: \(what)", waitForAnswer: false)
                return
            }
            guard sendPing else { continue }
            sequence += 1
            var data = channel.allocator.buffer(capacity: 8)
            data.writeInteger(sequence)
            let (outbound, frame, connection) = (outbound, WebSocketFrame(fin: true, opcode: .ping, data: data), self)
            Task {
                try? await outbound.write(frame)
                connection.state.withLockedValue { $0.pingInFlight = false }
            }
        }
    }

    /// Cancels the close timer (the handshake completed or the socket closed).
    func cancelCloseTimer() {
        state.withLockedValue { $0.closeTimer?.cancel() }
    }
}
