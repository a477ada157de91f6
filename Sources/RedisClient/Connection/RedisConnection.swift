import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Synchronization

/// One logical connection to a Redis server that survives reconnects.
///
/// Callers on any thread enqueue encoded commands under a lock; the first one to find the connection idle schedules a
/// single flush on the event loop, so every command queued in the meantime leaves in one write (automatic
/// pipelining). Replies complete requests in FIFO order. All I/O and the deadline timer run on one event loop.
final class RedisConnection: Sendable {
    /// What completes a request.
    enum Waiter: Sendable {
        case single(UnsafeContinuation<RESPValue, any Error>)
        case batch(PipelineCollector, Int)
    }

    enum Mode: Sendable {
        /// Ordinary request/reply.
        case commands
        /// A pub/sub connection: array replies whose first element is a push kind go to `onPush`.
        case pubSub(onPush: @Sendable (RESPValue) -> Void, onReady: @Sendable (any Channel) -> Void)
    }

    private enum Phase {
        case idle
        case connecting
        case handshaking(any Channel)
        case ready(any Channel)
        case shutdown

        var channel: (any Channel)? {
            switch self {
            case .handshaking(let channel), .ready(let channel): return channel
            case .idle, .connecting, .shutdown: return nil
            }
        }
    }

    private struct State {
        var queue = RequestQueue<Waiter>()
        var phase = Phase.idle
        var flushScheduled = false
        var timerDeadline: NIODeadline?
        var lastConnectError: RedisError?
    }

    let configuration: RedisClientConfiguration
    let eventLoop: any EventLoop
    let logger: Logger
    let mode: Mode
    /// `host:port`, for errors and logs.
    let address: String
    // A pthread mutex: Synchronization.Mutex uses priority-inheritance futexes on Linux, which always enter the
    // kernel under contention and measured 2x slower here with many callers.
    private let state = NIOLockedValueBox(State())
    private let nextID = Atomic<UInt64>(0)

    init(configuration: RedisClientConfiguration, mode: Mode, logger: Logger) {
        self.configuration = configuration
        self.eventLoop = configuration.eventLoopGroup.next()
        self.mode = mode
        self.address = configuration.address
        var logger = logger
        logger[metadataKey: "redis.address"] = .string(configuration.address)
        self.logger = logger
    }

    /// Requests waiting to be written and requests written and waiting for a reply (for tests and diagnostics).
    var queueDepth: (pending: Int, inflight: Int) {
        state.withLockedValue { ($0.queue.pendingCount, $0.queue.inflightCount) }
    }

    // MARK: Requests

    /// Sends one command and waits for its reply; an error reply is thrown as a `RedisError`.
    func send(_ command: RedisCommand, deadline: NIODeadline) async throws -> RESPValue {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).newValue
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<RESPValue, any Error>) in
                if Task.isCancelled {
                    continuation.resume(throwing: RedisError(code: .cancelled, message: "request to \(address) cancelled before it was sent"))
                    return
                }
                do {
                    try Hiredis.withEncoded(command) { bytes in
                        enqueue(id: id, deadline: deadline, waiter: .single(continuation), bytes: bytes)
                    }
                } catch {
                    continuation.resume(throwing: error)
                }
            }
        } onCancel: {
            cancel(id: id)
        }
    }

    /// Sends commands back to back (one write) and returns each one's reply or error reply, in order.
    func send(batch commands: [RedisCommand], deadline: NIODeadline) async throws -> [Result<RESPValue, RedisError>] {
        if commands.isEmpty { return [] }
        var encoded = ByteBufferAllocator().buffer(capacity: commands.count * 32)
        var ranges: [Range<Int>] = []
        ranges.reserveCapacity(commands.count)
        for command in commands {
            let start = encoded.writerIndex
            try Hiredis.encode(command, into: &encoded)
            ranges.append(start..<encoded.writerIndex)
        }
        let ids = (0..<commands.count).map { _ in nextID.wrappingAdd(1, ordering: .relaxed).newValue }
        return try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<[Result<RESPValue, RedisError>], any Error>) in
                let collector = PipelineCollector(count: commands.count, continuation: continuation, address: address)
                encoded.withUnsafeReadableBytes { bytes in
                    enqueue(ids: ids, deadline: deadline, collector: collector, bytes: bytes, ranges: ranges)
                }
            }
        } onCancel: {
            for id in ids { cancel(id: id) }
        }
    }

    private func enqueue(id: UInt64, deadline: NIODeadline, waiter: Waiter, bytes: UnsafeRawBufferPointer) {
        let action = state.withLockedValue { state -> EnqueueAction in
            if let refusal = Self.refusal(state, address: address) { return .fail(refusal) }
            state.queue.enqueue(id: id, deadline: deadline, waiter: waiter, bytes: bytes)
            return Self.afterEnqueue(&state, deadline: deadline)
        }
        perform(action, failing: [waiter])
    }

    private func enqueue(ids: [UInt64], deadline: NIODeadline, collector: PipelineCollector, bytes: UnsafeRawBufferPointer, ranges: [Range<Int>]) {
        let waiters = ids.indices.map { Waiter.batch(collector, $0) }
        let action = state.withLockedValue { state -> EnqueueAction in
            if let refusal = Self.refusal(state, address: address) { return .fail(refusal) }
            for (index, range) in ranges.enumerated() {
                state.queue.enqueue(id: ids[index], deadline: deadline, waiter: waiters[index], bytes: UnsafeRawBufferPointer(rebasing: bytes[range]))
            }
            return Self.afterEnqueue(&state, deadline: deadline)
        }
        perform(action, failing: waiters)
    }

    private enum EnqueueAction {
        case none
        case fail(RedisError)
        case schedule(flush: Bool, timer: NIODeadline?)
    }

    /// Why a new request is refused at once instead of waiting, if it is.
    private static func refusal(_ state: State, address: String) -> RedisError? {
        switch state.phase {
        case .shutdown:
            return RedisError(code: .clientShutdown, message: "the Redis client for \(address) was shut down")
        case .connecting, .idle:
            // Waiting for a reconnect cannot fix a refused password: fail fast instead of piling up requests.
            if let error = state.lastConnectError, error.code == .authenticationFailed { return error }
            return nil
        case .handshaking, .ready:
            return nil
        }
    }

    private static func afterEnqueue(_ state: inout State, deadline: NIODeadline) -> EnqueueAction {
        var flush = false
        // One flush per event-loop turn: every command queued until it runs leaves in the same write. (Holding
        // commands until the next reply would batch more, but would add up to a round trip of latency on slow links.)
        if case .ready = state.phase, !state.flushScheduled {
            state.flushScheduled = true
            flush = true
        }
        var timer: NIODeadline? = nil
        if state.timerDeadline == nil || deadline < state.timerDeadline! {
            state.timerDeadline = deadline
            timer = deadline
        }
        return flush || timer != nil ? .schedule(flush: flush, timer: timer) : .none
    }

    private func perform(_ action: EnqueueAction, failing waiters: [Waiter]) {
        switch action {
        case .none:
            break
        case .fail(let error):
            Self.fail(waiters, with: error)
        case .schedule(let flush, let timer):
            if flush { eventLoop.execute { self.flush() } }
            if let timer { eventLoop.scheduleTask(deadline: timer) { self.expireRequests() } }
        }
    }

    /// Writes every pending request in one write. Runs on the event loop.
    private func flush() {
        let write = state.withLockedValue { state -> (any Channel, ByteBuffer)? in
            state.flushScheduled = false
            guard case .ready(let channel) = state.phase, let bytes = state.queue.takePendingForWrite() else { return nil }
            return (channel, bytes)
        }
        if let (channel, bytes) = write { channel.writeAndFlush(bytes, promise: nil) }
    }

    private func cancel(id: UInt64) {
        guard let (waiter, _) = state.withLockedValue({ $0.queue.cancel(id: id) }) else { return }
        Self.fail([waiter], with: RedisError(code: .cancelled, message: "request to \(address) cancelled"))
    }

    /// The deadline timer: fails expired requests and re-arms for the earliest remaining deadline.
    private func expireRequests() {
        let now = NIODeadline.now()
        let (expired, next, lastError, connected) = state.withLockedValue { state in
            state.timerDeadline = nil
            let (expired, next) = state.queue.expire(now: now)
            var rearm: NIODeadline? = nil
            if let next {
                state.timerDeadline = next
                rearm = next
            }
            let connected: Bool
            if case .ready = state.phase { connected = true } else { connected = false }
            return (expired, rearm, state.lastConnectError, connected)
        }
        if let next { eventLoop.scheduleTask(deadline: next) { self.expireRequests() } }
        let timeout = configuration.commandTimeout
        for (waiter, place) in expired {
            let error: RedisError
            switch place {
            case .inflight:
                error = RedisError(
                    code: .timeout, message: "no reply from Redis at \(address) before the request's deadline (command timeout \(timeout))")
            case .pending where !connected && lastError != nil:
                var cause = lastError!
                cause.message = "no connection to Redis at \(address) before the request's deadline; last attempt: \(cause.message)"
                error = cause
            case .pending:
                error = RedisError(
                    code: .timeout, message: "no connection to Redis at \(address) before the request's deadline (command timeout \(timeout))")
            }
            Self.fail([waiter], with: error)
        }
    }

    static func fail(_ waiters: [Waiter], with error: RedisError) {
        for waiter in waiters {
            switch waiter {
            case .single(let continuation): continuation.resume(throwing: error)
            case .batch(let collector, _): collector.fail(error)
            }
        }
    }

    // MARK: Replies (event loop)

    /// Replies decoded from `channel`; completes the oldest requests.
    func received(_ replies: [RESPValue], on channel: any Channel) {
        var ordinary = replies
        if case .pubSub(let onPush, _) = mode {
            ordinary = []
            for reply in replies {
                if Self.isPush(reply) { onPush(reply) } else { ordinary.append(reply) }
            }
            if ordinary.isEmpty { return }
        }
        var unexpected = false
        var write: ByteBuffer? = nil
        let targets = state.withLockedValue { state -> [RequestQueue<Waiter>.ReplyTarget] in
            guard state.phase.channel === channel else { return [] }
            let targets = ordinary.map { _ in
                let target = state.queue.replyReceived()
                if case .unexpected = target { unexpected = true }
                return target
            }
            if case .ready = state.phase, !state.flushScheduled { write = state.queue.takePendingForWrite() }
            return targets
        }
        if let write, !unexpected { channel.writeAndFlush(write, promise: nil) }
        for (reply, target) in zip(ordinary, targets) {
            guard case .waiter(let waiter) = target else { continue }
            switch waiter {
            case .single(let continuation):
                if case .error(let text) = reply {
                    continuation.resume(throwing: RedisError.serverReply(text, address: address))
                } else {
                    continuation.resume(returning: reply)
                }
            case .batch(let collector, let index):
                if case .error(let text) = reply {
                    collector.complete(index, .failure(RedisError.serverReply(text, address: address)))
                } else {
                    collector.complete(index, .success(reply))
                }
            }
        }
        if unexpected {
            logger.debug("reply without a request; closing the connection")
            channel.close(promise: nil)
        }
    }

    private static func isPush(_ reply: RESPValue) -> Bool {
        guard case .array(let values) = reply, let first = values.first, case .bulkString(let kind) = first else { return false }
        switch String(decoding: kind, as: UTF8.self) {
        case "message", "pmessage", "subscribe", "psubscribe", "unsubscribe", "punsubscribe": return true
        default: return false
        }
    }

    /// The channel closed (or failed): every in-flight request fails with an error naming the cause.
    func channelClosed(_ channel: any Channel, cause: (any Error)?) {
        let waiters = state.withLockedValue { state -> [Waiter] in
            guard state.phase.channel === channel else { return [] }
            state.phase = .connecting
            state.flushScheduled = false
            return state.queue.failInflight()
        }
        let because = cause.map { "\($0)" } ?? "the server closed the connection"
        if !waiters.isEmpty || cause != nil {
            logger.debug("connection lost", metadata: ["error": "\(because)", "redis.failed-requests": "\(waiters.count)"])
        }
        Self.fail(
            waiters,
            with: RedisError(
                code: .connectionLost, message: "connection to Redis at \(address) lost: \(because)", address: address, underlying: cause)
        )
    }

    // MARK: Pub/sub writes

    /// Writes a command whose replies arrive as pushes (SUBSCRIBE and friends). Returns `false` when not connected;
    /// the pub/sub registry re-sends everything on the next connection.
    @discardableResult
    func writeUntracked(_ command: RedisCommand) -> Bool {
        guard
            let channel = state.withLockedValue({ state -> (any Channel)? in
                if case .ready(let channel) = state.phase { return channel }
                return nil
            })
        else { return false }
        write(command, to: channel)
        return true
    }

    /// Writes a command on `channel` without tracking a reply.
    func write(_ command: RedisCommand, to channel: any Channel) {
        var buffer = channel.allocator.buffer(capacity: 64)
        do {
            try Hiredis.encode(command, into: &buffer)
            channel.writeAndFlush(buffer, promise: nil)
        } catch {
            logger.debug("could not encode command", metadata: ["error": "\(error)"])
        }
    }

    // MARK: Life cycle

    /// Connects, reconnects with backoff, and fails everything on cancellation. Returns when cancelled.
    func run() async {
        var attempt = 0
        while !Task.isCancelled {
            state.withLockedValue { if case .idle = $0.phase { $0.phase = .connecting } }
            let channel: any Channel
            do {
                channel = try await connect()
                do {
                    try await handshake(channel)
                } catch {
                    channel.close(promise: nil)
                    throw error
                }
            } catch {
                let failure = Self.connectError(error, address: address)
                let failedPending = state.withLockedValue { state -> [Waiter] in
                    state.lastConnectError = failure
                    if case .shutdown = state.phase { return [] }
                    state.phase = .connecting
                    return failure.code == .authenticationFailed ? state.queue.failPending() : []
                }
                Self.fail(failedPending, with: failure)
                let delay = configuration.reconnectBackoff.delay(attempt: attempt)
                logger.debug("connect failed", metadata: ["error": "\(failure.message)", "redis.retry-in": "\(delay)"])
                attempt += 1
                do { try await Task.sleep(for: delay) } catch { break }
                continue
            }
            attempt = 0
            if case .pubSub(_, let onReady) = mode { onReady(channel) }
            let flush = state.withLockedValue { state -> Bool in
                guard case .handshaking(let current) = state.phase, current === channel else { return false }
                state.phase = .ready(channel)
                state.lastConnectError = nil
                if state.queue.pendingCount > 0, !state.flushScheduled {
                    state.flushScheduled = true
                    return true
                }
                return false
            }
            if flush { eventLoop.execute { self.flush() } }
            logger.debug("connected")
            await withTaskCancellationHandler {
                try? await channel.closeFuture.get()
            } onCancel: {
                channel.close(promise: nil)
            }
        }
        let waiters = state.withLockedValue { state -> [Waiter] in
            let channel = state.phase.channel
            state.phase = .shutdown
            channel?.close(promise: nil)
            return state.queue.failAll()
        }
        Self.fail(waiters, with: RedisError(code: .clientShutdown, message: "the Redis client for \(address) was shut down", address: address))
    }

    private func connect() async throws -> any Channel {
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(
                .nanoseconds(
                    Int64(configuration.connectTimeout.components.seconds) * 1_000_000_000
                        + configuration.connectTimeout.components.attoseconds / 1_000_000_000)
            )
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RedisReplyHandler(connection: self))
                }
            }
        let channel = try await bootstrap.connect(host: configuration.host, port: configuration.port).get()
        let accepted = state.withLockedValue { state -> Bool in
            if case .shutdown = state.phase { return false }
            state.phase = .handshaking(channel)
            return true
        }
        guard accepted else {
            channel.close(promise: nil)
            throw CancellationError()
        }
        return channel
    }

    /// AUTH, SELECT and CLIENT SETNAME, pipelined, before any queued request may go out.
    private func handshake(_ channel: any Channel) async throws {
        var commands: [RedisCommand] = []
        if let password = configuration.password {
            if let user = configuration.username {
                commands.append(RedisCommand("AUTH", user, password))
            } else {
                commands.append(RedisCommand("AUTH", password))
            }
        }
        if configuration.database != 0 { commands.append(RedisCommand("SELECT", configuration.database)) }
        if let name = configuration.clientName { commands.append(RedisCommand("CLIENT", "SETNAME", name)) }
        guard !commands.isEmpty else { return }

        var buffer = channel.allocator.buffer(capacity: 128)
        for command in commands { try Hiredis.encode(command, into: &buffer) }
        let deadline = NIODeadline.now() + .nanoseconds(Int64(configuration.connectTimeout.components.seconds) * 1_000_000_000)
        let ids = commands.map { _ in nextID.wrappingAdd(1, ordering: .relaxed).newValue }
        let results = try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<[Result<RESPValue, RedisError>], any Error>) in
            let collector = PipelineCollector(count: commands.count, continuation: continuation, address: address)
            let timer = state.withLockedValue { state -> NIODeadline? in
                for (index, id) in ids.enumerated() {
                    state.queue.enqueueWritten(id: id, deadline: deadline, waiter: .batch(collector, index))
                }
                if state.timerDeadline == nil || deadline < state.timerDeadline! {
                    state.timerDeadline = deadline
                    return deadline
                }
                return nil
            }
            if let timer { eventLoop.scheduleTask(deadline: timer) { self.expireRequests() } }
            channel.writeAndFlush(buffer, promise: nil)
        }
        for (command, result) in zip(commands, results) {
            if case .failure(var error) = result {
                if command.name == "AUTH" {
                    error.code = .authenticationFailed
                    let who = configuration.username.map { "user \"\($0)\"" } ?? "the default user"
                    error.message = "authentication as \(who) to Redis at \(address) failed: \(error.message); check the URL's user and password"
                } else {
                    error.message = "\(command.name) during connection set-up to \(address) failed: \(error.message)"
                }
                throw error
            }
        }
    }

    /// Maps a connect or handshake failure to a `RedisError` that names the address and the cause.
    static func connectError(_ error: any Error, address: String) -> RedisError {
        if let error = error as? RedisError { return error }
        let text = "\(error)"
        if let connectionError = error as? NIOConnectionError {
            let refused = connectionError.connectionErrors.contains { failure in
                if let io = failure.error as? IOError { return io.errnoCode == ECONNREFUSED }
                return false
            }
            if refused {
                return RedisError(
                    code: .connectionRefused,
                    message: "could not connect to Redis at \(address): connection refused (is redis-server running there?)",
                    address: address, underlying: error)
            }
        }
        if let io = error as? IOError, io.errnoCode == ECONNREFUSED {
            return RedisError(
                code: .connectionRefused, message: "could not connect to Redis at \(address): connection refused (is redis-server running there?)",
                address: address, underlying: error)
        }
        if let channelError = error as? ChannelError, case .connectTimeout = channelError {
            return RedisError(
                code: .connectFailed, message: "could not connect to Redis at \(address): connect timed out", address: address, underlying: error)
        }
        return RedisError(code: .connectFailed, message: "could not connect to Redis at \(address): \(text)", address: address, underlying: error)
    }
}

/// Gathers the replies of a batch and resumes its caller once all arrived (or at the first connection error).
final class PipelineCollector: Sendable {
    typealias Replies = [Result<RESPValue, RedisError>]
    private struct State {
        var results: [Result<RESPValue, RedisError>?]
        var remaining: Int
        var continuation: UnsafeContinuation<Replies, any Error>?
    }
    private let state: Mutex<State>
    let address: String

    init(count: Int, continuation: UnsafeContinuation<Replies, any Error>, address: String) {
        state = Mutex(State(results: Array(repeating: nil, count: count), remaining: count, continuation: continuation))
        self.address = address
    }

    func complete(_ index: Int, _ result: Result<RESPValue, RedisError>) {
        let done = state.withLock { state -> (Replies, UnsafeContinuation<Replies, any Error>)? in
            guard state.continuation != nil, state.results[index] == nil else { return nil }
            state.results[index] = result
            state.remaining -= 1
            guard state.remaining == 0, let continuation = state.continuation else { return nil }
            state.continuation = nil
            return (state.results.map { $0! }, continuation)
        }
        if let (values, continuation) = done { continuation.resume(returning: values) }
    }

    /// A connection-level failure (or deadline) fails the whole batch, once.
    func fail(_ error: RedisError) {
        let continuation = state.withLock { state -> UnsafeContinuation<Replies, any Error>? in
            defer { state.continuation = nil }
            return state.continuation
        }
        continuation?.resume(throwing: error)
    }
}
