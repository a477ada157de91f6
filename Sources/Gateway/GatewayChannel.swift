import HTTPTypes
import HummingbirdCore
import Logging
import NIOCore
import NIOHTTP1
import NIOHTTPTypes
import NIOHTTPTypesHTTP1
import NIOWebSocket

/// A refused upgrade: the HTTP answer the client gets instead of a WebSocket.
struct Refusal: Sendable {
    var status: HTTPResponse.Status
    var headers: HTTPFields = [:]
    /// A JSON object.
    var body: String
}

/// What the gateway decided for one upgrade request.
enum UpgradeDecision: Sendable {
    /// Upgrade and serve the connection.
    case accept(AdmittedConnection)
    /// Upgrade and close at once with this code (`--deny-mode close`).
    case closeAtOnce(code: UInt16, reason: String)
    /// Answer with an HTTP error and no upgrade.
    case refuse(Refusal)
}

/// An upgrade the limiter admitted (or that needs no admission with `--limiter off`).
struct AdmittedConnection: Sendable {
    var id: String
    var user: String
}

/// The server side of one TCP connection: HTTP/1.1 with a WebSocket upgrade at `/ws`.
///
/// Hummingbird's own `HTTP1WebSocketUpgradeChannel` answers every refused upgrade with a bare 400, but a denied
/// client must learn why (401 with the failed check, 429 with the counts and `Retry-After`, 503). This channel has
/// the same shape, with the refusal carried from `shouldUpgrade` to the response on the channel itself; plain HTTP
/// requests (`/healthz`, `/metrics`, `/admin`) go to the Hummingbird router as usual.
struct GatewayChannel: ServerChildChannel, HTTPChannelHandler {
    enum Negotiated: Sendable {
        case webSocket(NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, UpgradeDecision)
        case http(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>)
        case refused(NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>, Refusal)
    }

    struct Value: ServerChildChannelValue {
        let negotiated: EventLoopFuture<Negotiated>
        let channel: any Channel
    }

    let responder: HTTPChannelHandler.Responder
    let core: GatewayCore

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        channel.eventLoop.makeCompletedFuture {
            let decision = NIOLoopBoundBox<UpgradeDecision?>(nil, eventLoop: channel.eventLoop)
            let settled = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
            let core = self.core
            let upgrader = NIOTypedWebSocketServerUpgrader<Negotiated>(
                maxFrameSize: core.configuration.maxFrameSize,
                enableAutomaticErrorHandling: true,
                shouldUpgrade: { channel, head in
                    // Stop reading while the admission runs: NIO's upgrade handler buffers every byte that arrives
                    // after the request until the decision, without bound (a client must not send any before the
                    // 101 anyway). One read's worth at most is held.
                    try? channel.syncOptions?.setOption(ChannelOptions.autoRead, value: false)
                    let promise = channel.eventLoop.makePromise(of: UpgradeDecision.self)
                    promise.completeWithTask { await core.decide(head: head, channel: channel) }
                    return promise.futureResult.map { result in
                        try? channel.syncOptions?.setOption(ChannelOptions.autoRead, value: true)
                        decision.value = result
                        switch result {
                        case .accept, .closeAtOnce: return HTTPHeaders()
                        case .refuse: return nil
                        }
                    }
                },
                upgradePipelineHandler: { channel, _ in
                    channel.eventLoop.makeCompletedFuture {
                        settled.value = true
                        let asyncChannel = try NIOAsyncChannel<WebSocketFrame, WebSocketFrame>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true)
                        )
                        return .webSocket(asyncChannel, decision.value ?? .closeAtOnce(code: GatewayCloseCode.internalError, reason: ""))
                    }
                }
            )
            let http1 = HTTP1Channel.Configuration(idleTimeout: .init(core.configuration.httpIdleTimeout))
            let upgradeConfiguration = NIOTypedHTTPServerUpgradeConfiguration(
                upgraders: [upgrader],
                notUpgradingCompletionHandler: { channel in
                    channel.eventLoop.makeCompletedFuture {
                        settled.value = true
                        try channel.pipeline.syncOperations.addHandler(HTTP1ToHTTPServerCodec(secure: false))
                        try channel.pipeline.syncOperations.addHandler(
                            HTTPConnectionStateHandler(idleTimeout: http1.idleTimeout.map { .init($0) }, logger: logger)
                        )
                        let asyncChannel = try NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>(
                            wrappingChannelSynchronously: channel,
                            configuration: .init(isOutboundHalfClosureEnabled: true)
                        )
                        if case .refuse(let refusal) = decision.value {
                            return .refused(asyncChannel, refusal)
                        }
                        return .http(asyncChannel)
                    }
                }
            )
            var configuration = NIOUpgradableHTTPServerPipelineConfiguration<Negotiated>(upgradeConfiguration: upgradeConfiguration)
            configuration.enablePipelining = false
            configuration.enableErrorHandling = false
            configuration.enableResponseHeaderValidation = false
            let negotiated = try channel.pipeline.syncOperations.configureUpgradableHTTPServerPipeline(configuration: configuration)

            // Handshake timeout: a client that connects and never completes a request (or an admission that hangs)
            // must not hold a socket.
            let timeout = channel.eventLoop.scheduleTask(in: .init(core.configuration.handshakeTimeout)) {
                if !settled.value {
                    logger.debug("closing a connection that did not finish its handshake in time")
                    channel.close(promise: nil)
                }
            }
            channel.closeFuture.whenComplete { _ in timeout.cancel() }
            return Value(negotiated: negotiated, channel: channel)
        }
    }

    func handle(value: Value, logger: Logger) async {
        do {
            switch try await value.negotiated.get() {
            case .http(let http):
                await handleHTTP(asyncChannel: http, logger: logger)
            case .refused(let http, let refusal):
                await Self.write(refusal, to: http, logger: logger)
            case .webSocket(let webSocket, let decision):
                await core.serve(webSocket, decision: decision, logger: logger)
            }
        } catch let error as ChannelError where error == .inputClosed {
            logger.trace("connection closed before its request was complete")
        } catch {
            logger.debug("connection ended during the upgrade", metadata: ["error": "\(error)"])
        }
    }

    /// Answers a refused upgrade and closes the connection.
    static func write(_ refusal: Refusal, to http: NIOAsyncChannel<HTTPRequestPart, HTTPResponsePart>, logger: Logger) async {
        do {
            try await http.executeThenClose { _, outbound in
                var body = ByteBuffer(string: refusal.body)
                body.writeString("\n")
                var headers = refusal.headers
                headers[.contentType] = "application/json; charset=utf-8"
                headers[.contentLength] = String(body.readableBytes)
                headers[.connection] = "close"
                try await outbound.write(contentsOf: [
                    .head(HTTPResponse(status: refusal.status, headerFields: headers)),
                    .body(body),
                    .end(nil),
                ])
            }
        } catch {
            logger.trace("could not write the refusal", metadata: ["error": "\(error)"])
        }
    }
}
