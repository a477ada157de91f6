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
    let kick: RedisScript
    let registry: RedisScript

    var all: [RedisScript] { [admit, release, renew, purge, heartbeat, sweeperLock, kick, registry] }

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
            sweeperLock: load("sweeper-lock"),
            kick: load("kick"),
            registry: load("registry")
        )
    }()
}

extension ConnectionLimiter {
    /// The limiter's Lua scripts (each file under `Scripts/` documents its keys, arguments and reply).
    public enum Script: String, CaseIterable, Sendable {
        case admit, release, renew, purge, heartbeat, kick, registry
        case sweeperLock = "sweeper-lock"
    }

    /// The source of one of the limiter's scripts, exactly as the limiter runs it: for benchmarks that run the same
    /// script beside it (`redis-benchmark` with `EVALSHA`) and for operators who run one by hand.
    public static func scriptSource(_ script: Script) -> String {
        let scripts = LimiterScripts.shared
        switch script {
        case .admit: return scripts.admit.source
        case .release: return scripts.release.source
        case .renew: return scripts.renew.source
        case .purge: return scripts.purge.source
        case .heartbeat: return scripts.heartbeat.source
        case .kick: return scripts.kick.source
        case .sweeperLock: return scripts.sweeperLock.source
        case .registry: return scripts.registry.source
        }
    }
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
            var command = RedisCommand("EVALSHA", strings: [script.sha1, String(keys.count)])
            for key in keys { command.append(key) }
            for argument in arguments { command.append(argument) }
            return command
        }
    }
}

extension RedisClient {
    /// Sends `steps` in one write. Script steps answered with `NOSCRIPT` (a restarted or failed-over Redis) are
    /// re-sent together once each script is loaded again (`SCRIPT LOAD`, one per script, not per step).
    func pipeline(_ steps: [PipelineStep], timeout: Duration? = nil) async throws -> [Result<RESPValue, RedisError>] {
        var results = try await pipeline(steps.map(\.redisCommand), timeout: timeout)
        let missing = steps.indices.filter { index in
            guard case .script = steps[index], case .failure(let error) = results[index] else { return false }
            return error.code == .noScript
        }
        guard !missing.isEmpty else { return results }
        var loaded = Set<String>()
        for index in missing {
            guard case .script(let script, _, _) = steps[index], !loaded.contains(script.sha1) else { continue }
            try await load(script)
            loaded.insert(script.sha1)
        }
        let retried = try await pipeline(missing.map { steps[$0].redisCommand }, timeout: timeout)
        for (index, result) in zip(missing, retried) { results[index] = result }
        return results
    }

    /// Loads every limiter script (after a registration: a fresh Redis has an empty script cache).
    func load(_ scripts: LimiterScripts) async throws {
        _ = try await pipeline(scripts.all.map { RedisCommand("SCRIPT", "LOAD", $0.source) })
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
