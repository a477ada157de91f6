import ChildProcesses
import Foundation

/// The built `fleetgate` binary run to completion, for tests of its commands.
public enum FleetgateCommand {
    /// What a run printed and how it ended.
    public struct Result: Sendable {
        public var status: Int32
        public var out: String
        public var err: String
    }

    /// Runs `fleetgate arguments…` with this process's environment, less every `FLEETGATE_` variable (a developer's
    /// shell must not change a test), plus `environment`.
    public static func run(_ arguments: [String], environment extra: [String: String] = [:]) async throws -> Result {
        let process = Process()
        process.executableURL = try GatewayProcess.fleetgateExecutable()
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment.filter { !$0.key.hasPrefix("FLEETGATE_") }
        environment.merge(extra) { _, new in new }
        process.environment = environment
        // One launch at a time (ChildProcess); the blocking reads run off the concurrency pool.
        let (out, err) = try ChildProcess.runCapturingOutput(process)
        return await BlockingWork.run {
            let stdout = String(decoding: out.readDataToEndOfFile(), as: UTF8.self)
            let stderr = String(decoding: err?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
            process.waitUntilExit()
            return Result(status: process.terminationStatus, out: stdout, err: stderr)
        }
    }
}
