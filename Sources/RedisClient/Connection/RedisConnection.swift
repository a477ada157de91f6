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
        /// Nobody waits: the reply (or failure) is dropped.
        case discard
    }

    enum Mode: Sendable {
        /// Ordinary request/reply.
        case commands
        /// A pub/sub connection: array replies whose first element is a push kind go to `onPush`, and so do error
        /// replies while `awaitsSubscribeAnswer` (a (P)SUBSCRIBE is unanswered: Redis answers in command order).
        case pubSub(
            onPush: @Sendable (RESPValue) -> Void, onReady: @Sendable (any Channel) -> Void, awaitsSubscribeAnswer: @Sendable () -> Bool)
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
        /// Bumped for every timer scheduled; an older timer that fires finds a newer one armed and does nothing.
        var timerGeneration: UInt64 = 0
        /// When a reply last arrived (to tell a stuck connection from a slow command).
        var lastReplyAt = NIODeadline.now()
        /// The last error reply on the current connection (the reason, if the server hangs up right after).
        var lastErrorReply: String?
        var lastConnectError: RedisError?
        /// Why this side closed the current channel (a stuck peer, a protocol violation), for the requests it fails.
        var closeReason: String?
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

    /// Where each (re)connect goes when that can change (a cluster shard's pub/sub connection follows the slot's
    /// primary); nil: always ``RedisClientConfiguration/host``:``RedisClientConfiguration/port``.
    let endpoint: (@Sendable () -> RedisClientConfiguration.Endpoint?)?
    /// Told of every established connection (the client's ``RedisClient/connectionsEstablished``).
    let events: ConnectEvents?
    private let stopped = Atomic<Bool>(false)

    init(
        configuration: RedisClientConfiguration, mode: Mode, logger: Logger, address: String? = nil,
        endpoint: (@Sendable () -> RedisClientConfiguration.Endpoint?)? = nil, events: ConnectEvents? = nil
    ) {
        self.events = events
        self.configuration = configuration
        self.eventLoop = configuration.eventLoopGroup.next()
        self.mode = mode
        self.address = address ?? configuration.address
        self.endpoint = endpoint
        var logger = logger
        logger[metadataKey: "redis.address"] = .string(self.address)
        self.logger = logger
    }

    /// Closes the current connection so that ``run()`` connects again (to where ``endpoint`` says now).
    func reconnect() {
        let channel = state.withLockedValue { $0.phase.channel }
        channel?.close(promise: nil)
    }

    /// Whether ``stop()`` was called.
    var isStopped: Bool { stopped.load(ordering: .acquiring) }

    /// For a pub/sub connection, which sends no requests of its own: a `PING` every `interval` until ``stop()`` or
    /// cancellation. Its reply proves the link alive; without one the connection counts as stuck, closes and
    /// re-subscribes on a new one — a half-open link would otherwise leave every subscription silently dead until TCP
    /// noticed (hours).
    func keepAlive(every interval: Duration) async {
        while !isStopped {
            do { try await Task.sleep(for: interval) } catch { return }
            _ = try? await send(RedisCommand("PING"), deadline: .now() + TimeAmount(interval))
        }
    }

    /// Ends ``run()`` for good: the connection closes and is not opened again; waiting requests fail.
    func stop() {
        stopped.store(true, ordering: .releasing)
        reconnect()
    }

    /// Requests waiting to be written and requests written and waiting for a reply (for tests and diagnostics).
    var queueDepth: (pending: Int, inflight: Int) {
        state.withLockedValue { ($0.queue.pendingCount, $0.queue.inflightCount) }
    }

    /// Whether no connection is up and the last attempt to connect failed (requests would wait for a reconnect).
    var isUnreachable: Bool {
        state.withLockedValue { state in
            if case .ready = state.phase { return false }
            return state.lastConnectError != nil
        }
    }

    /// Fails every request not written yet, while no connection is up (a cluster primary that failed over: they
    /// go to its successor instead); requests already written keep waiting for their reply or deadline.
    func failUnsent(with error: RedisError) {
        let waiters = state.withLockedValue { state -> [Waiter] in
            if case .ready = state.phase { return [] }
            return state.queue.failPending()
        }
        Self.fail(waiters, with: error)
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

    /// Queues a command whose reply nobody waits for; it leaves before any command queued after it.
    func enqueueDiscarding(_ command: RedisCommand, deadline: NIODeadline) throws(RedisError) {
        let id = nextID.wrappingAdd(1, ordering: .relaxed).newValue
        try Hiredis.withEncoded(command) { bytes in
            enqueue(id: id, deadline: deadline, waiter: .discard, bytes: bytes)
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
                if Task.isCancelled {
                    continuation.resume(throwing: RedisError(code: .cancelled, message: "pipeline to \(address) cancelled before it was sent"))
                    return
                }
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
        case schedule(flush: Bool, timer: (NIODeadline, UInt64)?)
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
        let timer = armTimer(&state, deadline: deadline)
        return flush || timer != nil ? .schedule(flush: flush, timer: timer) : .none
    }

    /// Arms the deadline timer for `deadline` when none is armed for an earlier one; returns what to schedule.
    private static func armTimer(_ state: inout State, deadline: NIODeadline) -> (NIODeadline, UInt64)? {
        guard state.timerDeadline == nil || deadline < state.timerDeadline! else { return nil }
        state.timerDeadline = deadline
        state.timerGeneration &+= 1
        return (deadline, state.timerGeneration)
    }

    private func schedule(timer: (NIODeadline, UInt64)) {
        eventLoop.scheduleTask(deadline: timer.0) { self.expireRequests(generation: timer.1) }
    }

    private func perform(_ action: EnqueueAction, failing waiters: [Waiter]) {
        switch action {
        case .none:
            break
        case .fail(let error):
            Self.fail(waiters, with: error)
        case .schedule(let flush, let timer):
            if flush { eventLoop.execute { self.flush() } }
            if let timer { schedule(timer: timer) }
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

    /// The deadline timer: fails expired requests and re-arms for the earliest remaining deadline. A connection that
    /// has requests past their deadline and has sent no reply for a whole command timeout is closed (a stuck or
    /// half-open peer), so the client reconnects instead of waiting for TCP to notice.
    private func expireRequests(generation: UInt64) {
        let now = NIODeadline.now()
        let stuckAfter = TimeAmount(configuration.commandTimeout)
        let outcome = state.withLockedValue {
            state -> (
                expired: [(Waiter, RequestQueue<Waiter>.Place)], rearm: (NIODeadline, UInt64)?, lastError: RedisError?, connected: Bool,
                stuck: (any Channel)?
            )? in
            guard generation == state.timerGeneration else { return nil }
            state.timerDeadline = nil
            let (expired, next) = state.queue.expire(now: now) { waiter in
                if case .discard = waiter { return true }
                return false
            }
            let rearm = next.flatMap { Self.armTimer(&state, deadline: $0) }
            let connected: Bool
            var stuck: (any Channel)? = nil
            if case .ready(let channel) = state.phase {
                connected = true
                // Stuck: the request the server is working on (the oldest in flight) is past its own deadline and no
                // reply came for a whole command timeout. A long request at the head (BLPOP with a long timeout, a slow
                // script) with short ones behind it is not a stuck peer.
                if let head = state.queue.oldestInflightDeadline, head <= now, now - state.lastReplyAt >= stuckAfter {
                    stuck = channel
                    state.closeReason = "closed by the client: no reply for \(configuration.commandTimeout) (stuck or half-open peer)"
                }
            } else {
                connected = false
            }
            return (expired, rearm, state.lastConnectError, connected, stuck)
        }
        guard let outcome else { return }
        if let rearm = outcome.rearm { schedule(timer: rearm) }
        if let stuck = outcome.stuck {
            logger.debug("no reply for a whole command timeout; closing the connection to reconnect")
            stuck.close(promise: nil)
        }
        let timeout = configuration.commandTimeout
        for (waiter, place) in outcome.expired {
            let error: RedisError
            switch place {
            case .inflight:
                error = RedisError(
                    code: .timeout, message: "no reply from Redis at \(address) before the request's deadline (command timeout \(timeout))",
                    address: address)
            case .pending where !outcome.connected && outcome.lastError != nil:
                var cause = outcome.lastError!
                cause.message = "no connection to Redis at \(address) before the request's deadline; last attempt: \(cause.message)"
                error = cause
            case .pending:
                error = RedisError(
                    code: .timeout, message: "no connection to Redis at \(address) before the request's deadline (command timeout \(timeout))",
                    address: address)
            case .behindDropped:
                error = RedisError(
                    code: .connectionLost,
                    message:
                        "not sent to Redis at \(address): a command queued before it without waiting for its reply could not be sent before its deadline",
                    address: address)
            }
            Self.fail([waiter], with: error)
        }
    }

    static func fail(_ waiters: [Waiter], with error: RedisError) {
        for waiter in waiters {
            switch waiter {
            case .single(let continuation): continuation.resume(throwing: error)
            case .batch(let collector, _): collector.fail(error)
            case .discard: break
            }
        }
    }

    // MARK: Replies (event loop)

    /// Replies decoded from `channel`; completes the oldest requests.
    func received(_ replies: [RESPValue], on channel: any Channel) {
        var ordinary = replies
        if case .pubSub(let onPush, _, let awaitsSubscribeAnswer) = mode {
            ordinary = []
            let expecting = state.withLockedValue { $0.queue.inflightCount }
            for reply in replies {
                // Pushes, and error replies to a (P)SUBSCRIBE (e.g. NOPERM), go to the router; the rest (the
                // handshake, keepalive PINGs) complete requests.
                let refusal = reply.isError && (awaitsSubscribeAnswer() || ordinary.count >= expecting)
                if Self.isPush(reply) || refusal { onPush(reply) } else { ordinary.append(reply) }
            }
            if ordinary.isEmpty { return }
        }
        var unexpected = false
        var write: ByteBuffer? = nil
        let now = NIODeadline.now()
        let targets = state.withLockedValue { state -> [RequestQueue<Waiter>.ReplyTarget] in
            guard state.phase.channel === channel else {
                // A channel not published yet (the server greeted with an error and hung up at once): keep the
                // reason for the set-up failure to report.
                if case .error(let text) = ordinary.last { state.lastConnectError = RedisError.serverReply(text, address: address) }
                return []
            }
            state.lastReplyAt = now
            if case .error(let text) = ordinary.last { state.lastErrorReply = text }
            let targets = ordinary.map { reply in
                let target = state.queue.replyReceived()
                if case .unexpected = target {
                    unexpected = true
                    // Redis greets with an error before closing (e.g. "max number of clients reached"): keep it as
                    // the reason later requests report.
                    if case .error(let text) = reply { state.lastConnectError = RedisError.serverReply(text, address: address) }
                }
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
            case .discard:
                break
            }
        }
        if unexpected {
            logger.debug("reply without a request; closing the connection")
            state.withLockedValue { state in
                if state.phase.channel === channel { state.closeReason = "closed by the client: Redis sent a reply no request was waiting for" }
            }
            channel.close(promise: nil)
        }
    }

    private static func isPush(_ reply: RESPValue) -> Bool {
        guard case .array(let values) = reply, let first = values.first, case .bulkString(let kind) = first else { return false }
        switch String(decoding: kind, as: UTF8.self) {
        case "message", "pmessage", "subscribe", "psubscribe", "unsubscribe", "punsubscribe", "smessage", "ssubscribe", "sunsubscribe":
            return true
        default: return false
        }
    }

    /// The channel closed (or failed): every in-flight request fails with an error naming the cause.
    func channelClosed(_ channel: any Channel, cause: (any Error)?) {
        let (waiters, reason) = state.withLockedValue { state -> ([Waiter], String?) in
            guard state.phase.channel === channel else { return ([], nil) }
            state.phase = .connecting
            state.flushScheduled = false
            defer { state.closeReason = nil }
            return (state.queue.failInflight(), state.closeReason)
        }
        let because = cause.map { "\($0)" } ?? reason ?? "the server closed the connection"
        if !waiters.isEmpty || cause != nil {
            logger.debug("connection lost", metadata: ["error": "\(because)", "redis.failed-requests": "\(waiters.count)"])
        }
        Self.fail(
            waiters,
            with: RedisError(
                code: .connectionLost, message: "connection to Redis at \(address) lost: \(because)", address: address, underlying: cause)
        )
    }

    // MARK: Untracked writes (pub/sub)

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
    ///
    /// The backoff restarts only after a connection stayed up for a while, so a server that accepts and closes at
    /// once (maxclients, a proxy with no backend) is retried with growing delays, not in a tight loop.
    func run() async {
        var attempt = 0
        let stableAfter = Duration.seconds(1)
        while !Task.isCancelled, !stopped.load(ordering: .acquiring) {
            state.withLockedValue { if case .idle = $0.phase { $0.phase = .connecting } }
            let channel: any Channel
            do {
                channel = try await connect()
                do {
                    try await handshake(channel)
                } catch {
                    // Whatever the handshake left in flight belongs to this channel only.
                    abandon(channel, cause: error)
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
                guard await backOff(attempt: &attempt, after: failure.message) else { break }
                continue
            }
            if case .pubSub(_, let onReady, _) = mode { onReady(channel) }
            let (flush, ready) = state.withLockedValue { state -> (Bool, Bool) in
                guard case .handshaking(let current) = state.phase, current === channel else { return (false, false) }
                state.phase = .ready(channel)
                state.lastConnectError = nil
                state.lastErrorReply = nil
                state.lastReplyAt = .now()
                if state.queue.pendingCount > 0, !state.flushScheduled {
                    state.flushScheduled = true
                    return (true, true)
                }
                return (false, true)
            }
            if flush { eventLoop.execute { self.flush() } }
            if ready {
                events?.record()
                logger.debug("connected")
            }
            let connectedAt = ContinuousClock.now
            await withTaskCancellationHandler {
                try? await channel.closeFuture.get()
            } onCancel: {
                channel.close(promise: nil)
            }
            // The handler normally reported the close already; this covers a close it reported too early.
            channelClosed(channel, cause: nil)
            if ContinuousClock.now - connectedAt >= stableAfter {
                attempt = 0
            } else {
                // Closed right after connecting: keep what the server said last as the reason waiting requests report.
                let reason = state.withLockedValue { state -> String in
                    if state.lastConnectError == nil, let text = state.lastErrorReply {
                        state.lastConnectError = RedisError.serverReply(text, address: address)
                    }
                    return state.lastConnectError?.message ?? "the server closed the connection at once"
                }
                guard await backOff(attempt: &attempt, after: reason) else { break }
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

    /// Sleeps the next backoff delay; `false` when cancelled.
    private func backOff(attempt: inout Int, after reason: String) async -> Bool {
        let delay = configuration.reconnectBackoff.delay(attempt: attempt)
        logger.debug("reconnecting after a delay", metadata: ["error": "\(reason)", "redis.retry-in": "\(delay)"])
        attempt += 1
        do {
            try await Task.sleep(for: delay)
            return true
        } catch {
            return false
        }
    }

    /// Gives up on `channel` during set-up: close it and fail (or drop) what it had in flight.
    private func abandon(_ channel: any Channel, cause: any Error) {
        channel.close(promise: nil)
        let waiters = state.withLockedValue { state -> [Waiter] in
            guard state.phase.channel === channel else { return [] }
            state.phase = .connecting
            state.flushScheduled = false
            return state.queue.failInflight()
        }
        Self.fail(waiters, with: Self.connectError(cause, address: address))
    }

    private func connect() async throws -> any Channel {
        let bootstrap = ClientBootstrap(group: eventLoop)
            .connectTimeout(TimeAmount(configuration.connectTimeout))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(RedisReplyHandler(connection: self))
                }
            }
        let target = endpoint?() ?? .init(host: configuration.host, port: configuration.port)
        let channel = try await bootstrap.connect(host: target.host, port: target.port).get()
        let accepted = state.withLockedValue { state -> Bool in
            if case .shutdown = state.phase { return false }
            state.phase = .handshaking(channel)
            return true
        }
        guard accepted else {
            channel.close(promise: nil)
            throw CancellationError()
        }
        // A channel that closed before it was published (the server sent an error and hung up at once) was not
        // reported by the handler; never treat it as usable.
        guard channel.isActive else {
            abandon(
                channel,
                cause: RedisError(code: .connectionLost, message: "Redis at \(address) closed the connection during set-up", address: address))
            throw state.withLockedValue { $0.lastConnectError }
                ?? RedisError(code: .connectionLost, message: "Redis at \(address) closed the connection during set-up", address: address)
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
        let deadline = NIODeadline.now() + TimeAmount(configuration.connectTimeout)
        let ids = commands.map { _ in nextID.wrappingAdd(1, ordering: .relaxed).newValue }
        let results = try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<[Result<RESPValue, RedisError>], any Error>) in
            let collector = PipelineCollector(count: commands.count, continuation: continuation, address: address)
            let timer = state.withLockedValue { state -> (NIODeadline, UInt64)?? in
                // The channel may have closed (and the phase moved on) since it was published: nothing of it may
                // enter the queue, or the next connection's replies would be matched against it.
                guard state.phase.channel === channel else { return .none }
                for (index, id) in ids.enumerated() {
                    state.queue.enqueueWritten(id: id, deadline: deadline, waiter: .batch(collector, index))
                }
                return .some(Self.armTimer(&state, deadline: deadline))
            }
            guard case .some(let armed) = timer else {
                collector.fail(
                    RedisError(code: .connectionLost, message: "Redis at \(address) closed the connection during set-up", address: address))
                return
            }
            if let armed { schedule(timer: armed) }
            channel.writeAndFlush(buffer, promise: nil)
        }
        for (command, result) in zip(commands, results) {
            if case .failure(var error) = result {
                if command.name == "AUTH", error.code == .authenticationFailed || error.message.contains("invalid password") {
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

extension TimeAmount {
    /// The same span as a NIO time amount (nanosecond precision), saturating at about ±292 years instead of
    /// overflowing (a caller's "practically forever" timeout must not crash the process).
    init(_ duration: Duration) {
        let (seconds, attoseconds) = duration.components
        let (nanoseconds, overflow) = seconds.multipliedReportingOverflow(by: 1_000_000_000)
        let (total, overflowAgain) = nanoseconds.addingReportingOverflow(attoseconds / 1_000_000_000)
        self = .nanoseconds(overflow || overflowAgain ? (seconds < 0 ? .min : .max) : total)
    }
}

extension RESPValue {
    var isError: Bool {
        if case .error = self { return true }
        return false
    }
}
