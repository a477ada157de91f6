import ArgumentParser
import ChildProcesses
import Foundation
import TestSupport
import Testing

@testable import FleetgateBench
@testable import fleetgate

@Suite("fleetgate bench redis")
struct BenchCommandTests {
    @Test("arguments parse, with defaults")
    func parses() throws {
        let command = try Fleetgate.parseAsRoot(["bench", "redis", "--url", "redis://127.0.0.1:7000", "--clients", "2", "--requests", "5000"])
        let bench = try #require(command as? BenchRedis)
        #expect(bench.clients == 2)
        #expect(bench.requests == 5000)
        #expect(bench.pipeline == 16)
        #expect(bench.command == [.set, .evalsha])
    }

    @Test(
        "bad values are refused with a clear message",
        arguments: [
            (["--clients", "0"], "--clients"),
            (["--requests", "10"], "--requests"),
            (["--url", "http://x"], "scheme"),
            (["--command", "flushall"], "flushall"),
        ])
    func refuses(arguments: [String], mentions: String) {
        expectRefusal(["bench", "redis"] + arguments, mentioning: mentions)
    }

    @Test("redis-benchmark CSV output is read")
    func parsesCSV() throws {
        let csv = """
            "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
            "SET fgbench:set:__rand_int__ xxx","412371.13","1.503","0.376","0.135","0.231","0.263","1.767"
            """
        let measurement = try #require(RedisBenchmarkTool.parse(csv: csv))
        #expect(measurement.requestsPerSecond == 412371.13)
        #expect(measurement.p50Milliseconds == 0.135)
        #expect(measurement.p99Milliseconds == 0.263)
        #expect(RedisBenchmarkTool.parse(csv: "garbage") == nil)
    }

    @Test("the built binary runs both measurements and prints their ratio, leaving no keys behind")
    func runsBinary() async throws {
        try await RedisServer.withServer { server throws in
            let binary = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("fleetgate")
            let process = Process()
            process.executableURL = binary
            process.arguments = ["bench", "redis", "--url", server.url, "--clients", "2", "--requests", "4000", "--pipeline", "4"]
            // Launched through TestSupport, so no other child of this test process can hold its pipe open.
            let (output, _) = try ChildProcess.runCapturingOutput(process, error: false)
            // Off the concurrency pool: these block for the whole run, and a blocked cooperative thread is one of only
            // as many as there are cores, shared by every test of this process.
            let text = await BlockingWork.run {
                let text = String(decoding: output.readDataToEndOfFile(), as: UTF8.self)
                process.waitUntilExit()
                return text
            }
            #expect(process.terminationStatus == 0, "\(text)")
            let rows = text.split(whereSeparator: \.isNewline).filter { $0.hasPrefix("SET") || $0.hasPrefix("EVALSHA") }
            #expect(rows.count == 4, "\(text)")
            for row in rows {
                let ratio = row.split(separator: " ").last.map { String($0.dropLast()) }.flatMap(Double.init)
                #expect((ratio ?? 0) > 0, "no ratio in \(row)")
            }
            let keys = try await server.cli("DBSIZE")
            #expect(keys == "0")
        }
    }

    @Test("--pin runs redis-server on CPU 1 and the clients on CPU 0, and gives the server every CPU back afterwards")
    func pinned() async throws {
        try await RedisServer.withServer { server throws in
            let run = try await runFleetgate([
                "bench", "redis", "--url", server.url, "--clients", "2", "--requests", "2000", "--pipeline", "4", "--command", "set",
                "--mode", "automatic", "--pin",
            ])
            #expect(run.status == 0, "\(run.output)\n\(run.errors)")
            #expect(run.output.contains("pinned: redis-server on CPU 1"), "\(run.output)")
            let pid = try #require(server.pid)
            // Every CPU again once the run is over.
            let affinity = try String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)
                .split(separator: "\n").first { $0.hasPrefix("Cpus_allowed_list:") }?
                .split(separator: "\t").last.map(String.init)
            #expect(affinity == "0-\(ProcessInfo.processInfo.activeProcessorCount - 1)", "redis-server still pinned: \(affinity ?? "?")")
        }
    }
}
