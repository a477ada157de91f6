import Testing

@testable import ConnectionLimiter

/// The node's life as a value: every transition without Redis, tasks or a real clock.
@Suite("Node lifecycle state machine")
struct NodeLifecycleTests {
    let start = ContinuousClock.now

    func life(_ policy: LimiterConfiguration.LeaseLossPolicy = .keep) -> NodeLifecycle {
        NodeLifecycle(node: "boot0000", heartbeatInterval: .seconds(1), nodeTTL: .seconds(5), onLeaseLoss: policy)
    }

    @Test("stopped, registering, live: admissions go to Redis only once registered")
    func registration() {
        var life = life()
        #expect(life.admissionRoute == .notRunning(node: "boot0000"))
        life.start(at: start)
        #expect(life.phase == .registering)
        #expect(life.admissionRoute == .unregistered(node: "boot0000"))
        #expect(!life.isCurrent)
        let result1 = life.registered(as: "nodeAAAA", sentAt: start)
        #expect(result1 == nil, "the first registration replaces nothing")
        #expect(life.phase == .live)
        #expect(life.admissionRoute == .redis(node: "nodeAAAA"))
        #expect(life.isCurrent && life.everRegistered)
        #expect(life.leaseDeadline == start + .seconds(5))
    }

    @Test("keep: in doubt one interval before the deadline, lost at it; a good heartbeat brings it back")
    func keepPolicy() {
        var life = life(.keep)
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        let result2 = life.tick(at: start + .seconds(3))
        #expect(result2 == [])
        #expect(life.phase == .live)
        let result3 = life.tick(at: start + .seconds(4))
        #expect(result3 == [])
        #expect(life.phase == .inDoubt)
        #expect(life.admissionRoute == .redis(node: "nodeAAAA"), "in doubt, Redis still decides")
        let result4 = life.tick(at: start + .seconds(5))
        #expect(result4 == [.announceLeaseLost(node: "nodeAAAA")])
        #expect(life.phase == .lost)
        let result5 = life.tick(at: start + .seconds(6))
        #expect(result5 == [], "announced once")
        #expect(life.admissionRoute == .unregistered(node: "nodeAAAA"), "keep: the onRedisDown policy decides")
        #expect(!life.isFenced)
        // Redis still held the lease (our clock counts from the sending): resume.
        let result6 = life.heartbeatSucceeded(for: "nodeAAAA", sentAt: start + .seconds(6))
        #expect(result6 == [.announceResumed(node: "nodeAAAA")])
        #expect(life.phase == .live)
        #expect(life.leaseDeadline == start + .seconds(11))
    }

    @Test("close: fenced one interval before the deadline, admissions refused until a heartbeat succeeds")
    func closePolicy() {
        var life = life(.close)
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        let result7 = life.tick(at: start + .milliseconds(4500))
        #expect(result7 == [.fence(node: "nodeAAAA")])
        #expect(life.phase == .fenced)
        #expect(life.isFenced)
        #expect(life.isCurrent, "fenced, the lease may still be held: peers can still reach the node")
        #expect(life.admissionRoute == .fenced(node: "nodeAAAA"))
        let result8 = life.tick(at: start + .seconds(5))
        #expect(result8 == [.announceLeaseLost(node: "nodeAAAA")])
        #expect(life.admissionRoute == .fenced(node: "nodeAAAA"))
        let result9 = life.heartbeatSucceeded(for: "nodeAAAA", sentAt: start + .seconds(5))
        #expect(result9 == [.announceResumed(node: "nodeAAAA")])
        #expect(!life.isFenced)
        #expect(life.admissionRoute == .redis(node: "nodeAAAA"))
    }

    @Test("Redis says the incarnation is gone: lost once; re-registering remembers the old id as dead")
    func expiredInRedis() {
        var life = life()
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        let result10 = life.heartbeatRefused(for: "nodeAAAA")
        #expect(result10 == [.announceLeaseLost(node: "nodeAAAA")])
        let result11 = life.heartbeatRefused(for: "nodeAAAA")
        #expect(result11 == [])
        let result12 = life.heartbeatRefused(for: "someone-else")
        #expect(result12 == [])
        let result13 = life.registered(as: "nodeBBBB", sentAt: start + .seconds(1))
        #expect(result13 == "nodeAAAA")
        #expect(life.deadIncarnations == ["nodeAAAA"])
        #expect(life.phase == .live)
        // A late answer for the old id changes nothing.
        let result14 = life.heartbeatSucceeded(for: "nodeAAAA", sentAt: start + .seconds(2))
        #expect(result14 == [])
        #expect(life.leaseDeadline == start + .seconds(6))
        for index in 0..<10 { life.registered(as: "node\(index)", sentAt: start) }
        #expect(life.deadIncarnations.count == 8, "only the last few earlier incarnations are kept")
    }

    @Test("close: Redis saying the incarnation is gone fences at once, even before the lease monitor would")
    func closePolicyRefusedHeartbeat() {
        var life = life(.close)
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        let refused = life.heartbeatRefused(for: "nodeAAAA")
        #expect(refused == [.fence(node: "nodeAAAA"), .announceLeaseLost(node: "nodeAAAA")])
        #expect(life.admissionRoute == .fenced(node: "nodeAAAA"))
        let later = life.tick(at: start + .seconds(10))
        #expect(later == [], "fenced and announced once")
        #expect(!life.isCurrent)
    }

    @Test("a registration that lands while draining is refused")
    func registrationWhileDraining() {
        var life = life()
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        _ = life.requestShutdown()
        #expect(!life.acceptsRegistration)
    }

    @Test("shutdown: draining refuses admissions and ignores registrations; run() ending stops it")
    func shutdown() {
        var life = life()
        life.start(at: start)
        life.registered(as: "nodeAAAA", sentAt: start)
        let result15 = life.requestShutdown()
        #expect(result15)
        let result16 = life.requestShutdown()
        #expect(!result16, "only the first request counts")
        #expect(life.phase == .draining)
        #expect(life.admissionRoute == .draining(node: "nodeAAAA"))
        let result17 = life.registered(as: "nodeBBBB", sentAt: start)
        #expect(result17 == nil)
        #expect(life.node == "nodeAAAA")
        let result18 = life.tick(at: start + .seconds(60))
        #expect(result18 == [], "a draining node neither fences nor announces")
        life.deregistered()
        #expect(!life.registered)
        life.stop()
        #expect(life.admissionRoute == .notRunning(node: "nodeAAAA"))
    }

    @Test("a shutdown asked for before run() makes run() drain at once")
    func shutdownBeforeStart() {
        var life = life()
        let result19 = life.requestShutdown()
        #expect(result19)
        #expect(life.phase == .stopped)
        life.start(at: start)
        #expect(life.phase == .draining)
        #expect(life.shutdownRequested)
    }

    @Test("the local fallback's share of a limit is ceil(limit / live nodes)")
    func localShare() {
        #expect(ConnectionLimiter.localShare(of: 20, liveNodes: 3) == 7)
        #expect(ConnectionLimiter.localShare(of: 20, liveNodes: 1) == 20)
        #expect(ConnectionLimiter.localShare(of: 20, liveNodes: 0) == 20)
        #expect(ConnectionLimiter.localShare(of: 1, liveNodes: 5) == 1)
        #expect(ConnectionLimiter.localShare(of: 0, liveNodes: 3) == 0)
        // Fleet-wide: n nodes × share < limit + n.
        for limit in 0...50 {
            for nodes in 1...8 { #expect(nodes * ConnectionLimiter.localShare(of: limit, liveNodes: nodes) < limit + nodes) }
        }
    }
}

@Suite("Jumps of Redis's clock, seen from heartbeat replies")
struct ClockReadingTests {
    let start = ContinuousClock.now

    func reading(redis: Int64, sentAfter: Duration, roundTrip: Duration = .milliseconds(2)) -> ClockReading {
        ClockReading(redisMilliseconds: redis, sent: start + sentAfter, received: start + sentAfter + roundTrip)
    }

    @Test("a second of heartbeats with Redis's clock moving a second is no jump, nor are slow round trips")
    func noJump() {
        let first = reading(redis: 1_000_000, sentAfter: .zero)
        #expect(first.jump(to: reading(redis: 1_001_000, sentAfter: .seconds(1))) == nil)
        // A reply that took 800 ms: Redis may have read its clock anywhere in it.
        #expect(first.jump(to: reading(redis: 1_001_800, sentAfter: .seconds(1), roundTrip: .milliseconds(800))) == nil)
        #expect(first.jump(to: reading(redis: 1_001_900, sentAfter: .seconds(1))) == nil)
    }

    @Test("Redis's clock 60 s ahead or behind after one real second is a jump of about that much, with its sign")
    func jumps() throws {
        let first = reading(redis: 1_000_000, sentAfter: .zero)
        let forward = try #require(first.jump(to: reading(redis: 1_061_000, sentAfter: .seconds(1))))
        #expect(forward > .seconds(59) && forward < .seconds(61))
        let backward = try #require(first.jump(to: reading(redis: 941_000, sentAfter: .seconds(1))))
        #expect(backward < .seconds(-59) && backward > .seconds(-61))
    }
}
