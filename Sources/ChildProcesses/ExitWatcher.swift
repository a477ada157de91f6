import Dispatch
import Foundation
import Synchronization

/// Records that a child process has exited and lets any number of tasks await that moment.
///
/// The child's `waitpid` thread (``reaping(_:)``) calls ``markExited(status:signaled:)``; waiters that arrive after
/// that return immediately, so there is no window in which the exit can be missed.
public final class ExitWatcher: Sendable {
    /// How the process ended.
    public struct Termination: Sendable, CustomStringConvertible {
        /// The exit status, or the signal number when `signaled` is true.
        public var status: Int32
        /// Whether the process was ended by an uncaught signal.
        public var signaled: Bool

        public var description: String {
            signaled ? "killed by signal \(status)" : "exited with status \(status)"
        }
    }

    private struct State {
        var termination: Termination?
        var nextWaiterID = 0
        var waiters: [Int: CheckedContinuation<Bool, Never>] = [:]
        /// The pid announced to ``ProcessWatchdog``, withdrawn again on exit.
        var watchedPID: Int32?
    }

    private let state = Mutex(State())

    /// How the process ended, or nil while it is still running.
    public var termination: Termination? {
        state.withLock { $0.termination }
    }

    /// Whether the process has exited (and been reaped).
    public var hasExited: Bool {
        termination != nil
    }

    /// Announces `pid` to ``ProcessWatchdog`` unless the process has already exited; ``markExited(status:signaled:)``
    /// withdraws it. Both happen under one lock, so an early exit can never leave a stale (reusable) pid announced.
    public func registerWithWatchdog(pid: Int32) {
        state.withLock { state in
            guard state.termination == nil, state.watchedPID == nil else { return }
            ProcessWatchdog.watch(pid: pid)
            state.watchedPID = pid
        }
    }

    /// Records the exit and wakes every waiter. Later calls are ignored.
    public func markExited(status: Int32, signaled: Bool) {
        let waiters = state.withLock { state -> [CheckedContinuation<Bool, Never>] in
            guard state.termination == nil else { return [] }
            state.termination = Termination(status: status, signaled: signaled)
            if let pid = state.watchedPID {
                ProcessWatchdog.forget(pid: pid)
            }
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters {
            waiter.resume(returning: true)
        }
    }

    /// Waits until the process has exited; returns false if `timeout` passed first (the process may still be running).
    @discardableResult
    public func wait(timeout: Duration? = nil) async -> Bool {
        await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
            let waiterID = state.withLock { state -> Int? in
                guard state.termination == nil else { return nil }
                let waiterID = state.nextWaiterID
                state.nextWaiterID += 1
                state.waiters[waiterID] = continuation
                return waiterID
            }
            guard let waiterID else {
                continuation.resume(returning: true)
                return
            }
            if let timeout {
                let (seconds, attoseconds) = timeout.components
                let nanoseconds = Int(seconds) * 1_000_000_000 + Int(attoseconds / 1_000_000_000)
                DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) {
                    let waiter = self.state.withLock { $0.waiters.removeValue(forKey: waiterID) }
                    waiter?.resume(returning: false)
                }
            }
        }
    }
}

extension ExitWatcher {
    /// Creates a watcher fed by a thread that waits for `pid` (a child spawned without Foundation's `Process`) and
    /// reaps it: the status is its exit code, or the signal that ended it.
    public static func reaping(_ pid: Int32) -> ExitWatcher {
        let watcher = ExitWatcher()
        let thread = Thread {
            var status: Int32 = 0
            while waitpid(pid, &status, 0) < 0 {
                guard errno == EINTR else {
                    // Reaped elsewhere or never ours: nothing more can be learnt; report it gone.
                    watcher.markExited(status: -1, signaled: false)
                    return
                }
            }
            // WIFSIGNALED / WTERMSIG / WEXITSTATUS, which Swift's Glibc module does not import (macros).
            let signal = status & 0x7f
            if signal != 0, signal != 0x7f {
                watcher.markExited(status: signal, signaled: true)
            } else {
                watcher.markExited(status: (status >> 8) & 0xff, signaled: false)
            }
        }
        thread.name = "waitpid \(pid)"
        thread.start()
        return watcher
    }
}
