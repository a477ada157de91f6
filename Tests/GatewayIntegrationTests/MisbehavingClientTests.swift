import Foundation
import TestSupport
import Testing

/// Clients that read nothing, vanish mid-stream, flood pings or send before the upgrade: the node must stay bounded,
/// release their entries and still shut down cleanly.
@Suite("Gateway nodes: misbehaving clients", .timeLimit(.minutes(2)))
struct MisbehavingClientTests {
    /// An echo request of about 60 KB, as a masked client frame.
    static let bigEcho = RawWebSocket.frame(
        opcode: 0x1, payload: Array(#"{"type":"echo","pad":"\#(String(repeating: "x", count: 60_000))"}"#.utf8))

    @Test("a client that fills its queue without reading, then vanishes: released, counted as 1006, and SIGTERM still drains")
    func vanishingWhileBlocked() async throws {
        try await Fleet.with(1) { fleet in
            let port = fleet.nodes[0].port
            let client = try await RawWebSocket.connect(port: port, token: try await Tokens.valid("quentin"), receiveBuffer: 4096)
            // The node echoes into a socket nobody reads: its handler blocks, the queue fills, the reader waits.
            let sent = await client.socket.flood(Self.bigEcho, total: 64 << 20, idle: .milliseconds(500))
            #expect(sent < 64 << 20, "the node kept reading from a client that reads nothing (\(sent) bytes)")
            client.socket.reset()
            #expect(try await eventually { try await fleet.entries("quentin").isEmpty }, "the vanished client's entry was not released")
            let ended = try await eventually {
                try await RawHTTP.get(port: port, path: "/metrics").body.contains("fleetgate_gateway_sessions 0")
            }
            #expect(ended, "the session never ended")
            let metrics = try await RawHTTP.get(port: port, path: "/metrics").body
            #expect(metrics.contains(#"fleetgate_gateway_closes_total{code="1006"} 1"#), "\(metrics.prefix(3000))")
            #expect(try await fleet.nodes[0].terminate(timeout: .seconds(15)) == 0, "\(fleet.nodes[0].standardError().suffix(2000))")
            #expect(try await fleet.keys().isEmpty)
        }
    }

    @Test("a client that stops reading (and whose messages are queued) is closed by the ping timeout and released")
    func stopsReading() async throws {
        try await Fleet.with(1, arguments: ["--ping-interval", "300ms", "--missed-pongs", "2"]) { fleet in
            let port = fleet.nodes[0].port
            let client = try await RawWebSocket.connect(port: port, token: try await Tokens.valid("rupert"), receiveBuffer: 4096)
            defer { client.close() }
            _ = await client.socket.flood(Self.bigEcho, total: 64 << 20, idle: .milliseconds(500))
            // Connected, silent and reading nothing: 2 missed intervals of 300 ms, then the 2 s close timeout.
            #expect(try await eventually { try await fleet.entries("rupert").isEmpty }, "a client that reads nothing kept its slot")
        }
    }

    @Test("a ping flood is answered with at most one pong in flight and closed with 1008")
    func pingFlood() async throws {
        try await Fleet.with(1) { fleet in
            let client = try await RawWebSocket.connect(port: fleet.nodes[0].port, token: try await Tokens.valid("sybil"))
            defer { client.close() }
            let ping = RawWebSocket.frame(opcode: 0x9, payload: Array("are you there".utf8))
            try client.socket.send(Array([[UInt8]](repeating: ping, count: 500).joined()))
            var pongs = 0
            var close: RawWebSocket.Frame?
            while let frame = try await client.nextFrame(timeout: .seconds(10)) {
                if frame.opcode == 0xA { pongs += 1 }
                if frame.opcode == 0x8 {
                    close = frame
                    break
                }
            }
            #expect(close?.closeCode == 1008, "\(String(describing: close))")
            #expect(pongs <= 51, "\(pongs) pongs for a flood of 500 pings")
            #expect(try await eventually { try await fleet.entries("sybil").isEmpty })
        }
    }

    @Test("bytes sent before the 101 are not read while the admission waits (Redis frozen): the node buffers no more than a read")
    func dataBeforeTheUpgrade() async throws {
        try await RedisServer.withServer { server throws in
            try await Fleet.with(1, redis: server) { fleet in
                let port = fleet.nodes[0].port
                let token = try await Tokens.valid("trent")
                let socket = try await RawSocket.connect(port: port)
                defer { socket.close() }
                server.pause()
                defer { server.resume() }
                let request =
                    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    + "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer \(token)\r\n\r\n"
                try socket.send(Array(request.utf8))
                // The admission waits for the frozen Redis (up to the 1 s admission timeout); meanwhile the client
                // pushes as much as the node takes.
                let sent = await socket.flood(Array(repeating: 0x41, count: 65536), total: 256 << 20, idle: .milliseconds(300))
                #expect(sent < 32 << 20, "the node read \(sent) bytes before deciding the upgrade")
            }
        }
    }

    @Test("close frames: RSV bits, a 1-byte payload and a non-UTF-8 reason are protocol errors; 1012-1014 are echoed")
    func closeFrameRules() async throws {
        try await Fleet.with(1) { fleet in
            let port = fleet.nodes[0].port
            let token = try await Tokens.valid("uma", limit: 10)
            let cases: [(frame: [UInt8], expected: UInt16, what: String)] = [
                (RawWebSocket.frame(opcode: 0x1, payload: Array("{}".utf8), reservedBits: 0x40), 1002, "RSV1 without an extension"),
                (RawWebSocket.frame(opcode: 0x8, payload: [0x03]), 1002, "a 1-byte close payload"),
                (RawWebSocket.frame(opcode: 0x8, payload: [0x03, 0xE8, 0xC3, 0x28]), 1007, "a close reason that is not UTF-8"),
                (RawWebSocket.frame(opcode: 0x8, payload: [0x03, 0xF4]), 1012, "close code 1012"),
                (RawWebSocket.frame(opcode: 0x8, payload: [0x03, 0xF6]), 1014, "close code 1014"),
            ]
            for (frame, expected, what) in cases {
                let client = try await RawWebSocket.connect(port: port, token: token)
                defer { client.close() }
                try client.socket.send(frame)
                let close = try await client.closeFrame()
                #expect(close?.closeCode == expected, "\(what): \(String(describing: close))")
            }
        }
    }
}
