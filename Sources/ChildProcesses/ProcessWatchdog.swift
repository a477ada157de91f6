import Foundation
import Glibc
import Synchronization

/// A backstop that makes sure no child (a `redis-server`, a gateway node) outlives this process, even when it crashes
/// or is killed (when `deinit`, `withServer` or a signal handler never get a chance to run).
///
/// On first use it creates one temporary root directory for this process and starts a tiny `/bin/sh` helper
/// whose stdin is one end of a socket pair. Every server pid is announced to it (`pid N`) and withdrawn once the
/// server has exited (`unpid N`). When this process goes away for any reason, the kernel closes our end, the
/// helper reads EOF, SIGKILLs every pid still announced and removes the root directory. TestSupport's shared server is
/// cleaned up this way at the end of every test run, and a benchmark's nodes when the benchmark is killed.
public enum ProcessWatchdog {
    private struct State {
        var rootDirectory: String?
        /// Our end of the socket pair, or -1 if the helper could not be started (the backstop is then disabled).
        var descriptor: Int32 = -1
        /// Kept so Foundation keeps monitoring the helper; never waited on.
        var helper: Process?
    }

    private static let state = Mutex(State())

    /// The helper script; `$1` is the root directory to remove at the end.
    private static let script = """
        pids=' '
        while read -r op arg; do
          case "$op" in
            pid) pids="$pids$arg " ;;
            unpid) kept=' '; for p in $pids; do [ "$p" = "$arg" ] || kept="$kept$p "; done; pids="$kept" ;;
          esac
        done
        for p in $pids; do kill -KILL "$p" 2>/dev/null; done
        i=0
        while [ "$i" -lt 20 ]; do
          alive=0
          for p in $pids; do kill -0 "$p" 2>/dev/null && alive=1; done
          [ "$alive" -eq 0 ] && break
          sleep 0.05
          i=$((i + 1))
        done
        rm -rf -- "$1"
        """

    /// The per-test-process directory under which every server directory is created (removed when the process ends).
    public static func rootDirectory() throws -> String {
        try state.withLock { state in
            if let rootDirectory = state.rootDirectory {
                return rootDirectory
            }
            let rootDirectory = try makeTemporaryDirectory(
                template: FileManager.default.temporaryDirectory.appendingPathComponent("fleetgate-redis-XXXXXX").path
            )
            state.rootDirectory = rootDirectory
            startHelper(&state, rootDirectory: rootDirectory)
            return rootDirectory
        }
    }

    /// Announces a freshly started server process.
    public static func watch(pid: Int32) {
        post("pid \(pid)\n")
    }

    /// Withdraws a server process that has exited and been reaped.
    public static func forget(pid: Int32) {
        post("unpid \(pid)\n")
    }

    /// Creates a fresh directory from a `mkdtemp` template ending in `XXXXXX` and returns its path.
    public static func makeTemporaryDirectory(template: String) throws -> String {
        var bytes = Array(template.utf8CString)
        let path = bytes.withUnsafeMutableBufferPointer { buffer in
            mkdtemp(buffer.baseAddress!).map { String(cString: $0) }
        }
        guard let path else {
            throw ChildProcessError("mkdtemp(\(template)) failed: \(ChildProcessError.errnoDescription())")
        }
        return path
    }

    private static func post(_ line: String) {
        state.withLock { state in
            guard state.descriptor >= 0 else { return }
            let bytes = Array(line.utf8)
            let sent = bytes.withUnsafeBytes { send(state.descriptor, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent != bytes.count {
                // The helper is gone; stop talking to it rather than failing tests over a backstop.
                close(state.descriptor)
                state.descriptor = -1
            }
        }
    }

    private static func startHelper(_ state: inout State, rootDirectory: String) {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0 else {
            return
        }
        let helper = Process()
        helper.executableURL = URL(fileURLWithPath: "/bin/sh")
        helper.arguments = ["-c", script, "fleetgate-redis-watchdog", rootDirectory]
        helper.standardInput = FileHandle(fileDescriptor: pair[1], closeOnDealloc: false)
        helper.standardOutput = FileHandle.nullDevice
        helper.standardError = FileHandle.nullDevice
        do {
            try ChildProcess.run(helper)
        } catch {
            close(pair[0])
            close(pair[1])
            return
        }
        close(pair[1])
        state.descriptor = pair[0]
        state.helper = helper
    }
}
