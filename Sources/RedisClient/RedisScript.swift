import Crypto
import Logging

/// A Lua script with its SHA1 computed locally, run with `EVALSHA` and re-sent with `EVAL` when the server answers
/// `NOSCRIPT` (its script cache is lost on restart, failover and `SCRIPT FLUSH`).
public struct RedisScript: Sendable, Hashable {
    /// The Lua source.
    public let source: String
    /// The lowercase hex SHA1 of the source, as Redis computes it.
    public let sha1: String

    /// Creates a script from its source.
    public init(_ source: String) {
        self.source = source
        self.sha1 = Insecure.SHA1.hash(data: Array(source.utf8)).map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined()
    }
}

extension RedisClient {
    /// Runs `script` with `EVALSHA`; on `NOSCRIPT` sends it with `EVAL` (which also caches it) and returns that reply.
    ///
    /// - Throws: ``RedisError`` for the script's own error replies, timeouts and connection failures.
    @discardableResult
    public func eval(
        _ script: RedisScript,
        keys: [String] = [],
        arguments: [any RESPArgumentConvertible] = [],
        timeout: Duration? = nil
    ) async throws -> RESPValue {
        var command = RedisCommand("EVALSHA", script.sha1, keys.count)
        for key in keys { command.append(key) }
        for argument in arguments { command.append(argument) }
        do {
            return try await send(command, timeout: timeout)
        } catch let error as RedisError where error.code == .noScript {
            logger.debug("script not cached; sending it with EVAL", metadata: ["redis.script": "\(script.sha1)"])
            var eval = RedisCommand("EVAL", script.source, keys.count)
            for key in keys { eval.append(key) }
            for argument in arguments { eval.append(argument) }
            return try await send(eval, timeout: timeout)
        }
    }

    /// `SCRIPT LOAD`: caches `script` on the server ahead of time; returns the server's SHA1.
    @discardableResult
    ///
    /// In cluster mode it is loaded on every primary (a failed-over primary's replica may not have it: ``eval(_:keys:arguments:timeout:)``
    /// falls back to `EVAL` there); the first failure is thrown.
    public func load(_ script: RedisScript) async throws -> String {
        guard isCluster else { return try await send("SCRIPT", "LOAD", script.source).string ?? "" }
        var sha = ""
        for (_, reply) in try await sendToEveryPrimary(RedisCommand("SCRIPT", "LOAD", script.source)) {
            sha = try reply.get().string ?? sha
        }
        return sha
    }
}
