import Foundation
import FoundationXML
import LoadGenerator
import Testing

@testable import FleetChaos

@Suite("Chaos scenarios and reports (pure logic; the runs themselves are in scripts/test)")
struct ScenarioTests {
    @Test("every built-in scenario is valid for three nodes (cluster on a cluster), and the names list matches")
    func builtIns() throws {
        for name in Scenario.builtInNames {
            let scenario = try #require(Scenario.builtIn(name), "\(name)")
            try scenario.validate(nodes: 3, clusterPrimaries: name == "cluster" ? 3 : nil)
            #expect(scenario.name == name)
        }
        #expect(Scenario.builtIn("nope") == nil)
    }

    @Test("kill-primary needs a cluster and a primary in range; the faults of one server are refused on a cluster")
    func clusterFaults() throws {
        let cluster = try #require(Scenario.builtIn("cluster"))
        #expect(throws: ChaosError.self) { try cluster.validate(nodes: 3) }
        let fourth = Scenario(name: "p", duration: 30, faults: [.init(at: 1, kind: .killPrimary, node: 4)])
        #expect(throws: ChaosError.self) { try fourth.validate(nodes: 3, clusterPrimaries: 3) }
        try fourth.validate(nodes: 3, clusterPrimaries: 4)
        for kind in [Scenario.Kind.partition, .redisRestart, .redisStop, .redisFull, .clockJump] {
            let single = Scenario(name: "s", duration: 30, faults: [.init(at: 1, kind: kind, node: 1, for: 5, offset: 10)])
            try single.validate(nodes: 3)
            #expect(throws: ChaosError.self, "\(kind)") { try single.validate(nodes: 3, clusterPrimaries: 3) }
        }
        #expect(Scenario.Fault(at: 1, kind: .killPrimary, node: 2).label(prefix: "chaos") == "kill-primary 2")
    }

    @Test("--duration repeats the faults, shifted by the scenario's length, and keeps them within the run")
    func repeated() throws {
        let once = Scenario(name: "k", duration: 20, faults: [.init(at: 2, kind: .kill, node: 1), .init(at: 15, kind: .restart, node: 1)])
        let again = once.repeated(until: 50)
        #expect(again.duration == 50)
        #expect(again.faults.map(\.at) == [2, 15, 22, 35, 42])
        try again.validate(nodes: 3)
        #expect(once.repeated(until: 10) == once)
    }

    @Test("a scenario file: JSON with 1-based nodes, lengths in seconds, kinds by name")
    func decoding() throws {
        let text =
            #"{"name": "mine", "duration": 40, "faults": [{"at": 5, "kind": "pause", "node": 2, "for": 8}, {"at": 20, "kind": "redis-full", "for": 3}]}"#
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("scenario-\(UUID()).json")
        try Data(text.utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        let scenario = try Scenario.load(file: file.path)
        #expect(scenario.faults == [.init(at: 5, kind: .pause, node: 2, for: 8), .init(at: 20, kind: .redisFull, for: 3)])
        #expect(scenario.faults[0].label(prefix: "chaos") == "pause chaos-2 for 8s")
        try scenario.validate(nodes: 3)
    }

    @Test(
        "invalid scenarios are refused with the fault and what it needs",
        arguments: [
            (Scenario.Fault(at: 1, kind: .kill), "needs a node 1…3"),
            (Scenario.Fault(at: 1, kind: .kill, node: 4), "needs a node 1…3"),
            (Scenario.Fault(at: 1, kind: .pause, node: 1), "needs \"for\""),
            (Scenario.Fault(at: 99, kind: .storm), "within the run"),
            (Scenario.Fault(at: 1, kind: .clockJump, for: 5), "needs \"offset\""),
        ])
    func invalid(fault: Scenario.Fault, mentions: String) {
        let scenario = Scenario(name: "bad", duration: 30, faults: [fault])
        #expect {
            try scenario.validate(nodes: 3)
        } throws: { error in
            "\(error)".contains(mentions) && "\(error)".contains(fault.kind.rawValue)
        }
    }

    @Test("a file that is not a scenario says which file and why")
    func notAScenario() throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("scenario-\(UUID()).json")
        try Data(#"{"name": "x"}"#.utf8).write(to: file)
        defer { try? FileManager.default.removeItem(at: file) }
        #expect { try Scenario.load(file: file.path) } throws: { "\($0)".contains(file.path) }
        #expect { try Scenario.load(file: "/nonexistent/s.json") } throws: { "\($0)".contains("cannot read") }
    }

    private func report(scenario: Scenario, summary: InvariantChecker.Summary) -> ChaosReport {
        var fleet = FleetOptions(executable: URL(fileURLWithPath: "/bin/false"))
        fleet.limit = 20
        return ChaosReport(
            configuration: ChaosConfiguration(fleet: fleet, scenario: scenario), scenarioStart: 1,
            events: [.init(t: 1, label: "kill chaos-1", kind: "kill")],
            summary: summary, load: LoadReport(), liveNodesAtEnd: 2)
    }

    private func summary(peak: Int, over: Double = 0, stale: Double = 1, lost: Double = 1, gone: Double? = 5) -> InvariantChecker.Summary {
        let samples = (0..<50).map {
            ChaosSample(t: Double($0) / 10, sockets: [10, 10, 10], entries: 30, stale: 0, lost: 0, overLimit: 0, maxPerUser: peak)
        }
        return InvariantChecker.Summary(
            samples: samples, maxStaleAge: stale, maxStaleWhere: "u@1", maxLostAge: lost, maxLostWhere: "u@2", maxOverAge: over, peakPerUser: peak,
            kills: [.init(slot: 0, node: "abc", at: 1, users: ["u"], entriesGoneAfter: gone, usersBackAfter: 9)], failedSamples: 0,
            reregistrations: 0)
    }

    @Test("the checks: over-admission (none allowed without a fault that permits it), stale ≤ 30 s, lost, SIGKILL eviction ≤ 30 s")
    func checks() {
        let kill = Scenario.builtIn("kill")!
        #expect(report(scenario: kill, summary: summary(peak: 20)).passed)
        #expect(!report(scenario: kill, summary: summary(peak: 21)).passed)
        #expect(!report(scenario: kill, summary: summary(peak: 20, stale: 31)).passed)
        #expect(!report(scenario: kill, summary: summary(peak: 20, lost: 14)).passed)
        #expect(!report(scenario: kill, summary: summary(peak: 20, gone: 31)).passed)
        #expect(!report(scenario: kill, summary: summary(peak: 20, gone: nil)).passed)
        // A pause may overshoot (the node cannot close what it holds while stopped), for at most a renewal interval + 3 s.
        let pause = Scenario.builtIn("pause")!
        #expect(report(scenario: pause, summary: summary(peak: 25, over: 4)).passed)
        #expect(!report(scenario: pause, summary: summary(peak: 25, over: 14)).passed)
    }

    @Test("the timeline is well-formed SVG with a line per node, the faults and the verdict")
    func timeline() throws {
        let svg = report(scenario: Scenario.builtIn("kill")!, summary: summary(peak: 21)).svg
        let document = try XMLDocument(xmlString: svg)
        #expect(document.rootElement()?.name == "svg")
        #expect(svg.contains("kill chaos-1"))
        #expect(svg.contains("entries gone 5.0 s"))
        #expect(svg.contains("FAILED: over-admission"))
        #expect(svg.components(separatedBy: "<path").count - 1 >= 3 + 1 + 3)
    }
}
