import Foundation

/// Runs blocking calls (socket probes with receive timeouts, reading a child process's output to the end and waiting
/// for its exit) off the Swift concurrency pool.
///
/// Each call gets its own `Thread`, so a probe waiting on a paused server never occupies one of the few cooperative
/// threads (or one of the width-limited global dispatch threads) that other tests need. The pool has one thread per
/// core: on a two-core CI machine, two tests blocking there for seconds freeze every other test of the process (their
/// heartbeats, deadlines and Redis clients), which then fail or wait for events that never come.
public enum BlockingWork {
    /// Runs `body` on a fresh thread and returns its result.
    public static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            let thread = Thread {
                continuation.resume(returning: body())
            }
            thread.start()
        }
    }
}
