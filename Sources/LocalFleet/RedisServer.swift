import ChildProcesses
import Foundation
import Glibc
import Synchronization

/// A real `redis-server` child process on a free loopback port, in its own temporary directory, for tests and the
/// chaos runner.
///
/// Start one with ``start(_:)`` (or ``withServer(_:_:)``, which also guarantees it is killed afterwards). The server
/// can be stopped, killed, paused, resumed and restarted on the same port and directory to simulate failures.
/// Every process is SIGKILLed by `deinit` at the latest, and by a watchdog helper if this process itself dies.
///
/// All methods are safe to call from any task; the mutable parts (the current process, the paused flag) live behind
/// a `Mutex`.
public final class RedisServer: Sendable {
    /// How to configure a server started by ``RedisServer/start(_:)``.
    public struct Options: Sendable {
        /// AOF with `appendfsync always`, so data survives kill -9 + ``RedisServer/restart(keepData:)`` with
        /// `keepData: true`. Defaults to false (no persistence at all: RDB snapshots are always disabled).
        public var persistence: Bool
        /// Extra `redis-server` arguments, e.g. `["--requirepass", "x"]` or `["--cluster-enabled", "yes"]`.
        ///
        /// They are appended after the generated ones, so they must not override `--port`, `--bind`, `--dir` or
        /// `--logfile`.
        public var extraArguments: [String]
        /// Changes to the server's environment (an empty value removes a variable), e.g. `LD_PRELOAD` of the chaos
        /// runner's clock-offset library.
        public var environment: [String: String]

        /// Creates options; the defaults give a plain, non-persistent standalone server.
        public init(persistence: Bool = false, extraArguments: [String] = [], environment: [String: String] = [:]) {
            self.persistence = persistence
            self.extraArguments = extraArguments
            self.environment = environment
        }

        /// Whether Redis Cluster is enabled without an explicit `--cluster-port`, i.e. Redis also needs port + 10000.
        var needsClusterBusPort: Bool {
            value(of: "--cluster-enabled")?.lowercased() == "yes" && value(of: "--cluster-port") == nil
        }

        /// The file Redis Cluster keeps its node configuration in (relative to the server directory).
        var clusterConfigFile: String {
            value(of: "--cluster-config-file") ?? "nodes.conf"
        }

        /// The value following the last occurrence of `option` in ``extraArguments``.
        private func value(of option: String) -> String? {
            guard let index = extraArguments.lastIndex(of: option), index + 1 < extraArguments.count else { return nil }
            return extraArguments[index + 1]
        }
    }

    /// The host the server listens on: always `"127.0.0.1"`.
    public let host: String
    /// The TCP port the server listens on; it stays the same across ``restart(keepData:)``.
    public let port: Int
    /// The server's temporary directory (its working directory): holds `redis.log` and any data files.
    /// Removed when the `RedisServer` is deallocated.
    public let directory: String

    /// `"redis://127.0.0.1:<port>"`.
    public var url: String {
        "redis://\(address)"
    }

    /// `"127.0.0.1:<port>"`.
    public var address: String {
        "\(host):\(port)"
    }

    /// The current process id, or nil when the server is not running (never started, stopped, killed or crashed).
    public var pid: Int32? {
        state.withLock { Self.running($0)?.pid }
    }

    private let options: Options
    private let state: Mutex<State>

    /// The mutable part: the current `redis-server` process (replaced by ``restart(keepData:)``).
    private struct State {
        var child: LaunchedChild?
        /// Whether we sent SIGSTOP and no SIGCONT since.
        var paused = false
    }

    /// Why a launch failed in a way the caller may retry.
    private enum LaunchFailure: Error {
        /// `redis-server` exited because its port (or cluster bus port) was taken; carries the error message to use
        /// if the caller gives up.
        case addressInUse(LocalFleetError)
    }

    /// Name of the log file (inside ``directory``).
    static let logFileName = "redis.log"
    /// Name of the file receiving `redis-server`'s stdout and stderr (config errors are only printed there).
    static let outputFileName = "redis-server.out"
    /// How many log lines error messages quote.
    private static let logLinesInErrors = 20

    private init(port: Int, directory: String, options: Options, launch: LaunchedChild) {
        self.host = Sockets.loopbackHost
        self.port = port
        self.directory = directory
        self.options = options
        self.state = Mutex(State(child: launch))
    }

    deinit {
        state.withLock { $0.child }?.killBlocking()
        try? FileManager.default.removeItem(atPath: directory)
    }

    // MARK: - Starting

    /// Starts a server on a free loopback port with a fresh temporary directory and waits until it answers PING.
    ///
    /// If the port is taken between picking and binding it, retries with another port (up to 5 times).
    /// - Throws: ``LocalFleetError`` if `redis-server` is not on `PATH`, exits during startup or does not answer
    ///   within 10 s; the message includes the address and the tail of `redis.log`.
    public static func start(_ options: Options = .init()) async throws -> RedisServer {
        let executable = try locateExecutable("redis-server", package: "redis-server")
        let directory = try ProcessWatchdog.makeTemporaryDirectory(
            template: try ProcessWatchdog.rootDirectory() + "/server-XXXXXX"
        )
        do {
            var lastFailure: LocalFleetError?
            for _ in 0..<5 {
                let port = try Sockets.reserveFreePort(needsClusterBusPort: options.needsClusterBusPort)
                do {
                    let launch = try await launchUntilReady(executable, port: port, directory: directory, options: options)
                    return RedisServer(port: port, directory: directory, options: options, launch: launch)
                } catch LaunchFailure.addressInUse(let failure) {
                    lastFailure = failure
                }
            }
            throw LocalFleetError(
                "redis-server could not bind a free port 5 times in a row (another process took each port first); last attempt: "
                    + (lastFailure?.message ?? "unknown")
            )
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
    }

    /// Starts `count` independent servers concurrently (distinct ports and directories).
    ///
    /// If any of them fails to start, the others are killed and the first error is thrown.
    public static func startSeveral(_ count: Int, _ options: Options = .init()) async throws -> [RedisServer] {
        precondition(count >= 0, "startSeveral needs a non-negative count, got \(count)")
        return try await withThrowingTaskGroup(of: (Int, RedisServer).self) { group in
            for index in 0..<count {
                group.addTask { (index, try await start(options)) }
            }
            var servers = [RedisServer?](repeating: nil, count: count)
            do {
                for try await (index, server) in group {
                    servers[index] = server
                }
            } catch {
                group.cancelAll()
                while let result = await group.nextResult() {
                    if case .success((_, let server)) = result {
                        await server.kill()
                    }
                }
                for server in servers.compactMap({ $0 }) {
                    await server.kill()
                }
                throw error
            }
            return servers.compactMap { $0 }
        }
    }

    /// Starts a server, runs `body` with it and kills the server afterwards on every path, including a thrown error
    /// or cancellation; the server is gone (its pid reaped) by the time this returns or throws.
    public static func withServer<T: Sendable>(
        _ options: Options = .init(),
        _ body: (RedisServer) async throws -> T
    ) async throws -> T {
        let server = try await start(options)
        do {
            let result = try await body(server)
            await server.kill()
            return result
        } catch {
            await server.kill()
            throw error
        }
    }

    // MARK: - Controlling the process

    /// Gracefully stops the server: SIGTERM (after SIGCONT if paused), then waits for it to exit, sending SIGKILL if
    /// it is still running after 5 s. Does nothing if the server is not running.
    public func stop() async {
        let target = state.withLock { state -> (pid: Int32, watcher: ExitWatcher)? in
            guard let running = Self.running(state) else { return nil }
            if state.paused {
                _ = Glibc.kill(running.pid, SIGCONT)
                state.paused = false
            }
            _ = Glibc.kill(running.pid, SIGTERM)
            return running
        }
        guard let target else { return }
        if await target.watcher.wait(timeout: .seconds(5)) {
            return
        }
        state.withLock { _ in
            if !target.watcher.hasExited {
                _ = Glibc.kill(target.pid, SIGKILL)
            }
        }
        await target.watcher.wait()
    }

    /// Kills the server with SIGKILL (like `kill -9`, also when paused) and waits until the process is gone, so the
    /// port refuses connections when this returns. Does nothing if the server is not running.
    public func kill() async {
        let watcher = state.withLock { state -> ExitWatcher? in
            guard let running = Self.running(state) else { return nil }
            _ = Glibc.kill(running.pid, SIGKILL)
            state.paused = false
            return running.watcher
        }
        await watcher?.wait()
    }

    /// Freezes the server with SIGSTOP: connections are still accepted by the kernel but nothing is answered.
    ///
    /// Returns once the process is actually stopped. Does nothing if it is not running or already paused.
    public func pause() {
        let pid = state.withLock { state -> Int32? in
            guard let running = Self.running(state), !state.paused else { return nil }
            _ = Glibc.kill(running.pid, SIGSTOP)
            state.paused = true
            return running.pid
        }
        if let pid {
            LaunchedChild.waitUntilStopped(pid)
        }
    }

    /// Continues a server frozen by ``pause()`` (SIGCONT). Does nothing if it is not paused.
    public func resume() {
        state.withLock { state in
            guard let running = Self.running(state), state.paused else { return }
            _ = Glibc.kill(running.pid, SIGCONT)
            state.paused = false
        }
    }

    /// Starts the server again on the same port and in the same directory, and waits until it answers PING.
    ///
    /// If it is running, it is killed with SIGKILL first (no graceful shutdown). With `keepData: false`, every data
    /// file (`dump.rdb`, `appendonlydir/`, ...) is deleted first; `redis.log` is kept and appended to, and so is a
    /// cluster node config (`nodes.conf`), so a cluster node keeps its identity. With `keepData: true`, data survives
    /// only if the server was started with ``Options/persistence``.
    /// - Parameter portWait: how long to keep retrying while another process holds the port. Defaults to 10 seconds
    ///   (generous: a loaded test machine can take seconds to let go of a socket).
    /// - Throws: ``LocalFleetError`` if the server does not come back, e.g. because another process holds the port
    ///   for longer than `portWait`; the message has the address and the tail of `redis.log`.
    public func restart(keepData: Bool, portWait: Duration = .seconds(10)) async throws {
        await kill()
        if !keepData {
            try wipeData()
        }
        let executable = try Self.locateExecutable("redis-server", package: "redis-server")
        // Someone else may have bound our port while the server was down (often a short-lived socket): retry a while.
        let deadline = ContinuousClock.now + portWait
        while true {
            do {
                let launch = try await Self.launchUntilReady(executable, port: port, directory: directory, options: options)
                state.withLock { state in
                    state.child = launch
                    state.paused = false
                }
                return
            } catch LaunchFailure.addressInUse(let failure) {
                guard ContinuousClock.now < deadline else {
                    throw LocalFleetError("cannot restart redis-server on \(address), its port stayed in use for \(portWait): \(failure.message)")
                }
                try await Task.sleep(for: .milliseconds(50))
            }
        }
    }

    // MARK: - redis-cli

    /// Runs `redis-cli -h 127.0.0.1 -p <port> <arguments>` and returns its stdout with surrounding whitespace
    /// trimmed, e.g. `try await server.cli("SET", key, "1")` returns `"OK"`.
    ///
    /// Note that `redis-cli` prints error replies (e.g. `"WRONGTYPE ..."`) to stdout and still exits 0; a nil reply
    /// comes back as `""`. Options go before the command, e.g. `cli("-a", password, "--no-auth-warning", "PING")`.
    /// - Throws: ``LocalFleetError`` with stderr if `redis-cli` exits non-zero (e.g. the server is down), or if it
    ///   does not finish within 10 s (e.g. the server is paused), in which case it is killed.
    public func cli(_ arguments: String...) async throws -> String {
        try await cli(arguments: arguments)
    }

    /// ``cli(_:)`` with the arguments as an array.
    public func cli(arguments: [String]) async throws -> String {
        let executable = try Self.locateExecutable("redis-cli", package: "redis-tools")
        let scratch = try ProcessWatchdog.rootDirectory() + "/cli-\(UUID().uuidString)"
        let outputPath = scratch + ".out"
        let errorPath = scratch + ".err"
        defer {
            try? FileManager.default.removeItem(atPath: outputPath)
            try? FileManager.default.removeItem(atPath: errorPath)
        }
        let command = "redis-cli " + arguments.joined(separator: " ")

        let child = try LaunchedChild.launch(
            executable, arguments: ["-h", host, "-p", String(port)] + arguments, standardOutput: outputPath, standardError: errorPath,
            purpose: "for \(address)", watchdog: false)
        let watcher = child.watcher

        if await !watcher.wait(timeout: .seconds(10)) {
            await child.kill()
            throw LocalFleetError("`\(command)` against \(address) did not finish within 10 s (is the server paused?); killed it")
        }
        let stdout = LaunchedChild.readText(outputPath)
        let stderr = LaunchedChild.readText(errorPath).trimmingCharacters(in: .whitespacesAndNewlines)
        if let termination = watcher.termination, termination.signaled || termination.status != 0 {
            var message = "`\(command)` against \(address) failed (\(termination))"
            message += stderr.isEmpty ? "" : ": \(stderr)"
            let trimmedOutput = stdout.trimmingCharacters(in: .whitespacesAndNewlines)
            message += trimmedOutput.isEmpty ? "" : "\nstdout: \(trimmedOutput)"
            throw LocalFleetError(message)
        }
        return stdout.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    // MARK: - Internals

    /// The current process's pid and watcher, if it has not exited.
    private static func running(_ state: borrowing State) -> (pid: Int32, watcher: ExitWatcher)? {
        guard let child = state.child, !child.watcher.hasExited else { return nil }
        return (child.pid, child.watcher)
    }

    /// Launches `redis-server` and waits until it is ready; on any failure (including cancellation) the process is
    /// killed before the error is thrown.
    private static func launchUntilReady(
        _ executable: URL,
        port: Int,
        directory: String,
        options: Options
    ) async throws -> LaunchedChild {
        let launch = try self.launch(executable, port: port, directory: directory, options: options)
        do {
            try await waitUntilReady(launch, port: port, directory: directory)
            return launch
        } catch {
            await launch.kill()
            throw error
        }
    }

    private static func launch(_ executable: URL, port: Int, directory: String, options: Options) throws -> LaunchedChild {
        var arguments = [
            "--port", String(port),
            "--bind", Sockets.loopbackHost,
            "--dir", directory,
            "--logfile", logFileName,
            "--save", "",
            "--appendonly", options.persistence ? "yes" : "no",
        ]
        if options.persistence {
            arguments += ["--appendfsync", "always"]
        }
        arguments += ["--daemonize", "no"]
        arguments += options.extraArguments

        return try LaunchedChild.launch(
            executable, arguments: arguments, environment: options.environment, workingDirectory: directory,
            standardOutput: directory + "/" + outputFileName,
            purpose: "for \(Sockets.loopbackHost):\(port)")
    }

    /// Polls every 15 ms until the server answers PING (`+PONG`, or `-NOAUTH` for servers with a password) *and* its
    /// log says this very process is ready (so a foreign server that happens to hold the port cannot fool us).
    private static func waitUntilReady(_ launch: LaunchedChild, port: Int, directory: String) async throws {
        let address = "\(Sockets.loopbackHost):\(port)"
        let pid = launch.pid
        let deadline = ContinuousClock.now + .seconds(10)
        var answersWithoutReadyLine = 0
        while true {
            if let termination = launch.watcher.termination {
                let failure = LocalFleetError(
                    "redis-server for \(address) (pid \(pid)) \(termination) during startup\n" + diagnostics(directory: directory)
                )
                if logLines(directory: directory, pid: pid).contains(where: { $0.contains("Address already in use") }) {
                    throw LaunchFailure.addressInUse(failure)
                }
                throw failure
            }
            let reply = await BlockingWork.run { Sockets.request("PING\r\n", port: port, timeout: .milliseconds(100)) }
            if case .line(let line) = reply, line == "+PONG" || line.hasPrefix("-NOAUTH") {
                let readyLogged = logLines(directory: directory, pid: pid).contains {
                    $0.contains("Ready to accept connections")
                }
                // The log check can only be missing if extraArguments lowered the log level; then a server that keeps
                // answering while our process stays alive is ours.
                answersWithoutReadyLine += 1
                if (readyLogged || answersWithoutReadyLine >= 10) && !launch.watcher.hasExited {
                    return
                }
            }
            guard ContinuousClock.now < deadline else {
                throw LocalFleetError(
                    "redis-server for \(address) (pid \(pid)) did not answer PING within 10 s (last probe: \(reply))\n"
                        + diagnostics(directory: directory)
                )
            }
            try await Task.sleep(for: .milliseconds(15))
        }
    }

    /// Deletes everything in ``directory`` except the log files and the cluster node config.
    private func wipeData() throws {
        let keep: Set<String> = [Self.logFileName, Self.outputFileName, options.clusterConfigFile]
        let entries: [String]
        do {
            entries = try FileManager.default.contentsOfDirectory(atPath: directory)
        } catch {
            throw LocalFleetError("cannot list \(directory) to wipe the data of \(address): \(error)")
        }
        for entry in entries where !keep.contains(entry) {
            do {
                try FileManager.default.removeItem(atPath: directory + "/" + entry)
            } catch {
                throw LocalFleetError("cannot delete \(directory)/\(entry) to wipe the data of \(address): \(error)")
            }
        }
    }

    /// Finds `name` in a `PATH` directory.
    static func locateExecutable(_ name: String, package: String) throws -> URL {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin"
        for directory in path.split(separator: ":") where !directory.isEmpty {
            let candidate = "\(directory)/\(name)"
            if FileManager.default.isExecutableFile(atPath: candidate) {
                return URL(fileURLWithPath: candidate)
            }
        }
        throw LocalFleetError("\(name) not found on PATH; run scripts/test, which installs it (apt-get install \(package))")
    }

    /// The lines of `redis.log` written by process `pid`.
    private static func logLines(directory: String, pid: Int32) -> [Substring] {
        let prefix = "\(pid):"
        return LaunchedChild.readText(directory + "/" + logFileName).split(separator: "\n").filter { $0.hasPrefix(prefix) }
    }

    /// The tail of `redis.log` and of the server's stdout/stderr, for error messages.
    private static func diagnostics(directory: String) -> String {
        func tail(_ name: String) -> String? {
            let lines = LaunchedChild.readText(directory + "/" + name).split(separator: "\n", omittingEmptySubsequences: false)
            let trimmed = lines.suffix(logLinesInErrors + 1).joined(separator: "\n").trimmingCharacters(in: .whitespacesAndNewlines)
            return trimmed.isEmpty ? nil : "--- last lines of \(directory)/\(name) ---\n\(trimmed)"
        }
        return [tail(logFileName), tail(outputFileName)].compactMap { $0 }.joined(separator: "\n")
    }
}
