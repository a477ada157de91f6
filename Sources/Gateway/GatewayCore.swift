import ConnectionLimiter
import Foundation
import HTTPTypes
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOWebSocket
import ServiceLifecycle

/// The state shared by every connection of one node: admission at the upgrade, the table of open connections (for
/// kicks, fencing and drain), and the session loop.
final class GatewayCore: Sendable {
    /// One connection from its admission to its close.
    struct Entry {
        var user: String
        /// Whether the limiter holds an entry that must be released.
        var admitted = false
        /// Set once the WebSocket session runs.
        var connection: SessionConnection?
        /// A close requested before the session ran (a kick during the upgrade).
        var pendingClose: (code: UInt16, reason: String)?
    }

    struct State {
        var entries: [String: Entry] = [:]
        /// Set when a drain begins: no new connections from then on.
        var drainDeadline: ContinuousClock.Instant?
        var draining: Bool { drainDeadline != nil }
    }

    let configuration: GatewayConfiguration
    let verifier: TokenVerifier
    let limiter: ConnectionLimiter?
    let handler: any GatewaySessionHandler
    let logger: Logger
    let metrics: GatewayMetrics
    let state = NIOLockedValueBox(State())
    /// Opens once a drain has begun and no connection is left.
    let drained = Latch()

    init(
        configuration: GatewayConfiguration,
        verifier: TokenVerifier,
        limiter: ConnectionLimiter?,
        handler: any GatewaySessionHandler,
        metrics: GatewayMetrics,
        logger: Logger
    ) {
        self.configuration = configuration
        self.verifier = verifier
        self.limiter = configuration.limiterEnabled ? limiter : nil
        self.handler = handler
        self.metrics = metrics
        self.logger = logger
    }

    /// Connections admitted or open on this node.
    var connectionCount: Int { state.withLockedValue { $0.entries.count } }

    /// Whether the node is draining (no new connections).
    var isDraining: Bool { state.withLockedValue { $0.draining } }

    // MARK: Admission at the upgrade

    private func shuttingDown() -> UpgradeDecision {
        metrics.upgrades(.draining)
        return .refuse(
            Refusal(
                status: .serviceUnavailable, headers: [.retryAfter: "1"],
                body: JSON.encode(ErrorBody(error: "shutting_down", message: "this node is shutting down; connect to another node"))))
    }

    /// Decides an upgrade request: path, token, node cap, then the limiter.
    func decide(head: HTTPRequestHead, channel: any Channel) async -> UpgradeDecision {
        let (path, query) = Self.split(head.uri)
        guard path == "/ws" else {
            return .refuse(Refusal(status: .notFound, body: JSON.encode(ErrorBody(error: "not_found", message: "WebSockets are served at /ws"))))
        }
        if isDraining { return shuttingDown() }
        let identity: GatewayIdentity
        do {
            identity = try await verifier.verify(Self.token(head: head, query: query))
        } catch {
            metrics.upgrades(.unauthorized)
            logger.info("refused a token", metadata: ["fleetgate.check": "\(error.check)"])
            return .refuse(
                Refusal(
                    status: .unauthorized, headers: [.wwwAuthenticate: "Bearer error=\"invalid_token\""],
                    body: JSON.encode(ErrorBody(error: "unauthorized", message: error.message, check: "\(error.check)"))))
        }

        let id = ConnectionLimiter.makeConnectionID()
        // Checked again with the reservation: a drain that began during the token check must not see the table grow
        // after it found it empty.
        let (reserved, draining) = state.withLockedValue { state -> (Bool, Bool) in
            guard !state.draining else { return (false, true) }
            guard state.entries.count < configuration.maxConnections else { return (false, false) }
            state.entries[id] = Entry(user: identity.user)
            return (true, false)
        }
        if draining { return shuttingDown() }
        guard reserved else {
            metrics.upgrades(.nodeFull)
            logger.warning("node at its connection cap", metadata: ["fleetgate.cap": "\(configuration.maxConnections)"])
            return .refuse(
                Refusal(
                    status: .serviceUnavailable, headers: [.retryAfter: "1"],
                    body: JSON.encode(
                        ErrorBody(error: "node_full", message: "this node holds its maximum of \(configuration.maxConnections) connections"))))
        }
        // Whatever happens from here, the connection's end removes its entry and releases its admission.
        channel.closeFuture.whenComplete { _ in self.connectionClosed(id) }

        guard let limiter else {
            metrics.upgrades(.accepted)
            return .accept(AdmittedConnection(id: id, user: identity.user))
        }
        let decision: AdmissionDecision
        do {
            decision = try await limiter.admit(user: identity.user, connection: id, limit: identity.connectionLimit)
        } catch {
            removeEntry(id)
            return refusal(for: error, user: identity.user)
        }
        switch decision {
        case .admitted:
            let stillOpen = state.withLockedValue { state -> Bool in
                guard state.entries[id] != nil else { return false }
                state.entries[id]?.admitted = true
                return true
            }
            if !stillOpen {
                // The client left while we were admitting it.
                Task { await limiter.release(connection: id) }
                return .refuse(Refusal(status: .badRequest, body: JSON.encode(ErrorBody(error: "closed"))))
            }
            metrics.upgrades(.accepted)
            return .accept(AdmittedConnection(id: id, user: identity.user))
        case .denied(let denial):
            removeEntry(id)
            metrics.upgrades(.denied)
            logger.info(
                "connection limit exceeded",
                metadata: ["fleetgate.user": "\(identity.user)", "fleetgate.count": "\(denial.count)", "fleetgate.limit": "\(denial.limit)"])
            switch configuration.denyMode {
            case .close:
                return .closeAtOnce(code: GatewayCloseCode.limitExceeded, reason: "connection limit exceeded (\(denial.count)/\(denial.limit))")
            case .http:
                let milliseconds = max(0, Gateway.milliseconds(denial.retryAfter))
                return .refuse(
                    Refusal(
                        status: .tooManyRequests,
                        headers: [.retryAfter: String(max(1, (milliseconds + 999) / 1000))],
                        body: JSON.encode(
                            DenialBody(
                                user: identity.user, limit: denial.limit, current: denial.count, retryAfterMs: milliseconds,
                                message: denial.description))))
            }
        }
    }

    private func refusal(for error: any Error, user: String) -> UpgradeDecision {
        guard let error = error as? LimiterError else {
            metrics.upgrades(.unavailable)
            logger.error("admission failed", metadata: ["fleetgate.user": "\(user)", "fleetgate.error": "\(error)"])
            return .refuse(
                Refusal(status: .internalServerError, body: JSON.encode(ErrorBody(error: "internal_error", message: "admission failed"))))
        }
        switch error.code {
        case .invalidUser:
            metrics.upgrades(.unauthorized)
            return .refuse(
                Refusal(
                    status: .unauthorized, headers: [.wwwAuthenticate: "Bearer error=\"invalid_token\""],
                    body: JSON.encode(ErrorBody(error: "unauthorized", message: error.message, check: "subject"))))
        case .redisFull:
            metrics.upgrades(.unavailable)
            switch configuration.denyMode {
            case .close:
                return .closeAtOnce(code: GatewayCloseCode.tryAgainLater, reason: "Redis is full, try again later")
            case .http:
                return .refuse(
                    Refusal(
                        status: .serviceUnavailable, headers: [.retryAfter: "5"],
                        body: JSON.encode(ErrorBody(error: "redis_full", message: error.message))))
            }
        case .redisUnavailable:
            metrics.upgrades(.unavailable)
            logger.warning("admission refused: Redis unavailable", metadata: ["fleetgate.user": "\(user)"])
            switch configuration.denyMode {
            case .close:
                return .closeAtOnce(code: GatewayCloseCode.tryAgainLater, reason: "Redis unavailable, try again later")
            case .http:
                return .refuse(
                    Refusal(
                        status: .serviceUnavailable, headers: [.retryAfter: "1"],
                        body: JSON.encode(ErrorBody(error: "redis_unavailable", message: error.message))))
            }
        default:
            metrics.upgrades(.unavailable)
            logger.error("admission failed", metadata: ["fleetgate.user": "\(user)", "fleetgate.error": "\(error)"])
            return .refuse(
                Refusal(
                    status: .serviceUnavailable, headers: [.retryAfter: "1"],
                    body: JSON.encode(ErrorBody(error: "admission_failed", message: error.message))))
        }
    }

    /// Forgets a connection; the last one to go during a drain opens ``drained``.
    @discardableResult
    private func removeEntry(_ id: String) -> Entry? {
        let (entry, empty) = state.withLockedValue { state in
            (state.entries.removeValue(forKey: id), state.draining && state.entries.isEmpty)
        }
        if empty { drained.open() }
        return entry
    }

    /// The end of a connection, whatever ended it: forget it and release its admission.
    private func connectionClosed(_ id: String) {
        let entry = removeEntry(id)
        if let entry, entry.admitted, let limiter {
            Task { await limiter.release(connection: id) }
        }
    }

    // MARK: Kicks, fencing, drain

    /// Closes one connection (a kick), now or as soon as its session starts.
    func close(connection id: String, code: UInt16, reason: String) -> Bool {
        let connection = state.withLockedValue { state -> SessionConnection?? in
            guard state.entries[id] != nil else { return .none }
            if let connection = state.entries[id]?.connection { return .some(connection) }
            state.entries[id]?.pendingClose = (code, reason)
            return .some(nil)
        }
        switch connection {
        case .none: return false
        case .some(let connection):
            connection?.close(code: code, reason: reason)
            return true
        }
    }

    /// Closes every connection with `code`.
    func closeAll(code: UInt16, reason: String) {
        let ids = state.withLockedValue { Array($0.entries.keys) }
        for id in ids { _ = close(connection: id, code: code, reason: reason) }
    }

    /// Acts on the limiter's events until they end or the task is cancelled.
    func followLimiterEvents() async {
        guard let limiter else { return }
        for await event in limiter.events {
            switch event {
            case .kick(let connection, let user, let reason):
                let found = close(connection: connection, code: GatewayCloseCode.kicked, reason: Self.kickReason(reason))
                logger.info(
                    "kicked a connection",
                    metadata: [
                        "fleetgate.user": "\(user)", "fleetgate.connection": "\(connection)", "fleetgate.reason": "\(reason)",
                        "fleetgate.found": "\(found)",
                    ])
            case .fenced(let node):
                logger.warning("fenced: closing every connection (the node lost its lease)", metadata: ["fleetgate.node": "\(node)"])
                closeAll(code: GatewayCloseCode.serviceRestart, reason: "node lost its lease in Redis; reconnect")
            case .leaseLost(let node):
                logger.warning("node lease lost", metadata: ["fleetgate.node": "\(node)"])
            case .reregistered(let node, let readmitted, let denied):
                logger.info(
                    "node re-registered",
                    metadata: ["fleetgate.node": "\(node)", "fleetgate.readmitted": "\(readmitted)", "fleetgate.denied": "\(denied)"])
            case .redisUnavailable(let reason):
                logger.warning("Redis unavailable", metadata: ["fleetgate.reason": "\(reason)"])
            case .redisAvailable:
                logger.info("Redis available again")
            }
        }
    }

    static func kickReason(_ reason: LimiterEvent.KickReason) -> String {
        switch reason {
        case .evicted: return "evicted: a newer connection of this user took the slot"
        case .operatorRequest: return "closed by an operator"
        case .deniedAfterLeaseLoss: return "over the limit after the node re-registered"
        case .lostAtRenewal: return "the connection's entry was lost in Redis"
        case .kickedAtRenewal: return "kicked: closed by an operator or evicted by a newer connection"
        }
    }

    /// Stops accepting and closes every connection with 1001; ``waitUntilDrained()`` waits for them.
    func beginDrain() {
        let (first, empty) = state.withLockedValue { state -> (Bool, Bool) in
            guard !state.draining else { return (false, false) }
            // A fifth of the drain timeout is left for the limiter's release of every entry and deregistration.
            state.drainDeadline = ContinuousClock.now + configuration.drainTimeout * 4 / 5
            return (true, state.entries.isEmpty)
        }
        guard first else { return }
        if empty { drained.open() }
        logger.info("draining: closing every connection", metadata: ["fleetgate.open": "\(connectionCount)"])
        closeAll(code: GatewayCloseCode.goingAway, reason: "node shutting down")
    }

    /// Waits until every connection is gone or the drain deadline passed (returns at once unless draining).
    /// - Returns: how many connections were still open.
    func waitUntilDrained() async -> Int {
        guard let deadline = state.withLockedValue({ $0.drainDeadline }) else { return connectionCount }
        // Each connection ends by itself once its client answers the close frame (or the close timeout passes).
        await drained.wait(timeout: ContinuousClock.now.duration(to: deadline))
        return connectionCount
    }

    // MARK: Request parsing

    static func split(_ uri: String) -> (path: String, query: String?) {
        guard let mark = uri.firstIndex(of: "?") else { return (uri, nil) }
        return (String(uri[..<mark]), String(uri[uri.index(after: mark)...]))
    }

    /// The token from `Authorization: Bearer …`, else from `?access_token=…`.
    static func token(head: HTTPRequestHead, query: String?) -> String? {
        if let authorization = head.headers.first(name: "authorization") {
            let parts = authorization.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: true)
            if parts.count == 2, parts[0].lowercased() == "bearer" {
                return parts[1].trimmingCharacters(in: .whitespaces)
            }
        }
        guard let query else { return nil }
        for pair in query.split(separator: "&") {
            let keyValue = pair.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
            if keyValue.count == 2, keyValue[0] == "access_token" {
                return String(keyValue[1]).replacingOccurrences(of: "+", with: " ").removingPercentEncoding
            }
        }
        return nil
    }
}
