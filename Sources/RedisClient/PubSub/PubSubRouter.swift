import Logging
import NIOCore
import Synchronization

/// The pub/sub registry: which subscription listens to which channel or pattern, what the server has confirmed on
/// the current connection, and who waits for a confirmation. Re-subscribes everything on every new connection.
final class PubSubRouter: Sendable {
    struct Topic: Hashable {
        var name: String
        var isPattern: Bool
    }

    private struct Subscriber {
        var topics: [Topic]
        var continuation: AsyncStream<RedisPubSubMessage>.Continuation
    }

    private struct Confirmation {
        var waiting: Set<Topic>
        var continuation: CheckedContinuation<Void, any Error>
    }

    /// A (P)SUBSCRIBE written on the current connection and not fully confirmed yet. Redis answers commands in
    /// order: one confirmation per topic, or one error reply (`NOPERM`) for the whole command.
    private struct SentSubscribe {
        var topics: [Topic]
        var unconfirmed: Int
    }

    private struct State {
        var subscribers: [UInt64: Subscriber] = [:]
        var sent: [SentSubscribe] = []
        var listeners: [Topic: Set<UInt64>] = [:]
        var confirmed: Set<Topic> = []
        var confirmations: [UInt64: Confirmation] = [:]
        var channel: (any Channel)?
        var needed = false
        var neededWaiter: CheckedContinuation<Bool, Never>?
        var shutdown = false
        var nextID: UInt64 = 0
    }

    private let state = Mutex(State())
    private let connection = Mutex<RedisConnection?>(nil)
    let address: String
    let logger: Logger
    /// Sharded pub/sub (Redis Cluster): `SSUBSCRIBE`/`SUNSUBSCRIBE`, `smessage` pushes, no patterns.
    let sharded: Bool
    /// Called when the server ends a sharded subscription nobody gave up (its slot moved to another shard).
    let onMoved: (@Sendable () -> Void)?

    init(address: String, logger: Logger, sharded: Bool = false, onMoved: (@Sendable () -> Void)? = nil) {
        self.address = address
        self.logger = logger
        self.sharded = sharded
        self.onMoved = onMoved
    }

    /// Whether no subscription listens here and none is being set up.
    var isIdle: Bool { state.withLock { $0.subscribers.isEmpty } }

    /// (P)SUBSCRIBE commands written on the current connection and not fully answered yet; while there is one, an
    /// error reply is its answer.
    var unansweredSubscribes: Int { state.withLock { $0.sent.count } }

    func attach(_ connection: RedisConnection) {
        self.connection.withLock { $0 = connection }
    }

    /// Waits until the first subscription; `false` when the client shut down first.
    func waitUntilNeeded() async -> Bool {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                let resume = state.withLock { state -> Bool? in
                    if state.shutdown || Task.isCancelled { return false }
                    if state.needed { return true }
                    state.neededWaiter = continuation
                    return nil
                }
                if let resume { continuation.resume(returning: resume) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> CheckedContinuation<Bool, Never>? in
                state.shutdown = true
                defer { state.neededWaiter = nil }
                return state.neededWaiter
            }
            waiter?.resume(returning: false)
        }
    }

    func subscribe(channels: [String], patterns: [String], deadline: NIODeadline, timeout: Duration) async throws -> RedisSubscription {
        let topics = channels.map { Topic(name: $0, isPattern: false) } + patterns.map { Topic(name: $0, isPattern: true) }
        guard !topics.isEmpty else {
            throw RedisError(code: .invalidArgument, message: "subscribe needs at least one channel or pattern")
        }
        let (stream, continuation) = AsyncStream<RedisPubSubMessage>.makeStream(bufferingPolicy: .unbounded)
        let id: UInt64
        let connection = connection.withLock { $0 }
        let (registered, wake) = try state.withLock { state throws(RedisError) in
            if state.shutdown {
                throw RedisError(code: .clientShutdown, message: "the Redis client for \(address) was shut down")
            }
            state.nextID += 1
            let id = state.nextID
            state.subscribers[id] = Subscriber(topics: topics, continuation: continuation)
            var newTopics: [Topic] = []
            for topic in topics {
                if state.listeners[topic, default: []].isEmpty { newTopics.append(topic) }
                state.listeners[topic, default: []].insert(id)
            }
            var wake: CheckedContinuation<Bool, Never>? = nil
            if !state.needed {
                state.needed = true
                wake = state.neededWaiter
                state.neededWaiter = nil
            }
            // Written under the lock, so (UN)SUBSCRIBEs of concurrent callers reach the server in the order in which
            // they changed the listeners.
            if let channel = state.channel, let connection, !newTopics.isEmpty {
                writeSubscribe(newTopics, on: channel, with: connection, state: &state)
            }
            return (id, wake)
        }
        id = registered
        wake?.resume(returning: true)
        continuation.onTermination = { [weak self] _ in self?.remove(id) }
        let subscription = RedisSubscription(stream: stream, id: id, router: self)
        do {
            try await waitForConfirmation(of: Set(topics), id: id, deadline: deadline, timeout: timeout)
        } catch {
            remove(id)
            throw error
        }
        return subscription
    }

    /// Waits until the server confirmed every topic; throws at the deadline, or `cancelled` when the task is.
    private func waitForConfirmation(of topics: Set<Topic>, id: UInt64, deadline: NIODeadline, timeout: Duration) async throws {
        let eventLoop = connection.withLock { $0 }?.eventLoop
        try await withTaskCancellationHandler {
            try await confirmation(of: topics, id: id, deadline: deadline, timeout: timeout, eventLoop: eventLoop)
        } onCancel: {
            let waiting = state.withLock { $0.confirmations.removeValue(forKey: id) }
            waiting?.continuation.resume(throwing: RedisError(code: .cancelled, message: "subscription to \(address) was cancelled"))
        }
    }

    private func confirmation(of topics: Set<Topic>, id: UInt64, deadline: NIODeadline, timeout: Duration, eventLoop: (any EventLoop)?)
        async throws
    {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let (done, cancelled) = state.withLock { state -> (Bool, Bool) in
                let waiting = topics.subtracting(state.confirmed)
                if waiting.isEmpty { return (true, false) }
                // Cancelled before the continuation was stored: the handler found nothing to resume.
                if Task.isCancelled { return (true, true) }
                state.confirmations[id] = Confirmation(waiting: waiting, continuation: continuation)
                return (false, false)
            }
            if done {
                if cancelled {
                    continuation.resume(throwing: RedisError(code: .cancelled, message: "subscription to \(address) was cancelled"))
                } else {
                    continuation.resume()
                }
                return
            }
            eventLoop?.scheduleTask(deadline: deadline) {
                let expired = self.state.withLock { $0.confirmations.removeValue(forKey: id) }
                expired?.continuation.resume(
                    throwing: RedisError(
                        code: .timeout,
                        message: "Redis at \(self.address) did not confirm the subscription within \(timeout)",
                        address: self.address
                    ))
            }
        }
    }

    /// Ends subscription `id`; unsubscribes from topics nobody listens to any more.
    func remove(_ id: UInt64) {
        let connection = connection.withLock { $0 }
        let (subscriber, confirmation) = state.withLock { state -> (Subscriber?, Confirmation?) in
            guard let subscriber = state.subscribers.removeValue(forKey: id) else { return (nil, nil) }
            var drop: [Topic] = []
            for topic in subscriber.topics {
                state.listeners[topic]?.remove(id)
                if state.listeners[topic]?.isEmpty == true {
                    state.listeners[topic] = nil
                    state.confirmed.remove(topic)
                    drop.append(topic)
                }
            }
            if let channel = state.channel, let connection, !drop.isEmpty {
                for command in Self.commands(for: drop, subscribe: false, sharded: sharded) { connection.write(command, to: channel) }
            }
            return (subscriber, state.confirmations.removeValue(forKey: id))
        }
        subscriber?.continuation.finish()
        confirmation?.continuation.resume(throwing: RedisError(code: .cancelled, message: "subscription to \(address) was cancelled"))
    }

    /// A new pub/sub connection (before requests flow): subscribe to every topic again.
    func connected(_ channel: any Channel) {
        let connection = connection.withLock { $0 }
        let count = state.withLock { state -> Int in
            state.channel = channel
            state.confirmed = []
            state.sent = []
            let topics = Array(state.listeners.keys)
            if let connection, !topics.isEmpty {
                writeSubscribe(topics, on: channel, with: connection, state: &state)
            }
            return topics.count
        }
        if count > 0 { logger.debug("re-subscribing", metadata: ["redis.topics": "\(count)"]) }
    }

    /// A push from the server: a message, or a (un)subscribe confirmation. Called on the event loop, in order.
    func push(_ reply: RESPValue) {
        if case .error(let text) = reply {
            refuse(RedisError.serverReply(text, address: address))
            return
        }
        guard case .array(let values) = reply, values.count >= 3, let kind = values[0].string else { return }
        switch kind {
        case "message", "smessage":
            guard let channel = values[1].string, let payload = values[2].bytes else { return }
            deliver(RedisPubSubMessage(channel: channel, pattern: nil, payload: payload), to: Topic(name: channel, isPattern: false))
        case "pmessage":
            guard values.count >= 4, let pattern = values[1].string, let channel = values[2].string, let payload = values[3].bytes else { return }
            deliver(RedisPubSubMessage(channel: channel, pattern: pattern, payload: payload), to: Topic(name: pattern, isPattern: true))
        case "subscribe", "psubscribe", "ssubscribe":
            guard let name = values[1].string else { return }
            confirm(Topic(name: name, isPattern: kind == "psubscribe"))
        case "sunsubscribe":
            // Unasked for while someone listens: the channel's slot moved (a reshard, a failover); the cluster
            // client finds the new shard and reconnects there, which subscribes again.
            guard let name = values[1].string, state.withLock({ $0.listeners[Topic(name: name, isPattern: false)] != nil }) else { return }
            logger.info("sharded subscription ended by the server (its slot moved)", metadata: ["redis.channel": "\(name)"])
            onMoved?()
        default:
            break
        }
    }

    private func deliver(_ message: RedisPubSubMessage, to topic: Topic) {
        let continuations = state.withLock { state in
            (state.listeners[topic] ?? []).compactMap { state.subscribers[$0]?.continuation }
        }
        for continuation in continuations { continuation.yield(message) }
    }

    private func confirm(_ topic: Topic) {
        let ready = state.withLock { state -> [CheckedContinuation<Void, any Error>] in
            if !state.sent.isEmpty {
                state.sent[0].unconfirmed -= 1
                if state.sent[0].unconfirmed <= 0 { state.sent.removeFirst() }
            }
            guard state.listeners[topic] != nil else { return [] }
            state.confirmed.insert(topic)
            var ready: [CheckedContinuation<Void, any Error>] = []
            for (id, var confirmation) in state.confirmations {
                confirmation.waiting.remove(topic)
                if confirmation.waiting.isEmpty {
                    state.confirmations[id] = nil
                    ready.append(confirmation.continuation)
                } else {
                    state.confirmations[id] = confirmation
                }
            }
            return ready
        }
        for continuation in ready { continuation.resume() }
    }

    /// The server refused the oldest unconfirmed (P)SUBSCRIBE (for example `NOPERM`): the subscriptions that listen to
    /// one of its topics fail with that error (or, after a reconnect, end) and are removed, so the command is not
    /// re-sent on every reconnect. Subscriptions to other topics are not affected.
    private func refuse(_ error: RedisError) {
        let refused = state.withLock { state -> Set<Topic> in
            state.sent.isEmpty ? [] : Set(state.sent.removeFirst().topics)
        }
        let victims = state.withLock { state in
            state.subscribers.filter { !refused.isDisjoint(with: $0.value.topics) }.map(\.key)
        }
        logger.warning(
            "subscription refused", metadata: ["error": "\(error.message)", "redis.topics": "\(refused.map(\.name).sorted())"])
        for id in victims {
            let confirmation = state.withLock { $0.confirmations.removeValue(forKey: id) }
            remove(id)
            confirmation?.continuation.resume(throwing: error)
        }
    }

    /// Writes the (P)SUBSCRIBE commands for `topics` and records them for ``refuse(_:)`` (under the state lock).
    private func writeSubscribe(_ topics: [Topic], on channel: any Channel, with connection: RedisConnection, state: inout State) {
        for command in Self.commands(for: topics, subscribe: true, sharded: sharded) {
            let isPattern = command.name == "PSUBSCRIBE"
            let sent = topics.filter { $0.isPattern == isPattern }
            state.sent.append(SentSubscribe(topics: sent, unconfirmed: sent.count))
            connection.write(command, to: channel)
        }
    }

    /// The client stopped: every subscription finishes, every waiter fails.
    func shutdown() {
        let (subscribers, confirmations, waiter) = state.withLock { state in
            state.shutdown = true
            defer {
                state.subscribers = [:]
                state.listeners = [:]
                state.confirmations = [:]
                state.neededWaiter = nil
            }
            return (Array(state.subscribers.values), Array(state.confirmations.values), state.neededWaiter)
        }
        waiter?.resume(returning: false)
        for subscriber in subscribers { subscriber.continuation.finish() }
        let error = RedisError(code: .clientShutdown, message: "the Redis client for \(address) was shut down")
        for confirmation in confirmations { confirmation.continuation.resume(throwing: error) }
    }

    private static func commands(for topics: [Topic], subscribe: Bool, sharded: Bool) -> [RedisCommand] {
        var commands: [RedisCommand] = []
        let channels = topics.filter { !$0.isPattern }.map(\.name)
        let patterns = topics.filter(\.isPattern).map(\.name)
        let (on, off) = sharded ? ("SSUBSCRIBE", "SUNSUBSCRIBE") : ("SUBSCRIBE", "UNSUBSCRIBE")
        if !channels.isEmpty { commands.append(RedisCommand(subscribe ? on : off, arguments: channels)) }
        if !patterns.isEmpty { commands.append(RedisCommand(subscribe ? "PSUBSCRIBE" : "PUNSUBSCRIBE", arguments: patterns)) }
        return commands
    }
}
