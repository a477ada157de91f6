import Foundation
import RedisClient

/// The Lua scripts, loaded once from the module's `Scripts/` resources.
struct LimiterScripts: Sendable {
    let admit: RedisScript
    let release: RedisScript
    let renew: RedisScript
    let purge: RedisScript
    let heartbeat: RedisScript
    let sweeperLock: RedisScript

    static let shared: LimiterScripts = {
        func load(_ name: String) -> RedisScript {
            guard let url = Bundle.module.url(forResource: name, withExtension: "lua", subdirectory: "Scripts"),
                let source = try? String(contentsOf: url, encoding: .utf8)
            else {
                // The scripts are part of the build; a missing one means a broken installation.
                preconditionFailure("ConnectionLimiter resource Scripts/\(name).lua is missing from \(Bundle.module.bundlePath)")
            }
            return RedisScript(source)
        }
        return LimiterScripts(
            admit: load("admit"),
            release: load("release"),
            renew: load("renew"),
            purge: load("purge"),
            heartbeat: load("heartbeat"),
            sweeperLock: load("sweeper-lock")
        )
    }()
}

/// One step of a pipelined write: a plain command or a script call (re-sent with EVAL on `NOSCRIPT`).
enum PipelineStep: Sendable {
    case command(RedisCommand)
    case script(RedisScript, keys: [String], arguments: [String])

    var redisCommand: RedisCommand {
        switch self {
        case .command(let command):
            return command
        case .script(let script, let keys, let arguments):
            return RedisCommand("EVALSHA", arguments: [script.sha1, keys.count] + keys + arguments)
        }
    }
}

extension RedisClient {
    /// Sends `steps` in one write; a script step answered with `NOSCRIPT` is re-sent alone with `EVAL`.
    func pipeline(_ steps: [PipelineStep], timeout: Duration? = nil) async throws -> [Result<RESPValue, RedisError>] {
        var results = try await pipeline(steps.map(\.redisCommand), timeout: timeout)
        for (index, step) in steps.enumerated() {
            guard case .script(let script, let keys, let arguments) = step, case .failure(let error) = results[index],
                error.code == .noScript
            else { continue }
            do {
                results[index] = .success(try await eval(script, keys: keys, arguments: arguments, timeout: timeout))
            } catch let error as RedisError {
                results[index] = .failure(error)
            }
        }
        return results
    }
}

extension RESPValue {
    /// Element `index` of an array reply as an integer.
    func int(at index: Int) -> Int? {
        guard let values = array, index < values.count else { return nil }
        return values[index].int
    }

    /// Elements from `index` on, as strings.
    func strings(from index: Int) -> [String] {
        guard let values = array, index < values.count else { return [] }
        return values[index...].compactMap(\.string)
    }
}
