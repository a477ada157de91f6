import ConnectionLimiter
import Foundation
import HTTPTypes
import Hummingbird
import HummingbirdCore
import Logging
import Metrics
import NIOCore
import Prometheus
import RedisClient
import ServiceLifecycle

/// One gateway node: a Hummingbird HTTP server with WebSockets at `/ws`, every upgrade admitted by the
/// ``ConnectionLimiter`` before it happens, plus `/healthz`, `/readyz`, `/metrics` and a token-protected `/admin`.
///
/// Run it in a `ServiceGroup` after the `RedisClient` and the `ConnectionLimiter` (so a graceful shutdown drains the
/// gateway first, then the limiter releases and deregisters, then Redis closes):
///
/// ```swift
/// let group = ServiceGroup(configuration: .init(services: [redis, limiter, gateway], gracefulShutdownSignals: [.sigterm], logger: logger))
/// try await group.run()
/// ```
public final class Gateway: Service, Sendable {
    let core: GatewayCore
    let redis: RedisClient?
    let prometheus: PrometheusCollectorRegistry?
    let onListening: @Sendable (Int) async -> Void
    let logger: Logger

    /// Creates a node.
    /// - Parameters:
    ///   - configuration: listen address, deny mode, pings, limits, admin token.
    ///   - verifier: checks client tokens.
    ///   - redis: the Redis client the limiter uses (for `/readyz`); nil only with the limiter off.
    ///   - limiter: admits connections; nil (or `configuration.limiterEnabled == false`) admits everyone.
    ///   - handler: serves admitted connections. Defaults to ``AgentDemoHandler``.
    ///   - metricsFactory: where the gateway's own metrics go.
    ///   - prometheus: the registry `/metrics` exposes (nil: `/metrics` answers 404).
    ///   - logger: logs with user, connection and node metadata.
    ///   - onListening: called with the bound port once the server listens.
    public init(
        configuration: GatewayConfiguration,
        verifier: TokenVerifier,
        redis: RedisClient?,
        limiter: ConnectionLimiter?,
        handler: any GatewaySessionHandler = AgentDemoHandler(),
        metricsFactory: any MetricsFactory = MetricsSystem.factory,
        prometheus: PrometheusCollectorRegistry? = nil,
        logger: Logger = Logger(label: "fleetgate.gateway"),
        onListening: @escaping @Sendable (Int) async -> Void = { _ in }
    ) {
        self.core = GatewayCore(
            configuration: configuration, verifier: verifier, limiter: limiter, handler: handler,
            metrics: GatewayMetrics(factory: metricsFactory), logger: logger)
        if configuration.limiterEnabled, configuration.probeEnabled, let limiter { limiter.useProbe(core) }
        self.redis = redis
        self.prometheus = prometheus
        self.onListening = onListening
        self.logger = logger
    }

    /// The node's configuration.
    public var configuration: GatewayConfiguration { core.configuration }

    /// WebSocket connections admitted or open on this node.
    public var connectionCount: Int { core.connectionCount }

    /// Serves until a graceful shutdown, which stops accepting, closes every WebSocket with 1001 and waits for them
    /// (each connection's end releases its admission); the limiter's own shutdown then deregisters the node.
    public func run() async throws {
        try configuration.validate()
        let core = self.core
        // The limiter holds this gateway as its probe: let both go when the gateway stops.
        defer { core.limiter?.useProbe(nil) }
        let onListening = self.onListening
        let server = HTTPServerBuilder { responder in GatewayChannel(responder: responder, core: core) }
        let app = Application(
            router: makeRouter(),
            server: server,
            configuration: ApplicationConfiguration(address: .hostname(configuration.host, port: configuration.port), serverName: "fleetgate"),
            onServerRunning: { channel in
                // The port is read now, while the channel is bound (0 was asked for: the system picked one).
                let port = channel.localAddress?.port ?? core.configuration.port
                // Operators see where the node runs (the node's hash in Redis, `fleetgate status`).
                await core.limiter?.announce(address: Self.advertisedAddress(host: core.configuration.host, port: port))
                // Announce the node once it can admit for real (registered in Redis), or after 5 s regardless: with
                // Redis down from the start, the onRedisDown policy applies and the node still serves.
                await core.limiter?.waitUntilRegistered(timeout: .seconds(5))
                await onListening(port)
            },
            logger: logger
        )
        try await withGracefulShutdownHandler {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { await core.followLimiterEvents() }
                try await app.run()
                // The HTTP server can finish before its WebSockets do: this service ends only once every connection
                // is gone (or the drain deadline passed), so the limiter's shutdown (release all, deregister) comes after.
                let left = await core.waitUntilDrained()
                if left > 0 {
                    core.logger.warning("drain deadline passed with connections still open", metadata: ["fleetgate.open": "\(left)"])
                }
                group.cancelAll()
            }
        } onGracefulShutdown: {
            core.beginDrain()
        }
    }

    /// `host:port` as operators should use it: a wildcard listen address (`0.0.0.0`, `::`) is replaced by the host
    /// name.
    static func advertisedAddress(host: String, port: Int) -> String {
        let reachable = ["0.0.0.0", "::", "[::]", ""].contains(host) ? LimiterConfiguration.hostName() : host
        return reachable.contains(":") && !reachable.hasPrefix("[") ? "[\(reachable)]:\(port)" : "\(reachable):\(port)"
    }

    // MARK: HTTP endpoints

    func makeRouter() -> Router<BasicRequestContext> {
        let router = Router(context: BasicRequestContext.self)
        router.get("/healthz") { _, _ in
            Self.json(.ok, HealthBody())
        }
        router.get("/readyz") { _, _ in
            await self.readiness()
        }
        router.get("/metrics") { _, _ in
            guard let prometheus = self.prometheus else {
                return Self.json(.notFound, ErrorBody(error: "not_found", message: "metrics are not enabled"))
            }
            self.core.metrics.recordHeapInUse()
            var buffer: [UInt8] = []
            buffer.reserveCapacity(16 * 1024)
            prometheus.emit(into: &buffer)
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                body: ResponseBody(byteBuffer: ByteBuffer(bytes: buffer)))
        }
        router.get("/ws") { _, _ in
            Self.json(.upgradeRequired, ErrorBody(error: "upgrade_required", message: "connect with a WebSocket client (Upgrade: websocket)"))
        }
        router.get("/admin/nodes") { request, _ in
            try await self.admin(request) { limiter in
                let nodes = try await limiter.nodes()
                let totals = try await limiter.totals()
                return Self.json(
                    .ok,
                    NodesBody(
                        this: limiter.nodeID,
                        nodes: nodes.map { node in
                            NodesBody.Node(
                                id: node.id, name: node.name, address: node.address, alive: node.isAlive, connections: node.connections,
                                users: node.users, leaseRemainingMs: Self.milliseconds(node.leaseRemaining))
                        },
                        totals: NodesBody.Totals(
                            liveNodes: totals.liveNodes, deadNodes: totals.deadNodes, connections: totals.connections,
                            userNodePairs: totals.userNodePairs)))
            }
        }
        router.get("/admin/users/:id") { request, context in
            try await self.admin(request) { limiter in
                let rawUser = context.parameters.get("id") ?? ""
                let user = rawUser.removingPercentEncoding ?? rawUser
                do {
                    let entries = try await limiter.entries(user: user)
                    let override = try await limiter.limitOverride(user: user)
                    let body = UserBody(
                        user: user, count: entries.count, defaultLimit: limiter.configuration.defaultLimit,
                        entries: entries.map { entry in
                            UserBody.Entry(
                                node: entry.node, connection: entry.connection, leaseRemainingMs: Self.milliseconds(entry.leaseRemaining),
                                admittedMsAgo: entry.admittedAgo.map(Self.milliseconds))
                        },
                        override: override)
                    return Self.json(.ok, body)
                } catch let error as LimiterError {
                    if error.code == .invalidUser { return Self.json(.badRequest, ErrorBody(error: "invalid_user", message: error.message)) }
                    throw error
                }
            }
        }
        return router
    }

    private func readiness() async -> Response {
        let draining = core.isDraining
        guard let limiter = core.limiter else {
            return Self.json(draining ? .serviceUnavailable : .ok, ReadinessBody(ready: !draining, draining: draining, limiter: "off"))
        }
        let registered = limiter.isRegistered
        var redisStatus = "ok"
        if let redis {
            do {
                _ = try await redis.send(RedisCommand("PING"), timeout: .milliseconds(500))
            } catch {
                redisStatus = "\(error)"
            }
        }
        let ready = registered && redisStatus == "ok" && !draining
        return Self.json(
            ready ? .ok : .serviceUnavailable,
            ReadinessBody(
                ready: ready, draining: draining, registered: registered, redis: redisStatus, node: limiter.nodeID,
                liveNodes: limiter.liveNodeCount))
    }

    private func admin(_ request: Request, _ body: (ConnectionLimiter) async throws -> Response) async throws -> Response {
        guard let adminToken = configuration.adminToken else {
            return Self.json(.notFound, ErrorBody(error: "not_found", message: "the admin API is off (no --admin-token)"))
        }
        let presented = request.headers[.authorization].flatMap { value -> String? in
            let parts = value.split(separator: " ", maxSplits: 1)
            return parts.count == 2 && parts[0].lowercased() == "bearer" ? String(parts[1]) : nil
        }
        guard let presented, Self.constantTimeEqual(presented, adminToken) else {
            return Self.json(
                .unauthorized, ErrorBody(error: "unauthorized", message: presented == nil ? "admin token missing" : "admin token wrong"),
                headers: [.wwwAuthenticate: "Bearer realm=\"fleetgate-admin\""])
        }
        guard let limiter = core.limiter else {
            return Self.json(.serviceUnavailable, ErrorBody(error: "limiter_off", message: "this node runs without the limiter"))
        }
        do {
            return try await body(limiter)
        } catch {
            return Self.json(.serviceUnavailable, ErrorBody(error: "redis_error", message: "\(error)"))
        }
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        var difference = UInt8(x.count == y.count ? 0 : 1)
        for index in 0..<max(x.count, y.count) {
            difference |= (index < x.count ? x[index] : 0) ^ (index < y.count ? y[index] : 0)
        }
        return difference == 0
    }

    static func milliseconds(_ duration: Duration) -> Int {
        Int(duration.components.seconds * 1000 + duration.components.attoseconds / 1_000_000_000_000_000)
    }

    static func json(_ status: HTTPResponse.Status, _ body: some Encodable, headers: HTTPFields = [:]) -> Response {
        var headers = headers
        headers[.contentType] = "application/json; charset=utf-8"
        return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: JSON.encode(body) + "\n")))
    }
}
