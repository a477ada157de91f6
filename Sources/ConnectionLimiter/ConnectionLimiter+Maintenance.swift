import Synchronization

extension ConnectionLimiter {
    /// Hands the re-admission of this node's connections (after `previous` lost its lease) to the maintenance loop.
    func schedule(readmissionAfter previous: String) {
        wakeMaintenance { $0.pendingReadmission = previous }
    }

    /// Asks the maintenance loop for a renewal round now (after a forward jump of Redis's clock).
    func scheduleRenewal() {
        wakeMaintenance { $0.pendingRenewal = true }
    }

    /// Hands a sweep of dead nodes to the maintenance loop.
    func schedule(sweep nodes: Set<String>) {
        wakeMaintenance { state in
            state.pendingSweep.formUnion(nodes)
            state.sweeping = true
        }
    }

    /// Records work for the maintenance loop and wakes it if it is waiting.
    private func wakeMaintenance(_ record: (inout State) -> Void) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            record(&state)
            defer { state.maintenanceWaiter = nil }
            return state.maintenanceWaiter
        }
        waiter?.resume()
    }

    /// Runs re-admissions and sweeps the heartbeat asked for, one at a time, so a long one never delays a heartbeat.
    func maintenanceLoop() async {
        while !Task.isCancelled {
            await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let ready = state.withLock { state -> Bool in
                        if state.pendingReadmission != nil || !state.pendingSweep.isEmpty || state.pendingRenewal || Task.isCancelled { return true }
                        state.maintenanceWaiter = continuation
                        return false
                    }
                    if ready { continuation.resume() }
                }
            } onCancel: {
                let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                    defer { state.maintenanceWaiter = nil }
                    return state.maintenanceWaiter
                }
                waiter?.resume()
            }
            let (readmission, sweep, renewal) = state.withLock { state -> (String?, Set<String>, Bool) in
                defer {
                    state.pendingReadmission = nil
                    state.pendingSweep = []
                    state.pendingRenewal = false
                }
                return (state.pendingReadmission, state.pendingSweep, state.pendingRenewal)
            }
            if let previous = readmission { await readmitAll(previous: previous) }
            if renewal { await renewLeases() }
            if !sweep.isEmpty {
                await self.sweep(sweep)
                state.withLock { $0.sweeping = false }
            }
        }
    }
}
