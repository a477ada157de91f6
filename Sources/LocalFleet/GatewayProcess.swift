import ChildProcesses
import Foundation
import Glibc
import Synchronization

/// A real gateway node (`fleetgate serve`) running as a child process, for tests and the chaos runner: several of them
/// against one Redis, drained, killed or frozen to simulate failures.
///
/// Start one with ``start(executable:arguments:environment:startupTimeout:)``, which returns once the node has printed
/// its `fleetgate: listening on 127.0.0.1:PORT node=NAME` line. The node's stdout and stderr go to files in a temporary
/// directory, so they can be read at any time (``standardOutput()``, ``standardError()``). The process is SIGKILLed by
/// `deinit` at the latest, and by a watchdog helper if this process itself dies.
///
/// All methods are safe to call from any task; the mutable part (whether the node is stopped by SIGSTOP) lives behind a
/// `Mutex`.
public final class GatewayProcess: Sendable, CustomStringConvertible {
    /// The host the node listens on, from its "listening on" line: `"127.0.0.1"`.
    public let host: String
    /// The TCP port the node listens on, from its "listening on" line.
    public let port: Int
    /// The node's name, from its "listening on" line.
    public let nodeName: String
    /// The node's temporary directory, holding its stdout (`stdout.log`) and stderr (`stderr.log`). Removed when the
    /// `GatewayProcess` is deallocated.
    public let directory: String

    /// `"http://127.0.0.1:<port>"`.
    public var baseURL: String {
        "http://\(host):\(port)"
    }

    /// `"ws://127.0.0.1:<port>/ws"`.
    public var webSocketURL: String {
        "ws://\(host):\(port)/ws"
    }

    /// The process id (kept after the process has exited).
    public var pid: Int32 {
        child.pid
    }

    /// Whether the process has exited (and been reaped).
    public var hasExited: Bool {
        child.watcher.hasExited
    }

    /// The exit status, or 128 + the signal number if the process was ended by a signal (as a shell reports it, so
    /// SIGKILL gives 137); nil while the process is running.
    public var exitStatus: Int32? {
        child.watcher.termination.map(Self.exitStatus)
    }

    /// The process's resident set size in bytes (`VmRSS` of `/proc/<pid>/status`), or nil once it has exited.
    public func residentBytes() -> Int? {
        guard !hasExited, let status = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return nil }
        // "VmRSS:     12345 kB"
        let fields = line.split(separator: " ", omittingEmptySubsequences: true)
        guard fields.count >= 2, let kilobytes = Int(fields[1]) else { return nil }
        return kilobytes * 1024
    }

    /// `"gateway node NAME at 127.0.0.1:PORT (pid N)"`.
    public var description: String {
        "gateway node \(nodeName) at \(host):\(port) (pid \(pid))"
    }

    private let child: LaunchedChild
    private let state: Mutex<State>

    /// The mutable part.
    private struct State {
        /// Whether we sent SIGSTOP and no SIGCONT since.
        var stopped = false
    }

    /// What the "listening on" line says.
    struct ListeningLine: Equatable, Sendable {
        var host: String
        var port: Int
        var nodeName: String
    }

    /// How the line announcing that the node is listening starts.
    static let listeningPrefix = "fleetgate: listening on "
    /// Name of the file receiving the node's stdout (inside ``directory``).
    static let outputFileName = "stdout.log"
    /// Name of the file receiving the node's stderr (inside ``directory``).
    static let errorFileName = "stderr.log"
    /// How many lines of each output error messages quote.
    private static let linesInErrors = 20
    /// How often startup and ``waitForOutput(containing:timeout:)`` look at the output files.
    private static let pollInterval = Duration.milliseconds(20)

    private init(listening: ListeningLine, directory: String, child: LaunchedChild) {
        self.host = listening.host
        self.port = listening.port
        self.nodeName = listening.nodeName
        self.directory = directory
        self.child = child
        self.state = Mutex(State())
    }

    deinit {
        child.killBlocking()
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: - Starting

    /// Launches `executable` with `arguments` and waits until it prints its "listening on" line.
    ///
    /// - Parameters:
    ///   - executable: the `fleetgate` binary, usually ``fleetgateExecutable()``.
    ///   - arguments: e.g. `["serve", "--port", "0", "--redis", server.url]`.
    ///   - environment: changes to this process's environment for the child: entries here win, and an entry with an
    ///     empty value removes the variable. Defaults to no changes.
    ///   - startupTimeout: how long to wait for the "listening on" line. Defaults to 30 seconds.
    /// - Throws: ``LocalFleetError`` if the process cannot be launched, exits before it is listening, prints a
    ///   malformed "listening on" line or does not print one within `startupTimeout` (it is then killed); the message
    ///   quotes the tail of its stderr and stdout.
    public static func start(
        executable: URL,
        arguments: [String],
        environment: [String: String] = [:],
        startupTimeout: Duration = .seconds(30)
    ) async throws -> GatewayProcess {
        let directory = try ProcessWatchdog.makeTemporaryDirectory(template: try ProcessWatchdog.rootDirectory() + "/gateway-XXXXXX")
        let child: LaunchedChild
        do {
            child = try LaunchedChild.launch(
                executable, arguments: arguments, environment: environment, standardOutput: directory + "/" + outputFileName,
                standardError: directory + "/" + errorFileName, purpose: "for a gateway node")
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
        do {
            let command = ([executable.lastPathComponent] + arguments).joined(separator: " ")
            let listening = try await waitUntilListening(child, command: command, directory: directory, timeout: startupTimeout)
            return GatewayProcess(listening: listening, directory: directory, child: child)
        } catch {
            await child.kill()
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    /// The `fleetgate` executable SwiftPM built next to the test binary.
    ///
    /// Looks in the directory of the running test binary (`CommandLine.arguments[0]`, then `/proc/self/exe`), which is
    /// the build products directory under `swift test`, and then in `debug/` below its parent directories.
    /// - Throws: ``LocalFleetError`` listing the places looked at if there is no such executable.
    public static func fleetgateExecutable() throws -> URL {
        var directories: [URL] = []
        if let first = CommandLine.arguments.first {
            directories.append(URL(fileURLWithPath: first).deletingLastPathComponent())
        }
        if let path = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe") {
            directories.append(URL(fileURLWithPath: path).deletingLastPathComponent())
        }
        var candidates: [String] = []
        for directory in directories {
            candidates.append(directory.appendingPathComponent("fleetgate").standardizedFileURL.path)
        }
        for directory in directories {
            var ancestor = directory.standardizedFileURL
            for _ in 0..<4 where ancestor.path != "/" {
                ancestor = ancestor.deletingLastPathComponent()
                candidates.append(ancestor.appendingPathComponent("debug/fleetgate").standardizedFileURL.path)
            }
        }
        var seen: Set<String> = []
        candidates = candidates.filter { seen.insert($0).inserted }
        if let found = candidates.first(where: { FileManager.default.isExecutableFile(atPath: $0) }) {
            return URL(fileURLWithPath: found)
        }
        throw LocalFleetError(
            "the fleetgate executable is not next to the test binary (looked for \(candidates.joined(separator: ", "))); "
                + "run `swift build --build-tests` (or `swift test`) so SwiftPM builds it"
        )
    }

    // MARK: - Controlling the process

    /// Sends `signal` (e.g. `SIGTERM`, `SIGSTOP`, `SIGCONT`) to the process; does nothing once it has exited.
    ///
    /// After `SIGSTOP` this returns once the process is actually stopped (waiting at most ~100 ms).
    public func signal(_ signal: Int32) {
        let stopping = state.withLock { state -> Bool in
            guard !child.watcher.hasExited else { return false }
            _ = Glibc.kill(child.pid, signal)
            if signal == SIGSTOP {
                state.stopped = true
            } else if signal == SIGCONT {
                state.stopped = false
            }
            return signal == SIGSTOP
        }
        if stopping {
            LaunchedChild.waitUntilStopped(child.pid)
        }
    }

    /// Drains the node: sends SIGTERM (and SIGCONT if it was stopped by ``signal(_:)``) and waits until it exits.
    ///
    /// Returns at once if the process has already exited.
    /// - Parameter timeout: how long the node may take to drain and exit. Defaults to 15 seconds (the node's own drain
    ///   deadline defaults to 10 seconds).
    /// - Returns: the exit status, as in ``exitStatus``: 0 after a clean drain.
    /// - Throws: ``LocalFleetError`` with the tail of stderr if the process is still running after `timeout`; it is
    ///   SIGKILLed (and gone) before the error is thrown.
    @discardableResult
    public func terminate(timeout: Duration = .seconds(15)) async throws -> Int32 {
        state.withLock { state in
            guard !child.watcher.hasExited else { return }
            _ = Glibc.kill(child.pid, SIGTERM)
            if state.stopped {
                _ = Glibc.kill(child.pid, SIGCONT)
                state.stopped = false
            }
        }
        if await child.watcher.wait(timeout: timeout), let termination = child.watcher.termination {
            return Self.exitStatus(termination)
        }
        await kill()
        throw LocalFleetError("\(self) did not drain and exit within \(timeout) of SIGTERM; killed it with SIGKILL\n" + diagnostics())
    }

    /// Kills the process with SIGKILL (also when stopped) and waits until it is gone, so its port refuses connections
    /// when this returns. Does nothing if it has already exited.
    public func kill() async {
        state.withLock { state in
            if !child.watcher.hasExited {
                _ = Glibc.kill(child.pid, SIGKILL)
                _ = Glibc.kill(child.pid, SIGCONT)
            }
            state.stopped = false
        }
        await child.watcher.wait()
    }

    /// Waits until the process has exited; returns false if `timeout` passed first (it is then still running).
    public func waitForExit(timeout: Duration) async -> Bool {
        await child.watcher.wait(timeout: timeout)
    }

    // MARK: - Output

    /// Everything the process has written to stdout so far.
    public func standardOutput() -> String {
        LaunchedChild.readText(directory + "/" + Self.outputFileName)
    }

    /// Everything the process has written to stderr (its log) so far.
    public func standardError() -> String {
        LaunchedChild.readText(directory + "/" + Self.errorFileName)
    }

    /// Polls stderr and stdout every 20 ms until one of them contains `text`.
    ///
    /// - Throws: ``LocalFleetError`` with the tail of both outputs if `timeout` passes first or the process exits
    ///   without having written `text`.
    public func waitForOutput(containing text: String, timeout: Duration) async throws {
        let deadline = ContinuousClock.now + timeout
        while true {
            // Read the exit state first: whatever the process wrote before exiting is then in the files.
            let termination = child.watcher.termination
            if standardError().contains(text) || standardOutput().contains(text) {
                return
            }
            if let termination {
                throw LocalFleetError("\(self) \(termination) without writing \"\(text)\"\n" + diagnostics())
            }
            guard ContinuousClock.now < deadline else {
                throw LocalFleetError("\(self) did not write \"\(text)\" within \(timeout)\n" + diagnostics())
            }
            try await Task.sleep(for: Self.pollInterval)
        }
    }

    // MARK: - Internals

    /// Polls stdout until the "listening on" line is complete.
    private static func waitUntilListening(
        _ child: LaunchedChild, command: String, directory: String, timeout: Duration
    ) async throws -> ListeningLine {
        let deadline = ContinuousClock.now + timeout
        while true {
            // Read the exit state first: a line written just before exiting is then still seen.
            let termination = child.watcher.termination
            do {
                if let listening = try parseListeningLine(LaunchedChild.readText(directory + "/" + outputFileName)) {
                    return listening
                }
            } catch let error as LocalFleetError {
                throw LocalFleetError("`\(command)` (pid \(child.pid)) \(error.message)\n" + diagnostics(directory: directory))
            }
            if let termination {
                throw LocalFleetError(
                    "`\(command)` (pid \(child.pid)) \(termination) before it was listening\n" + diagnostics(directory: directory)
                )
            }
            guard ContinuousClock.now < deadline else {
                throw LocalFleetError(
                    "`\(command)` (pid \(child.pid)) printed no \"\(listeningPrefix)...\" line within \(timeout); killed it\n"
                        + diagnostics(directory: directory)
                )
            }
            try await Task.sleep(for: pollInterval)
        }
    }

    /// The first complete (newline-terminated) "listening on" line in `output`, or nil if there is none yet.
    /// - Throws: ``LocalFleetError`` if that line does not have the form `fleetgate: listening on HOST:PORT node=NAME`.
    static func parseListeningLine(_ output: String) throws -> ListeningLine? {
        // The last piece is either empty (output ends with a newline) or a line still being written.
        let lines = output.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).dropLast()
        guard let line = lines.first(where: { $0.hasPrefix(listeningPrefix) }) else { return nil }
        let fields = line.dropFirst(listeningPrefix.count).split(separator: " ")
        guard let address = fields.first,
            let colon = address.lastIndex(of: ":"),
            let port = Int(address[address.index(after: colon)...]),
            (1...65_535).contains(port),
            colon > address.startIndex,
            let node = fields.dropFirst().first(where: { $0.hasPrefix("node=") }),
            node.count > "node=".count
        else {
            throw LocalFleetError("printed a malformed listening line \"\(line)\" (expected \"\(listeningPrefix)127.0.0.1:PORT node=NAME\")")
        }
        return ListeningLine(host: String(address[..<colon]), port: port, nodeName: String(node.dropFirst("node=".count)))
    }

    /// The exit status a shell would report: the status, or 128 + the signal number.
    private static func exitStatus(_ termination: ExitWatcher.Termination) -> Int32 {
        termination.signaled ? 128 + termination.status : termination.status
    }

    /// The tail of this node's stderr and stdout, for error messages.
    private func diagnostics() -> String {
        Self.diagnostics(directory: directory)
    }

    /// The tail of stderr and stdout in `directory`, for error messages.
    private static func diagnostics(directory: String) -> String {
        func tail(_ name: String, _ label: String) -> String? {
            let lines = LaunchedChild.readText(directory + "/" + name).split(separator: "\n", omittingEmptySubsequences: false)
            let trimmed = lines.suffix(linesInErrors + 1).joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
            return trimmed.isEmpty ? nil : "--- last lines of \(label) ---\n\(trimmed)"
        }
        let tails = [tail(errorFileName, "stderr"), tail(outputFileName, "stdout")].compactMap { $0 }
        return tails.isEmpty ? "(no output on stderr or stdout)" : tails.joined(separator: "\n")
    }
}
