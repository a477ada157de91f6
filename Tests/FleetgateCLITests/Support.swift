import ArgumentParser
import Testing

@testable import fleetgate

/// Expects the command line to be refused while parsing, with a message that mentions `text`.
func expectRefusal(_ arguments: [String], mentioning text: String, sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        _ = try Fleetgate.parseAsRoot(arguments)
        Issue.record("accepted \(arguments)", sourceLocation: sourceLocation)
    } catch {
        let message = Fleetgate.message(for: error)
        #expect(message.contains(text), "\(message)", sourceLocation: sourceLocation)
    }
}
