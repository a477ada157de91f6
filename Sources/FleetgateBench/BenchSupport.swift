import Foundation
import Histogram
import RedisClient

// Pieces shared by the `fleetgate bench …` commands.

/// Throughput and latency of one measured run.
struct Measurement: Sendable {
    var requestsPerSecond: Double
    var p50Milliseconds: Double
    var p99Milliseconds: Double
    /// CPU time (user + system) this process spent per request, in microseconds; `nil` for redis-benchmark.
    var cpuMicrosecondsPerRequest: Double? = nil
}

/// User + system CPU time of this process so far, in microseconds.
func processCPUMicroseconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    let user = Double(usage.ru_utime.tv_sec) * 1e6 + Double(usage.ru_utime.tv_usec)
    let system = Double(usage.ru_stime.tv_sec) * 1e6 + Double(usage.ru_stime.tv_usec)
    return user + system
}

/// A tiny, fast PRNG for picking keys (the system generator makes a syscall per number).
struct SplitMix64: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Runs `requests` operations on `tasks` concurrent tasks and measures throughput, latency (HdrHistogram) and this
/// process's CPU time per operation.
///
/// Each task calls `operation(task, done, remaining, &generator)` until it has done its share; one call may cover
/// several operations (a pipelined batch) and returns how many it did; its latency is recorded once per operation.
/// Task `task` owns the operation indices `task + k * tasks` (k = `done` …), so indices are unique across tasks and
/// together cover `0..<requests`.
func measureConcurrently(
    tasks: Int,
    requests: Int,
    executor: (any TaskExecutor)? = nil,
    operation: @escaping @Sendable (_ task: Int, _ done: Int, _ remaining: Int, _ generator: inout SplitMix64) async throws -> Int
) async throws -> Measurement {
    let clock = ContinuousClock()
    let cpuBefore = processCPUMicroseconds()
    let start = clock.now
    let histogram = try await withThrowingTaskGroup(of: Histogram<UInt64>.self) { group in
        for task in 0..<tasks {
            let share = requests / tasks + (task < requests % tasks ? 1 : 0)
            group.addTask(executorPreference: executor) {
                var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
                var generator = SplitMix64(seed: UInt64(task) &+ 0x9E37_79B9_7F4A_7C15)
                var done = 0
                while done < share {
                    let sent = clock.now
                    let did = try await operation(task, done, share - done, &generator)
                    let count = max(1, did)
                    let elapsed = sent.duration(to: clock.now).components
                    let micros = UInt64(elapsed.seconds) * 1_000_000 + UInt64(elapsed.attoseconds / 1_000_000_000_000)
                    _ = histogram.record(micros, count: UInt64(count))
                    done += count
                }
                return histogram
            }
        }
        var total = Histogram<UInt64>(highestTrackableValue: 60_000_000, numberOfSignificantValueDigits: .three)
        for try await part in group { total.add(part) }
        return total
    }
    let elapsed = start.duration(to: clock.now).components
    let cpu = processCPUMicroseconds() - cpuBefore
    let seconds = Double(elapsed.seconds) + Double(elapsed.attoseconds) / 1e18
    return Measurement(
        requestsPerSecond: Double(requests) / seconds,
        p50Milliseconds: Double(histogram.valueAtPercentile(50)) / 1000,
        p99Milliseconds: Double(histogram.valueAtPercentile(99)) / 1000,
        cpuMicrosecondsPerRequest: cpu / Double(requests)
    )
}

extension RedisClient {
    /// Deletes every key matching `pattern` (SCAN + UNLINK, never FLUSHALL); returns how many were deleted.
    @discardableResult
    func unlinkKeys(matching pattern: String) async throws -> Int {
        var deleted = 0
        try await scan(matching: pattern) { names in
            // One UNLINK per key: on Redis Cluster the keys of a page lie in many slots.
            for reply in try await pipeline(names.map { RedisCommand("UNLINK", $0) }) { deleted += (try? reply.get().int) ?? 0 }
        }
        return deleted
    }

    /// `INFO <section>`, parsed.
    func info(_ section: String) async throws -> RedisInfo {
        RedisInfo(try await send("INFO", section).string ?? "")
    }
}

/// The `field:value` lines of an `INFO` reply.
struct RedisInfo: Sendable {
    /// One `cmdstat_<name>` line of `INFO commandstats`.
    struct CommandStat: Sendable, Hashable {
        var calls = 0
        /// Time spent executing the command in the main thread, in microseconds (scripts include their inner calls).
        var usec = 0
    }

    var fields: [String: String] = [:]

    init(_ text: String) {
        for line in text.split(whereSeparator: \.isNewline) where !line.hasPrefix("#") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            fields[String(line[..<colon])] = String(line[line.index(after: colon)...]).trimmingCharacters(in: .whitespaces)
        }
    }

    func int(_ field: String) -> Int? { fields[field].flatMap { Int($0) } }
    func double(_ field: String) -> Double? { fields[field].flatMap { Double($0) } }

    /// `INFO commandstats` by lowercase command name (`evalsha`, `config|resetstat`, …).
    var commandStats: [String: CommandStat] {
        var stats: [String: CommandStat] = [:]
        for (field, value) in fields where field.hasPrefix("cmdstat_") {
            var stat = CommandStat()
            for pair in value.split(separator: ",") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                guard parts.count == 2 else { continue }
                if parts[0] == "calls" { stat.calls = Int(parts[1]) ?? 0 }
                if parts[0] == "usec" { stat.usec = Int(parts[1]) ?? 0 }
            }
            stats[String(field.dropFirst("cmdstat_".count))] = stat
        }
        return stats
    }
}

/// `text` left-aligned in a column of `width` characters (at least one space follows it).
func pad(_ text: String, _ width: Int) -> String {
    text.count >= width ? text + " " : text + String(repeating: " ", count: width - text.count)
}

/// `value` with `decimals` decimals.
func format(_ value: Double, _ decimals: Int) -> String {
    String(format: "%.\(decimals)f", value)
}
