/// An error from the limiter: what happened, for which user or node, and what to do.
public struct LimiterError: Error, Sendable, CustomStringConvertible {
    /// The kind of failure; compare with the static members (new codes may be added).
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case invalidUser, invalidConnection, invalidLimit, redisUnavailable, redisFull, notRunning, unexpectedReply
        }
        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// The user id is empty or longer than 256 bytes.
        public static let invalidUser = Code(.invalidUser)
        /// The connection id is empty, too long, or has characters outside `A-Z a-z 0-9 _ - .`.
        public static let invalidConnection = Code(.invalidConnection)
        /// A limit is negative or too large.
        public static let invalidLimit = Code(.invalidLimit)
        /// Redis could not be reached and the policy is `reject` (or the call needs Redis).
        public static let redisUnavailable = Code(.redisUnavailable)
        /// Redis answered, but is out of memory (`maxmemory` reached under `noeviction`): new connections are refused
        /// (never admitted on a local count: Redis is up), existing ones keep their leases.
        public static let redisFull = Code(.redisFull)
        /// The limiter has not registered its node yet, or has shut down.
        public static let notRunning = Code(.notRunning)
        /// Redis answered something the limiter did not expect (a script/key layout mismatch).
        public static let unexpectedReply = Code(.unexpectedReply)

        public var description: String { base.rawValue }
    }

    /// The kind of failure.
    public var code: Code
    /// A sentence naming the user, node or key involved.
    public var message: String
    /// The underlying error, when there is one.
    public var underlying: (any Error)?

    /// Creates an error.
    public init(code: Code, message: String, underlying: (any Error)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String { "LimiterError(\(code)): \(message)" }
}
