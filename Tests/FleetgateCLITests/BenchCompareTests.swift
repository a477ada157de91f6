import ChildProcesses
import Foundation
import TestSupport
import Testing

@testable import FleetgateBench
@testable import fleetgate

/// The performance-regression guard: `fleetgate bench … --compare FILE` against figures recorded in the repository.
@Suite("fleetgate bench --compare and --record", .serialized)
struct BenchCompareTests {
    static func recorded(_ value: Double, noise: Double = 0.1, higherIsBetter: Bool = true) -> RecordedFigures {
        RecordedFigures(about: "test", figures: ["x.ratio": .init(value: value, noise: noise, higherIsBetter: higherIsBetter, label: "x")])
    }

    static func measured(_ value: Double, higherIsBetter: Bool = true) -> [BenchFigure] {
        [BenchFigure(name: "x.ratio", value: value, higherIsBetter: higherIsBetter, label: "x")]
    }

    @Test(
        "a figure worse by more than its noise is a regression, in either direction of 'better'",
        arguments: [
            (0.80, true, BenchComparison.Verdict.regressed), (0.91, true, .same), (1.09, true, .same), (1.2, true, .better),
            (1.2, false, .regressed), (1.09, false, .same), (0.8, false, .better),
        ])
    func verdicts(measured: Double, higherIsBetter: Bool, verdict: BenchComparison.Verdict) {
        let comparison = BenchComparison(
            measured: Self.measured(measured, higherIsBetter: higherIsBetter), recorded: Self.recorded(1.0, higherIsBetter: higherIsBetter))
        #expect(comparison.rows.map(\.verdict) == [verdict])
        #expect(comparison.regressions.count == (verdict == .regressed ? 1 : 0))
        let report = comparison.report(recordedAt: "f.json")
        #expect(report.contains(verdict == .regressed ? "REGRESSION: x.ratio" : "no regression"), "\(report)")
    }

    @Test("figures of a benchmark that ran but missing from the file, or the other way round, are named")
    func unrecordedAndMissing() {
        var recorded = Self.recorded(1.0)
        recorded.figures["x.other"] = .init(value: 2, noise: 0.1, higherIsBetter: true, label: "o")
        recorded.figures["y.ratio"] = .init(value: 2, noise: 0.1, higherIsBetter: true, label: "y")
        let comparison = BenchComparison(
            measured: Self.measured(1.0) + [BenchFigure(name: "x.new", value: 3, higherIsBetter: true, label: "n")], recorded: recorded)
        #expect(comparison.unrecorded == ["x.new"])
        // y.* belongs to a benchmark that did not run: not reported as missing.
        #expect(comparison.notMeasured == ["x.other"])
    }

    @Test("--record adds new figures with the default noise and keeps a recorded figure's noise")
    func recordingKeepsNoise() throws {
        let updated = Self.recorded(1.0, noise: 0.04).recording(
            Self.measured(1.3) + [BenchFigure(name: "x.new", value: 5, higherIsBetter: false, label: "n")], about: "now")
        #expect(updated.about == "now")
        #expect(updated.figures["x.ratio"] == .init(value: 1.3, noise: 0.04, higherIsBetter: true, label: "x"))
        #expect(updated.figures["x.new"]?.noise == RecordedFigures.defaultNoise)
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("figures-\(UUID()).json").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try updated.write(to: path)
        #expect(try RecordedFigures.load(from: path) == updated)
    }

    @Test(
        "a file that cannot be used is refused, naming the file and the problem",
        arguments: [
            ("not json", "is not a recorded-figures file"),
            (#"{"about":"","figures":{"a.b":{"value":0,"noise":0.1,"higherIsBetter":true,"label":""}}}"#, "it must be > 0"),
            (#"{"about":"","figures":{"a.b":{"value":1,"noise":1.5,"higherIsBetter":true,"label":""}}}"#, "it must be a fraction"),
        ])
    func refusesBadFiles(content: String, problem: String) throws {
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("figures-\(UUID()).json").path
        defer { try? FileManager.default.removeItem(atPath: path) }
        try content.write(toFile: path, atomically: true, encoding: .utf8)
        #expect {
            try RecordedFigures.load(from: path)
        } throws: { error in
            "\(error)".contains(path) && "\(error)".contains(problem)
        }
        expectRefusal(["bench", "redis", "--compare", path], mentioning: problem)
        expectRefusal(["bench", "admit", "--compare", "/nonexistent/figures.json"], mentioning: "cannot read")
        expectRefusal(["bench", "gateway", "--record-about", "x"], mentioning: "--record-about needs --record")
    }

    @Test("the recorded figures in the repository load, and every figure the benchmarks produce is recorded")
    func repositoryFigures() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let recorded = try RecordedFigures.load(from: root.appendingPathComponent("docs/bench-figures.json").path)
        var names = [
            "admit.throughput-ratio", "admit.bytes-per-connection", "gateway.ratio", "gateway.cpu-ratio", "cluster.routing-ratio",
            "cluster.scaling-ratio",
        ]
        for workload in RedisBenchWorkload.allCases {
            for mode in RedisBenchMode.allCases { names.append("redis.\(workload.rawValue).\(mode.rawValue)-ratio") }
        }
        #expect(Set(recorded.figures.keys) == Set(names))
        #expect(!recorded.about.isEmpty)
    }

    /// Runs the built binary's `bench redis` (SET, explicit pipelining, 2,000 requests) with `extra` arguments.
    private func benchRedis(_ server: RedisServer, _ extra: [String]) async throws -> (status: Int32, output: String) {
        let run = try await runFleetgate(
            ["bench", "redis", "--url", server.url, "--command", "set", "--mode", "explicit", "--requests", "2000"] + extra)
        return (run.status, run.output + run.errors)
    }

    @Test("the built binary records its figures, then flags a recorded figure it falls short of and passes one it beats", .timeLimit(.minutes(2)))
    func binaryComparesAndRecords() async throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("figures-\(UUID())")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let file = directory.appendingPathComponent("figures.json").path
        let name = "redis.set.explicit-ratio"
        try await RedisServer.withServer { server throws in
            let recorded = try await benchRedis(server, ["--record", file, "--record-about", "test run"])
            #expect(recorded.status == 0, "\(recorded.output)")
            #expect(recorded.output.contains("recorded 1 figures in \(file): \(name)"), "\(recorded.output)")
            let figures = try RecordedFigures.load(from: file)
            #expect(figures.about == "test run")
            let measured = try #require(figures.figures[name]?.value)
            #expect(measured > 0)

            // A recorded ratio 100 times what this machine can reach: a regression, exit 1.
            try RecordedFigures(about: "x", figures: [name: .init(value: measured * 100, noise: 0.2, higherIsBetter: true, label: "")])
                .write(to: file)
            let worse = try await benchRedis(server, ["--compare", file])
            #expect(worse.status == 1, "\(worse.output)")
            #expect(worse.output.contains("REGRESSION: \(name)"), "\(worse.output)")
            #expect(worse.output.contains("REGRESSED"), "\(worse.output)")

            // A recorded ratio a hundredth of it: better, exit 0.
            try RecordedFigures(about: "x", figures: [name: .init(value: measured / 100, noise: 0.2, higherIsBetter: true, label: "")])
                .write(to: file)
            let better = try await benchRedis(server, ["--compare", file])
            #expect(better.status == 0, "\(better.output)")
            #expect(better.output.contains("no regression"), "\(better.output)")
            #expect(better.output.contains("better"), "\(better.output)")
        }
    }
}
