import Synchronization

/// One server per test process, started lazily on first use, for tests that only need *a* server; such tests must use
/// ``uniqueKeyPrefix(_:)`` for every key and never FLUSHALL/FLUSHDB, stop, pause or restart it, since other tests
/// use it concurrently.
///
/// The server lives until the test process ends; the process watchdog then kills it and removes its directory.
public enum SharedRedisServer {
    /// The start-up task, shared by concurrent first callers; reset if starting failed so a later call can retry.
    private static let startup = Mutex<Task<RedisServer, any Error>?>(nil)

    /// Returns the shared server, starting it on the first call (concurrent callers wait for the same start).
    /// - Throws: the ``TestSupportError`` from ``RedisServer/start(_:)`` if the server cannot be started.
    public static func get() async throws -> RedisServer {
        let task = startup.withLock { startup in
            if let task = startup {
                return task
            }
            let task = Task { try await RedisServer.start() }
            startup = task
            return task
        }
        do {
            return try await task.value
        } catch {
            startup.withLock { startup in
                if startup == task {
                    startup = nil
                }
            }
            throw error
        }
    }
}
