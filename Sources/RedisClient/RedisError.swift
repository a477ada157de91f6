/// An error from the Redis client: what happened, to which server, and why.
///
/// Match on ``code`` (new codes may be added without breaking a `switch` that has a `default`). Server error
/// replies keep Redis's own prefix (`NOSCRIPT`, `MOVED`, `WRONGTYPE`, …) in ``serverErrorPrefix``.
public struct RedisError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case connectionRefused, connectionLost, connectFailed, timeout, authenticationFailed, server, noScript, moved, ask, busy
            case loading, wrongType, protocolError, invalidArgument, invalidConfiguration, clientShutdown, cancelled
            case crossSlot, tryAgain, clusterDown
        }
        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// Nothing listens on the server's address (TCP connection refused).
        public static let connectionRefused = Code(.connectionRefused)
        /// A connection attempt failed for another reason (host unreachable, connect timeout, DNS).
        public static let connectFailed = Code(.connectFailed)
        /// An established connection broke; requests that were in flight on it failed (they may or may not have run).
        public static let connectionLost = Code(.connectionLost)
        /// The request's deadline passed before its reply arrived.
        public static let timeout = Code(.timeout)
        /// `AUTH` was refused (wrong user or password, `NOAUTH`, `WRONGPASS`). The client keeps retrying slowly.
        public static let authenticationFailed = Code(.authenticationFailed)
        /// Any other error reply from the server; see ``RedisError/serverErrorPrefix``.
        public static let server = Code(.server)
        /// `NOSCRIPT`: the script is not in the server's script cache.
        public static let noScript = Code(.noScript)
        /// `MOVED`: the key's slot is served by another cluster node.
        public static let moved = Code(.moved)
        /// `ASK`: the key's slot is being migrated; ask the other node once.
        public static let ask = Code(.ask)
        /// `BUSY`: a script is running too long on the server.
        public static let busy = Code(.busy)
        /// `LOADING`: the server is loading its data set.
        public static let loading = Code(.loading)
        /// The keys of one command (or one script call) lie in different Redis Cluster slots. The client refuses
        /// such a command before sending it (the server would answer `CROSSSLOT`); put the keys under one hash tag.
        public static let crossSlot = Code(.crossSlot)
        /// `TRYAGAIN`: a multi-key command during a slot migration; retried by the cluster client until its deadline.
        public static let tryAgain = Code(.tryAgain)
        /// `CLUSTERDOWN`: the cluster cannot serve the slot (a failover in progress, slots uncovered); retried by the
        /// cluster client until its deadline.
        public static let clusterDown = Code(.clusterDown)
        /// `WRONGTYPE`: the key holds a value of another type.
        public static let wrongType = Code(.wrongType)
        /// The server sent bytes that are not valid RESP; the connection is closed.
        public static let protocolError = Code(.protocolError)
        /// A request could not be encoded (for example an empty command).
        public static let invalidArgument = Code(.invalidArgument)
        /// The configuration (URL, options) is not valid.
        public static let invalidConfiguration = Code(.invalidConfiguration)
        /// The client was shut down; no further requests are sent.
        public static let clientShutdown = Code(.clientShutdown)
        /// The calling task was cancelled while it waited.
        public static let cancelled = Code(.cancelled)

        public var description: String { base.rawValue }
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming what failed, the server's address and the cause.
    public var message: String
    /// For error replies: the first word of the reply (`NOSCRIPT`, `MOVED`, `ERR`, …).
    public var serverErrorPrefix: String?
    /// The server's `host:port`, when one is involved.
    public var address: String?
    /// The underlying error (a socket error, for example), when there is one.
    public var underlying: (any Error)?

    /// Creates an error.
    public init(code: Code, message: String, serverErrorPrefix: String? = nil, address: String? = nil, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.serverErrorPrefix = serverErrorPrefix
        self.address = address
        self.underlying = underlying
    }

    public var description: String { "RedisError(\(code)): \(message)" }

    /// An error for an error reply such as `NOSCRIPT No matching script`, with the code its prefix implies.
    static func serverReply(_ text: String, address: String?) -> RedisError {
        let prefix = text.prefix { $0 != " " }
        let code: Code
        switch prefix {
        case "NOSCRIPT": code = .noScript
        case "MOVED": code = .moved
        case "ASK": code = .ask
        case "BUSY": code = .busy
        case "LOADING": code = .loading
        case "CROSSSLOT": code = .crossSlot
        case "TRYAGAIN": code = .tryAgain
        case "CLUSTERDOWN": code = .clusterDown
        case "WRONGTYPE": code = .wrongType
        case "WRONGPASS", "NOAUTH", "NOPERM": code = prefix == "NOPERM" ? .server : .authenticationFailed
        default: code = .server
        }
        let at = address.map { " from \($0)" } ?? ""
        return RedisError(code: code, message: "Redis replied with an error\(at): \(text)", serverErrorPrefix: String(prefix), address: address)
    }
}
