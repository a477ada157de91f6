import Foundation
import NIOCore
import NIOPosix

/// How a ``RedisClient`` reaches its server.
///
/// ```swift
/// var configuration = try RedisClientConfiguration(url: "redis://app:secret@127.0.0.1:6379/0")
/// configuration.commandTimeout = .seconds(2)
/// ```
public struct RedisClientConfiguration: Sendable {
    /// Capped exponential backoff between reconnect attempts.
    public struct Backoff: Sendable, Hashable {
        /// The first delay. Defaults to 50 milliseconds.
        public var initialDelay: Duration
        /// The largest delay. Defaults to 2 seconds.
        public var maximumDelay: Duration
        /// Each delay is the previous one times this. Defaults to 2.
        public var multiplier: Double

        /// Creates a backoff policy.
        public init(initialDelay: Duration = .milliseconds(50), maximumDelay: Duration = .seconds(2), multiplier: Double = 2) {
            self.initialDelay = initialDelay
            self.maximumDelay = maximumDelay
            self.multiplier = multiplier
        }

        /// The delay before attempt `attempt` (0-based), with ±20 % jitter so a fleet does not reconnect in lockstep.
        func delay(attempt: Int) -> Duration {
            let initial = Double(initialDelay.components.seconds) + Double(initialDelay.components.attoseconds) / 1e18
            let maximum = Double(maximumDelay.components.seconds) + Double(maximumDelay.components.attoseconds) / 1e18
            let raw = min(maximum, initial * pow(multiplier, Double(min(attempt, 64))))
            let jittered = raw * Double.random(in: 0.8...1.2)
            return .nanoseconds(Int64(min(maximum, jittered) * 1e9))
        }
    }

    /// A server's address: host name or IP address, and TCP port.
    public struct Endpoint: Sendable, Hashable, CustomStringConvertible {
        public var host: String
        public var port: Int
        /// Creates an endpoint.
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
        /// `host:port`, IPv6 hosts in brackets.
        public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    }

    /// The server's host name or IP address. Defaults to `127.0.0.1`. In cluster mode: the first seed's.
    public var host: String
    /// The server's TCP port. Defaults to 6379.
    public var port: Int
    /// The ACL user for `AUTH`, or `nil` for the default user.
    public var username: String?
    /// The password for `AUTH`, or `nil` to not authenticate.
    public var password: String?
    /// The database number selected on every connection. Defaults to 0.
    public var database: Int
    /// How long one TCP connect may take. Defaults to 5 seconds.
    public var connectTimeout: Duration
    /// The deadline of each request, counted from the call (it includes waiting for a reconnect). Defaults to 5 seconds.
    public var commandTimeout: Duration
    /// The delays between reconnect attempts.
    public var reconnectBackoff: Backoff
    /// Sent with `CLIENT SETNAME` on every (re)connect so operators see who is connected; `nil` sends nothing.
    /// Must not contain spaces. Defaults to `nil`.
    public var clientName: String?
    /// The event loops the client's connections run on. Defaults to `MultiThreadedEventLoopGroup.singleton`.
    public var eventLoopGroup: any EventLoopGroup
    /// Redis Cluster seed nodes: when not empty, the client runs in cluster mode. It reads the slot map from the
    /// first seed that answers `CLUSTER SLOTS`, routes every command to the primary serving its key's slot, and
    /// follows `MOVED` and `ASK`. Defaults to none (one server at ``host``:``port``).
    public var clusterSeeds: [Endpoint] = []

    /// Whether the client runs in Redis Cluster mode (``clusterSeeds`` is not empty).
    public var isCluster: Bool { !clusterSeeds.isEmpty }

    /// The server address as `host:port` (IPv6 hosts in brackets), used in error messages.
    public var address: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    /// Creates a configuration from its parts.
    public init(
        host: String = "127.0.0.1",
        port: Int = 6379,
        username: String? = nil,
        password: String? = nil,
        database: Int = 0,
        connectTimeout: Duration = .seconds(5),
        commandTimeout: Duration = .seconds(5),
        reconnectBackoff: Backoff = .init(),
        clientName: String? = nil,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
    ) {
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.database = database
        self.connectTimeout = connectTimeout
        self.commandTimeout = commandTimeout
        self.reconnectBackoff = reconnectBackoff
        self.clientName = clientName
        self.eventLoopGroup = eventLoopGroup
    }

    /// Creates a configuration from a URL `redis://[user:password@]host[:port][/db]`, or for Redis Cluster
    /// `redis+cluster://[user:password@]host:port[,host:port…]` (seed nodes; database 0 only); options keep their
    /// defaults.
    ///
    /// User and password may be percent-encoded. `rediss://` (TLS) is refused: hiredis 0.14 has no TLS.
    /// - Throws: ``RedisError`` with code ``RedisError/Code/invalidConfiguration`` naming what is wrong.
    public init(url: String) throws(RedisError) {
        if url.lowercased().hasPrefix("redis+cluster://") {
            try self.init(clusterURL: url)
            return
        }
        self.init()
        func invalid(_ why: String) -> RedisError {
            RedisError(code: .invalidConfiguration, message: "invalid Redis URL \"\(Self.redacted(url))\": \(why)")
        }
        guard let components = URLComponents(string: url) else { throw invalid("not a URL") }
        switch components.scheme?.lowercased() {
        case "redis": break
        case "rediss": throw invalid("TLS (rediss://) is not supported; use redis:// on a trusted network or a TLS tunnel")
        case let other?: throw invalid("scheme must be redis:// or redis+cluster://, not \(other)://")
        case nil: throw invalid("missing scheme; expected redis://host:port")
        }
        guard let host = components.host, !host.isEmpty else { throw invalid("missing host") }
        self.host = host.hasPrefix("[") && host.hasSuffix("]") ? String(host.dropFirst().dropLast()) : host
        if let port = components.port {
            guard (1...65535).contains(port) else { throw invalid("port \(port) is out of range 1-65535") }
            self.port = port
        }
        if let user = components.percentEncodedUser, !user.isEmpty {
            username = user.removingPercentEncoding ?? user
        }
        if let password = components.percentEncodedPassword {
            self.password = password.removingPercentEncoding ?? password
        }
        let path = components.path.trimmingCharacters(in: CharacterSet(charactersIn: "/"))
        if !path.isEmpty {
            guard let db = Int(path), db >= 0 else { throw invalid("database must be a number >= 0, not \"\(path)\"") }
            database = db
        }
        if components.query != nil { throw invalid("query options are not supported; set them on the configuration") }
    }

    /// `redis+cluster://[user:password@]host:port[,host:port…][/0]`.
    private init(clusterURL url: String) throws(RedisError) {
        self.init()
        func invalid(_ why: String) -> RedisError {
            RedisError(code: .invalidConfiguration, message: "invalid Redis Cluster URL \"\(Self.redacted(url))\": \(why)")
        }
        var rest = url.dropFirst("redis+cluster://".count)
        if let at = rest.lastIndex(of: "@") {
            let credentials = rest[..<at]
            rest = rest[rest.index(after: at)...]
            let parts = credentials.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
            if let user = parts.first, !user.isEmpty { username = String(user).removingPercentEncoding ?? String(user) }
            if parts.count == 2 { password = String(parts[1]).removingPercentEncoding ?? String(parts[1]) }
        }
        if rest.contains("?") { throw invalid("query options are not supported; set them on the configuration") }
        if let slash = rest.firstIndex(of: "/") {
            let path = rest[rest.index(after: slash)...]
            rest = rest[..<slash]
            guard path.isEmpty || path == "0" else { throw invalid("Redis Cluster has only database 0, not \"\(path)\"") }
        }
        guard !rest.isEmpty else { throw invalid("missing host; expected redis+cluster://host:port[,host:port…]") }
        var seeds: [Endpoint] = []
        for seed in rest.split(separator: ",", omittingEmptySubsequences: false) {
            guard !seed.isEmpty else { throw invalid("an empty seed address") }
            let host: Substring
            let portText: Substring?
            if seed.hasPrefix("[") {
                guard let close = seed.firstIndex(of: "]") else { throw invalid("unclosed [ in \"\(seed)\"") }
                host = seed[seed.index(after: seed.startIndex)..<close]
                let after = seed[seed.index(after: close)...]
                portText = after.hasPrefix(":") ? after.dropFirst() : (after.isEmpty ? nil : after)
            } else {
                let parts = seed.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
                host = parts[0]
                portText = parts.count == 2 ? parts[1] : nil
            }
            guard !host.isEmpty else { throw invalid("missing host in \"\(seed)\"") }
            var port = 6379
            if let portText {
                guard let number = Int(portText), (1...65535).contains(number) else { throw invalid("port \"\(portText)\" is not in 1-65535") }
                port = number
            }
            seeds.append(Endpoint(host: String(host), port: port))
        }
        guard let first = seeds.first else { throw invalid("no seed address; expected redis+cluster://host:port[,host:port…]") }
        clusterSeeds = seeds
        host = first.host
        port = first.port
    }

    /// The URL with any password replaced by `***`, safe for logs and errors.
    static func redacted(_ url: String) -> String {
        // Works on text that does not even parse: hide everything between "://" and the last "@".
        guard let scheme = url.range(of: "://"), let at = url.range(of: "@", options: .backwards), scheme.upperBound <= at.lowerBound else {
            return url
        }
        let credentials = url[scheme.upperBound..<at.lowerBound]
        let user = credentials.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false).first ?? ""
        return url[..<scheme.upperBound] + user + ":***" + url[at.lowerBound...]
    }
}
