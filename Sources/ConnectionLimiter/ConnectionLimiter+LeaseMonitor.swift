import Logging
import Metrics
import Synchronization

extension ConnectionLimiter {
    /// Watches this node's own lease on the monotonic clock (``NodeLifecycle/tick(at:)``). With `onLeaseLoss: close`,
    /// fences (asks the gateway to close every connection) one heartbeat interval before the lease can run out.
    func leaseMonitorLoop() async {
        let step = min(configuration.heartbeat.interval / 4, .milliseconds(100))
        while await pause(step) {
            let now = clock.now
            perform(state.withLock { $0.life.tick(at: now) })
        }
    }

    /// Carries out what a ``NodeLifecycle`` transition asked for.
    func perform(_ actions: [NodeLifecycle.Action]) {
        for action in actions {
            switch action {
            case .fence(let node):
                metrics.fencingEvents.increment()
                nodeLogger(node).info("fencing: closing every connection before the node lease can expire")
                emit(.fenced(node: node))
            case .announceLeaseLost(let node):
                nodeLogger(node).info("node lease lost (no successful heartbeat within the node TTL)")
                emit(.leaseLost(node: node))
            case .announceResumed(let node):
                nodeLogger(node).info("node lease still held in Redis; resuming")
            }
        }
    }
}
