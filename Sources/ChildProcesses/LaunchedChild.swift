import Foundation
import Glibc

/// A child process launched through ``ChildProcess`` with its output going to files and its exit watched: what
/// TestSupport's `RedisServer` and `GatewayProcess`, and the benchmarks' gateway nodes, share.
///
/// Launched with `posix_spawn` (the `CSpawn` shim), not Foundation's `Process`: `Process.run()` on Linux scans
/// `/proc/self/fd` with a 256-byte copy per entry that over-reads glibc's `readdir` buffer
/// (swift-corelibs-foundation PR #5472), and with the thousands of sockets the chaos runner's load holds, it crashed
/// the runner within a few launches. The exit is collected by a thread of the child's own blocked in `waitpid`.
public struct LaunchedChild: Sendable {
    /// The child's process id (signals are sent to it; it leads a process group of its own).
    public let pid: Int32
    /// Learns of the child's exit (from the `waitpid` thread).
    public let watcher: ExitWatcher

    /// Launches `executable`.
    ///
    /// - Parameters:
    ///   - environment: changes to this process's environment for the child: entries here win, and an entry with an
    ///     empty value removes the variable.
    ///   - workingDirectory: the child's working directory (default: this process's).
    ///   - standardOutput: the file stdout is appended to; `standardError` defaults to the same file.
    ///   - purpose: what the child is for, in the error message ("for a gateway node", "for 127.0.0.1:6379").
    ///   - watchdog: whether the watchdog helper SIGKILLs the child if this process dies first.
    /// - Throws: ``ChildProcessError`` if an output file cannot be opened or the process cannot be launched.
    public static func launch(
        _ executable: URL,
        arguments: [String],
        environment: [String: String] = [:],
        workingDirectory: String? = nil,
        standardOutput: String,
        standardError: String? = nil,
        purpose: String,
        watchdog: Bool = true
    ) throws -> LaunchedChild {
        var merged = ProcessInfo.processInfo.environment
        for (name, value) in environment {
            merged[name] = value.isEmpty ? nil : value
        }
        let output = try openForAppending(standardOutput)
        var errorOutput = output
        if let standardError, standardError != standardOutput {
            do {
                errorOutput = try openForAppending(standardError)
            } catch {
                try? output.close()
                throw error
            }
        }
        // The child has its own copies of the descriptors once launched (or none if the launch failed).
        defer {
            try? output.close()
            if errorOutput !== output { try? errorOutput.close() }
        }
        let pid = try ChildProcess.spawn(
            executable.path, arguments: [executable.path] + arguments, environment: merged.map { "\($0.key)=\($0.value)" },
            workingDirectory: workingDirectory, output: output.fileDescriptor, error: errorOutput.fileDescriptor
        ) { errorNumber in
            ChildProcessError("could not launch \(executable.path) \(purpose): \(String(cString: strerror(errorNumber)))")
        }
        let watcher = ExitWatcher.reaping(pid)
        if watchdog {
            watcher.registerWithWatchdog(pid: pid)
        }
        return LaunchedChild(pid: pid, watcher: watcher)
    }

    /// SIGKILLs the process unless it has already exited (with SIGCONT in case it is stopped), and waits until it is
    /// gone.
    public func kill() async {
        sendKill()
        await watcher.wait()
    }

    /// For `deinit`, which cannot await: SIGKILL, then give the kernel a moment (normally well under 1 ms, at most
    /// 100 ms) so a directory is not removed while the dying process still has files open in it.
    public func killBlocking() {
        sendKill()
        var spins = 0
        while !watcher.hasExited, spins < 200 {
            usleep(500)
            spins += 1
        }
    }

    private func sendKill() {
        if !watcher.hasExited {
            _ = Glibc.kill(pid, SIGKILL)
            _ = Glibc.kill(pid, SIGCONT)
        }
    }

    /// Blocks (at most ~100 ms) until `/proc/<pid>/stat` reports the process as stopped.
    public static func waitUntilStopped(_ pid: Int32) {
        let path = "/proc/\(pid)/stat"
        for _ in 0..<200 {
            guard let stat = try? String(contentsOfFile: path, encoding: .utf8),
                let closingParen = stat.lastIndex(of: ")")
            else { return }
            let fields = stat[stat.index(after: closingParen)...].split(separator: " ")
            if let processState = fields.first, processState == "T" || processState == "t" {
                return
            }
            usleep(500)
        }
    }

    /// A file opened for appending (created if missing), closed on exec.
    public static func openForAppending(_ path: String) throws -> FileHandle {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            throw ChildProcessError("cannot open \(path): \(ChildProcessError.errnoDescription())")
        }
        return FileHandle(fileDescriptor: descriptor, closeOnDealloc: true)
    }

    /// The file's text ("" if it cannot be read).
    public static func readText(_ path: String) -> String {
        guard let data = FileManager.default.contents(atPath: path) else { return "" }
        return String(decoding: data, as: UTF8.self)
    }
}
