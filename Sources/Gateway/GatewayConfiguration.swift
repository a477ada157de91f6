import ConnectionLimiter

/// Everything a gateway node needs besides its Redis client and limiter.
public struct GatewayConfiguration: Sendable {
    /// How a denied upgrade is answered.
    public enum DenyMode: String, Sendable, Hashable, CaseIterable {
        /// HTTP 429 with a JSON body and `Retry-After` (the default; best for API clients).
        case http
        /// The upgrade is accepted and closed at once with code 4429 and a short reason (for browsers, which cannot
        /// read the status of a refused upgrade).
        case close
    }

    /// The address to listen on. Defaults to `127.0.0.1`.
    public var host: String = "127.0.0.1"
    /// The port to listen on; 0 picks a free one. Defaults to 8080.
    public var port: Int = 8080
    /// How denials are answered. Defaults to ``DenyMode/http``.
    public var denyMode: DenyMode = .http
    /// Whether connections go through the limiter. Only the `--limiter off` benchmark comparison turns it off.
    public var limiterEnabled: Bool = true
    /// The interval of server pings. Defaults to 15 seconds.
    public var pingInterval: Duration = .seconds(15)
    /// How many pings in a row may go unanswered before the connection is closed and released. Defaults to 2.
    public var missedPongLimit: Int = 2
    /// Whether the emergency cleanup of a denial probes this node's silent connections of the user (a ping that must
    /// be answered within the limiter's ``LimiterConfiguration/Probe/timeout``; failures close with 4410). Defaults
    /// to `true`.
    public var probeEnabled: Bool = true
    /// A connection that sent a frame (or answered a ping) this recently counts as alive without a probe. Defaults
    /// to 1 second.
    public var probeIdle: Duration = .seconds(1)
    /// The largest WebSocket frame accepted (larger ones are closed with 1009). Defaults to 64 KiB.
    public var maxFrameSize: Int = 64 * 1024
    /// The largest message (all frames of a fragmented message) accepted. Defaults to 1 MiB.
    public var maxMessageSize: Int = 1024 * 1024
    /// How long a client may take from connecting to a completed upgrade. Defaults to 10 seconds.
    public var handshakeTimeout: Duration = .seconds(10)
    /// How long to wait for the client's close frame after sending ours. Defaults to 2 seconds.
    public var closeTimeout: Duration = .seconds(2)
    /// The most WebSocket connections this node holds at once; more are answered with 503. Defaults to 10,000.
    public var maxConnections: Int = 10_000
    /// How long a graceful shutdown may take before the node exits anyway. Defaults to 10 seconds.
    public var drainTimeout: Duration = .seconds(10)
    /// The Bearer token `/admin` requires; without one, `/admin` answers 404.
    public var adminToken: String?
    /// The idle timeout of plain HTTP connections (health checks, metrics). Defaults to 60 seconds.
    public var httpIdleTimeout: Duration = .seconds(60)

    /// A configuration with the defaults.
    public init() {}

    /// Checks that every value is usable.
    /// - Throws: ``GatewayConfigurationError`` naming the first bad value.
    public func validate() throws(GatewayConfigurationError) {
        guard (0...65535).contains(port) else { throw GatewayConfigurationError("port \(port) is not in 0...65535") }
        guard !host.isEmpty else { throw GatewayConfigurationError("the listen host is empty") }
        guard pingInterval >= .milliseconds(100) else { throw GatewayConfigurationError("the ping interval must be at least 100 ms") }
        guard missedPongLimit >= 1 else { throw GatewayConfigurationError("the missed-pong limit must be at least 1") }
        guard probeIdle >= .zero else { throw GatewayConfigurationError("the probe idle time must not be negative") }
        guard (125...16 * 1024 * 1024).contains(maxFrameSize) else {
            throw GatewayConfigurationError("the maximum frame size must be from 125 bytes to 16 MiB")
        }
        guard maxMessageSize >= maxFrameSize, maxMessageSize <= 64 * 1024 * 1024 else {
            throw GatewayConfigurationError("the maximum message size must be from the frame size to 64 MiB")
        }
        guard handshakeTimeout > .zero else { throw GatewayConfigurationError("the handshake timeout must be positive") }
        guard maxConnections >= 1 else { throw GatewayConfigurationError("the connection cap must be at least 1") }
        guard drainTimeout > .zero else { throw GatewayConfigurationError("the drain timeout must be positive") }
        if let adminToken, adminToken.utf8.count < 16 {
            throw GatewayConfigurationError("the admin token must have at least 16 characters")
        }
    }
}

/// A configuration value that cannot be used; the message names it.
public struct GatewayConfigurationError: Error, Sendable, CustomStringConvertible {
    /// What is wrong, in one line.
    public var message: String
    /// Creates an error with a one-line message.
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
