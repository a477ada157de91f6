import Metrics

/// The limiter's metrics, created once per limiter with bounded dimensions (never a user id).
struct LimiterMetrics: Sendable {
    let admitted: Counter
    let admittedLocal: Counter
    let denied: Counter
    let dryRunDenied: Counter
    let redisFull: Counter
    let evictedExpired: Counter
    let evictedDeadNode: Counter
    let evictedZombie: Counter
    let evictedKicked: Counter
    let evictedTrimmed: Counter
    let evictedProbe: Counter
    let activeConnections: Gauge
    let sweeps: Counter
    let sweepDuration: Timer
    let heartbeatFailures: Counter
    let fencingEvents: Counter
    let clockJumpsForward: Counter
    let clockJumpsBackward: Counter
    let scriptLatency: Timer

    init(factory: any MetricsFactory) {
        admitted = Counter(label: "fleetgate_admissions_total", dimensions: [("result", "admitted")], factory: factory)
        admittedLocal = Counter(label: "fleetgate_admissions_total", dimensions: [("result", "admitted_local")], factory: factory)
        denied = Counter(label: "fleetgate_admissions_total", dimensions: [("result", "denied")], factory: factory)
        dryRunDenied = Counter(label: "fleetgate_admissions_total", dimensions: [("result", "dry_run_denied")], factory: factory)
        redisFull = Counter(label: "fleetgate_admissions_total", dimensions: [("result", "redis_full")], factory: factory)
        evictedExpired = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "expired")], factory: factory)
        evictedDeadNode = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "dead_node")], factory: factory)
        evictedZombie = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "zombie")], factory: factory)
        evictedKicked = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "kicked")], factory: factory)
        evictedTrimmed = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "trimmed")], factory: factory)
        evictedProbe = Counter(label: "fleetgate_evictions_total", dimensions: [("reason", "probe")], factory: factory)
        activeConnections = Gauge(label: "fleetgate_local_connections", factory: factory)
        sweeps = Counter(label: "fleetgate_sweeps_total", factory: factory)
        sweepDuration = Timer(label: "fleetgate_sweep_duration_seconds", factory: factory)
        heartbeatFailures = Counter(label: "fleetgate_heartbeat_failures_total", factory: factory)
        fencingEvents = Counter(label: "fleetgate_fencing_events_total", factory: factory)
        clockJumpsForward = Counter(label: "fleetgate_clock_jumps_total", dimensions: [("direction", "forward")], factory: factory)
        clockJumpsBackward = Counter(label: "fleetgate_clock_jumps_total", dimensions: [("direction", "backward")], factory: factory)
        scriptLatency = Timer(label: "fleetgate_admission_script_duration_seconds", factory: factory)
    }
}

/// Metadata keys for logs, defined in one place.
enum LogKey {
    static let user = "fleetgate.user"
    static let node = "fleetgate.node"
    static let connection = "fleetgate.connection"
    static let count = "fleetgate.count"
    static let limit = "fleetgate.limit"
    static let error = "fleetgate.error"
}
