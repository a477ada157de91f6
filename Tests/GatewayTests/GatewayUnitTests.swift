import NIOHTTP1
import TestSupport
import Testing

@testable import Gateway

@Suite("Gateway pieces without a network")
struct GatewayUnitTests {
    @Test("the token comes from Authorization: Bearer first, else from ?access_token= (percent-decoded)")
    func tokenExtraction() {
        var head = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws?x=1&access_token=a%2Eb.c")
        #expect(GatewayCore.token(head: head, query: GatewayCore.split(head.uri).query) == "a.b.c")
        head.headers.add(name: "Authorization", value: "bearer  header.token.here")
        #expect(GatewayCore.token(head: head, query: GatewayCore.split(head.uri).query) == "header.token.here")
        let basic = HTTPRequestHead(version: .http1_1, method: .GET, uri: "/ws", headers: ["Authorization": "Basic dXNlcjpwYXNz"])
        #expect(GatewayCore.token(head: basic, query: nil) == nil)
        #expect(GatewayCore.split("/ws").path == "/ws" && GatewayCore.split("/ws").query == nil)
    }

    @Test("close codes a client may send are echoed; reserved ones are not")
    func closeCodes() {
        for code: UInt16 in [1000, 1001, 1011, 3000, 4409, 4999] { #expect(GatewayCore.isValidCloseCode(code)) }
        for code: UInt16 in [0, 999, 1004, 1005, 1006, 1015, 2999, 5000] { #expect(!GatewayCore.isValidCloseCode(code)) }
    }

    @Test("the admin token comparison is exact")
    func constantTime() {
        #expect(Gateway.constantTimeEqual("abcdefghijklmnop", "abcdefghijklmnop"))
        #expect(!Gateway.constantTimeEqual("abcdefghijklmnop", "abcdefghijklmnoq"))
        #expect(!Gateway.constantTimeEqual("abcdefghijklmnop", "abcdefghijklmno"))
        #expect(!Gateway.constantTimeEqual("", "a"))
    }

    @Test("the message queue delivers in order, holds the producer when full, and ends after finish()")
    func messageQueue() async {
        let queue = MessageQueue(capacity: 2)
        let producer = Task {
            for index in 0..<10 { await queue.push(.text("\(index)")) }
            queue.finish()
        }
        // The producer cannot run ahead by more than the capacity (+1 in hand).
        #expect(await eventually { queue.isProducerWaiting })
        var received: [String] = []
        while let message = await queue.next() {
            if case .text(let text) = message { received.append(text) }
        }
        await producer.value
        #expect(received == (0..<10).map(String.init))
    }

    @Test("configuration values out of range are refused with the setting named")
    func configurationValidation() {
        var configuration = GatewayConfiguration()
        #expect(throws: Never.self) { try configuration.validate() }
        configuration.maxFrameSize = 10
        #expect { try configuration.validate() } throws: { ($0 as? GatewayConfigurationError)?.message.contains("frame size") == true }
        configuration = GatewayConfiguration()
        configuration.missedPongLimit = 0
        #expect { try configuration.validate() } throws: { ($0 as? GatewayConfigurationError)?.message.contains("missed-pong") == true }
    }
}
