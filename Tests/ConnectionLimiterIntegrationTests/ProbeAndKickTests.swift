import ConnectionLimiter
import MetricsTestKit
import RedisClient
import Synchronization
import TestSupport
import Testing

/// A probe as an embedder would supply it, scripted by the test: connections whose id starts with `dead` fail, and
/// every call is recorded.
final class ScriptedProbe: ConnectionProbe {
    let calls = Mutex<[(connections: [String], user: String, timeout: Duration)]>([])
    let delay: Duration

    init(delay: Duration = .zero) { self.delay = delay }

    func probe(connections: [String], user: String, timeout: Duration) async -> Set<String> {
        calls.withLock { $0.append((connections.sorted(), user, timeout)) }
        if delay > .zero { try? await Task.sleep(for: delay) }
        return Set(connections.filter { $0.hasPrefix("dead") })
    }
}

@Suite("Liveness probe, kicks that hold, user identity: against real Redis", .timeLimit(.minutes(2)))
struct ProbeAndKickTests {
    @Test("an owner's probe: connections that fail it are released and counted, and the admission on another node is retried")
    func probeReleasesFailures() async throws {
        let server = try await SharedRedisServer.get()
        let metrics = TestMetrics()
        let configuration = testConfiguration(limit: 3)
        var ownerConfiguration = configuration
        ownerConfiguration.metricsFactory = metrics
        let owner = try LimiterNode(url: server.url, configuration: ownerConfiguration)
        let probe = ScriptedProbe()
        owner.limiter.useProbe(probe)
        let registered = await owner.limiter.waitUntilRegistered(timeout: .seconds(10))
        try #require(registered)
        let other = try await LimiterNode.start(server.url, configuration)
        for id in ["dead1", "dead2", "live1"] { try await owner.limiter.mustAdmit("pat", id) }

        let admission = try await other.limiter.mustAdmit("pat", "new1")
        #expect(admission.count == 2)
        let left = try await other.limiter.entries(user: "pat").map(\.connection).sorted()
        #expect(left == ["live1", "new1"])
        #expect(owner.limiter.localConnectionCount == 1)
        let calls = probe.calls.withLock { $0 }
        #expect(calls.count == 1)
        #expect(calls.first?.connections == ["dead1", "dead2", "live1"])
        #expect(calls.first?.user == "pat")
        #expect(calls.first?.timeout == configuration.probe.timeout)
        #expect(try metrics.expectCounter("fleetgate_evictions_total", [("reason", "probe")]).totalValue == 2)
        // The embedder's own release of a probed-away connection is a no-op.
        await owner.limiter.release(connection: "dead1")
        #expect(owner.limiter.localConnectionCount == 1)
        await owner.stop()
        await other.stop()
    }

    @Test("without a probe, connections open on their node count as alive: the 21st is denied")
    func noProbeKeepsConnections() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 2)
        let owner = try await LimiterNode.start(server.url, configuration)
        let other = try await LimiterNode.start(server.url, configuration)
        for id in ["dead1", "dead2"] { try await owner.limiter.mustAdmit("quentin", id) }
        let decision = try await other.limiter.admit(user: "quentin", connection: "new1")
        guard case .denied(let denial) = decision else {
            Issue.record("admitted without a probe: \(decision)")
            return
        }
        #expect(denial.count == 2)
        #expect(owner.limiter.localConnectionCount == 2)
        await owner.stop()
        await other.stop()
    }

    @Test("a probe that overruns its deadline decides nothing: the admission is denied within the verify timeout")
    func slowProbeDecidesNothing() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 1) {
            $0.probe.timeout = .milliseconds(200)
            $0.verifyTimeout = .milliseconds(600)
        }
        let owner = try LimiterNode(url: server.url, configuration: configuration)
        owner.limiter.useProbe(ScriptedProbe(delay: .seconds(20)))
        try #require(await owner.limiter.waitUntilRegistered(timeout: .seconds(10)))
        try await owner.limiter.mustAdmit("rita", "dead1")
        let clock = ContinuousClock()
        let started = clock.now
        let decision = try await owner.limiter.admit(user: "rita", connection: "new1")
        let elapsed = started.duration(to: clock.now)
        #expect(!decision.isAdmitted, "\(decision)")
        #expect(elapsed < .seconds(5), "the probe's 20 s must not hold the admission: \(elapsed)")
        #expect(owner.limiter.localConnectionCount == 1)
        await owner.stop()
    }

    @Test("a kick made while its owner's Redis link is cut holds: the owner's renewal closes the connection instead of re-adding it")
    func kickHoldsWhileOwnerUnreachable() async throws {
        // A node TTL long enough that the cut does not cost the owner its lease (that path is covered below).
        try await KickScene.with({
            $0.heartbeat.interval = .milliseconds(500)
            $0.heartbeat.nodeTTL = .seconds(10)
            $0.lease.ttl = .seconds(4)
            $0.lease.renewInterval = .seconds(1)
        }) { scene in
            try await scene.owner.limiter.mustAdmit("kim", "k1")
            try await scene.owner.limiter.mustAdmit("kim", "k2")
            let ownerID = scene.owner.limiter.nodeID
            // The owner's pub/sub link (and every other link) is cut: the kick message reaches nobody. The operator's
            // node stops right after (its retries of the message go with it): only the mark in Redis is left.
            scene.proxy.cut()
            try await scene.operatorNode.limiter.kick(user: "kim", node: ownerID, connection: "k1")
            await scene.operatorNode.stop()
            scene.proxy.restore()
            guard case .kick(let connection, let user, let reason) = await scene.events.nextKick() else {
                Issue.record("the kicked connection was never closed")
                return
            }
            #expect(connection == "k1")
            #expect(user == "kim")
            #expect(reason == .kickedAtRenewal)
            #expect(scene.owner.limiter.localConnectionCount == 1)
            // Renewals go on: k1 is never back, k2 stays.
            #expect(try await scene.eventuallyMembers(of: "kim") { $0 == ["\(ownerID):k2"] })
        }
    }

    @Test("a kick message nobody received is published again, and reaches its owner once it is back")
    func kickDeliveryRetried() async throws {
        // Renewals far apart: the retried message, not the renewal, is what closes the connection here.
        try await KickScene.with({
            $0.heartbeat.interval = .milliseconds(500)
            $0.heartbeat.nodeTTL = .seconds(10)
            $0.lease.ttl = .seconds(60)
            $0.lease.renewInterval = .seconds(30)
        }) { scene in
            try await scene.owner.limiter.mustAdmit("kit", "k1")
            scene.proxy.cut()
            try await scene.operatorNode.limiter.kick(user: "kit", node: scene.owner.limiter.nodeID, connection: "k1")
            scene.proxy.restore()
            guard case .kick(let connection, _, let reason) = await scene.events.nextKick() else {
                Issue.record("the kick never reached its owner")
                return
            }
            #expect(connection == "k1")
            #expect(reason == .operatorRequest)
            #expect(scene.owner.limiter.localConnectionCount == 0)
        }
    }

    @Test("a kick made while its owner lost its lease holds across the re-admission under a new id")
    func kickHoldsAcrossReadmission() async throws {
        try await KickScene.with({
            $0.lease.ttl = .seconds(30)
            $0.lease.renewInterval = .seconds(10)
        }) { scene in
            try await scene.owner.limiter.mustAdmit("lou", "l1")
            try await scene.owner.limiter.mustAdmit("lou", "l2")
            let first = scene.owner.limiter.nodeID
            scene.proxy.cut()
            try await scene.operatorNode.limiter.kick(user: "lou", node: first, connection: "l1")
            await scene.operatorNode.stop()
            // Redis expires the owner's lease while it is cut off; it re-registers under a new id and re-admits.
            let expired = try await withClient(scene.server.url) { redis in
                try await eventually { try await leaseHasRunOut(redis, scene.configuration, node: first) }
            }
            try #require(expired)
            scene.proxy.restore()
            guard case .kick(let connection, _, let reason) = await scene.events.nextKick() else {
                Issue.record("the kicked connection was re-admitted instead of closed")
                return
            }
            #expect(connection == "l1")
            #expect(reason == .kickedAtRenewal)
            let readmitted = try await scene.eventuallyMembers(of: "lou") { members in
                members.count == 1 && members[0].hasSuffix(":l2") && !members[0].hasPrefix(first)
            }
            #expect(readmitted, "l2 re-admitted under the new id, l1 not at all")
            #expect(scene.owner.limiter.localConnectionCount == 1)
        }
    }

    @Test("NFC and NFD spellings of one name are two users on one node, through a renewal that re-adds lost entries")
    func userIdentityIsBytes() async throws {
        let server = try await SharedRedisServer.get()
        let configuration = testConfiguration(limit: 1)
        let node = try await LimiterNode.start(server.url, configuration)
        let composed = "caf\u{E9}"
        let decomposed = "cafe\u{301}"
        try await node.limiter.mustAdmit(composed, "nfc1")
        // Limit 1: if the two were one user, this would be denied.
        try await node.limiter.mustAdmit(decomposed, "nfd1")
        #expect(try await node.limiter.entries(user: composed).map(\.connection) == ["nfc1"])
        #expect(try await node.limiter.entries(user: decomposed).map(\.connection) == ["nfd1"])
        // Lose both entries; the next renewal re-adds each under its own user's key.
        let keys = try await withClient(server.url) { redis in
            let keys = try await redis.send("KEYS", "\(configuration.keyPrefix):{u:caf*}:conns").array?.compactMap(\.string) ?? []
            for key in keys { _ = try await redis.send("DEL", key) }
            return keys
        }
        #expect(keys.count == 2, "one key per spelling: \(keys)")
        let back = try await eventually {
            let nfc = try await node.limiter.entries(user: composed).map(\.connection)
            let nfd = try await node.limiter.entries(user: decomposed).map(\.connection)
            return nfc == ["nfc1"] && nfd == ["nfd1"]
        }
        #expect(back, "each spelling's entry is back under its own key")
        #expect(node.limiter.localConnectionCount == 2)
        await node.stop()
    }
}

/// A Redis server of its own, an owner node behind a TCP proxy (so the test can cut its links), and an operator node
/// straight on Redis; everything is stopped afterwards.
struct KickScene {
    let server: RedisServer
    let proxy: TCPProxy
    let configuration: LimiterConfiguration
    let owner: LimiterNode
    let operatorNode: LimiterNode
    let events: LimiterEvents

    static func with(_ adjust: (inout LimiterConfiguration) -> Void, _ body: (KickScene) async throws -> Void) async throws {
        try await RedisServer.withServer { server throws in
            let proxy = try await TCPProxy.start(upstreamPort: server.port)
            let configuration = testConfiguration(limit: 5, adjust)
            let owner = try await LimiterNode.start(proxy.url, configuration)
            let operatorNode = try await LimiterNode.start(server.url, configuration)
            let scene = KickScene(
                server: server, proxy: proxy, configuration: configuration, owner: owner, operatorNode: operatorNode,
                events: LimiterEvents(owner.limiter, timeout: .seconds(20)))
            try await body(scene)
            await owner.stop()
            await operatorNode.stop()
            await proxy.stop()
        }
    }

    /// Waits until the user's members in Redis satisfy `condition` (bounded, as `eventually`).
    func eventuallyMembers(of user: String, _ condition: @escaping @Sendable ([String]) -> Bool) async throws -> Bool {
        let key = connsKey(configuration, user)
        return try await withClient(server.url) { redis in
            try await eventually {
                condition(try await redis.send("ZRANGE", key, 0, -1).array?.compactMap(\.string) ?? [])
            }
        }
    }
}
