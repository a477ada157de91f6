import Logging
import NIOConcurrencyHelpers
import NIOCore

/// Sharded pub/sub on Redis Cluster (`SSUBSCRIBE`, `SPUBLISH`): a message stays on the shard that owns its
/// channel's slot instead of being broadcast over the cluster bus to every node, so the control traffic of a fleet
/// grows with the shard, not with the cluster, and a subscriber needs no connection to any other shard.
///
/// One pub/sub connection per slot that has subscribers, to that slot's primary; when the map moves the slot (a
/// failover, a reshard) or the server ends the subscription (`sunsubscribe` nobody asked for), the connection
/// reconnects to the slot's new primary and subscribes again. A connection whose subscribers are all gone is stopped
/// when the next subscription is made.
final class ClusterPubSub: Sendable {
    private final class Shard: Sendable {
        let slot: Int
        let router: PubSubRouter
        let connection: RedisConnection
        /// Where the connection went last (the endpoint provider's last answer).
        let connectedTo = NIOLockedValueBox<String?>(nil)
        /// Subscriptions being set up through this shard: it is not stopped meanwhile.
        let pending = NIOLockedValueBox(0)

        init(slot: Int, router: PubSubRouter, connection: RedisConnection) {
            self.slot = slot
            self.router = router
            self.connection = connection
        }
    }

    private let cluster: ClusterRouter
    private let shards = NIOLockedValueBox<[Int: Shard]>([:])

    init(cluster: ClusterRouter) {
        self.cluster = cluster
    }

    /// Subscribes to `channels`, which must all hash to one slot (as `SSUBSCRIBE` requires).
    func subscribe(channels: [String], deadline: NIODeadline, timeout: Duration) async throws -> RedisSubscription {
        guard let first = channels.first else {
            throw RedisError(code: .invalidArgument, message: "subscribe needs at least one channel")
        }
        let slots = channels.map { HashSlot.of($0) }
        if Set(slots).count > 1 {
            throw RedisError(
                code: .crossSlot,
                message:
                    "sharded pub/sub on Redis Cluster needs the channels of one subscription in one slot; "
                    + "\(zip(channels, slots).map { "\($0) → \($1)" }.joined(separator: ", ")): subscribe to them separately or give them one hash tag"
            )
        }
        // The map must be known before the connection asks where the slot lives.
        _ = try await cluster.primaries(deadline: deadline)
        let shard = shard(for: HashSlot.of(first))
        defer { shard.pending.withLockedValue { $0 -= 1 } }
        return try await shard.router.subscribe(channels: channels, patterns: [], deadline: deadline, timeout: timeout)
    }

    /// The shard of `slot` (started at first use), marked as in use by one more subscription; idle shards of other
    /// slots are stopped.
    private func shard(for slot: Int) -> Shard {
        let (shard, new, retired) = shards.withLockedValue { shards -> (Shard, Bool, [Shard]) in
            let retired = shards.values.filter { $0.slot != slot && $0.router.isIdle && $0.pending.withLockedValue { $0 } == 0 }
            for old in retired { shards[old.slot] = nil }
            if let existing = shards[slot] {
                existing.pending.withLockedValue { $0 += 1 }
                return (existing, false, retired)
            }
            let shard = makeShard(slot: slot)
            shard.pending.withLockedValue { $0 += 1 }
            shards[slot] = shard
            return (shard, true, retired)
        }
        for old in retired {
            old.router.shutdown()
            old.connection.stop()
        }
        if new { cluster.launch { await self.run(shard) } }
        return shard
    }

    private func makeShard(slot: Int) -> Shard {
        let cluster = self.cluster
        let box = NIOLockedValueBox<Shard?>(nil)
        let router = PubSubRouter(
            address: "slot \(slot) of \(cluster.configuration.clusterSeeds.map(\.description).joined(separator: ","))", logger: cluster.logger,
            sharded: true,
            onMoved: { [weak self] in
                guard let self, let shard = box.withLockedValue({ $0 }) else { return }
                Task { await self.moved(shard) }
            })
        let connection = RedisConnection(
            configuration: cluster.configuration,
            mode: .pubSub(
                onPush: { [weak router] in router?.push($0) }, onReady: { [weak router] in router?.connected($0) },
                awaitsSubscribeAnswer: { [weak router] in (router?.unansweredSubscribes ?? 0) > 0 }),
            logger: cluster.logger, address: "pub/sub of slot \(slot)",
            endpoint: {
                guard let address = cluster.owner(of: slot) else { return nil }
                box.withLockedValue { $0 }?.connectedTo.withLockedValue { $0 = address }
                return ClusterRouter.endpoint(address)
            }, events: cluster.events)
        router.attach(connection)
        let shard = Shard(slot: slot, router: router, connection: connection)
        box.withLockedValue { $0 = shard }
        return shard
    }

    /// Runs a shard's connection, with a keepalive `PING` every command timeout (a half-open link would otherwise
    /// leave the subscription silently dead).
    private func run(_ shard: Shard) async {
        await withDiscardingTaskGroup { group in
            group.addTask { await shard.connection.run() }
            group.addTask { await shard.connection.keepAlive(every: max(self.cluster.configuration.commandTimeout, .seconds(1))) }
        }
    }

    /// The server ended a subscription of `shard` (its slot moved): load the map again and reconnect.
    private func moved(_ shard: Shard) async {
        await cluster.refresh(force: true)
        shard.connection.reconnect()
    }

    /// The slot map changed: shards whose slot now lives elsewhere reconnect there.
    func mapChanged() {
        let all = shards.withLockedValue { Array($0.values) }
        for shard in all {
            let now = cluster.owner(of: shard.slot)
            if let now, shard.connectedTo.withLockedValue({ $0 }) != now { shard.connection.reconnect() }
        }
    }

    /// The client stopped: every subscription ends.
    func shutdown() {
        let all = shards.withLockedValue { shards -> [Shard] in
            defer { shards = [:] }
            return Array(shards.values)
        }
        for shard in all {
            shard.router.shutdown()
            shard.connection.stop()
        }
    }
}
