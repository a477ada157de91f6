import Foundation
import RedisClient

/// Runs Debian's `redis-benchmark` and reads its CSV output.
public enum RedisBenchmarkTool {
    /// redis-benchmark is missing, failed, or printed something unexpected.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The path of `redis-benchmark` on `PATH`.
    public static func locate() throws -> String {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin"
        for directory in path.split(separator: ":") {
            let candidate = "\(directory)/redis-benchmark"
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        }
        throw Failure(description: "redis-benchmark not found on PATH; install it with `apt-get install redis-tools` or pass --redis-benchmark PATH")
    }

    /// Runs it against the configured server and returns its throughput and latency.
    /// - Parameter cpus: a `taskset -c` CPU list to run it on (nil: anywhere).
    static func run(path: String, configuration: RedisClientConfiguration, arguments: [String], cpus: String? = nil) throws -> Measurement {
        var connection = ["-h", configuration.host, "-p", "\(configuration.port)", "--csv"]
        if configuration.database != 0 { connection += ["--dbnum", "\(configuration.database)"] }
        if let user = configuration.username { connection += ["--user", user] }
        if let password = configuration.password { connection += ["-a", password] }
        let process = Process()
        if let cpus {
            process.executableURL = URL(fileURLWithPath: try CPUPinning.tasksetPath())
            process.arguments = ["-c", cpus, path] + connection + arguments
        } else {
            process.executableURL = URL(fileURLWithPath: path)
            process.arguments = connection + arguments
        }
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let data = output.fileHandleForReading.readDataToEndOfFile()
        let errorText = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        let text = String(decoding: data, as: UTF8.self)
        guard process.terminationStatus == 0, let measurement = parse(csv: text) else {
            throw Failure(
                description: "redis-benchmark against \(configuration.address) failed (exit \(process.terminationStatus)): \(errorText)\(text)")
        }
        return measurement
    }

    /// Parses `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms",…`.
    static func parse(csv: String) -> Measurement? {
        let lines = csv.split(whereSeparator: \.isNewline).map { line in
            line.split(separator: ",").map { $0.trimmingCharacters(in: CharacterSet(charactersIn: "\"")) }
        }
        guard let header = lines.first, let row = lines.dropFirst().last,
            let rps = header.firstIndex(of: "rps"), let p50 = header.firstIndex(of: "p50_latency_ms"),
            let p99 = header.firstIndex(of: "p99_latency_ms"), row.count > max(rps, p50, p99),
            let rate = Double(row[rps]), let median = Double(row[p50]), let tail = Double(row[p99])
        else { return nil }
        return Measurement(requestsPerSecond: rate, p50Milliseconds: median, p99Milliseconds: tail)
    }
}

/// `taskset` (util-linux): pinning a process, all of its threads, to CPUs, and undoing it.
enum CPUPinning {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    static func tasksetPath() throws -> String {
        for candidate in ["/usr/bin/taskset", "/bin/taskset"] where FileManager.default.isExecutableFile(atPath: candidate) {
            return candidate
        }
        throw Failure(description: "taskset not found (util-linux): --pin needs it")
    }

    /// `taskset -a -p -c cpus pid`: every thread of `pid`, and the threads it starts later, on `cpus`.
    static func pin(_ pid: Int32, to cpus: String) throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: try tasksetPath())
        process.arguments = ["-a", "-p", "-c", cpus, String(pid)]
        process.standardOutput = FileHandle.nullDevice
        let errors = Pipe()
        process.standardError = errors
        try process.run()
        let errorText = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw Failure(description: "taskset -a -p -c \(cpus) \(pid) failed (exit \(process.terminationStatus)): \(errorText)")
        }
    }

    /// Every CPU this machine has, as a `taskset -c` list.
    static var allCPUs: String { "0-\(max(0, ProcessInfo.processInfo.activeProcessorCount - 1))" }
}
