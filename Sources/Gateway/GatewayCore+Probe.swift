import ConnectionLimiter
import Logging
import Metrics
import NIOConcurrencyHelpers

/// The gateway's ``ConnectionProbe``: a WebSocket ping that a silent client must answer.
extension GatewayCore: ConnectionProbe {
    /// Probes this node's open sessions among `connections` (see ``SessionConnection/probe(idle:timeout:)``); closes
    /// the ones that fail with 4410. A connection whose upgrade is still under way counts as alive.
    func probe(connections: [String], user: String, timeout: Duration) async -> Set<String> {
        let sessions = state.withLockedValue { state in
            connections.compactMap { id in state.entries[id]?.connection.map { (id: id, connection: $0) } }
        }
        let idle = configuration.probeIdle
        let failed = await withTaskGroup(of: (id: String, connection: SessionConnection)?.self) { group in
            for session in sessions {
                group.addTask {
                    let outcome = await session.connection.probe(idle: idle, timeout: timeout)
                    self.metrics.probed(outcome)
                    return outcome == .failed ? session : nil
                }
            }
            var failed: [(id: String, connection: SessionConnection)] = []
            for await result in group { if let result { failed.append(result) } }
            return failed
        }
        guard !failed.isEmpty else { return [] }
        let milliseconds = Gateway.milliseconds(timeout)
        for session in failed {
            // The client is presumed gone: don't wait for its close frame.
            session.connection.close(
                code: GatewayCloseCode.probeFailed, reason: "liveness probe: no answer within \(milliseconds) ms", waitForAnswer: false)
        }
        logger.info(
            "closed connections that failed the liveness probe",
            metadata: ["fleetgate.user": "\(user)", "fleetgate.closed": "\(failed.count)", "fleetgate.probed": "\(sessions.count)"])
        return Set(failed.map(\.id))
    }
}
