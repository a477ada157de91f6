import Foundation
import Glibc
import Testing

@testable import LocalFleet
@testable import TestSupport

/// Tests of ``GatewayProcess`` with `/bin/sh` scripts standing in for `fleetgate serve`.
@Suite("GatewayProcess")
struct GatewayProcessTests {
    /// The line `fleetgate serve` prints once it is listening.
    static let listening = #"echo "fleetgate: listening on 127.0.0.1:12345 node=x""#

    /// Starts `/bin/sh -c script`.
    static func start(
        _ script: String,
        environment: [String: String] = [:],
        startupTimeout: Duration = .seconds(10)
    ) async throws -> GatewayProcess {
        try await GatewayProcess.start(
            executable: URL(fileURLWithPath: "/bin/sh"),
            arguments: ["-c", script],
            environment: environment,
            startupTimeout: startupTimeout
        )
    }

    @Test("start waits for the listening line and reads the address and node name from it")
    func startParsesListeningLine() async throws {
        let node = try await Self.start("echo 'starting' >&2; sleep 0.2; \(Self.listening); exec sleep 100")
        #expect(node.host == "127.0.0.1")
        #expect(node.port == 12345)
        #expect(node.nodeName == "x")
        #expect(node.baseURL == "http://127.0.0.1:12345")
        #expect(node.webSocketURL == "ws://127.0.0.1:12345/ws")
        #expect(node.description == "gateway node x at 127.0.0.1:12345 (pid \(node.pid))")
        #expect(Glibc.kill(node.pid, 0) == 0)
        #expect(!node.hasExited)
        #expect(node.exitStatus == nil)
        #expect(node.standardOutput() == "fleetgate: listening on 127.0.0.1:12345 node=x\n")
        #expect(node.standardError() == "starting\n")
        await node.kill()
        #expect(node.hasExited)
        #expect(node.exitStatus == 128 + SIGKILL)
        await node.kill()
    }

    @Test("a listening line still being written is not parsed before its newline")
    func waitsForCompleteLine() async throws {
        let node = try await Self.start("printf 'fleetgate: listening on 127.0.0.1:7 node=ab'; sleep 0.3; printf 'cd\\n'; exec sleep 100")
        #expect(node.nodeName == "abcd")
        #expect(node.port == 7)
        await node.kill()
    }

    @Test("the environment is inherited, overridden, and an empty value removes a variable")
    func environment() async throws {
        setenv("FLEETGATE_GP_INHERITED", "kept", 1)
        setenv("FLEETGATE_GP_REMOVED", "present", 1)
        let node = try await Self.start(
            #"echo "fleetgate: listening on 127.0.0.1:1 node=$FLEETGATE_GP_INHERITED-$FLEETGATE_GP_SET-${FLEETGATE_GP_REMOVED-unset}"; exec sleep 100"#,
            environment: ["FLEETGATE_GP_SET": "set", "FLEETGATE_GP_REMOVED": ""]
        )
        #expect(node.nodeName == "kept-set-unset")
        await node.kill()
    }

    @Test("a process exiting before it listens fails the start with its stderr")
    func exitBeforeListening() async throws {
        let error = await #expect(throws: TestSupportError.self) {
            try await Self.start("echo 'Error: unknown option --bogus' >&2; exit 64")
        }
        let message = error?.message ?? ""
        #expect(message.contains("exited with status 64 before it was listening"), "\(message)")
        #expect(message.contains("Error: unknown option --bogus"), "\(message)")
        #expect(message.contains("sh -c"), "\(message)")
    }

    @Test("a process that never listens is killed after the startup timeout")
    func startupTimeout() async throws {
        let clock = ContinuousClock()
        let started = clock.now
        let error = await #expect(throws: TestSupportError.self) {
            try await Self.start("echo 'connecting to redis' >&2; exec sleep 100", startupTimeout: .milliseconds(300))
        }
        #expect(clock.now - started < .seconds(5))
        let message = error?.message ?? ""
        #expect(message.contains("printed no \"fleetgate: listening on ...\" line within"), "\(message)")
        #expect(message.contains("connecting to redis"), "\(message)")
        let pid = try #require(Self.pid(in: message))
        #expect(Glibc.kill(pid, 0) != 0, "pid \(pid) still running")
    }

    @Test("a malformed listening line fails the start")
    func malformedLine() async throws {
        let error = await #expect(throws: TestSupportError.self) {
            try await Self.start("echo 'fleetgate: listening on somewhere'; exec sleep 100")
        }
        #expect(error?.message.contains("malformed listening line \"fleetgate: listening on somewhere\"") == true, "\(error?.message ?? "")")
    }

    @Test(
        "parseListeningLine reads complete lines only",
        arguments: [
            ("", nil),
            ("fleetgate: listening on 127.0.0.1:80 node=a", nil),
            ("log\nfleetgate: listening on 127.0.0.1:80 node=a\n", GatewayProcess.ListeningLine(host: "127.0.0.1", port: 80, nodeName: "a")),
            ("fleetgate: listening on 127.0.0.1:8080 node=n-1\r\n", GatewayProcess.ListeningLine(host: "127.0.0.1", port: 8080, nodeName: "n-1")),
        ] as [(String, GatewayProcess.ListeningLine?)])
    func parses(output: String, expected: GatewayProcess.ListeningLine?) throws {
        #expect(try GatewayProcess.parseListeningLine(output) == expected)
    }

    @Test(
        "parseListeningLine refuses malformed lines",
        arguments: ["127.0.0.1 node=a", "127.0.0.1:0 node=a", "127.0.0.1:x node=a", ":80 node=a", "127.0.0.1:80", "127.0.0.1:80 node="])
    func refuses(rest: String) {
        #expect(throws: TestSupportError.self) { try GatewayProcess.parseListeningLine("fleetgate: listening on \(rest)\n") }
    }

    @Test("terminate sends SIGTERM and returns the exit status of the drained process")
    func terminateDrains() async throws {
        let node = try await Self.start(
            "trap 'echo draining >&2; exit 0' TERM; \(Self.listening); while :; do sleep 0.02; done"
        )
        #expect(try await node.terminate() == 0)
        #expect(node.hasExited)
        #expect(node.exitStatus == 0)
        #expect(node.standardError().contains("draining"))
        #expect(try await node.terminate() == 0)
    }

    @Test("terminate continues a stopped process so it can drain")
    func terminateStopped() async throws {
        let node = try await Self.start("trap 'exit 3' TERM; \(Self.listening); while :; do sleep 0.02; done")
        node.signal(SIGSTOP)
        #expect(try Self.processState(node.pid) == "T")
        #expect(try await node.terminate(timeout: .seconds(5)) == 3)
    }

    @Test("terminate kills a process that does not exit in time and says so")
    func terminateTimeout() async throws {
        let node = try await Self.start("trap '' TERM; \(Self.listening); echo 'still serving' >&2; exec sleep 100")
        let error = await #expect(throws: TestSupportError.self) { try await node.terminate(timeout: .milliseconds(300)) }
        let message = error?.message ?? ""
        #expect(message.contains("\(node) did not drain and exit within"), "\(message)")
        #expect(message.contains("still serving"), "\(message)")
        #expect(node.hasExited)
        #expect(node.exitStatus == 128 + SIGKILL)
    }

    @Test("SIGSTOP freezes the process, SIGCONT resumes it, kill works while stopped")
    func stopContinueKill() async throws {
        let node = try await Self.start("\(Self.listening); exec sleep 100")
        node.signal(SIGSTOP)
        #expect(try Self.processState(node.pid) == "T")
        node.signal(SIGCONT)
        #expect(await eventually { (try? Self.processState(node.pid)) == "S" })
        node.signal(SIGSTOP)
        await node.kill()
        #expect(node.exitStatus == 128 + SIGKILL)
        #expect(await node.waitForExit(timeout: .milliseconds(10)))
        node.signal(SIGCONT)
    }

    @Test("waitForExit reports whether the process exited in time")
    func waitForExit() async throws {
        // It exits when told to (not after a sleep, which a loaded machine can outrun).
        let node = try await Self.start("\(Self.listening); trap 'exit 5' TERM; while :; do sleep 0.05; done")
        #expect(await !node.waitForExit(timeout: .milliseconds(10)))
        node.signal(SIGTERM)
        #expect(await node.waitForExit(timeout: .seconds(10)))
        #expect(node.exitStatus == 5)
    }

    @Test("waitForOutput finds text on stderr or stdout, and fails clearly on timeout or exit")
    func waitForOutput() async throws {
        let node = try await Self.start("\(Self.listening); sleep 0.2; echo 'lease acquired' >&2; echo 'on stdout'; exec sleep 100")
        try await node.waitForOutput(containing: "lease acquired", timeout: .seconds(10))
        try await node.waitForOutput(containing: "on stdout", timeout: .seconds(10))
        let timeout = await #expect(throws: TestSupportError.self) {
            try await node.waitForOutput(containing: "never printed", timeout: .milliseconds(100))
        }
        let message = timeout?.message ?? ""
        #expect(message.contains("\(node) did not write \"never printed\" within"), "\(message)")
        #expect(message.contains("--- last lines of stderr ---\nlease acquired"), "\(message)")

        let exiting = try await Self.start("\(Self.listening); echo 'bye' >&2")
        let exited = await #expect(throws: TestSupportError.self) {
            try await exiting.waitForOutput(containing: "never printed", timeout: .seconds(10))
        }
        #expect(exited?.message.contains("exited with status 0 without writing \"never printed\"") == true, "\(exited?.message ?? "")")
        await node.kill()
    }

    @Test("deinit kills a running process")
    func deinitKills() async throws {
        var node: GatewayProcess? = try await Self.start("\(Self.listening); exec sleep 100")
        let pid = try #require(node?.pid)
        let directory = try #require(node?.directory)
        #expect(FileManager.default.fileExists(atPath: directory + "/stdout.log"))
        node = nil
        #expect(await eventually { Self.isGone(pid) })
        #expect(!FileManager.default.fileExists(atPath: directory))
    }

    @Test("fleetgateExecutable finds the built binary or says how to build it")
    func fleetgateExecutable() {
        do {
            let url = try GatewayProcess.fleetgateExecutable()
            #expect(url.lastPathComponent == "fleetgate")
            #expect(FileManager.default.isExecutableFile(atPath: url.path))
        } catch {
            #expect("\(error)".contains("swift build --build-tests"), "\(error)")
        }
    }

    /// The process state letter from `/proc/<pid>/stat` (`S` sleeping, `T` stopped, `Z` zombie, ...).
    static func processState(_ pid: Int32) throws -> String {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let closingParen = try #require(stat.lastIndex(of: ")"))
        return String(try #require(stat[stat.index(after: closingParen)...].split(separator: " ").first))
    }

    /// Whether `pid` no longer exists (or is a zombie about to be reaped).
    static func isGone(_ pid: Int32) -> Bool {
        Glibc.kill(pid, 0) != 0 || (try? processState(pid)) == "Z"
    }

    /// The pid quoted as `(pid N)` in an error message.
    static func pid(in message: String) -> Int32? {
        guard let range = message.range(of: "(pid ") else { return nil }
        return Int32(message[range.upperBound...].prefix { $0.isNumber })
    }
}
