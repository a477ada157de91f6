/// A few typed conveniences; everything else goes through ``RedisClient/send(_:_:)``.
extension RedisClient {
    /// `PING`; returns the server's answer (`PONG`).
    @discardableResult
    public func ping() async throws -> String {
        try await send("PING").string ?? ""
    }

    /// `GET key`; `nil` when the key does not exist.
    public func get(_ key: String) async throws -> RESPValue? {
        let value = try await send("GET", key)
        return value.isNull ? nil : value
    }

    /// `SET key value`, optionally with an expiry (`PX`).
    public func set(_ key: String, to value: some RESPArgumentConvertible, expiresIn: Duration? = nil) async throws {
        var command = RedisCommand("SET", key, value)
        if let expiresIn {
            command.append("PX")
            command.append(Int(expiresIn.components.seconds * 1000 + expiresIn.components.attoseconds / 1_000_000_000_000_000))
        }
        try await send(command)
    }

    /// `DEL key...`; returns how many keys were removed.
    @discardableResult
    public func delete(_ keys: String...) async throws -> Int {
        try await send(RedisCommand("DEL", arguments: keys)).int ?? 0
    }

    /// `PUBLISH channel message` (in cluster mode `SPUBLISH`, to the channel's shard); returns how many subscribers
    /// received it.
    @discardableResult
    public func publish(_ message: some RESPArgumentConvertible, to channel: String) async throws -> Int {
        try await send(publishCommand(message, to: channel)).int ?? 0
    }

    /// The command ``publish(_:to:)`` sends: `PUBLISH`, or `SPUBLISH` in cluster mode; for pipelines.
    public func publishCommand(_ message: some RESPArgumentConvertible, to channel: String) -> RedisCommand {
        RedisCommand(isCluster ? "SPUBLISH" : "PUBLISH", channel, message)
    }
}
