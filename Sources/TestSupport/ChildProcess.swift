import Foundation
import Glibc

/// Launching child processes so they behave like ones started from a shell.
enum ChildProcess {
    /// Runs `process` with an empty signal mask.
    ///
    /// `posix_spawn` (used by `Process.run()`) hands the calling thread's signal mask to the child, and Swift
    /// concurrency / Dispatch worker threads block most signals. A `redis-server` spawned from such a thread would
    /// silently ignore SIGTERM forever, so the mask is cleared around the call and restored right after.
    static func run(_ process: Process) throws {
        var empty = sigset_t()
        sigemptyset(&empty)
        var saved = sigset_t()
        pthread_sigmask(SIG_SETMASK, &empty, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        try process.run()
    }
}
