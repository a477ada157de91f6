import Synchronization

/// A one-way gate: closed until ``open()``, then open for good. Waiters resume when it opens, when their timeout
/// passes, or when their task is cancelled, whichever comes first. For "wait for this to have happened once"
/// (the first registration, the end of a drain) without polling.
package final class Latch: Sendable {
    private struct State {
        var isOpen = false
        var nextWaiter: UInt64 = 0
        var waiters: [UInt64: CheckedContinuation<Void, Never>] = [:]
    }

    private let state = Mutex(State())

    package init() {}

    /// Whether ``open()`` was called.
    package var isOpen: Bool { state.withLock { $0.isOpen } }

    /// How many tasks are waiting now.
    package var waitingCount: Int { state.withLock { $0.waiters.count } }

    /// Opens the gate and resumes every waiter (again: nothing happens).
    package func open() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            guard !state.isOpen else { return [] }
            state.isOpen = true
            defer { state.waiters = [:] }
            return Array(state.waiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Waits until the gate opens, at most `timeout` (and no longer than the task stays uncancelled).
    /// - Returns: whether it is open.
    @discardableResult
    package func wait(timeout: Duration) async -> Bool {
        if isOpen { return true }
        await withTaskGroup(of: Void.self) { group in
            group.addTask { await self.waitUntilOpenOrCancelled() }
            group.addTask { try? await Task.sleep(for: timeout) }
            await group.next()
            group.cancelAll()
        }
        return isOpen
    }

    private func waitUntilOpenOrCancelled() async {
        let id = state.withLock { state -> UInt64 in
            state.nextWaiter &+= 1
            return state.nextWaiter
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    // Cancelled before the continuation was stored: the handler found nothing to resume.
                    if state.isOpen || Task.isCancelled { return true }
                    state.waiters[id] = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            let waiter = state.withLock { $0.waiters.removeValue(forKey: id) }
            waiter?.resume()
        }
    }
}
