import ArgumentParser
import ChildProcesses
import Foundation
import TestSupport
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

/// What a run of the built `fleetgate` binary printed, and how it ended.
struct BinaryRun {
    var status: Int32
    var output: String
    var errors: String
}

/// Runs the built `fleetgate` binary (beside the test bundle) with `arguments` and waits for it to exit.
func runFleetgate(_ arguments: [String]) async throws -> BinaryRun {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("fleetgate")
    process.arguments = arguments
    // Launched through TestSupport, so no other child of this test process can hold its pipes open.
    let (output, errors) = try ChildProcess.runCapturingOutput(process)
    // Off the concurrency pool: these block for the whole run, and a blocked cooperative thread is one of only as many
    // as there are cores, shared by every test of this process.
    let (text, errorText) = await BlockingWork.run {
        let text = String(decoding: output.readDataToEndOfFile(), as: UTF8.self)
        let errorText = String(decoding: errors?.readDataToEndOfFile() ?? Data(), as: UTF8.self)
        process.waitUntilExit()
        return (text, errorText)
    }
    return BinaryRun(status: process.terminationStatus, output: text, errors: errorText)
}
