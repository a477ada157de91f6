import ArgumentParser
import ConnectionLimiter
import Gateway
import LoadGenerator
import Logging

/// A duration as the command line spells it: `250ms`, `15s`, `2m`, `1h`, or a bare number of seconds; never negative.
struct DurationArgument: ExpressibleByArgument, Sendable, Hashable {
    var duration: Duration

    init(_ duration: Duration) {
        self.duration = duration
    }

    init?(argument: String) {
        guard let duration = Self.parse(argument) else { return nil }
        self.duration = duration
    }

    var defaultValueDescription: String { "\(duration)" }

    /// Parses `250ms`, `1.5s`, `2m`, `1h`, `3` (seconds); nil for anything else, negative or not finite.
    static func parse(_ text: String) -> Duration? {
        let units: [(String, Double)] = [("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)]
        for (suffix, scale) in units where text.hasSuffix(suffix) {
            guard let number = Double(text.dropLast(suffix.count)), number >= 0, number.isFinite else { return nil }
            return .milliseconds(Int64((number * scale * 1000).rounded()))
        }
        guard let number = Double(text), number >= 0, number.isFinite else { return nil }
        return .milliseconds(Int64((number * 1000).rounded()))
    }
}

/// `on` or `off` (also `true`/`false`, `yes`/`no`, `1`/`0`).
enum Switch: String, ExpressibleByArgument, CaseIterable, Sendable {
    case on, off

    init?(argument: String) {
        switch argument.lowercased() {
        case "on", "true", "yes", "1": self = .on
        case "off", "false", "no", "0": self = .off
        default: return nil
        }
    }

    var isOn: Bool { self == .on }
}

extension GatewayConfiguration.DenyMode: ExpressibleByArgument {}
extension LimiterConfiguration.RedisDownPolicy: ExpressibleByArgument {}
extension LimiterConfiguration.LeaseLossPolicy: ExpressibleByArgument {}

extension LimiterConfiguration.OverflowPolicy: ExpressibleByArgument {
    /// The flag's spelling: `reject-new`, `evict-oldest`.
    var argument: String {
        switch self {
        case .rejectNew: return "reject-new"
        case .evictOldest: return "evict-oldest"
        }
    }

    public init?(argument: String) {
        guard let policy = Self.allCases.first(where: { $0.argument == argument }) else { return nil }
        self = policy
    }

    public static var allValueStrings: [String] { allCases.map(\.argument) }
    public var defaultValueDescription: String { argument }
}

extension LoadGeneratorConfiguration.Spread: ExpressibleByArgument {}

extension Logger.Level: @retroactive ExpressibleByArgument {}
