import Foundation
import Glibc
import Testing

@testable import LocalFleet
@testable import TestSupport

/// Tests against real `redis-server` processes; each test owns its servers (except the `SharedRedisServer` tests).
@Suite("RedisServer", .timeLimit(.minutes(2)))
struct RedisServerTests {
    @Test("start gives a running server that answers PING")
    func startAnswersPing() async throws {
        try await RedisServer.withServer { server in
            let reply = try await server.cli("PING")
            #expect(reply == "PONG")
            #expect(server.host == "127.0.0.1")
            #expect(server.address == "127.0.0.1:\(server.port)")
            #expect(server.url == "redis://127.0.0.1:\(server.port)")
            let pid = try #require(server.pid)
            #expect(Glibc.kill(pid, 0) == 0)
            #expect(FileManager.default.fileExists(atPath: server.directory + "/redis.log"))
        }
    }

    @Test("SET and GET through redis-cli")
    func setAndGet() async throws {
        try await RedisServer.withServer { server in
            let key = uniqueKeyPrefix() + "greeting"
            let reply = try await server.cli("SET", key, "hello world")
            #expect(reply == "OK")
            #expect(try await server.cli("GET", key) == "hello world")
            #expect(try await server.cli("GET", key + ":missing") == "")
        }
    }

    @Test("kill makes the port refuse connections and is idempotent")
    func killRefusesConnections() async throws {
        let server = try await RedisServer.start()
        let pid = try #require(server.pid)
        #expect(Sockets.connectionError(port: server.port) == nil)
        await server.kill()
        #expect(server.pid == nil)
        #expect(isGone(pid))
        #expect(Sockets.connectionError(port: server.port) == ECONNREFUSED)
        await server.kill()
        await server.stop()
        let error = await #expect(throws: TestSupportError.self) { try await server.cli("PING") }
        #expect(error?.message.contains(server.address) == true)
    }

    @Test("stop shuts down gracefully and is idempotent")
    func stopIsGraceful() async throws {
        let server = try await RedisServer.start()
        let pid = try #require(server.pid)
        await server.stop()
        #expect(server.pid == nil)
        #expect(isGone(pid))
        #expect(Sockets.connectionError(port: server.port) == ECONNREFUSED)
        let log = try String(contentsOfFile: server.directory + "/redis.log", encoding: .utf8)
        #expect(log.contains("Redis is now ready to exit"))
        await server.stop()
    }

    @Test("restart(keepData: true) with persistence keeps data written before kill -9")
    func restartKeepsPersistedData() async throws {
        try await RedisServer.withServer(.init(persistence: true)) { server in
            let key = uniqueKeyPrefix() + "durable"
            #expect(try await server.cli("SET", key, "survives") == "OK")
            let oldPID = try #require(server.pid)
            let port = server.port
            await server.kill()
            try await server.restart(keepData: true)
            #expect(server.port == port)
            let newPID = try #require(server.pid)
            #expect(newPID != oldPID)
            #expect(try await server.cli("GET", key) == "survives")
        }
    }

    @Test("restart(keepData: false) kills a running server and loses its data but keeps the log")
    func restartWipesData() async throws {
        try await RedisServer.withServer(.init(persistence: true)) { server in
            let key = uniqueKeyPrefix() + "doomed"
            #expect(try await server.cli("SET", key, "gone soon") == "OK")
            let oldPID = try #require(server.pid)
            try await server.restart(keepData: false)
            #expect(isGone(oldPID))
            #expect(try await server.cli("GET", key) == "")
            #expect(try await server.cli("DBSIZE") == "0")
            let log = try String(contentsOfFile: server.directory + "/redis.log", encoding: .utf8)
            #expect(log.components(separatedBy: "Ready to accept connections").count - 1 == 2)
        }
    }

    @Test("restart(keepData: true) without persistence starts empty")
    func restartWithoutPersistenceLosesData() async throws {
        try await RedisServer.withServer { server in
            let key = uniqueKeyPrefix() + "volatile"
            #expect(try await server.cli("SET", key, "1") == "OK")
            try await server.restart(keepData: true)
            #expect(try await server.cli("EXISTS", key) == "0")
        }
    }

    @Test("restart waits for its port to be free again, and gives up with a clear error")
    func restartRetriesWhileThePortIsTaken() async throws {
        try await RedisServer.withServer { server in
            await server.kill()
            var squatter = try #require(listeningSocket(port: server.port))
            let restart = Task { try await server.restart(keepData: true) }
            try await Task.sleep(for: .milliseconds(300))
            close(squatter)
            try await restart.value
            let reply = try await server.cli("PING")
            #expect(reply == "PONG")

            await server.kill()
            squatter = try #require(listeningSocket(port: server.port))
            defer { close(squatter) }
            let error = await #expect(throws: TestSupportError.self) { try await server.restart(keepData: true, portWait: .seconds(1)) }
            #expect(error?.message.contains(server.address) == true)
            #expect(error?.message.contains("Address already in use") == true)
        }
    }

    @Test("pause stops answers, resume brings them back")
    func pauseAndResume() async throws {
        try await RedisServer.withServer { server in
            let port = server.port
            server.pause()
            let whilePaused = await BlockingWork.run { Sockets.request("PING\r\n", port: port, timeout: .milliseconds(300)) }
            #expect(whilePaused == .noReply)
            server.resume()
            let afterResume = await BlockingWork.run { Sockets.request("PING\r\n", port: port, timeout: .seconds(2)) }
            #expect(afterResume == .line("+PONG"))
        }
    }

    @Test("a paused server can be killed, and stopped without waiting for the SIGKILL fallback")
    func pausedServerDies() async throws {
        let killed = try await RedisServer.start()
        let killedPID = try #require(killed.pid)
        killed.pause()
        await killed.kill()
        #expect(isGone(killedPID))

        let stopped = try await RedisServer.start()
        let stoppedPID = try #require(stopped.pid)
        stopped.pause()
        let clock = ContinuousClock()
        let elapsed = await clock.measure { await stopped.stop() }
        #expect(isGone(stoppedPID))
        #expect(elapsed < .seconds(4))
    }

    @Test("startSeveral gives distinct servers that all answer")
    func startSeveral() async throws {
        let servers = try await RedisServer.startSeveral(3)
        #expect(servers.count == 3)
        #expect(Set(servers.map(\.port)).count == 3)
        #expect(Set(servers.map(\.directory)).count == 3)
        for server in servers {
            #expect(try await server.cli("PING") == "PONG")
        }
        for server in servers {
            await server.kill()
        }
    }

    @Test("withServer kills the server when the body throws")
    func withServerKillsOnThrow() async throws {
        struct Boom: Error {}
        var serverPID: Int32?
        await #expect(throws: Boom.self) {
            try await RedisServer.withServer { server in
                serverPID = server.pid
                throw Boom()
            }
        }
        let pid = try #require(serverPID)
        #expect(isGone(pid))
    }

    @Test("withServer returns the body's value and kills the server")
    func withServerReturnsValue() async throws {
        let (pid, answer) = try await RedisServer.withServer { server in
            (server.pid, try await server.cli("ECHO", "value"))
        }
        #expect(answer == "value")
        #expect(isGone(try #require(pid)))
    }

    @Test("deinit kills the process and removes the directory")
    func deinitCleansUp() async throws {
        var server: RedisServer? = try await RedisServer.start()
        let pid = try #require(server?.pid)
        let directory = try #require(server?.directory)
        server?.pause()
        server = nil
        #expect(await eventually { isGone(pid) })
        #expect(!FileManager.default.fileExists(atPath: directory))
    }

    @Test("a server with --requirepass counts as ready and accepts the password")
    func passwordProtectedServer() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--requirepass", "s3cret"])) { server in
            let unauthenticated = try await server.cli("PING")
            #expect(unauthenticated.hasPrefix("NOAUTH"))
            #expect(try await server.cli("-a", "s3cret", "--no-auth-warning", "PING") == "PONG")
        }
    }

    @Test("a cluster-enabled server gets a port with room for the cluster bus")
    func clusterEnabledServer() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--cluster-enabled", "yes"])) { server in
            let info = try await server.cli("CLUSTER", "INFO")
            #expect(info.contains("cluster_state:"))
            #expect(server.port + 10_000 <= 65_535)
        }
    }

    @Test("a server that cannot start throws an error naming the address and quoting its output")
    func startupFailureIsDescriptive() async throws {
        let error = await #expect(throws: TestSupportError.self) {
            _ = try await RedisServer.start(.init(extraArguments: ["--no-such-directive", "x"]))
        }
        let message = try #require(error?.message)
        #expect(message.contains("127.0.0.1:"))
        #expect(message.contains("no-such-directive"))
    }

    @Test("uniqueKeyPrefix is unique and well-formed")
    func uniqueKeyPrefixes() throws {
        let prefixes = (0..<1000).map { _ in uniqueKeyPrefix() }
        #expect(Set(prefixes).count == 1000)
        let base62 = Set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
        for prefix in prefixes.prefix(50) {
            #expect(prefix.count == 11)
            #expect(prefix.hasPrefix("t:") && prefix.hasSuffix(":"))
            #expect(prefix.dropFirst(2).dropLast().allSatisfy { base62.contains($0) })
        }
    }

    @Test("SharedRedisServer returns the same running server every time")
    func sharedServerIsShared() async throws {
        async let first = SharedRedisServer.get()
        async let second = SharedRedisServer.get()
        let (a, b) = try await (first, second)
        let c = try await SharedRedisServer.get()
        #expect(a.port == b.port)
        #expect(a === c)
        let key = uniqueKeyPrefix() + "shared"
        #expect(try await c.cli("SET", key, "1", "EX", "60") == "OK")
        #expect(try await a.cli("GET", key) == "1")
    }
}

/// Whether `pid` no longer exists (already reaped, so `kill(pid, 0)` fails with `ESRCH`).
private func isGone(_ pid: Int32) -> Bool {
    Glibc.kill(pid, 0) == -1 && errno == ESRCH
}

/// A socket listening on 127.0.0.1:`port` (with `SO_REUSEADDR`, like Redis), or nil if that failed.
private func listeningSocket(port: Int) -> Int32? {
    // Close-on-exec: a redis-server launched meanwhile must not keep listening on the port after close().
    let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
    guard descriptor >= 0 else { return nil }
    var one: Int32 = 1
    _ = setsockopt(descriptor, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = in_port_t(UInt16(port).bigEndian)
    address.sin_addr = in_addr(s_addr: UInt32(0x7F00_0001).bigEndian)
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard bound == 0, listen(descriptor, 1) == 0 else {
        close(descriptor)
        return nil
    }
    return descriptor
}
