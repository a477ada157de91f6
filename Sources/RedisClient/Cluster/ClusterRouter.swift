import Logging
import NIOConcurrencyHelpers
import NIOCore

/// The cluster mode of ``RedisClient``: the slot map, one command connection per primary (opened at first use), and
/// the rules that move a command to the right primary (`MOVED`, `ASK`, `TRYAGAIN`, `CLUSTERDOWN`, a failed-over
/// primary).
final class ClusterRouter: Sendable {
    private struct State {
        /// The primary (`host:port`) serving each slot; nil where the map has no owner (or before the first map).
        var owners: [String?] = Array(repeating: nil, count: HashSlot.count)
        /// The primaries of the current map, in the order `CLUSTER SLOTS` listed them.
        var primaries: [String] = []
        var connections: [String: RedisConnection] = [:]
        var refresh: Task<Void, Never>?
        var lastRefresh: NIODeadline?
        var lastRefreshError: RedisError?
        /// A `MOVED` was followed: the map is out of date somewhere, refresh it soon.
        var stale = false
        var shutdown = false
    }

    let configuration: RedisClientConfiguration
    let logger: Logger
    private let state = NIOLockedValueBox(State())
    /// Connections opened at first use (their run loops), handed to ``run()`` to be run in its task group.
    private let launches: AsyncStream<@Sendable () async -> Void>
    private let launcher: AsyncStream<@Sendable () async -> Void>.Continuation
    /// Sharded pub/sub, set once by the client.
    private let pubSubBox = NIOLockedValueBox<ClusterPubSub?>(nil)
    var pubSub: ClusterPubSub {
        pubSubBox.withLockedValue { box in
            if let existing = box { return existing }
            let created = ClusterPubSub(cluster: self)
            box = created
            return created
        }
    }
    /// Redirections (`MOVED`/`ASK`) one command may follow before it fails.
    static let maximumRedirections = 16

    /// Told of every connection established to a cluster node (commands and sharded pub/sub).
    let events: ConnectEvents

    init(configuration: RedisClientConfiguration, logger: Logger, events: ConnectEvents) {
        self.configuration = configuration
        self.events = events
        var logger = logger
        logger[metadataKey: "redis.cluster"] = .string(configuration.clusterSeeds.map(\.description).joined(separator: ","))
        self.logger = logger
        (launches, launcher) = AsyncStream.makeStream(of: (@Sendable () async -> Void).self)
    }

    /// Runs every connection opened so far and later, and keeps the slot map current: at once, after a `MOVED`, and
    /// every second while a primary cannot be reached (a failover promotes its replica; the map then names it).
    func run() async {
        await withDiscardingTaskGroup { group in
            group.addTask { await self.maintainMap() }
            for await body in launches {
                group.addTask { await body() }
            }
            group.cancelAll()
        }
        pubSubBox.withLockedValue { $0 }?.shutdown()
        let refresh = state.withLockedValue { state -> Task<Void, Never>? in
            state.shutdown = true
            return state.refresh
        }
        refresh?.cancel()
    }

    /// Ends ``run()``.
    func shutdown() {
        launcher.finish()
    }

    /// Runs `body` in ``run()``'s task group (a connection's run loop).
    func launch(_ body: @escaping @Sendable () async -> Void) {
        launcher.yield(body)
    }

    private func maintainMap() async {
        await refresh()
        while !Task.isCancelled {
            do { try await Task.sleep(for: .seconds(1)) } catch { return }
            let (needed, connections) = state.withLockedValue { state in
                (state.stale || state.primaries.isEmpty, state.primaries.compactMap { state.connections[$0] })
            }
            if needed || connections.contains(where: \.isUnreachable) { await refresh() }
        }
    }

    // MARK: Connections

    /// The command connection to `address`, opened (handed to ``run()``) at first use.
    func connection(to address: String) -> RedisConnection {
        let (connection, new) = state.withLockedValue { state -> (RedisConnection, Bool) in
            if let existing = state.connections[address] { return (existing, false) }
            var nodeConfiguration = configuration
            let endpoint = Self.endpoint(address) ?? .init(host: configuration.host, port: configuration.port)
            nodeConfiguration.host = endpoint.host
            nodeConfiguration.port = endpoint.port
            let connection = RedisConnection(configuration: nodeConfiguration, mode: .commands, logger: logger, events: events)
            state.connections[address] = connection
            return (connection, true)
        }
        if new { launcher.yield { await connection.run() } }
        return connection
    }

    /// `host:port` → endpoint (the port after the last colon; IPv6 hosts may come in brackets).
    static func endpoint(_ address: some StringProtocol) -> RedisClientConfiguration.Endpoint? {
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]) else { return nil }
        var host = address[..<colon]
        if host.hasPrefix("["), host.hasSuffix("]") { host = host.dropFirst().dropLast() }
        return .init(host: String(host), port: port)
    }

    // MARK: The slot map

    /// The primaries of the current map (after loading it if there is none yet).
    func primaries(deadline: NIODeadline) async throws -> [String] {
        if let primaries = state.withLockedValue({ $0.primaries.isEmpty ? nil : $0.primaries }) { return primaries }
        await refresh()
        let (primaries, error) = state.withLockedValue { ($0.primaries, $0.lastRefreshError) }
        guard !primaries.isEmpty else { throw noMap(error) }
        return primaries
    }

    private func noMap(_ error: RedisError?) -> RedisError {
        let seeds = configuration.clusterSeeds.map(\.description).joined(separator: ", ")
        return RedisError(
            code: error?.code ?? .clusterDown,
            message:
                "no Redis Cluster slot map from the seeds \(seeds)\(error.map { ": \($0.message)" } ?? ""); check that they run with cluster-enabled yes",
            address: error?.address, underlying: error)
    }

    /// Loads the slot map (`CLUSTER SLOTS`) from a primary that answers, else a seed. Concurrent callers share one
    /// refresh; a refresh less than 100 ms after the last one is skipped unless the map is empty.
    func refresh(force: Bool = false) async {
        let task = state.withLockedValue { state -> Task<Void, Never>? in
            if state.shutdown { return nil }
            if let running = state.refresh { return running }
            if !force, let last = state.lastRefresh, !state.primaries.isEmpty, NIODeadline.now() - last < .milliseconds(100) { return nil }
            let task = Task { await self.loadMap() }
            state.refresh = task
            return task
        }
        await task?.value
    }

    private func loadMap() async {
        defer {
            state.withLockedValue { state in
                state.refresh = nil
                state.lastRefresh = .now()
            }
        }
        let (known, connections) = state.withLockedValue { ($0.primaries, $0.connections) }
        var candidates: [String] = []
        // Reachable primaries first, then the seeds, then primaries that could not be reached last time.
        let reachable = known.filter { connections[$0]?.isUnreachable != true }
        for address in reachable + configuration.clusterSeeds.map(\.description) + known where !candidates.contains(address) {
            candidates.append(address)
        }
        var lastError: RedisError?
        for address in candidates {
            if Task.isCancelled { return }
            let connection = connection(to: address)
            do {
                let reply = try await connection.send(RedisCommand("CLUSTER", "SLOTS"), deadline: .now() + .milliseconds(1_000))
                let map = try Self.parseSlots(reply, askedHost: Self.endpoint(address)?.host ?? configuration.host)
                guard !map.primaries.isEmpty else {
                    lastError = RedisError(code: .clusterDown, message: "\(address) answered CLUSTER SLOTS with no slot assigned", address: address)
                    continue
                }
                apply(map, from: address)
                return
            } catch let error as RedisError {
                lastError = error
            } catch {
                lastError = RedisError(code: .server, message: "CLUSTER SLOTS at \(address) failed: \(error)", address: address, underlying: error)
            }
        }
        state.withLockedValue { $0.lastRefreshError = lastError }
        logger.warning(
            "cannot load the Redis Cluster slot map", metadata: ["redis.error": "\(lastError?.message ?? "no node to ask")"])
    }

    struct SlotMap: Equatable {
        var owners: [String?]
        var primaries: [String]
    }

    /// Parses `CLUSTER SLOTS`: `[[start, end, [host, port, id, …], replica…], …]`; an empty host means the node asked.
    static func parseSlots(_ reply: RESPValue, askedHost: String) throws(RedisError) -> SlotMap {
        guard let ranges = reply.array else {
            throw RedisError(code: .protocolError, message: "CLUSTER SLOTS answered \(reply), not an array of slot ranges")
        }
        var owners = [String?](repeating: nil, count: HashSlot.count)
        var primaries: [String] = []
        for range in ranges {
            guard let fields = range.array, fields.count >= 3, let start = fields[0].int, let end = fields[1].int,
                let node = fields[2].array, node.count >= 2, let port = node[1].int, (0..<HashSlot.count).contains(start),
                (start..<HashSlot.count).contains(end)
            else {
                throw RedisError(code: .protocolError, message: "CLUSTER SLOTS answered a malformed slot range: \(range)")
            }
            let host = node[0].string.flatMap { $0.isEmpty || $0 == "?" ? nil : $0 } ?? askedHost
            let address = RedisClientConfiguration.Endpoint(host: host, port: port).description
            if !primaries.contains(address) { primaries.append(address) }
            for slot in start...end { owners[slot] = address }
        }
        return SlotMap(owners: owners, primaries: primaries)
    }

    private func apply(_ map: SlotMap, from address: String) {
        let (before, demoted) = state.withLockedValue { state -> ([String], [RedisConnection]) in
            let before = state.primaries
            state.owners = map.owners
            state.primaries = map.primaries
            state.stale = false
            state.lastRefreshError = nil
            let demoted = before.filter { !map.primaries.contains($0) }.compactMap { state.connections[$0] }
            return (before, demoted)
        }
        // Requests queued for a primary that is gone from the map and cannot be reached were never sent: fail them
        // now with a retryable code, so they go to the new owner instead of waiting out their deadline.
        for connection in demoted where connection.isUnreachable {
            connection.failUnsent(
                with: RedisError(
                    code: .connectFailed, message: "not sent: \(connection.address) is no longer a primary of the cluster and cannot be reached",
                    address: connection.address))
        }
        pubSubBox.withLockedValue { $0 }?.mapChanged()
        if before != map.primaries {
            let uncovered = map.owners.lazy.filter { $0 == nil }.count
            logger.info(
                "Redis Cluster slot map loaded",
                metadata: [
                    "redis.primaries": "\(map.primaries.joined(separator: ","))", "redis.from": "\(address)",
                    "redis.uncovered_slots": "\(uncovered)",
                ])
        }
    }

    /// The primary serving `slot` in the current map.
    func owner(of slot: Int) -> String? {
        state.withLockedValue { $0.owners[slot] }
    }

    /// Where `route` goes now: the slot's primary, or for a keyless command the first primary; loads the map first
    /// when it has none for the slot.
    func address(for route: CommandRoute, deadline: NIODeadline) async throws -> String {
        for _ in 0..<3 {
            if let address = currentAddress(for: route) { return address }
            guard NIODeadline.now() < deadline else { break }
            await refresh()
            if currentAddress(for: route) == nil {
                // The map came back without an owner for the slot (a failover in progress): wait a little.
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
        if let address = currentAddress(for: route) { return address }
        let error = state.withLockedValue { $0.lastRefreshError }
        if case .slot(let slot) = route, state.withLockedValue({ !$0.primaries.isEmpty }) {
            throw RedisError(code: .clusterDown, message: "no Redis Cluster primary serves slot \(slot) (the map has no owner for it)")
        }
        throw noMap(error)
    }

    private func currentAddress(for route: CommandRoute) -> String? {
        state.withLockedValue { state in
            switch route {
            case .slot(let slot): return state.owners[slot]
            case .anyNode, .crossSlot: return state.primaries.first
            }
        }
    }

    /// Follows a `MOVED <slot> <host:port>`: that slot is now served there; the rest of the map is refreshed soon.
    private func moved(_ error: RedisError) -> String? {
        guard let (slot, address) = Self.redirection(error) else { return nil }
        state.withLockedValue { state in
            state.owners[slot] = address
            if !state.primaries.contains(address) { state.primaries.append(address) }
            state.stale = true
        }
        pubSubBox.withLockedValue { $0 }?.mapChanged()
        return address
    }

    /// The slot and `host:port` of a `MOVED`/`ASK` error reply (`MOVED 3999 127.0.0.1:6381`).
    static func redirection(_ error: RedisError) -> (slot: Int, address: String)? {
        let text = error.message.split(separator: ": ", maxSplits: 1).last.map(String.init) ?? error.message
        let words = text.split(separator: " ")
        guard let index = words.firstIndex(where: { $0 == "MOVED" || $0 == "ASK" }), index + 2 < words.count,
            let slot = Int(words[index + 1]), (0..<HashSlot.count).contains(slot), let endpoint = endpoint(words[index + 2])
        else { return nil }
        return (slot, endpoint.description)
    }

    // MARK: Requests

    /// The error for a command whose keys span slots.
    static func crossSlot(_ command: RedisCommand, keys: [String], slots: [Int]) -> RedisError {
        RedisError(
            code: .crossSlot,
            message:
                "\(command.name) names keys in different Redis Cluster slots (\(zip(keys, slots).map { "\($0) → \($1)" }.joined(separator: ", ")) "
                + "among \(keys.joined(separator: ", "))); not sent: put the keys under one hash tag, e.g. {user}:a and {user}:b")
    }

    /// Sends `command` to the primary of its slot, following redirections and waiting out failovers until `deadline`.
    func send(_ command: RedisCommand, deadline: NIODeadline) async throws -> RESPValue {
        let route = CommandRoute(command)
        if case .crossSlot(let keys, let slots) = route { throw Self.crossSlot(command, keys: keys, slots: slots) }
        var asking: String?
        var redirections = 0
        var retries = 0
        while true {
            let address: String
            if let asking {
                address = asking
            } else {
                address = try await self.address(for: route, deadline: deadline)
            }
            let connection = connection(to: address)
            // A primary that cannot be reached may have failed over: look for the new owner before queueing behind it.
            if asking == nil, connection.isUnreachable, try await waitForOtherOwner(of: route, than: address, deadline: deadline) {
                continue
            }
            do {
                if asking != nil {
                    let replies = try await connection.send(batch: [RedisCommand("ASKING"), command], deadline: deadline)
                    return try replies[1].get()
                }
                return try await connection.send(command, deadline: deadline)
            } catch let error as RedisError {
                asking = nil
                switch error.code {
                case .moved:
                    redirections += 1
                    guard redirections <= Self.maximumRedirections, moved(error) != nil else { throw error }
                case .ask:
                    redirections += 1
                    guard redirections <= Self.maximumRedirections, let target = Self.redirection(error) else { throw error }
                    asking = target.address
                case .tryAgain, .clusterDown, .loading:
                    retries += 1
                    if error.code == .clusterDown { await refresh() }
                    guard try await backOff(retries, deadline: deadline) else { throw error }
                case .connectionRefused, .connectFailed:
                    // Never reached the server: safe to send again once the map names another owner.
                    await refresh()
                    retries += 1
                    guard try await backOff(retries, deadline: deadline) else { throw error }
                case .connectionLost, .timeout:
                    // It may have run: not sent again; the next command finds the new owner.
                    state.withLockedValue { $0.stale = true }
                    throw error
                default:
                    throw error
                }
            }
        }
    }

    /// While the primary at `address` cannot be reached, refreshes the map until it names another owner for
    /// `route` (true) or the connection recovers or the deadline nears (false).
    private func waitForOtherOwner(of route: CommandRoute, than address: String, deadline: NIODeadline) async throws -> Bool {
        var attempt = 0
        while NIODeadline.now() < deadline {
            await refresh()
            if let now = currentAddress(for: route), now != address { return true }
            if !connection(to: address).isUnreachable { return false }
            attempt += 1
            guard try await backOff(attempt, deadline: deadline) else { return false }
        }
        return false
    }

    /// Sleeps 10 ms · 2^attempt (at most 500 ms); false when that would pass the deadline.
    private func backOff(_ attempt: Int, deadline: NIODeadline) async throws -> Bool {
        let delay = TimeAmount.milliseconds(min(500, 10 << min(attempt, 6)))
        guard NIODeadline.now() + delay < deadline else { return false }
        try await Task.sleep(for: .nanoseconds(delay.nanoseconds))
        return true
    }

    /// Queues `command` on its slot's primary without waiting for the reply; ordered before every later command to
    /// the same primary. Before the map is loaded it is sent from a task of its own (no ordering).
    func enqueueDiscarding(_ command: RedisCommand, deadline: NIODeadline) throws(RedisError) {
        let route = CommandRoute(command)
        if case .crossSlot(let keys, let slots) = route { throw Self.crossSlot(command, keys: keys, slots: slots) }
        guard let address = currentAddress(for: route) else {
            Task { _ = try? await self.send(command, deadline: deadline) }
            return
        }
        try connection(to: address).enqueueDiscarding(command, deadline: deadline)
    }

    /// Sends `commands` split per primary, each part in one write and all parts at once, and answers in the
    /// caller's order. Elements answered with a redirection or `TRYAGAIN` are sent again one by one; a command
    /// whose keys span slots fails alone. A part whose connection fails fails the whole call (thrown).
    func pipeline(_ commands: [RedisCommand], deadline: NIODeadline) async throws -> [Result<RESPValue, RedisError>] {
        if commands.count == 1 {
            // One command (an admission): the plain path, without a task group; an error reply stays a result.
            do {
                return [.success(try await send(commands[0], deadline: deadline))]
            } catch let error as RedisError where error.serverErrorPrefix != nil || error.code == .crossSlot {
                return [.failure(error)]
            }
        }
        var results = [Result<RESPValue, RedisError>?](repeating: nil, count: commands.count)
        var parts: [String: [Int]] = [:]
        var order: [String] = []
        for (index, command) in commands.enumerated() {
            let route = CommandRoute(command)
            if case .crossSlot(let keys, let slots) = route {
                results[index] = .failure(Self.crossSlot(command, keys: keys, slots: slots))
                continue
            }
            let address = try await address(for: route, deadline: deadline)
            if parts[address] == nil { order.append(address) }
            parts[address, default: []].append(index)
        }
        // Every part but the last in a child task of its own; the last one in this task (one shard: no task at all).
        func sendPart(_ address: String, _ connection: RedisConnection, _ batch: [RedisCommand]) async throws -> [Result<RESPValue, RedisError>] {
            do {
                return try await connection.send(batch: batch, deadline: deadline)
            } catch let error as RedisError where [.connectFailed, .connectionRefused].contains(error.code) {
                // Never sent (the primary cannot be reached): each command goes again on its own below, to whichever
                // primary the map names by then.
                return batch.map { _ in .failure(error) }
            }
        }
        let answered = try await withThrowingTaskGroup(of: (String, [Result<RESPValue, RedisError>]).self) { group in
            for address in order.dropLast() {
                let indexes = parts[address]!
                let batch = indexes.map { commands[$0] }
                let connection = connection(to: address)
                group.addTask { (address, try await sendPart(address, connection, batch)) }
            }
            var answered: [String: [Result<RESPValue, RedisError>]] = [:]
            if let last = order.last {
                answered[last] = try await sendPart(last, connection(to: last), parts[last]!.map { commands[$0] })
            }
            for try await (address, replies) in group { answered[address] = replies }
            return answered
        }
        for (address, replies) in answered {
            for (index, reply) in zip(parts[address]!, replies) { results[index] = reply }
        }
        for index in results.indices {
            guard case .failure(let error) = results[index],
                [.moved, .ask, .tryAgain, .clusterDown, .connectFailed, .connectionRefused].contains(error.code)
            else { continue }
            if error.code == .moved { _ = moved(error) }
            do {
                results[index] = .success(try await send(commands[index], deadline: deadline))
            } catch let error as RedisError where error.serverErrorPrefix != nil || error.code == .crossSlot {
                results[index] = .failure(error)
            }
        }
        return results.map { $0! }
    }

    /// Sends `command` to every primary of the map (`SCRIPT LOAD`, `SCAN`, `DBSIZE`), answering per primary.
    func sendToEveryPrimary(_ command: RedisCommand, deadline: NIODeadline) async throws -> [(address: String, reply: Result<RESPValue, RedisError>)]
    {
        let primaries = try await primaries(deadline: deadline)
        return try await withThrowingTaskGroup(of: (Int, String, Result<RESPValue, RedisError>).self) { group in
            for (index, address) in primaries.enumerated() {
                let connection = connection(to: address)
                group.addTask {
                    do {
                        return (index, address, .success(try await connection.send(command, deadline: deadline)))
                    } catch let error as RedisError {
                        return (index, address, .failure(error))
                    }
                }
            }
            var replies: [(Int, String, Result<RESPValue, RedisError>)] = []
            for try await reply in group { replies.append(reply) }
            return replies.sorted { $0.0 < $1.0 }.map { ($0.1, $0.2) }
        }
    }

    /// Sends `command` to the primary at `address` as it is (no routing): `SCAN` cursors belong to one node.
    func send(_ command: RedisCommand, to address: String, deadline: NIODeadline) async throws -> RESPValue {
        try await connection(to: address).send(command, deadline: deadline)
    }
}
