import CSpawn
import Foundation
import Glibc
import Synchronization

/// Launching child processes so they behave like ones started from a shell, one at a time.
///
/// Every child of this process (tests, benchmarks, the chaos runner) must be launched here: long-lived ones through
/// ``LaunchedChild`` (`posix_spawn`, no Foundation), short ones whose output is read through ``run(_:)`` and
/// ``runCapturingOutput(_:error:)``, which use Foundation's `Process`. All launches are serialised: Foundation's
/// `Process.run()` on Linux is not safe against a concurrent launch. It lists the open descriptors (to close them in
/// the child), then creates an inheritable socket pair (to learn of the child's exit), then spawns; a descriptor that
/// another thread creates in between (the socket pair of a concurrent launch, a `Pipe`) leaks into the child. When that
/// child lives long (a shared server lives as long as the test process), the other child's exit is never reported, so
/// its ``ExitWatcher`` (`kill()`, `withServer`) waits forever, and a pipe never reaches EOF, so its reader waits
/// forever. Measured with two threads launching long-lived children: 12 of 1,500 pipe reads waited for one of them.
public enum ChildProcess {
    /// Held around every launch, and around creating the pipes of one.
    private static let launching = Mutex(())

    /// Runs `process` with an empty signal mask, never concurrently with another launch.
    ///
    /// `posix_spawn` (used by `Process.run()`) hands the calling thread's signal mask to the child, and Swift
    /// concurrency / Dispatch worker threads block most signals. A `redis-server` spawned from such a thread would
    /// silently ignore SIGTERM forever, so the mask is cleared around the call and restored right after.
    public static func run(_ process: Process) throws {
        try launching.withLock { _ in
            try runWithEmptySignalMask(process)
        }
    }

    /// Runs `process` (like ``run(_:)``) with new pipes as its standard output and, with `error`, its standard error,
    /// and returns their read ends. The pipes are created under the launch lock, so no other child can inherit their
    /// write ends (a reader would then wait for that child's exit too). Read them off the concurrency pool
    /// (e.g. TestSupport's `BlockingWork`): reading to the end blocks until the child exits.
    public static func runCapturingOutput(_ process: Process, error: Bool = true) throws -> (output: FileHandle, error: FileHandle?) {
        try launching.withLock { _ in
            let output = Pipe()
            let errors = error ? Pipe() : nil
            process.standardOutput = output
            if let errors { process.standardError = errors }
            try runWithEmptySignalMask(process)
            return (output.fileHandleForReading, errors?.fileHandleForReading)
        }
    }

    /// Spawns `path` through `posix_spawn` (see ``LaunchedChild``) under the launch lock: stdin from /dev/null, stdout
    /// and stderr onto `output` and `error`, every other descriptor closed in the child, an empty signal mask and
    /// default signal dispositions. `failure` makes the error thrown from an errno value.
    static func spawn(
        _ path: String, arguments: [String], environment: [String], workingDirectory: String?, output: Int32, error: Int32,
        failure: (Int32) -> any Error
    ) throws -> Int32 {
        func cStrings(_ strings: [String]) -> [UnsafeMutablePointer<CChar>?] { strings.map { strdup($0) } + [nil] }
        let argv = cStrings(arguments)
        let envp = cStrings(environment)
        defer {
            for pointer in argv { free(pointer) }
            for pointer in envp { free(pointer) }
        }
        var pid: pid_t = 0
        let result = launching.withLock { _ in
            if let workingDirectory {
                return fleetgate_spawn(path, argv, envp, workingDirectory, output, error, &pid)
            }
            return fleetgate_spawn(path, argv, envp, nil, output, error, &pid)
        }
        guard result == 0 else { throw failure(result) }
        return pid
    }

    private static func runWithEmptySignalMask(_ process: Process) throws {
        var empty = sigset_t()
        sigemptyset(&empty)
        var saved = sigset_t()
        pthread_sigmask(SIG_SETMASK, &empty, &saved)
        defer { pthread_sigmask(SIG_SETMASK, &saved, nil) }
        try process.run()
    }
}
