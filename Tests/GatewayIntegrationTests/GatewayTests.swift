import Foundation
import Glibc
import TestSupport
import Testing

@Suite("Gateway nodes: real processes, real WebSockets, one Redis", .timeLimit(.minutes(2)))
struct GatewayProcessTests {
    @Test("the limit holds across three nodes: 20 admitted, the 21st gets 429 with the counts on any node")
    func limitAcrossNodes() async throws {
        try await Fleet.with(3) { fleet in
            let token = try await Tokens.valid("carol")
            var open: [HeldWebSocket] = []
            for index in 0..<20 {
                open.append(try await HeldWebSocket.open(port: fleet.nodes[index % 3].port, token: token))
            }
            #expect(try await fleet.entries("carol").count == 20)
            for node in 0..<3 {
                let answer = try await fleet.upgrade(on: node, token: token)
                #expect(answer.status == 429, "\(answer)")
                #expect(answer.json["error"] as? String == "connection_limit_exceeded")
                #expect(answer.json["user"] as? String == "carol")
                #expect(answer.json["limit"] as? Int == 20)
                #expect(answer.json["current"] as? Int == 20)
                #expect((answer.json["retry_after_ms"] as? Int ?? -1) >= 0)
                #expect(Int(answer.headers["retry-after"] ?? "") ?? 0 >= 1, "\(answer.headers)")
            }
            // One closes: a new connection is admitted again, on another node.
            await open.removeFirst().close()
            var reopened: HeldWebSocket?
            let admitted = await eventually {
                reopened = try? await HeldWebSocket.open(port: fleet.nodes[2].port, token: token)
                return reopened != nil
            }
            #expect(admitted)
            if let reopened { open.append(reopened) }
            #expect(try await fleet.entries("carol").count == 20)
            for connection in open { await connection.close() }
            #expect(try await eventually { try await fleet.entries("carol").isEmpty })
        }
    }

    @Test("--deny-mode close accepts the upgrade and closes it at once with 4429 and the counts")
    func denyModeClose() async throws {
        try await Fleet.with(1, arguments: ["--deny-mode", "close"]) { fleet in
            let token = try await Tokens.valid("dave", limit: 1)
            let first = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            // A raw client reads exactly what the server sends after its 101 (HummingbirdWSClient 2.8.1 sometimes
            // misses a close frame that arrives in the same read as the 101, and then never ends).
            let second = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: token)
            defer { second.close() }
            let close = try #require(try await second.nextFrame(timeout: .seconds(10)))
            #expect(close.closeCode == 4429)
            #expect(close.closeReason == "connection limit exceeded (1/1)")
            #expect(try await fleet.entries("dave").count == 1)
            await first.close()
        }
    }

    @Test("missing, expired, forged, alg:none and wrong-algorithm tokens get 401 naming the check; nothing is registered")
    func tokenErrors() async throws {
        try await Fleet.with(1) { fleet in
            let cases: [(String?, String)] = [
                (nil, "missing"),
                (try await Tokens.valid("eve", expiresIn: -120), "expired"),
                (try await Tokens.valid("eve", secret: "another-secret-that-is-32-bytes-long!!"), "signature"),
                (Tokens.unsigned("eve"), "algorithm"),
                (try await Tokens.wrongAlgorithm("eve"), "algorithm"),
                ("not-a-jwt", "malformed"),
            ]
            for (token, check) in cases {
                let answer = try await fleet.upgrade(on: 0, token: token)
                #expect(answer.status == 401, "\(check): \(answer)")
                #expect(answer.json["error"] as? String == "unauthorized")
                #expect(answer.json["check"] as? String == check, "\(answer)")
            }
            // The query-string form is read too.
            let viaQuery = try await RawHTTP.get(port: fleet.nodes[0].port, path: "/ws?access_token=garbage", upgrade: true)
            #expect(viaQuery.status == 401 && viaQuery.json["check"] as? String == "malformed", "\(viaQuery)")
            #expect(try await fleet.keys().filter { $0.contains("{u:") }.isEmpty)
        }
    }

    @Test("a client that stops answering pings is closed and its entry released")
    func deadClientReleased() async throws {
        // 1 s pings: the entry is checked well inside the two missed intervals, even on a loaded machine.
        try await Fleet.with(1, arguments: ["--ping-interval", "1s", "--missed-pongs", "2"]) { fleet in
            let token = try await Tokens.valid("frank")
            let silent = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: token)
            defer { silent.close() }
            #expect(try await fleet.entries("frank").count == 1)
            // It never answers: pings arrive, then the server gives up and closes the socket.
            var pings = 0
            var closeCode: UInt16?
            while let frame = try await silent.nextFrame(timeout: .seconds(10)) {
                if frame.opcode == 0x9 { pings += 1 }
                if frame.opcode == 0x8 { closeCode = frame.closeCode }
            }
            #expect(pings >= 2)
            #expect(closeCode == 4408, "a ping timeout has a code of its own (not 1001, the drain's)")
            #expect(try await eventually { try await fleet.entries("frank").isEmpty })
        }
    }

    @Test("SIGTERM drains: clients get 1001, the node exits 0 and leaves no key in Redis")
    func sigtermDrains() async throws {
        try await Fleet.with(2) { fleet in
            let token = try await Tokens.valid("grace")
            let a = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let b = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let other = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            #expect(try await fleet.entries("grace").count == 3)
            let started = ContinuousClock.now
            let status = try await fleet.nodes[0].terminate(timeout: .seconds(15))
            let took = ContinuousClock.now - started
            #expect(status == 0, "\(fleet.nodes[0].standardError())")
            #expect(took < .seconds(10), "drain took \(took)")
            #expect(try await a.closedByServer()?.code == 1001)
            #expect(try await b.closedByServer()?.code == 1001)
            let entries = try await fleet.entries("grace", on: 1)
            #expect(entries.count == 1, "\(entries)")
            await other.close()
            try await fleet.nodes[1].terminate()
            let left = try await fleet.keys()
            #expect(left.isEmpty, "\(left)")
        }
    }

    @Test("evict-oldest: a new connection at the limit closes the oldest socket with 4409")
    func kickClosesOldest() async throws {
        try await Fleet.with(2, arguments: ["--overflow", "evict-oldest"]) { fleet in
            let token = try await Tokens.valid("heidi", limit: 2)
            let oldest = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let middle = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            let newest = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            let close = try #require(try await oldest.closedByServer())
            #expect(close.code == 4409)
            // The eviction's kick, or (if a lease renewal ran first) the same close as "entry lost".
            #expect(close.reason.hasPrefix("evicted") || close.reason.contains("lost in Redis"), "\(close.reason)")
            #expect(try await eventually { try await fleet.entries("heidi").count == 2 })
            await middle.close()
            await newest.close()
        }
    }

    @Test("the agent flow streams its five events in order while the user is at the limit")
    func agentFlowAtLimit() async throws {
        try await Fleet.with(1, arguments: ["--agent-step", "20ms"]) { fleet in
            let token = try await Tokens.valid("ivan", limit: 1)
            let session = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let denied = try await fleet.upgrade(on: 0, token: token)
            #expect(denied.status == 429)
            session.send(#"{"type":"run","prompt":"hello"}"#)
            var events: [String] = []
            for _ in 0..<5 {
                let text = try #require(try await session.nextMessage())
                let object = try #require(try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any])
                events.append(object["type"] as? String ?? "?")
            }
            #expect(events == ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"])
            session.send(#"{"type":"echo","n":1}"#)
            #expect(try await session.nextMessage() == #"{"type":"echo","n":1}"#)
            session.send("garbage")
            let error = try #require(try await session.nextMessage())
            #expect(error.contains(#""error":"invalid_json""#), "\(error)")
            await session.close()
        }
    }

    @Test("with Redis unreachable at start, the listening line comes within seconds with the real port")
    func listeningWithoutRedis() async throws {
        let closed = try ClosedPort()
        let clock = ContinuousClock()
        let started = clock.now
        let node = try await GatewayProcess.start(
            executable: try GatewayProcess.fleetgateExecutable(),
            arguments: ["serve", "--port", "0", "--redis", "redis://\(closed.address)", "--jwt-secret", Tokens.secret])
        let elapsed = started.duration(to: clock.now)
        #expect(node.port > 0)
        #expect(elapsed < .seconds(15), "the listening line waits at most 5 s for Redis: \(elapsed)")
        #expect(try await RawHTTP.get(port: node.port, path: "/healthz").status == 200)
        await node.kill()
    }

    @Test("/readyz turns 503 when Redis stops, and /healthz stays 200")
    func readinessFollowsRedis() async throws {
        try await RedisServer.withServer { server throws in
            try await Fleet.with(1, redis: server) { fleet in
                let port = fleet.nodes[0].port
                #expect(try await eventually { try await RawHTTP.get(port: port, path: "/readyz").status == 200 })
                await server.stop()
                #expect(try await eventually { try await RawHTTP.get(port: port, path: "/readyz").status == 503 })
                let health = try await RawHTTP.get(port: port, path: "/healthz")
                #expect(health.status == 200)
            }
        }
    }

    @Test("/metrics exposes the limiter's and the gateway's metrics in Prometheus text")
    func metrics() async throws {
        try await Fleet.with(1) { fleet in
            let session = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: try await Tokens.valid("judy"))
            let answer = try await RawHTTP.get(port: fleet.nodes[0].port, path: "/metrics")
            #expect(answer.status == 200)
            #expect(answer.headers["content-type"]?.hasPrefix("text/plain") == true)
            #expect(answer.body.contains(#"fleetgate_admissions_total{result="admitted"} 1"#), "\(answer.body.prefix(2000))")
            #expect(answer.body.contains("fleetgate_local_connections 1"))
            #expect(answer.body.contains(#"fleetgate_gateway_upgrades_total{result="accepted"} 1"#))
            await session.close()
        }
    }

    @Test("/admin refuses a missing or wrong token, answers with the right one, and is 404 without an admin token")
    func adminAuth() async throws {
        try await Fleet.with(1) { fleet in
            let port = fleet.nodes[0].port
            #expect(try await RawHTTP.get(port: port, path: "/admin/nodes").status == 401)
            #expect(
                try await RawHTTP.get(port: port, path: "/admin/nodes", headers: ["Authorization": "Bearer wrong-token-0123456789"]).status == 401)
            let nodes = try await RawHTTP.get(port: port, path: "/admin/nodes", headers: ["Authorization": "Bearer \(adminToken)"])
            #expect(nodes.status == 200)
            #expect((nodes.json["nodes"] as? [[String: Any]])?.count == 1, "\(nodes)")
        }
        try await Fleet.with(1, arguments: ["--admin-token", ""]) { fleet in
            let answer = try await RawHTTP.get(port: fleet.nodes[0].port, path: "/admin/nodes", headers: ["Authorization": "Bearer \(adminToken)"])
            #expect(answer.status == 404)
        }
    }
}

@Suite("Gateway nodes: failure modes and limits", .timeLimit(.minutes(2)))
struct GatewayFailureTests {
    @Test("a node cut off from Redis with --on-lease-loss close closes its sockets with 1012 before its lease runs out")
    func fencingClosesWith1012() async throws {
        let redis = try await SharedRedisServer.get()
        let proxy = try await TCPProxy.start(upstreamPort: redis.port)
        // A 1 s heartbeat and a 3 s node TTL: the node fences one interval (1 s) before its lease can run out, which
        // leaves room for a loaded machine to deliver the close and for this test to ask Redis afterwards.
        let arguments = ["--on-lease-loss", "close", "--heartbeat-interval", "1s", "--node-ttl", "3s", "--redis", proxy.url]
        try await Fleet.with(1, arguments: arguments) { fleet in
            let session = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: try await Tokens.valid("mallory"))
            let keys = try await fleet.keys()
            let registry = try #require(keys.first { $0.hasSuffix(":nodes") }, "no node registry in \(keys)")
            // The node's current id, as it reports it (on a loaded machine it may have re-registered since it started,
            // leaving its earlier id in the registry until the sweep).
            let ready = try await RawHTTP.get(port: fleet.nodes[0].port, path: "/readyz")
            let node = try #require(ready.json["node"] as? String, "no node id in /readyz: \(ready)")
            let cut = ContinuousClock.now
            proxy.cut()
            let close = try #require(try await session.closedByServer())
            let closedAt = unixMilliseconds()
            let after = ContinuousClock.now - cut
            #expect(close.code == 1012, "\(close)")
            // The promise is about the lease Redis holds: the node's score in the registry is its lease expiry (Redis
            // clock, same machine). Read after the client saw the close, so an expiry still ahead proves the close
            // came before the lease ran out (a node swept after its lease ran out has no score).
            let output = try await fleet.redis.cli("ZSCORE", registry, node).trimmingCharacters(in: .whitespacesAndNewlines)
            let expiresAt = try #require(Double(output).map { Int64($0) }, "no lease for node \(node) in \(registry): \(output)")
            #expect(expiresAt > closedAt, "closed \(after) after the cut, \(closedAt - expiresAt) ms after the lease ran out")
            print("fenced and closed with 1012 \(after) after the link to Redis was cut, \(expiresAt - closedAt) ms before the lease ran out")
        }
        await proxy.stop()
    }

    @Test("Redis down with --on-redis-down reject: upgrades get 503 (HTTP) or 1013 (--deny-mode close)")
    func redisDownReject() async throws {
        try await RedisServer.withServer { server throws in
            try await Fleet.with(2, redis: server, arguments: ["--on-redis-down", "reject"]) { fleet in
                let token = try await Tokens.valid("niaj")
                await server.stop()
                let answer = try await fleet.upgrade(on: 0, token: token)
                #expect(answer.status == 503, "\(answer)")
                #expect(answer.json["error"] as? String == "redis_unavailable", "\(answer)")
            }
        }
        try await RedisServer.withServer { server throws in
            try await Fleet.with(1, redis: server, arguments: ["--on-redis-down", "reject", "--deny-mode", "close"]) { fleet in
                let token = try await Tokens.valid("niaj")
                await server.stop()
                let session = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: token)
                defer { session.close() }
                #expect(try await session.nextFrame(timeout: .seconds(10))?.closeCode == 1013)
            }
        }
    }

    @Test("Redis full (maxmemory under the data, noeviction): 503 redis_full even with --on-redis-down local; open sockets stay")
    func redisFull() async throws {
        try await RedisServer.withServer(.init(extraArguments: ["--maxmemory-policy", "noeviction"])) { server throws in
            try await Fleet.with(1, redis: server, arguments: ["--on-redis-down", "local"]) { fleet in
                let held = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: try await Tokens.valid("olga"))
                defer { held.close() }
                _ = try await server.cli("CONFIG", "SET", "maxmemory", "1")
                let answer = try await fleet.upgrade(on: 0, token: try await Tokens.valid("olga"))
                #expect(answer.status == 503, "\(answer)")
                #expect(answer.json["error"] as? String == "redis_full", "\(answer)")
                #expect((answer.json["message"] as? String)?.contains("maxmemory") == true, "\(answer)")
                // The first connection stays open: no close frame and no end of the socket while Redis is full.
                do {
                    let frame = try await held.nextFrame(timeout: .milliseconds(1500))
                    #expect(frame != nil && frame?.closeCode == nil, "the held connection was closed: \(String(describing: frame))")
                } catch {
                    // Nothing arrived within the wait: still open.
                }
                _ = try await server.cli("CONFIG", "SET", "maxmemory", "0")
                #expect(try await fleet.upgrade(on: 0, token: try await Tokens.valid("olga")).status == 101)
            }
        }
    }

    @Test("frames over --max-frame-size close with 1009; garbage opcodes with 1002; the node keeps serving")
    func frameLimits() async throws {
        try await Fleet.with(1, arguments: ["--max-frame-size", "1024"]) { fleet in
            let token = try await Tokens.valid("olivia", limit: 5)
            let big = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: token)
            try big.send(opcode: 0x1, payload: Array(repeating: 0x61, count: 4096))
            var code: UInt16?
            while let frame = try await big.nextFrame(timeout: .seconds(10)) {
                if frame.opcode == 0x8 { code = frame.closeCode }
            }
            #expect(code == 1009)
            big.close()

            let odd = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: token)
            try odd.send(opcode: 0x3, payload: [1, 2, 3])
            let frame = try await odd.nextFrame(timeout: .seconds(10))
            #expect(frame?.closeCode == 1002, "\(String(describing: frame))")
            odd.close()

            #expect(try await eventually { try await fleet.entries("olivia").isEmpty })
            let fine = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            fine.send(#"{"type":"echo"}"#)
            #expect(try await fine.nextMessage() == #"{"type":"echo"}"#)
            await fine.close()
        }
    }

    @Test("a client that connects and never finishes its handshake is dropped after --handshake-timeout")
    func handshakeTimeout() async throws {
        try await Fleet.with(1, arguments: ["--handshake-timeout", "300ms"]) { fleet in
            let socket = try await RawSocket.connect(port: fleet.nodes[0].port)
            defer { socket.close() }
            try socket.send(Array("GET /ws HTTP/1.1\r\nHost: x\r\n".utf8))
            let started = ContinuousClock.now
            let data = try await socket.receive(timeout: .seconds(10))
            #expect(data.isEmpty, "the server should close, not answer: \(String(decoding: data, as: UTF8.self))")
            #expect(ContinuousClock.now - started < .seconds(5))
        }
    }

    @Test("--max-connections caps one node: the next upgrade gets 503 node_full, another node still admits")
    func nodeCap() async throws {
        try await Fleet.with(2, arguments: ["--max-connections", "2"]) { fleet in
            let token = try await Tokens.valid("peggy")
            let a = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let b = try await HeldWebSocket.open(port: fleet.nodes[0].port, token: token)
            let answer = try await fleet.upgrade(on: 0, token: token)
            #expect(answer.status == 503)
            #expect(answer.json["error"] as? String == "node_full")
            let c = try await HeldWebSocket.open(port: fleet.nodes[1].port, token: token)
            #expect(try await fleet.entries("peggy").count == 3)
            for session in [a, b, c] { await session.close() }
        }
    }
}
