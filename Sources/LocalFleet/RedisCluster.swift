import Foundation

/// A real Redis Cluster of `redis-server` child processes on free loopback ports, for tests and the chaos runner.
///
/// ``start(primaries:replicasPerPrimary:nodeTimeout:options:)`` starts the servers, joins them with
/// `redis-cli --cluster create` and returns once the cluster has settled; ``withCluster(primaries:replicasPerPrimary:nodeTimeout:options:_:)``
/// also guarantees that every server is killed afterwards. The cluster can then be disturbed the way production
/// clusters are: a primary killed (``killPrimary(_:within:)``), a slot migrated in one go (``migrateSlot(_:to:keysPerBatch:)``)
/// or in two phases so clients meet `ASK` (``beginMigration(slot:to:)``, ``finishMigration(slot:to:keysPerBatch:)``),
/// slots resharded by `redis-cli` (``reshard(slots:from:to:)``).
///
/// Every method that changes the cluster returns once it has *settled* again: every running node reports
/// `cluster_state:ok` and all 16,384 slots assigned, all of them show the same `CLUSTER NODES` (IDs, roles, slots,
/// failure flags), killed servers are flagged `fail`, and every running replica's link to its primary is up. Redis
/// announces none of this, so the waits poll every 100 ms, with a bound.
///
/// Servers are never restarted here, so each keeps its node ID for the cluster's life. Password-protected servers are
/// not supported (`redis-cli` would be refused).
public final class RedisCluster: Sendable {
    /// Every server of the cluster, primaries and replicas, in start order. Roles change on failover: ask
    /// ``primaries()`` and ``replicas()``.
    public var servers: [RedisServer] {
        members.servers
    }

    /// `"redis+cluster://127.0.0.1:<port>,127.0.0.1:<port>,..."`: the addresses of the primaries the cluster was
    /// created with, in start order (a cluster client discovers the other nodes from any of them).
    public let seedURL: String

    private let members: Members

    /// The number of hash slots of every Redis Cluster.
    public static let slotCount = 16_384
    /// How many slots one `redis-cli --cluster reshard` moves at most, so each run stays well within ``RedisServer/cli(_:)``'s
    /// 10 s limit (about 1,000 slots take 2 s on an idle two-core machine).
    private static let slotsPerReshardRun = 500

    private init(members: Members, seedURL: String) {
        self.members = members
        self.seedURL = seedURL
    }

    // MARK: - Starting and stopping

    /// Starts `primaries × (1 + replicasPerPrimary)` cluster-enabled servers, creates the cluster with
    /// `redis-cli --cluster create --cluster-replicas <replicasPerPrimary>` and waits (at most 30 s) until it has
    /// settled with the expected number of primaries and replicas.
    ///
    /// Each server is a ``RedisServer`` started with `--cluster-enabled yes --cluster-node-timeout <nodeTimeout>
    /// --repl-diskless-sync-delay 0` followed by `options.extraArguments`; like every ``RedisServer`` it has RDB
    /// snapshots off, and AOF off unless `options.persistence` is set. (Redis's default sync delay of 5 s would hold
    /// every replica's first sync, and so the start, for 5 s.)
    /// - Parameters:
    ///   - primaries: the number of primaries; at least 3, as `redis-cli` creates no smaller cluster. Defaults to 3.
    ///   - replicasPerPrimary: replicas of each primary. Defaults to 1.
    ///   - nodeTimeout: `cluster-node-timeout`, how long a node must be unreachable before it is flagged as failing; a
    ///     replica takes over about 1–2 node timeouts after its primary died. Defaults to 2 seconds (Redis: 15), so
    ///     failover tests are quick.
    ///   - options: for every server.
    /// - Throws: ``LocalFleetError`` naming the step that failed (starting the servers, creating the cluster, waiting
    ///   for it to settle) with `redis-cli`'s output; every server started is killed first.
    public static func start(
        primaries: Int = 3,
        replicasPerPrimary: Int = 1,
        nodeTimeout: Duration = .seconds(2),
        options: RedisServer.Options = .init()
    ) async throws -> RedisCluster {
        precondition(primaries >= 3, "a Redis Cluster needs at least 3 primaries, got \(primaries)")
        precondition(replicasPerPrimary >= 0, "replicasPerPrimary must not be negative, got \(replicasPerPrimary)")
        var serverOptions = options
        serverOptions.extraArguments =
            [
                "--cluster-enabled", "yes", "--cluster-node-timeout", String(nodeTimeout.wholeMilliseconds),
                "--repl-diskless-sync-delay", "0",
            ] + options.extraArguments
        let servers: [RedisServer]
        do {
            servers = try await RedisServer.startSeveral(primaries * (1 + replicasPerPrimary), serverOptions)
        } catch {
            throw LocalFleetError("creating a Redis Cluster failed while starting its servers: \(error)")
        }
        do {
            return try await create(servers: servers, primaries: primaries, replicasPerPrimary: replicasPerPrimary)
        } catch {
            for server in servers {
                await server.kill()
            }
            throw error
        }
    }

    /// Starts a cluster as ``start(primaries:replicasPerPrimary:nodeTimeout:options:)`` does, runs `body` with it and
    /// kills every server afterwards on every path, including a thrown error or cancellation.
    public static func withCluster<T: Sendable>(
        primaries: Int = 3,
        replicasPerPrimary: Int = 1,
        nodeTimeout: Duration = .seconds(2),
        options: RedisServer.Options = .init(),
        _ body: (RedisCluster) async throws -> T
    ) async throws -> T {
        let cluster = try await start(primaries: primaries, replicasPerPrimary: replicasPerPrimary, nodeTimeout: nodeTimeout, options: options)
        do {
            let result = try await body(cluster)
            await cluster.teardown()
            return result
        } catch {
            await cluster.teardown()
            throw error
        }
    }

    /// Kills every server with SIGKILL and waits until each process is gone. Safe to call more than once.
    public func teardown() async {
        for server in servers {
            await server.kill()
        }
    }

    private static func create(servers: [RedisServer], primaries: Int, replicasPerPrimary: Int) async throws -> RedisCluster {
        let addresses = servers.map(\.address)
        let failing = "creating a Redis Cluster of \(addresses.joined(separator: " ")) failed"
        var ids: [String] = []
        for server in servers {
            do {
                ids.append(try await nodeID(askingServer: server))
            } catch {
                throw LocalFleetError("\(failing) while asking \(server.address) for its node ID: \(error)")
            }
        }
        let command = ["--cluster", "create"] + addresses + ["--cluster-replicas", String(replicasPerPrimary), "--cluster-yes"]
        let output: String
        do {
            output = try await servers[0].cli(arguments: command)
        } catch {
            throw LocalFleetError("\(failing) at `redis-cli --cluster create`: \(withoutColors("\(error)"))")
        }
        guard output.contains("[OK] All \(slotCount) slots covered") else {
            throw LocalFleetError("\(failing): `redis-cli --cluster create` did not report all slots covered:\n\(withoutColors(output))")
        }
        let members = Members(servers: servers, ids: ids)
        let topology: ClusterTopology
        do {
            topology = try await members.waitUntilSettled(within: .seconds(30)) { topology in
                let primaryNodes = topology.nodes.filter(\.isPrimary)
                guard primaryNodes.count == primaries else {
                    return "\(primaryNodes.count) primaries instead of \(primaries)"
                }
                if let short = primaryNodes.first(where: { topology.replicas(of: $0.id).count != replicasPerPrimary }) {
                    return "\(short.address) has \(topology.replicas(of: short.id).count) replicas instead of \(replicasPerPrimary)"
                }
                return nil
            }
        } catch {
            throw LocalFleetError(
                "\(failing) while waiting for it to settle after `redis-cli --cluster create`: \(error)\n"
                    + "--- output of redis-cli --cluster create ---\n\(withoutColors(output))"
            )
        }
        let seeds = zip(servers, ids).filter { topology.node($0.1)?.isPrimary == true }.map(\.0.address)
        return RedisCluster(members: members, seedURL: "redis+cluster://" + seeds.joined(separator: ","))
    }

    // MARK: - Reading the cluster

    /// The node ID of `server` (`CLUSTER MYID`), 40 hex digits.
    public func nodeID(of server: RedisServer) async throws -> String {
        try await Self.nodeID(askingServer: server)
    }

    /// The running servers that are primaries according to the cluster (`CLUSTER NODES` of a running node), in start
    /// order. A killed server is never included, even before the cluster has noticed that it is gone.
    public func primaries() async throws -> [RedisServer] {
        let (topology, _) = try await members.topology()
        return try members.running.filter { try topology.node(members.id(of: $0))?.isPrimary == true }
    }

    /// The running servers that are replicas according to the cluster (`CLUSTER NODES` of a running node), in start
    /// order.
    public func replicas() async throws -> [RedisServer] {
        let (topology, _) = try await members.topology()
        return try members.running.filter { try topology.node(members.id(of: $0))?.isPrimary == false }
    }

    /// The primary that serves `slot` according to `CLUSTER NODES` of a running node. Right after a primary was killed
    /// (before a replica took over) this is the killed server.
    /// - Throws: ``LocalFleetError`` if no running server answers or the slot has no primary.
    public func primary(forSlot slot: Int) async throws -> RedisServer {
        precondition((0..<Self.slotCount).contains(slot), "slot \(slot) is not in 0..<\(Self.slotCount)")
        let (topology, source) = try await members.topology()
        guard let owner = topology.owner(ofSlot: slot) else {
            throw LocalFleetError("slot \(slot) has no primary according to CLUSTER NODES on \(source.address)")
        }
        return try members.server(withID: owner.id)
    }

    /// The hash slot of `key`: CRC16 (XMODEM) of its UTF-8 bytes modulo 16,384, or only of its hash tag, the part
    /// between the first `{` and the next `}` if that part is not empty (`"{user1}:a"` hashes `"user1"`, `"a{}b"` and
    /// `"{}{x}"` hash the whole key). The same as `CLUSTER KEYSLOT`.
    public static func slot(of key: String) -> Int {
        let bytes = Array(key.utf8)
        var hashed = bytes[...]
        if let open = bytes.firstIndex(of: UInt8(ascii: "{")),
            let close = bytes[(open + 1)...].firstIndex(of: UInt8(ascii: "}")),
            close > open + 1
        {
            hashed = bytes[(open + 1)..<close]
        }
        return Int(crc16(hashed)) % slotCount
    }

    // MARK: - Failover

    /// Kills the primary `server` with SIGKILL and waits until one of its replicas has taken over its slots and the
    /// cluster has settled again; returns that replica, now the primary.
    /// - Parameter timeout: how long to wait for the promotion. Defaults to 20 seconds (with the default node timeout
    ///   of 2 s a replica takes over within about 4 s).
    /// - Throws: ``LocalFleetError`` if `server` is not a primary serving slots, has no running replica, or no replica
    ///   took over within `timeout` (then with what was still missing).
    @discardableResult
    public func killPrimary(_ server: RedisServer, within timeout: Duration = .seconds(20)) async throws -> RedisServer {
        let id = try members.id(of: server)
        let (before, source) = try await members.topology()
        guard let primary = before.node(id), primary.isPrimary, !primary.slots.isEmpty else {
            throw LocalFleetError("\(server.address) is not a primary serving slots according to CLUSTER NODES on \(source.address)")
        }
        let running = try Set(members.running.map { try members.id(of: $0) })
        let candidates = Set(before.replicas(of: id).map(\.id)).intersection(running)
        guard !candidates.isEmpty else {
            throw LocalFleetError("primary \(server.address) has no running replica that could take over its slots")
        }
        await server.kill()
        let promoting = "promoting a replica of killed primary \(server.address)"
        let after = try await members.waitUntilSettled(within: timeout, while: promoting) { topology in
            topology.successor(of: primary, among: candidates) == nil ? "no replica of \(server.address) serves its slots yet" : nil
        }
        guard let successor = after.successor(of: primary, among: candidates) else {
            throw LocalFleetError("no replica of killed primary \(server.address) took over its slots")
        }
        return try members.server(withID: successor.id)
    }

    /// Starts a server killed by ``killPrimary(_:within:)`` again — same port, directory and node ID (its `nodes.conf`
    /// is kept), its data wiped — and waits until it has rejoined as a replica: the primary that took over its slots
    /// has the newer configuration epoch, so the cluster turns the returning node into that primary's replica. With
    /// it, the shard can survive a second kill of its primary.
    /// - Parameter timeout: how long to wait until it serves as a replica. Defaults to 30 seconds.
    /// - Throws: ``LocalFleetError`` if the server is not one of this cluster's, is still running, cannot start, or has
    ///   not rejoined as a replica within `timeout` (then with what was still missing).
    public func rejoin(_ server: RedisServer, within timeout: Duration = .seconds(30)) async throws {
        let id = try members.id(of: server)
        guard !members.running.contains(where: { $0 === server }) else {
            throw LocalFleetError("\(server.address) is still running: only a killed server can rejoin the cluster")
        }
        try await server.restart(keepData: false)
        try await members.waitUntilSettled(within: timeout, while: "rejoining \(server.address) as a replica") { topology in
            guard let node = topology.node(id) else { return "\(server.address) is not in CLUSTER NODES" }
            return node.isPrimary ? "\(server.address) still claims to be a primary" : nil
        }
    }

    // MARK: - Moving slots

    /// Moves `slot` with its keys to the primary `target` as `redis-cli --cluster` does, with the raw commands:
    /// ``beginMigration(slot:to:)``, then ``finishMigration(slot:to:keysPerBatch:)``.
    public func migrateSlot(_ slot: Int, to target: RedisServer, keysPerBatch: Int = 100) async throws {
        try await beginMigration(slot: slot, to: target)
        try await finishMigration(slot: slot, to: target, keysPerBatch: keysPerBatch)
    }

    /// Opens the migration of `slot` from its current primary to the primary `target` without moving anything:
    /// `CLUSTER SETSLOT <slot> IMPORTING <source>` on `target`, then `CLUSTER SETSLOT <slot> MIGRATING <target>` on the
    /// source. From then on the source still serves the slot's keys it has and answers `ASK` for the others, and
    /// `target` serves the slot only after `ASKING`.
    /// - Throws: ``LocalFleetError`` if `target` already serves the slot or a node refuses (with its reply).
    public func beginMigration(slot: Int, to target: RedisServer) async throws {
        let source = try await primary(forSlot: slot)
        guard source !== target else {
            throw LocalFleetError("cannot migrate slot \(slot) to \(target.address): it already serves it")
        }
        let sourceID = try members.id(of: source)
        let targetID = try members.id(of: target)
        try await Self.expectOK(target, "CLUSTER", "SETSLOT", String(slot), "IMPORTING", sourceID)
        do {
            try await Self.expectOK(source, "CLUSTER", "SETSLOT", String(slot), "MIGRATING", targetID)
        } catch {
            _ = try? await target.cli("CLUSTER", "SETSLOT", String(slot), "STABLE")
            throw error
        }
    }

    /// Completes a migration opened by ``beginMigration(slot:to:)``: moves the slot's keys to `target` with
    /// `CLUSTER GETKEYSINSLOT` and `MIGRATE ... KEYS`, `keysPerBatch` at a time, then assigns the slot with
    /// `CLUSTER SETSLOT <slot> NODE <target>` on `target`, the source and every other primary, and waits (at most
    /// 20 s) until the cluster has settled with `target` serving the slot.
    /// - Throws: ``LocalFleetError`` if the slot is not being migrated to `target`, a `MIGRATE` fails (e.g. `BUSYKEY`
    ///   when `target` already has one of the keys) or the cluster does not settle.
    public func finishMigration(slot: Int, to target: RedisServer, keysPerBatch: Int = 100) async throws {
        precondition(keysPerBatch > 0, "keysPerBatch must be positive, got \(keysPerBatch)")
        let source = try await primary(forSlot: slot)
        let targetID = try members.id(of: target)
        let moving = "moving slot \(slot) from \(source.address) to \(target.address)"
        guard try await source.cli("CLUSTER", "NODES").contains("[\(slot)->-\(targetID)]") else {
            throw LocalFleetError("\(moving) needs beginMigration first: the slot is not migrating on \(source.address)")
        }
        while true {
            let keys = try await Self.keys(inSlot: slot, on: source, limit: keysPerBatch)
            if keys.isEmpty { break }
            let reply = try await source.cli(arguments: ["MIGRATE", target.host, String(target.port), "", "0", "5000", "KEYS"] + keys)
            guard reply == "OK" else {
                throw LocalFleetError("\(moving): MIGRATE of \(keys.count) keys answered \(reply)")
            }
        }
        // The target first: it bumps its config epoch, so its claim wins wherever the others' older claims meet it.
        let assign = ["CLUSTER", "SETSLOT", String(slot), "NODE", targetID]
        try await Self.expectOK(target, arguments: assign)
        try await Self.expectOK(source, arguments: assign)
        for primary in try await primaries() where primary !== source && primary !== target {
            try await Self.expectOK(primary, arguments: assign)
        }
        try await members.waitUntilSettled(within: .seconds(20), while: moving) { topology in
            topology.owner(ofSlot: slot)?.id == targetID ? nil : "slot \(slot) is not yet served by \(target.address) everywhere"
        }
    }

    /// Moves `count` slots (with their keys) from the primary `source` to the primary `target` with
    /// `redis-cli --cluster reshard`, at most 500 slots per run, and waits (at most 20 s per run) until the cluster has
    /// settled with `target` serving `count` more slots. `redis-cli` takes `source`'s lowest slots first.
    /// - Throws: ``LocalFleetError`` if `source` serves fewer than `count` slots, `redis-cli` fails (with its output)
    ///   or the cluster does not settle.
    public func reshard(slots count: Int, from source: RedisServer, to target: RedisServer) async throws {
        precondition(count > 0, "reshard needs a positive slot count, got \(count)")
        let sourceID = try members.id(of: source)
        let targetID = try members.id(of: target)
        let moving = "resharding \(count) slots from \(source.address) to \(target.address)"
        let (before, _) = try await members.topology()
        let available = before.node(sourceID)?.slotCount ?? 0
        guard source !== target, available >= count else {
            throw LocalFleetError("\(moving) is impossible: the source serves \(available) slots")
        }
        var expected = before.node(targetID)?.slotCount ?? 0
        var remaining = count
        while remaining > 0 {
            let slots = min(remaining, Self.slotsPerReshardRun)
            do {
                _ = try await target.cli(
                    arguments: [
                        "--cluster", "reshard", target.address, "--cluster-from", sourceID, "--cluster-to", targetID,
                        "--cluster-slots", String(slots), "--cluster-yes",
                    ])
            } catch {
                throw LocalFleetError("\(moving) failed at `redis-cli --cluster reshard`: \(Self.withoutColors("\(error)"))")
            }
            expected += slots
            remaining -= slots
            try await members.waitUntilSettled(within: .seconds(20), while: moving) { [expected] topology in
                let served = topology.node(targetID)?.slotCount ?? 0
                return served == expected ? nil : "\(target.address) serves \(served) slots instead of \(expected)"
            }
        }
    }

    // MARK: - Internals

    private static func nodeID(askingServer server: RedisServer) async throws -> String {
        let id = try await server.query("CLUSTER", "MYID")
        guard id.count == 40, id.allSatisfy(\.isHexDigit) else {
            throw LocalFleetError("CLUSTER MYID on \(server.address) answered \"\(id)\" instead of a node ID")
        }
        return id
    }

    /// Up to `limit` keys of `slot` stored on `server` (`CLUSTER GETKEYSINSLOT`, as JSON so any key survives).
    private static func keys(inSlot slot: Int, on server: RedisServer, limit: Int) async throws -> [String] {
        let output = try await server.cli("--json", "CLUSTER", "GETKEYSINSLOT", String(slot), String(limit))
        do {
            return try JSONDecoder().decode([String].self, from: Data(output.utf8))
        } catch {
            throw LocalFleetError("CLUSTER GETKEYSINSLOT \(slot) on \(server.address) answered \(output)")
        }
    }

    private static func expectOK(_ server: RedisServer, _ arguments: String...) async throws {
        try await expectOK(server, arguments: arguments)
    }

    private static func expectOK(_ server: RedisServer, arguments: [String]) async throws {
        let reply = try await server.cli(arguments: arguments)
        guard reply == "OK" else {
            throw LocalFleetError("`\(arguments.joined(separator: " "))` on \(server.address) answered \(reply)")
        }
    }

    /// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis's `crc16.c`.
    private static func crc16(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        var crc: UInt16 = 0
        for byte in bytes {
            crc ^= UInt16(byte) << 8
            for _ in 0..<8 {
                crc = crc & 0x8000 == 0 ? crc << 1 : (crc << 1) ^ 0x1021
            }
        }
        return crc
    }

    /// `text` without the ANSI colour codes `redis-cli --cluster` prints even into files.
    private static func withoutColors(_ text: String) -> String {
        text.replacing(/\u{1B}\[[0-9;]*m/, with: "")
    }
}

/// The servers of a cluster with their node IDs, and the probes that tell whether the cluster has settled.
private struct Members: Sendable {
    let servers: [RedisServer]
    /// The node ID of each of ``servers`` (same index).
    let ids: [String]

    private static let pollInterval = Duration.milliseconds(100)

    /// The servers whose process is running.
    var running: [RedisServer] {
        servers.filter { $0.pid != nil }
    }

    func id(of server: RedisServer) throws -> String {
        guard let index = servers.firstIndex(where: { $0 === server }) else {
            throw LocalFleetError("\(server.address) is not a server of this cluster")
        }
        return ids[index]
    }

    func server(withID id: String) throws -> RedisServer {
        guard let index = ids.firstIndex(of: id) else {
            throw LocalFleetError("node \(id) is not a server of this cluster")
        }
        return servers[index]
    }

    /// `CLUSTER NODES` of the first running server that answers it, with that server.
    func topology() async throws -> (ClusterTopology, RedisServer) {
        var failures: [String] = []
        for server in running {
            do {
                return (try ClusterTopology(clusterNodes: try await server.query("CLUSTER", "NODES")), server)
            } catch {
                failures.append("\(error)")
            }
        }
        let why = failures.isEmpty ? "none is running" : failures.joined(separator: "; ")
        throw LocalFleetError("no server of the cluster answers CLUSTER NODES: \(why)")
    }

    /// Polls every 100 ms until the cluster has settled (see ``RedisCluster``) and `expectation` accepts the topology
    /// (by returning nil rather than what it still misses); returns that topology.
    /// - Throws: ``LocalFleetError`` with what was still missing when `timeout` passed.
    @discardableResult
    func waitUntilSettled(
        within timeout: Duration,
        while activity: String? = nil,
        _ expectation: (ClusterTopology) -> String? = { _ in nil }
    ) async throws -> ClusterTopology {
        let deadline = ContinuousClock.now + timeout
        while true {
            let reason: String
            do {
                switch try await settlement(expectation) {
                case .settled(let topology): return topology
                case .unsettled(let why): reason = why
                }
            } catch {
                reason = "\(error)"
            }
            guard ContinuousClock.now < deadline else {
                let context = activity.map { "\($0): " } ?? ""
                throw LocalFleetError("\(context)the cluster did not settle within \(timeout): \(reason)")
            }
            try await Task.sleep(for: Self.pollInterval)
        }
    }

    private enum Settlement {
        case settled(ClusterTopology)
        case unsettled(String)
    }

    /// One probe of every running node; stops at the first thing that is not settled yet.
    private func settlement(_ expectation: (ClusterTopology) -> String?) async throws -> Settlement {
        var agreed: (topology: ClusterTopology, server: RedisServer)?
        for server in running {
            let info = Self.fields(try await server.query("CLUSTER", "INFO"))
            guard info["cluster_state"] == "ok", info["cluster_slots_assigned"] == String(RedisCluster.slotCount) else {
                let state = "cluster_state:\(info["cluster_state"] ?? "?") cluster_slots_assigned:\(info["cluster_slots_assigned"] ?? "?")"
                return .unsettled("\(server.address) reports \(state)")
            }
            let topology = try ClusterTopology(clusterNodes: try await server.query("CLUSTER", "NODES"))
            if let agreed, agreed.topology != topology {
                let difference = agreed.topology.difference(from: topology)
                return .unsettled("\(agreed.server.address) and \(server.address) disagree about \(difference)")
            }
            agreed = agreed ?? (topology, server)
        }
        guard let topology = agreed?.topology else { return .unsettled("no server is running") }
        guard topology.nodes.count == servers.count else {
            return .unsettled("the nodes know \(topology.nodes.count) nodes instead of \(servers.count)")
        }
        for (server, id) in zip(servers, ids) {
            guard let node = topology.node(id) else { return .unsettled("the nodes do not know \(server.address)") }
            guard server.pid != nil else {
                if !node.isFailed { return .unsettled("killed \(server.address) is not flagged fail yet (\(node))") }
                continue
            }
            if node.isFailed || node.isSuspected { return .unsettled("running \(server.address) is flagged failing (\(node))") }
            if !node.isPrimary {
                let replication = Self.fields(try await server.query("INFO", "replication"))
                guard replication["role"] == "slave", replication["master_link_status"] == "up" else {
                    let state = "role:\(replication["role"] ?? "?") master_link_status:\(replication["master_link_status"] ?? "?")"
                    return .unsettled("replica \(server.address) reports \(state)")
                }
            }
        }
        if let missing = expectation(topology) { return .unsettled(missing) }
        return .settled(topology)
    }

    /// The `name:value` lines of an `INFO`-style reply.
    private static func fields(_ text: String) -> [String: String] {
        var fields: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = String(line[line.index(after: colon)...])
        }
        return fields
    }
}

/// A cluster's nodes as one node shows them in `CLUSTER NODES`, reduced to what every node of a settled cluster
/// shows alike: no ping times, link states or `myself` flag, and no open slot migrations (only the two nodes
/// involved list those).
struct ClusterTopology: Equatable, Sendable {
    struct Node: Equatable, Sendable, CustomStringConvertible {
        var id: String
        /// `"127.0.0.1:<port>"`.
        var address: String
        /// E.g. `["master"]`, `["slave", "fail?"]`; without `myself`.
        var flags: Set<String>
        /// The primary's ID if this is a replica.
        var primaryID: String?
        var slots: [ClosedRange<Int>]

        var isPrimary: Bool { flags.contains("master") }
        var isFailed: Bool { flags.contains("fail") }
        var isSuspected: Bool { flags.contains("fail?") }
        var slotCount: Int { slots.reduce(0) { $0 + $1.count } }

        var description: String {
            let slotList = slots.map { $0.count == 1 ? "\($0.lowerBound)" : "\($0.lowerBound)-\($0.upperBound)" }
            let role = primaryID.map { " of \($0)" } ?? ""
            return "\(address) \(flags.sorted().joined(separator: ","))\(role) slots [\(slotList.joined(separator: " "))]"
        }
    }

    /// Sorted by ID.
    var nodes: [Node]

    /// Parses the reply of `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping-sent>
    /// <pong-recv> <config-epoch> <link-state> <slot> <slot> ...`.
    init(clusterNodes text: String) throws {
        nodes = try text.split(whereSeparator: \.isNewline).map { line in
            let fields = line.split(separator: " ")
            guard fields.count >= 8 else { throw LocalFleetError("unexpected CLUSTER NODES line: \(line)") }
            let slots = try fields.dropFirst(8).filter { !$0.hasPrefix("[") }.map { entry in
                let bounds = entry.split(separator: "-").compactMap { Int($0) }
                guard let first = bounds.first, let last = bounds.last, bounds.count == entry.split(separator: "-").count, bounds.count <= 2
                else { throw LocalFleetError("unexpected slot range \(entry) in CLUSTER NODES line: \(line)") }
                return first...last
            }
            return Node(
                id: String(fields[0]),
                address: String(fields[1].prefix { $0 != "@" }),
                flags: Set(fields[2].split(separator: ",").map(String.init)).subtracting(["myself"]),
                primaryID: fields[3] == "-" ? nil : String(fields[3]),
                slots: slots
            )
        }.sorted { $0.id < $1.id }
    }

    func node(_ id: String) -> Node? {
        nodes.first { $0.id == id }
    }

    func replicas(of primaryID: String) -> [Node] {
        nodes.filter { $0.primaryID == primaryID }
    }

    /// The primary serving `slot` (possibly a failed one that no replica has replaced yet).
    func owner(ofSlot slot: Int) -> Node? {
        nodes.first { $0.isPrimary && $0.slots.contains { $0.contains(slot) } }
    }

    /// The node among `candidates` that is now a primary serving exactly the slots `primary` served.
    func successor(of primary: Node, among candidates: Set<String>) -> Node? {
        nodes.first { candidates.contains($0.id) && $0.isPrimary && $0.slots == primary.slots }
    }

    /// The first node two topologies describe differently, for messages.
    func difference(from other: ClusterTopology) -> String {
        func describe(_ node: Node?) -> String {
            node.map(String.init(describing:)) ?? "unknown"
        }
        for id in Set(nodes.map(\.id) + other.nodes.map(\.id)).sorted() where node(id) != other.node(id) {
            return "node \(id): \(describe(node(id))) vs \(describe(other.node(id)))"
        }
        return "nothing"
    }
}

extension Duration {
    /// The duration in whole milliseconds (rounded down).
    fileprivate var wholeMilliseconds: Int64 {
        components.seconds * 1000 + components.attoseconds / 1_000_000_000_000_000
    }
}
