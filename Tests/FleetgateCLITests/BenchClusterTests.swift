import ArgumentParser
import ChildProcesses
import Foundation
import TestSupport
import Testing

@testable import fleetgate

@Suite("fleetgate bench cluster", .serialized)
struct BenchClusterTests {
    @Test("arguments parse, with defaults; bad values are refused")
    func arguments() throws {
        let bench = try #require(try Fleetgate.parseAsRoot(["bench", "cluster"]) as? BenchCluster)
        #expect(bench.requests == 100_000)
        #expect(bench.users == 100_000)
        #expect(bench.rounds == 2)
        expectRefusal(["bench", "cluster", "--requests", "10"], mentioning: "--requests")
        expectRefusal(["bench", "cluster", "--rounds", "0"], mentioning: "--rounds")
        expectRefusal(["bench", "cluster", "--clients", "0"], mentioning: "--clients")
    }

    @Test("the built binary measures 1 server, a 1-primary and a 3-primary cluster, with keys on every primary", .timeLimit(.minutes(2)))
    func runsBinary() async throws {
        let run = try await runFleetgate(
            ["bench", "cluster", "--requests", "2000", "--users", "500", "--rounds", "1", "--clients", "2", "--pipeline", "4"])
        let text = run.output
        #expect(run.status == 0, "\(text)\n\(run.errors)")
        for target in ["1 server (redis://)", "cluster, 1 primary", "cluster, 3 primaries"] {
            #expect(text.contains(target), "no run on \(target):\n\(text)")
        }
        #expect(text.contains("routing: cluster client on 1 primary / plain client on 1 server: "), "\(text)")
        #expect(text.contains("scaling: 3 primaries / 1 server: "), "\(text)")
        // Keys reached every primary of the three-primary cluster (three non-zero counts).
        let three = try #require(text.split(separator: "\n").first { $0.contains("cluster, 3 primaries") })
        let counts = three.split(separator: " ").suffix(5).filter { $0 != "/" }.compactMap { Int($0) }
        #expect(counts.count == 3 && counts.allSatisfy { $0 > 0 }, "\(three)")
    }
}
