import ArgumentParser
import FleetgateBench
import Foundation

/// `--compare FILE` and `--record FILE`, shared by the `bench` commands: the performance-regression guard.
struct FigureOptions: ParsableArguments {
    @Option(
        help: ArgumentHelp(
            "Compare this run's figures with those recorded in FILE and exit 1 if one is worse by more than its noise.",
            discussion: "Only ratios against a reference measured in the same run and machine-independent sizes are compared.",
            valueName: "file"))
    var compare: String?

    @Option(
        help: ArgumentHelp(
            "Record this run's figures in FILE (created, or updated keeping each figure's noise).", valueName: "file"))
    var record: String?

    @Option(help: ArgumentHelp("With --record: where and how the figures were measured (machine, build).", valueName: "text"))
    var recordAbout: String?

    func validate() throws {
        if let compare {
            do {
                _ = try RecordedFigures.load(from: compare)
            } catch {
                throw ValidationError("--compare: \(error)")
            }
        }
        if recordAbout != nil, record == nil { throw ValidationError("--record-about needs --record") }
    }

    /// Records and compares `figures` as asked; throws `ExitCode(1)` after printing the comparison when one regressed.
    func finish(_ figures: [BenchFigure]) throws {
        if let record {
            let existing =
                FileManager.default.fileExists(atPath: record) ? try RecordedFigures.load(from: record) : RecordedFigures(about: "", figures: [:])
            try existing.recording(figures, about: recordAbout).write(to: record)
            print("recorded \(figures.count) figures in \(record): \(figures.map(\.name).joined(separator: ", "))")
        }
        guard let compare else { return }
        let comparison = BenchComparison(measured: figures, recorded: try RecordedFigures.load(from: compare))
        print(comparison.report(recordedAt: compare))
        if !comparison.regressions.isEmpty { throw ExitCode(1) }
    }
}
