import ArgumentParser
import ConnectionLimiter
import Foundation
import Gateway
import Logging
import Metrics
import Prometheus
import RedisClient
import ServiceLifecycle
import UnixSignals

/// `fleetgate serve`: one gateway node of a fleet.
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one gateway node: WebSockets at /ws, every connection admitted by the fleet-wide limiter.",
        discussion: """
            Every option can also come from the environment variable named in its help (the flag wins).
            Durations take a unit: 250ms, 15s, 2m. On SIGTERM or SIGINT the node stops accepting, closes every \
            WebSocket with 1001, releases its entries, deregisters and exits (within --drain-timeout).
            """
    )

    // Listening
    @Option(help: "Address to listen on. [env: FLEETGATE_HOST] (default: 127.0.0.1)") var host: String?
    @Option(help: "Port to listen on; 0 picks a free one (printed at start). [env: FLEETGATE_PORT] (default: 8080)") var port: Int?

    // Redis and the node
    @Option(
        help:
            "Redis URL, redis://[user:password@]host[:port][/db], or redis+cluster://host:port[,host:port…] for Redis Cluster. [env: FLEETGATE_REDIS_URL] (default: redis://127.0.0.1:6379)"
    )
    var redis: String?
    @Option(help: "This node's name in Redis and logs. [env: FLEETGATE_NODE_NAME] (default: the host name)") var nodeName: String?
    @Option(help: "Prefix of every Redis key. [env: FLEETGATE_KEY_PREFIX] (default: fg)") var keyPrefix: String?

    // Identity
    @Option(help: "HS256 secret for client tokens, at least 32 bytes. [env: FLEETGATE_JWT_SECRET]") var jwtSecret: String?
    @Option(help: "PEM file with the RS256 or ES256 public key for client tokens. [env: FLEETGATE_JWT_PUBLIC_KEY]") var jwtPublicKey: String?
    @Option(help: "Clock leeway for exp/nbf. [env: FLEETGATE_JWT_LEEWAY] (default: 30s)") var jwtLeeway: DurationArgument?

    // Limits and policies
    @Option(help: "Connections per user unless a token claim or a Redis override says otherwise. [env: FLEETGATE_DEFAULT_LIMIT] (default: 20)")
    var defaultLimit: Int?
    @Option(help: "How a denial is answered: http (429 + JSON) or close (accept, then close 4429). [env: FLEETGATE_DENY_MODE] (default: http)")
    var denyMode: GatewayConfiguration.DenyMode?
    @Option(
        help: "At the limit: reject-new, or evict-oldest (the oldest connection is closed with 4409). [env: FLEETGATE_OVERFLOW] (default: reject-new)"
    )
    var overflow: LimiterConfiguration.OverflowPolicy?
    @Option(help: "Redis unreachable: local (count per node) or reject (503 / 1013). [env: FLEETGATE_ON_REDIS_DOWN] (default: local)")
    var onRedisDown: LimiterConfiguration.RedisDownPolicy?
    @Option(help: "Node lease lost: keep (re-register, re-admit) or close (close all with 1012). [env: FLEETGATE_ON_LEASE_LOSS] (default: keep)")
    var onLeaseLoss: LimiterConfiguration.LeaseLossPolicy?
    @Option(help: "Never deny; count what would have been denied (on/off). [env: FLEETGATE_DRY_RUN] (default: off)") var dryRun: Switch?
    @Option(help: "on, or off to admit everyone without Redis (only for benchmarks). [env: FLEETGATE_LIMITER] (default: on)") var limiter: Switch?

    // Timings
    @Option(help: "Node heartbeat interval. [env: FLEETGATE_HEARTBEAT_INTERVAL] (default: 1s)") var heartbeatInterval: DurationArgument?
    @Option(help: "Node TTL: a node silent this long is dead and swept. [env: FLEETGATE_NODE_TTL] (default: 5s)") var nodeTTL: DurationArgument?
    @Option(help: "Connection lease TTL in Redis: the backstop for entries nobody owns. [env: FLEETGATE_LEASE_TTL] (default: 5m)") var leaseTTL: DurationArgument?
    @Option(help: "Connection lease renewal interval (early rounds follow a reconnect). [env: FLEETGATE_LEASE_RENEW_INTERVAL] (default: 2m)") var leaseRenewInterval: DurationArgument?
    @Option(
        help:
            "How long a denial waits for other nodes to verify zombies and probe silent clients; longer than --probe-timeout. [env: FLEETGATE_VERIFY_TIMEOUT] (default: 1s)"
    )
    var verifyTimeout: DurationArgument?
    @Option(help: "Probe the user's silent connections when a denial cleans up (on/off). [env: FLEETGATE_PROBE] (default: on)") var probe: Switch?
    @Option(help: "How long a probed client has to answer the probe's ping (else: close 4410). [env: FLEETGATE_PROBE_TIMEOUT] (default: 500ms)")
    var probeTimeout: DurationArgument?
    @Option(help: "A client that sent a frame this recently is not probed. [env: FLEETGATE_PROBE_IDLE] (default: 1s)") var probeIdle:
        DurationArgument?

    // Sessions
    @Option(help: "Server ping interval. [env: FLEETGATE_PING_INTERVAL] (default: 15s)") var pingInterval: DurationArgument?
    @Option(help: "Unanswered pings before a client is closed and released. [env: FLEETGATE_MISSED_PONGS] (default: 2)") var missedPongs: Int?
    @Option(help: "Largest WebSocket frame in bytes (larger: close 1009). [env: FLEETGATE_MAX_FRAME_SIZE] (default: 65536)") var maxFrameSize: Int?
    @Option(help: "Largest message in bytes, all frames. [env: FLEETGATE_MAX_MESSAGE_SIZE] (default: 1048576)") var maxMessageSize: Int?
    @Option(help: "Time from connecting to a completed upgrade. [env: FLEETGATE_HANDSHAKE_TIMEOUT] (default: 10s)") var handshakeTimeout:
        DurationArgument?
    @Option(help: "Most WebSocket connections on this node (more: 503). [env: FLEETGATE_MAX_CONNECTIONS] (default: 10000)") var maxConnections: Int?
    @Option(help: "Deadline for a graceful shutdown. [env: FLEETGATE_DRAIN_TIMEOUT] (default: 10s)") var drainTimeout: DurationArgument?
    @Option(help: "Run events' pause for the demo handler. [env: FLEETGATE_AGENT_STEP] (default: 50ms)") var agentStep: DurationArgument?

    // Operations
    @Option(help: "Bearer token for /admin (at least 16 characters); without one /admin answers 404. [env: FLEETGATE_ADMIN_TOKEN]")
    var adminToken: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical. [env: FLEETGATE_LOG_LEVEL] (default: info)") var logLevel: Logger.Level?

    func run() async throws {
        let settings = try ServeSettings(self, environment: ProcessInfo.processInfo.environment)
        try await settings.run()
    }
}

/// A start-up problem, printed as one line.
struct ServeError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// The resolved settings of `fleetgate serve`: flag, else environment variable, else default.
struct ServeSettings {
    var gateway = GatewayConfiguration()
    var limiter: LimiterConfiguration
    var redisURL = "redis://127.0.0.1:6379"
    var tokenKey: TokenVerifier.Key
    var leeway: Duration = .seconds(30)
    var logLevel: Logger.Level = .info
    var agentStep: Duration = .milliseconds(50)

    init(_ serve: Serve, environment: [String: String]) throws {
        /// The flag if given, else the environment variable parsed as the flag would be, else nil (the default).
        func pick<T: ExpressibleByArgument>(_ flag: T?, _ variable: String) throws -> T? {
            if let flag { return flag }
            guard let raw = environment[variable], !raw.isEmpty else { return nil }
            guard let value = T(argument: raw) else { throw ServeError("invalid \(variable)=\"\(raw)\": use \(Self.expectation(T.self))") }
            return value
        }
        func duration(_ flag: DurationArgument?, _ variable: String) throws -> Duration? { try pick(flag, variable)?.duration }
        func onOff(_ flag: Switch?, _ variable: String) throws -> Bool? { try pick(flag, variable)?.isOn }
        let text: (String?, String) throws -> String? = pick
        let int: (Int?, String) throws -> Int? = pick

        limiter = LimiterConfiguration(nodeName: try text(serve.nodeName, "FLEETGATE_NODE_NAME") ?? LimiterConfiguration.hostName())
        if let value = try text(serve.host, "FLEETGATE_HOST") { gateway.host = value }
        if let value = try int(serve.port, "FLEETGATE_PORT") { gateway.port = value }
        if let value = try text(serve.redis, "FLEETGATE_REDIS_URL") { redisURL = value }
        if let value = try text(serve.keyPrefix, "FLEETGATE_KEY_PREFIX") { limiter.keyPrefix = value }

        let secret = try text(serve.jwtSecret, "FLEETGATE_JWT_SECRET")
        let publicKeyPath = try text(serve.jwtPublicKey, "FLEETGATE_JWT_PUBLIC_KEY")
        switch (secret, publicKeyPath) {
        case (nil, nil):
            throw ServeError("no token key: set --jwt-secret (or FLEETGATE_JWT_SECRET) for HS256, or --jwt-public-key <pem file> for RS256/ES256")
        case (.some, .some):
            throw ServeError("--jwt-secret and --jwt-public-key exclude each other: the gateway pins one algorithm")
        case (let secret?, nil):
            guard secret.utf8.count >= TokenVerifier.minimumSecretBytes else {
                throw ServeError("the HS256 secret must be at least \(TokenVerifier.minimumSecretBytes) bytes (it has \(secret.utf8.count))")
            }
            tokenKey = .hs256(secret: secret)
        case (nil, let path?):
            guard let pem = try? String(contentsOfFile: path, encoding: .utf8) else { throw ServeError("cannot read the public key file \(path)") }
            tokenKey = Self.isRSA(pem) ? .rs256(publicKeyPEM: pem) : .es256(publicKeyPEM: pem)
        }
        if let value = try duration(serve.jwtLeeway, "FLEETGATE_JWT_LEEWAY") { leeway = value }

        if let value = try int(serve.defaultLimit, "FLEETGATE_DEFAULT_LIMIT") { limiter.defaultLimit = value }
        if let value = try pick(serve.denyMode, "FLEETGATE_DENY_MODE") {
            gateway.denyMode = value
        }
        if let value = try pick(serve.overflow, "FLEETGATE_OVERFLOW") {
            limiter.policies.overflow = value
        }
        if let value = try pick(serve.onRedisDown, "FLEETGATE_ON_REDIS_DOWN") {
            limiter.policies.onRedisDown = value
        }
        if let value = try pick(serve.onLeaseLoss, "FLEETGATE_ON_LEASE_LOSS") {
            limiter.policies.onLeaseLoss = value
        }
        if let value = try onOff(serve.dryRun, "FLEETGATE_DRY_RUN") { limiter.policies.dryRun = value }
        if let value = try onOff(serve.limiter, "FLEETGATE_LIMITER") { gateway.limiterEnabled = value }

        if let value = try duration(serve.heartbeatInterval, "FLEETGATE_HEARTBEAT_INTERVAL") {
            limiter.heartbeat.interval = value
        }
        if let value = try duration(serve.nodeTTL, "FLEETGATE_NODE_TTL") { limiter.heartbeat.nodeTTL = value }
        if let value = try duration(serve.leaseTTL, "FLEETGATE_LEASE_TTL") { limiter.lease.ttl = value }
        if let value = try duration(serve.leaseRenewInterval, "FLEETGATE_LEASE_RENEW_INTERVAL") {
            limiter.lease.renewInterval = value
        }
        if let value = try duration(serve.verifyTimeout, "FLEETGATE_VERIFY_TIMEOUT") { limiter.verifyTimeout = value }
        if let value = try onOff(serve.probe, "FLEETGATE_PROBE") { gateway.probeEnabled = value }
        if let value = try duration(serve.probeTimeout, "FLEETGATE_PROBE_TIMEOUT") { limiter.probe.timeout = value }
        if let value = try duration(serve.probeIdle, "FLEETGATE_PROBE_IDLE") { gateway.probeIdle = value }

        if let value = try duration(serve.pingInterval, "FLEETGATE_PING_INTERVAL") { gateway.pingInterval = value }
        if let value = try int(serve.missedPongs, "FLEETGATE_MISSED_PONGS") { gateway.missedPongLimit = value }
        if let value = try int(serve.maxFrameSize, "FLEETGATE_MAX_FRAME_SIZE") { gateway.maxFrameSize = value }
        if let value = try int(serve.maxMessageSize, "FLEETGATE_MAX_MESSAGE_SIZE") { gateway.maxMessageSize = value }
        if let value = try duration(serve.handshakeTimeout, "FLEETGATE_HANDSHAKE_TIMEOUT") { gateway.handshakeTimeout = value }
        if let value = try int(serve.maxConnections, "FLEETGATE_MAX_CONNECTIONS") { gateway.maxConnections = value }
        if let value = try duration(serve.drainTimeout, "FLEETGATE_DRAIN_TIMEOUT") { gateway.drainTimeout = value }
        if let value = try duration(serve.agentStep, "FLEETGATE_AGENT_STEP") { agentStep = value }
        gateway.adminToken = try text(serve.adminToken, "FLEETGATE_ADMIN_TOKEN").flatMap { $0.isEmpty ? nil : $0 }
        if let value = try pick(serve.logLevel, "FLEETGATE_LOG_LEVEL") { logLevel = value }

        do {
            try gateway.validate()
        } catch {
            throw ServeError("invalid gateway setting: \(error.message)")
        }
        do {
            try limiter.validate()
        } catch {
            throw ServeError(error.message)
        }
        if gateway.probeEnabled, limiter.verifyTimeout < limiter.probe.timeout + .milliseconds(250) {
            throw ServeError(
                "--verify-timeout (\(limiter.verifyTimeout)) must be at least --probe-timeout (\(limiter.probe.timeout)) + 250ms: other nodes probe within the verify wait; raise --verify-timeout (FLEETGATE_VERIFY_TIMEOUT), lower --probe-timeout, or set --probe off"
            )
        }
        do {
            _ = try RedisClientConfiguration(url: redisURL)
        } catch {
            throw ServeError(error.message)
        }
    }

    /// What a valid value of `type` looks like, for the error about an environment variable.
    static func expectation<T: ExpressibleByArgument>(_ type: T.Type) -> String {
        if type == DurationArgument.self { return "a number with ms, s or m, e.g. 250ms, 15s" }
        if type == Int.self { return "a whole number" }
        return T.allValueStrings.isEmpty ? "a valid value" : "one of " + T.allValueStrings.joined(separator: ", ")
    }

    static func isRSA(_ pem: String) -> Bool {
        if pem.contains("BEGIN RSA PUBLIC KEY") { return true }
        // A SubjectPublicKeyInfo names its algorithm by OID: rsaEncryption is 1.2.840.113549.1.1.1.
        let base64 = pem.split(separator: "\n").filter { !$0.hasPrefix("-----") }.joined()
        guard let der = Data(base64Encoded: base64) else { return false }
        let rsaOID: [UInt8] = [0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01]
        let bytes = [UInt8](der)
        guard bytes.count >= rsaOID.count else { return false }
        return (0...(bytes.count - rsaOID.count)).contains { Array(bytes[$0..<$0 + rsaOID.count]) == rsaOID }
    }

    func run() async throws {
        // A node holds a descriptor per connection: take the hard limit, not the shell's soft default (often 1024).
        var files = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &files) == 0, files.rlim_cur < files.rlim_max {
            files.rlim_cur = files.rlim_max
            _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &files)
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = logLevel
            return handler
        }
        var logger = Logger(label: "fleetgate.serve")
        logger[metadataKey: "fleetgate.node-name"] = "\(limiter.nodeName)"
        let registry = PrometheusCollectorRegistry()
        let metricsFactory = PrometheusMetricsFactory(registry: registry)
        MetricsSystem.bootstrap(metricsFactory)
        var limiterConfiguration = limiter
        limiterConfiguration.metricsFactory = metricsFactory

        let verifier: TokenVerifier
        do {
            verifier = try await TokenVerifier(key: tokenKey, leeway: leeway)
        } catch {
            throw ServeError("cannot use the token key: \(error)")
        }
        var services: [any Service] = []
        var redisClient: RedisClient?
        var connectionLimiter: ConnectionLimiter?
        if gateway.limiterEnabled {
            var redisConfiguration = try RedisClientConfiguration(url: redisURL)
            redisConfiguration.clientName = "fleetgate-\(limiter.nodeName)"
            let redis = RedisClient(configuration: redisConfiguration, logger: Logger(label: "fleetgate.redis"))
            let limiter = ConnectionLimiter(redis: redis, configuration: limiterConfiguration, logger: Logger(label: "fleetgate.limiter"))
            services += [redis, limiter]
            redisClient = redis
            connectionLimiter = limiter
        } else {
            logger.warning("the limiter is off: every connection is admitted (benchmark mode)")
        }
        let host = gateway.host
        let nodeName = limiter.nodeName
        let gatewayService = Gateway(
            configuration: gateway, verifier: verifier, redis: redisClient, limiter: connectionLimiter,
            handler: AgentDemoHandler(stepDelay: agentStep), metricsFactory: metricsFactory, prometheus: registry,
            logger: Logger(label: "fleetgate.gateway")
        ) { port in
            // Unbuffered, so a supervisor (or a test) reading stdout sees the line at once.
            FileHandle.standardOutput.write(Data("fleetgate: listening on \(host):\(port) node=\(nodeName)\n".utf8))
        }
        services.append(gatewayService)
        var groupConfiguration = ServiceGroupConfiguration(
            services: services.map { .init(service: $0) },
            gracefulShutdownSignals: [.sigterm, .sigint],
            cancellationSignals: [],
            logger: logger
        )
        // Past the drain deadline the group cancels what is left: entries not yet released expire with the node.
        groupConfiguration.maximumGracefulShutdownDuration = gateway.drainTimeout
        groupConfiguration.maximumCancellationDuration = .seconds(2)
        let group = ServiceGroup(configuration: groupConfiguration)
        try await group.run()
        logger.info("stopped")
    }
}
