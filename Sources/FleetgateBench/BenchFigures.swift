import Foundation

/// One figure a benchmark produced, measured against a reference in the same run (a ratio), or one that does not
/// depend on the machine's speed (bytes per connection). Absolute rates are not figures: they move with the machine.
public struct BenchFigure: Sendable, Equatable, Codable {
    /// A stable dotted name, `admit.throughput-ratio`.
    public var name: String
    public var value: Double
    /// Whether a higher value is better (ratios) or worse (bytes, CPU shares).
    public var higherIsBetter: Bool
    /// What the figure is, for the comparison's table.
    public var label: String

    public init(name: String, value: Double, higherIsBetter: Bool, label: String) {
        self.name = name
        self.value = value
        self.higherIsBetter = higherIsBetter
        self.label = label
    }
}

/// Figures recorded in the repository (`docs/bench-figures.json`): what a release build measured on a known machine,
/// with each figure's run-to-run noise, so a later run can tell a regression from noise.
public struct RecordedFigures: Sendable, Equatable, Codable {
    public struct Entry: Sendable, Equatable, Codable {
        public var value: Double
        /// The relative run-to-run spread of the figure (0.15: a value within 15 % of the recorded one is noise).
        public var noise: Double
        public var higherIsBetter: Bool
        public var label: String

        public init(value: Double, noise: Double, higherIsBetter: Bool, label: String) {
            self.value = value
            self.noise = noise
            self.higherIsBetter = higherIsBetter
            self.label = label
        }
    }

    /// Where and how the figures were measured (machine, build, commands).
    public var about: String
    public var figures: [String: Entry]

    public init(about: String, figures: [String: Entry]) {
        self.about = about
        self.figures = figures
    }

    /// The noise given to a figure recorded for the first time; edit the file to set a measured one.
    public static let defaultNoise = 0.15

    /// Reads a recorded file, with a message that names the file and what is wrong with it.
    public static func load(from path: String) throws -> RecordedFigures {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw BenchFiguresError("cannot read the recorded figures at \(path): \(error.localizedDescription)")
        }
        let recorded: RecordedFigures
        do {
            recorded = try JSONDecoder().decode(RecordedFigures.self, from: data)
        } catch {
            throw BenchFiguresError("\(path) is not a recorded-figures file ({\"about\": …, \"figures\": {name: {value, noise, …}}}): \(error)")
        }
        for (name, entry) in recorded.figures {
            guard entry.value.isFinite, entry.value > 0 else {
                throw BenchFiguresError("\(path): figure \(name) has value \(entry.value); it must be > 0")
            }
            guard entry.noise.isFinite, (0..<1).contains(entry.noise) else {
                throw BenchFiguresError("\(path): figure \(name) has noise \(entry.noise); it must be a fraction in [0, 1)")
            }
        }
        return recorded
    }

    /// These figures with `measured` added or replaced (a replaced figure keeps its noise).
    public func recording(_ measured: [BenchFigure], about newAbout: String? = nil) -> RecordedFigures {
        var result = self
        if let newAbout { result.about = newAbout }
        for figure in measured {
            let noise = figures[figure.name]?.noise ?? Self.defaultNoise
            result.figures[figure.name] = Entry(value: figure.value, noise: noise, higherIsBetter: figure.higherIsBetter, label: figure.label)
        }
        return result
    }

    /// Writes the figures as sorted, indented JSON.
    public func write(to path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
        do {
            try (encoder.encode(self) + Data("\n".utf8)).write(to: URL(fileURLWithPath: path), options: .atomic)
        } catch {
            throw BenchFiguresError("cannot write the recorded figures to \(path): \(error.localizedDescription)")
        }
    }
}

/// The comparison of a run's figures with recorded ones.
public struct BenchComparison: Sendable {
    public enum Verdict: String, Sendable {
        /// Within the noise.
        case same = "ok"
        /// Better by more than the noise.
        case better = "better"
        /// Worse by more than the noise: a regression.
        case regressed = "REGRESSED"
    }

    public struct Row: Sendable {
        public var name: String
        public var label: String
        public var recorded: Double
        public var measured: Double
        public var noise: Double
        /// measured / recorded − 1.
        public var change: Double { measured / recorded - 1 }
        public var verdict: Verdict
    }

    public var rows: [Row]
    /// Figures this run measured that the file does not hold (and the other way round): named, not judged.
    public var unrecorded: [String]
    public var notMeasured: [String]
    public var regressions: [Row] { rows.filter { $0.verdict == .regressed } }

    public init(measured: [BenchFigure], recorded: RecordedFigures) {
        var rows: [Row] = []
        var unrecorded: [String] = []
        for figure in measured {
            guard let entry = recorded.figures[figure.name] else {
                unrecorded.append(figure.name)
                continue
            }
            let ratio = figure.value / entry.value
            let verdict: Verdict
            // Better and worse are symmetric in the figure's direction; the noise is relative to the recorded value.
            let improvement = entry.higherIsBetter ? ratio - 1 : 1 - ratio
            if improvement < -entry.noise {
                verdict = .regressed
            } else if improvement > entry.noise {
                verdict = .better
            } else {
                verdict = .same
            }
            rows.append(
                Row(name: figure.name, label: figure.label, recorded: entry.value, measured: figure.value, noise: entry.noise, verdict: verdict))
        }
        self.rows = rows
        self.unrecorded = unrecorded
        let names = Set(measured.map(\.name))
        self.notMeasured = recorded.figures.keys.filter { !names.contains($0) && Self.family(of: $0, in: names) }.sorted()
    }

    /// Whether `name` belongs to a benchmark that ran (same first component as a measured figure).
    private static func family(of name: String, in measured: Set<String>) -> Bool {
        let prefix = name.split(separator: ".").first.map(String.init) ?? name
        return measured.contains { $0.hasPrefix(prefix + ".") }
    }

    /// The comparison as a table, then a verdict line.
    public func report(recordedAt path: String) -> String {
        var lines = ["compared with the figures recorded in \(path) (a change beyond a figure's noise is flagged):"]
        lines.append(pad("figure", 40) + pad("recorded", 11) + pad("now", 11) + pad("change", 9) + pad("noise", 8) + "verdict")
        for row in rows {
            lines.append(
                pad(row.name, 40) + pad(format(row.recorded, 3), 11) + pad(format(row.measured, 3), 11)
                    + pad((row.change >= 0 ? "+" : "") + format(row.change * 100, 1) + "%", 9) + pad("±" + format(row.noise * 100, 0) + "%", 8)
                    + row.verdict.rawValue)
        }
        if !unrecorded.isEmpty { lines.append("not recorded (use --record to add): \(unrecorded.joined(separator: ", "))") }
        if !notMeasured.isEmpty { lines.append("recorded but not measured in this run: \(notMeasured.joined(separator: ", "))") }
        if regressions.isEmpty {
            lines.append("no regression: every figure is within its noise or better")
        } else {
            lines.append(
                "REGRESSION: "
                    + regressions.map { "\($0.name) \(format($0.measured, 3)) vs \(format($0.recorded, 3)) recorded" }.joined(separator: "; "))
        }
        return lines.joined(separator: "\n")
    }
}

/// A recorded-figures file that cannot be used.
public struct BenchFiguresError: Error, CustomStringConvertible {
    public var description: String
    public init(_ description: String) { self.description = description }
}

extension AdmitBenchResult {
    /// `admit.throughput-ratio` and, when measured, `admit.bytes-per-connection` and `admit.keepalive-ratio`.
    public var figures: [BenchFigure] {
        var figures = [
            BenchFigure(
                name: "admit.throughput-ratio", value: throughput.ratio, higherIsBetter: true,
                label: "admissions/s, limiter / redis-benchmark EVALSHA admit.lua")
        ]
        if let memory, memory.limiterEntries > 0 {
            figures.append(
                BenchFigure(
                    name: "admit.bytes-per-connection", value: memory.limiterBytesPerEntry, higherIsBetter: false,
                    label: "used_memory per live connection, limiter path"))
        }
        if let ratio = upkeep?.naiveRatio {
            figures.append(
                BenchFigure(
                    name: "admit.keepalive-ratio", value: ratio, higherIsBetter: false,
                    label: "Redis command time keeping connections alive / naive (1 ZADD per connection every 10 s)"))
        }
        return figures
    }
}

extension GatewayBenchResult {
    /// `gateway.ratio` and `gateway.cpu-ratio` (medians over the rounds).
    public var figures: [BenchFigure] {
        guard !rounds.isEmpty else { return [] }
        return [
            BenchFigure(
                name: "gateway.ratio", value: medianRatio, higherIsBetter: true, label: "connect+close cycles/s, limiter / --limiter off"),
            BenchFigure(
                name: "gateway.cpu-ratio", value: Self.median(rounds.map(\.cpuRatio)), higherIsBetter: true,
                label: "CPU per cycle, --limiter off / limiter"),
        ]
    }
}

extension RedisBenchResult {
    /// `redis.<workload>.<mode>-ratio`.
    public var figure: BenchFigure {
        BenchFigure(
            name: "redis.\(workload.rawValue).\(mode.rawValue)-ratio", value: ratio, higherIsBetter: true,
            label: "\(workload.rawValue) requests/s, client (\(mode.rawValue)) / redis-benchmark")
    }
}
