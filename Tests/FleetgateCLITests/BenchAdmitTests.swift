import ArgumentParser
import ChildProcesses
import ConnectionLimiter
import Foundation
import RedisClient
import TestSupport
import Testing

@testable import FleetgateBench
@testable import fleetgate

@Suite("fleetgate bench admit")
struct BenchAdmitTests {
    @Test("arguments parse, with defaults")
    func parsesDefaults() throws {
        let command = try Fleetgate.parseAsRoot(["bench", "admit"])
        let bench = try #require(command as? BenchAdmit)
        #expect(bench.url == "redis://127.0.0.1:6379")
        #expect(bench.clients == 4)
        #expect(bench.pipeline == 16)
        #expect(bench.requests == 200_000)
        #expect(bench.users == 100_000)
        #expect(bench.limit == 20)
        #expect(bench.memoryUsers == 100_000)
        #expect(bench.memoryConnectionsPerUser == 5)
        #expect(bench.renewInterval == 120)
        #expect(bench.redisBenchmark == nil)
    }

    @Test("arguments parse, with values")
    func parsesValues() throws {
        let command = try Fleetgate.parseAsRoot([
            "bench", "admit", "--url", "redis://127.0.0.1:7000/2", "--clients", "2", "--pipeline", "8", "--requests", "5000",
            "--users", "300", "--limit", "50", "--memory-users", "0", "--memory-connections-per-user", "3", "--renew-interval", "2",
        ])
        let bench = try #require(command as? BenchAdmit)
        #expect(bench.clients == 2)
        #expect(bench.pipeline == 8)
        #expect(bench.requests == 5000)
        #expect(bench.users == 300)
        #expect(bench.limit == 50)
        #expect(bench.memoryUsers == 0)
        #expect(bench.memoryConnectionsPerUser == 3)
        #expect(bench.renewInterval == 2)
    }

    @Test(
        "bad values are refused with a clear message",
        arguments: [
            (["--clients", "0"], "--clients"),
            (["--pipeline", "1001"], "--pipeline"),
            (["--clients", "1000", "--pipeline", "1000"], "--clients x --pipeline"),
            (["--requests", "10"], "--requests"),
            (["--users", "0"], "--users"),
            (["--limit", "0"], "--limit"),
            (["--memory-users", "-1"], "--memory-users"),
            (["--memory-connections-per-user", "1001"], "--memory-connections-per-user"),
            (["--renew-interval", "0"], "--renew-interval"),
            (["--url", "http://x"], "scheme"),
            (["--users", "many"], "many"),
        ])
    func refuses(arguments: [String], mentions: String) {
        expectRefusal(["bench", "admit"] + arguments, mentioning: mentions)
    }

    @Test("help explains every figure")
    func help() {
        let help = Fleetgate.helpMessage(for: BenchAdmit.self, columns: 10_000)
        for phrase in ["admissions/s", "redis-benchmark", "ratio", "used_memory", "Bytes per connection", "commandstats", "100,000 connections"] {
            #expect(help.contains(phrase), "help lacks \(phrase)")
        }
    }

    @Test("redis-benchmark runs the limiter's admission script with limiter-shaped keys")
    func referenceArguments() throws {
        let command = try Fleetgate.parseAsRoot([
            "bench", "admit", "--clients", "3", "--pipeline", "7", "--requests", "1000", "--users", "42", "--limit", "9",
        ])
        let bench = try #require(command as? BenchAdmit)
        var runner = try bench.makeRunner(redisBenchmarkPath: "/bin/false")
        // By default the limiter's own admission script, exactly as the limiter loads it.
        #expect(runner.admitScript.source == ConnectionLimiter.scriptSource(.admit))
        #expect(runner.admitScript.source.contains("ZREMRANGEBYSCORE"))
        runner.admitScript = RedisScript("return 1")
        runner.prefix = "fgbench-test"
        #expect(
            runner.referenceArguments == [
                "-c", "3", "-n", "1000", "-P", "7", "-r", "42", "EVALSHA", "e0e1f9fabfc9d4800c877a703b823ac0578ff8db", "4",
                "fgbench-test:r:{u:__rand_int__}:conns", "fgbench-test:r:{u:__rand_int__}:limit", "fgbench-test:r:{u:__rand_int__}:since",
                "fgbench-test:r:{u:__rand_int__}:kicked",
                "benchnode:__rand_int__", "9", "30000", "reject", "0",
            ])
        #expect(AdmitBenchRunner.digits(42) == "000000000042")
    }

    @Test("the built binary measures throughput, memory and upkeep, leaving no keys behind", .timeLimit(.minutes(1)))
    func runsBinary() async throws {
        try await RedisServer.withServer { server throws in
            let run = try await runFleetgate([
                "bench", "admit", "--url", server.url, "--clients", "2", "--pipeline", "4", "--requests", "2000", "--users", "500",
                "--limit", "100", "--memory-users", "200", "--memory-connections-per-user", "2", "--renew-interval", "1",
            ])
            let text = run.output
            #expect(run.status == 0, "\(text)\n\(run.errors)")
            let lines = text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }

            func firstNumber(after label: String) -> Double? {
                guard let line = lines.first(where: { $0.hasPrefix(label) }) else { return nil }
                return line.dropFirst(label.count).split(separator: " ").lazy.compactMap { Double($0.trimmingCharacters(in: ["x"])) }.first
            }
            #expect((firstNumber(after: "ratio limiter / redis-benchmark:") ?? 0) > 0, "no ratio in:\n\(text)")
            #expect((firstNumber(after: "limiter admit()") ?? 0) > 0, "no limiter throughput in:\n\(text)")
            // 400 entries are too few for a meaningful figure (used_memory moves by more than that), so only check it is printed.
            #expect(firstNumber(after: "limiter admission path") != nil, "no bytes per connection in:\n\(text)")
            #expect(firstNumber(after: "admission script alone") != nil, "no script-alone bytes per connection in:\n\(text)")
            #expect(firstNumber(after: "command time (INFO commandstats), of which:") != nil, "no upkeep CPU in:\n\(text)")
            #expect((firstNumber(after: "ratio admit.lua / minimal:") ?? 0) > 0, "no script server time ratio in:\n\(text)")
            #expect((firstNumber(after: "ratio command time / naive:") ?? 0) > 0, "no naive keep-alive reference in:\n\(text)")
            #expect(text.contains("1 renewal round"), "\(text)")
            #expect(text.contains("users index in the same write"), "\(text)")
            #expect(!text.contains("drain failed"), "\(text)")
            let keys = try await server.cli("DBSIZE")
            #expect(keys == "0")
        }
    }
}
