import CHeapStats
import Metrics
import Synchronization

/// The gateway's own metrics (the limiter has its own), with bounded dimensions.
struct GatewayMetrics: Sendable {
    enum UpgradeResult: String, CaseIterable {
        case accepted, denied, unauthorized, unavailable, draining
        case nodeFull = "node_full"
    }

    private let upgradeCounters: [String: Counter]
    private let sessions: Gauge
    private let closeCounters: [UInt16: Counter]
    private let otherClose: Counter
    private let probeCounters: [ProbeOutcome: Counter]
    private let heapInUse: Gauge
    private let open = OpenCount()

    init(factory: any MetricsFactory) {
        var upgradeCounters: [String: Counter] = [:]
        for result in UpgradeResult.allCases {
            upgradeCounters[result.rawValue] = Counter(
                label: "fleetgate_gateway_upgrades_total", dimensions: [("result", result.rawValue)], factory: factory)
        }
        self.upgradeCounters = upgradeCounters
        sessions = Gauge(label: "fleetgate_gateway_sessions", factory: factory)
        var closeCounters: [UInt16: Counter] = [:]
        for code in GatewayCloseCode.all {
            closeCounters[code] = Counter(label: "fleetgate_gateway_closes_total", dimensions: [("code", String(code))], factory: factory)
        }
        self.closeCounters = closeCounters
        otherClose = Counter(label: "fleetgate_gateway_closes_total", dimensions: [("code", "other")], factory: factory)
        var probeCounters: [ProbeOutcome: Counter] = [:]
        for outcome in ProbeOutcome.allCases {
            probeCounters[outcome] = Counter(label: "fleetgate_gateway_probes_total", dimensions: [("result", outcome.rawValue)], factory: factory)
        }
        self.probeCounters = probeCounters
        heapInUse = Gauge(label: "fleetgate_process_heap_in_use_bytes", factory: factory)
    }

    /// Records the C heap in use now (`fleetgate_process_heap_in_use_bytes`, glibc's `mallinfo2`), read when
    /// `/metrics` is scraped: it walks the allocator's arenas, too dear for every connection.
    func recordHeapInUse() {
        heapInUse.record(Int64(fleetgate_heap_in_use()))
    }

    func upgrades(_ result: UpgradeResult) {
        upgradeCounters[result.rawValue]?.increment()
    }

    /// One connection's liveness probe ended with `outcome`.
    func probed(_ outcome: ProbeOutcome) {
        probeCounters[outcome]?.increment()
    }

    func sessionOpened() {
        sessions.record(open.add(1))
    }

    /// `code` is the close code the connection ended with (1006 recorded for a client that vanished); nil counts as 1006.
    func sessionClosed(code: UInt16?) {
        sessions.record(open.add(-1))
        (closeCounters[code ?? 1006] ?? otherClose).increment()
    }
}

/// A shared counter of open sessions for the gauge.
private final class OpenCount: Sendable {
    private let value = Synchronization.Atomic<Int>(0)
    func add(_ delta: Int) -> Int { value.add(delta, ordering: .relaxed).newValue }
}
