import ArgumentParser
import ChildProcesses
import Foundation
import TestSupport
import Testing

@testable import FleetgateBench
@testable import fleetgate

@Suite("fleetgate bench gateway", .serialized)
struct BenchGatewayTests {
    @Test("arguments parse, with defaults")
    func parsesDefaults() throws {
        let bench = try #require(try Fleetgate.parseAsRoot(["bench", "gateway"]) as? BenchGateway)
        #expect(bench.url == "redis://127.0.0.1:6379")
        #expect(bench.connections == 20_000)
        #expect(bench.concurrency == 64)
        #expect(bench.users == 1_000)
        #expect(bench.rounds == 3)
        #expect(bench.warmup == 1_000)
        #expect(bench.client == .minimal)
    }

    @Test("arguments parse, with values")
    func parsesValues() throws {
        let command = try Fleetgate.parseAsRoot([
            "bench", "gateway", "--url", "redis://127.0.0.1:7000/2", "--connections", "500", "--concurrency", "8", "--users", "20",
            "--rounds", "5", "--warmup", "0", "--client", "hummingbird",
        ])
        let bench = try #require(command as? BenchGateway)
        #expect(bench.url == "redis://127.0.0.1:7000/2")
        #expect(bench.connections == 500)
        #expect(bench.concurrency == 8)
        #expect(bench.users == 20)
        #expect(bench.rounds == 5)
        #expect(bench.warmup == 0)
        #expect(bench.client == .hummingbird)
    }

    @Test(
        "bad values are refused with a clear message",
        arguments: [
            (["--connections", "0"], "--connections"),
            (["--concurrency", "0"], "--concurrency"),
            (["--users", "0"], "--users"),
            (["--rounds", "0"], "--rounds"),
            (["--warmup", "-1"], "--warmup"),
            (["--url", "http://x"], "scheme"),
            (["--client", "curl"], "curl"),
        ])
    func refuses(arguments: [String], mentions: String) {
        expectRefusal(["bench", "gateway"] + arguments, mentioning: mentions)
    }

    @Test("help explains every figure")
    func help() {
        let help = Fleetgate.helpMessage(for: BenchGateway.self, columns: 10_000)
        for phrase in ["cycles/s", "p50/p99", "--limiter off", "ratio", "goal >= 0.90", "CPU per cycle", "INFO commandstats", "SIGINT"] {
            #expect(help.contains(phrase), "help lacks \(phrase)")
        }
    }

    @Test("the nodes differ only in the limiter")
    func nodeArguments() throws {
        let bench = try #require(try Fleetgate.parseAsRoot(["bench", "gateway", "--url", "redis://127.0.0.1:7000"]) as? BenchGateway)
        var runner = try bench.makeRunner(executable: URL(fileURLWithPath: "/bin/false"))
        runner.prefix = "fgbench-test"
        runner.secret = String(repeating: "s", count: 40)
        let common = ["serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning", "--jwt-secret", runner.secret]
        #expect(runner.nodeArguments(limiter: false) == common + ["--node-name", "fgbench-test-off", "--limiter", "off"])
        #expect(
            runner.nodeArguments(limiter: true)
                == common + [
                    "--node-name", "fgbench-test-limiter", "--limiter", "on", "--redis", "redis://127.0.0.1:7000", "--key-prefix", "fgbench-test",
                    "--default-limit", "1000000", "--on-redis-down", "reject",
                ])
    }

    @Test(
        "the built binary measures both nodes, prints their ratio, and leaves no node and no key behind",
        .timeLimit(.minutes(1)), arguments: GatewayBenchClient.allCases)
    func runsBinary(client: GatewayBenchClient) async throws {
        try await RedisServer.withServer { server throws in
            let run = try await BenchBinary.run([
                "bench", "gateway", "--url", server.url, "--connections", "100", "--concurrency", "8", "--users", "20", "--rounds", "2",
                "--warmup", "10", "--client", client.rawValue,
            ])
            #expect(run.status == 0, "\(run.output)\n\(run.errors)")
            let lines = run.output.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
            func numbers(_ prefix: String) -> [Double] {
                lines.filter { $0.hasPrefix(prefix) }.compactMap { line in
                    line.dropFirst(prefix.count).split(separator: " ").first.flatMap { Double($0.trimmingCharacters(in: ["x"])) }
                }
            }
            #expect(numbers("1      --limiter off").count == 1 && numbers("1      --limiter off")[0] > 0, "\(run.output)")
            #expect(numbers("2      limiter").count == 1 && numbers("2      limiter")[0] > 0, "\(run.output)")
            #expect(numbers("ratio").filter { $0 > 0 }.count == 2, "no per-round ratios in:\n\(run.output)")
            let summary = "ratio (limiter / --limiter off):"
            #expect((numbers(summary).first ?? 0) > 0, "no ratio in:\n\(run.output)")
            #expect(run.output.contains("(median of 2 rounds; goal >= 0.90)"), "\(run.output)")
            #expect(run.output.contains("every connection entry released"), "\(run.output)")
            // Admission and release are one EVALSHA each; the node's heartbeats add a few more. A release runs after its
            // socket closed, so up to one per concurrent task (8 of 100 cycles) can land after a round's last snapshot.
            let evalsha = run.output.components(separatedBy: "evalsha ").dropFirst().first?.split(separator: ",").first.flatMap { Double($0) }
            #expect((1.92..<2.2).contains(evalsha ?? 0), "the limiter node did not run admit + release per cycle:\n\(run.output)")
            #expect(!run.output.contains("failed cycles"), "\(run.output)")
            #expect(try await server.cli("DBSIZE") == "0")
            #expect(BenchBinary.processes(mentioning: try #require(run.prefix)).isEmpty, "a gateway node outlived the benchmark")
        }
    }

    @Test("SIGINT stops the gateway nodes and fails the command", .timeLimit(.minutes(1)))
    func interrupted() async throws {
        try await RedisServer.withServer { server throws in
            let run = try await BenchBinary.run(
                ["bench", "gateway", "--url", server.url, "--connections", "1000000", "--concurrency", "4", "--users", "10", "--warmup", "0"],
                interruptAfter: "round 1/3")
            #expect(run.status != 0)
            #expect(run.errors.contains("interrupted by SIGINT"), "\(run.errors)")
            #expect(BenchBinary.processes(mentioning: try #require(run.prefix)).isEmpty, "a gateway node outlived the benchmark")
            #expect(try await server.cli("DBSIZE") == "0")
        }
    }
}

/// The built `fleetgate` binary, run as a child process.
enum BenchBinary {
    struct Run {
        var status: Int32
        var output: String
        var errors: String
        /// The key prefix the run announced on stderr (`keys under fgbench-…:*`).
        var prefix: String? {
            guard let range = errors.range(of: "keys under ") else { return nil }
            return errors[range.upperBound...].split(separator: ":").first.map(String.init)
        }
    }

    /// Runs `fleetgate arguments`; with `interruptAfter`, sends SIGINT once stderr contains that text.
    static func run(_ arguments: [String], interruptAfter marker: String? = nil) async throws -> Run {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("bench-gateway-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let outputPath = directory.appendingPathComponent("stdout").path
        let errorPath = directory.appendingPathComponent("stderr").path
        guard FileManager.default.createFile(atPath: outputPath, contents: nil), FileManager.default.createFile(atPath: errorPath, contents: nil)
        else { throw CocoaError(.fileWriteUnknown) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("fleetgate")
        process.arguments = arguments
        process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: outputPath))
        process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errorPath))
        // Through TestSupport: one launch at a time (no descriptor leaks into other children) with an empty signal
        // mask, so the benchmark sees SIGINT (concurrency threads block signals).
        try ChildProcess.run(process)
        func read(_ path: String) -> String {
            FileManager.default.contents(atPath: path).map { String(decoding: $0, as: UTF8.self) } ?? ""
        }
        var interrupted = false
        while process.isRunning {
            if let marker, !interrupted, read(errorPath).contains(marker) {
                kill(process.processIdentifier, SIGINT)
                interrupted = true
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        await BlockingWork.run { process.waitUntilExit() }
        return Run(status: process.terminationStatus, output: read(outputPath), errors: read(errorPath))
    }

    /// Processes whose command line contains `text`.
    static func processes(mentioning text: String) -> [Int32] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []
        return entries.compactMap { entry -> Int32? in
            guard let pid = Int32(entry), let data = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return nil }
            return String(decoding: data, as: UTF8.self).contains(text) ? pid : nil
        }
    }
}
