import Foundation

/// Runs short blocking system calls (socket probes with receive timeouts) off the Swift concurrency pool.
///
/// Each call gets its own `Thread`, so a probe waiting on a paused server never occupies one of the few cooperative
/// threads (or one of the width-limited global dispatch threads) that other tests need.
enum BlockingWork {
    /// Runs `body` on a fresh thread and returns its result.
    static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) async -> T {
        await withCheckedContinuation { continuation in
            let thread = Thread {
                continuation.resume(returning: body())
            }
            thread.start()
        }
    }
}
