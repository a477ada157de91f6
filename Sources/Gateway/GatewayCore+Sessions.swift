import ConnectionLimiter
import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import NIOWebSocket
import ServiceLifecycle

/// One upgraded connection's life: the session loop, frame reading and the closing handshake.
extension GatewayCore {
    /// Serves one upgraded connection until it closes.
    func serve(_ webSocket: NIOAsyncChannel<WebSocketFrame, WebSocketFrame>, decision: UpgradeDecision, logger baseLogger: Logger) async {
        var logger = baseLogger
        do {
            try await webSocket.executeThenClose { inbound, outbound in
                let connection = SessionConnection(channel: webSocket.channel, outbound: outbound, configuration: configuration, logger: logger)
                let admitted: AdmittedConnection
                switch decision {
                case .accept(let accepted):
                    admitted = accepted
                case .closeAtOnce(let code, let reason):
                    logger.debug("upgraded only to close", metadata: ["fleetgate.code": "\(code)"])
                    connection.close(code: code, reason: reason)
                    await Self.drainUntilClosed(inbound, connection: connection)
                    await connection.closeFrameWritten()
                    return
                case .refuse:
                    return
                }
                logger[metadataKey: "fleetgate.user"] = "\(admitted.user)"
                logger[metadataKey: "fleetgate.connection"] = "\(admitted.id)"
                let pending = state.withLockedValue { state -> (code: UInt16, reason: String)? in
                    state.entries[admitted.id]?.connection = connection
                    return state.draining ? (GatewayCloseCode.goingAway, "node shutting down") : state.entries[admitted.id]?.pendingClose
                }
                let logger = logger
                metrics.sessionOpened()
                defer { metrics.sessionClosed(code: connection.closingCode) }
                let queue = MessageQueue()
                connection.setReaderBlocked { queue.isProducerWaiting }
                // However the socket ends, the reader must not stay parked on a full queue.
                webSocket.channel.closeFuture.whenComplete { _ in queue.finish() }
                let session = GatewaySession(
                    user: admitted.user, connectionID: admitted.id, logger: logger, messages: GatewayMessages(queue: queue), connection: connection)
                await withGracefulShutdownHandler {
                    await withTaskGroup(of: Void.self) { group in
                        group.addTask { await connection.runPinger(readerBlocked: { queue.isProducerWaiting }) }
                        group.addTask {
                            do {
                                try await self.handler.run(session)
                                // The handler also ends when the socket went away (its messages end): that is 1006.
                                if webSocket.channel.isActive {
                                    connection.close(code: GatewayCloseCode.normal, reason: "")
                                } else {
                                    connection.noteClosed(code: GatewayCloseCode.abnormal)
                                }
                            } catch let closed as GatewaySessionClosed {
                                // A send failed because the connection is closing or gone (1006): not a handler fault.
                                if connection.closingCode == nil {
                                    connection.noteClosed(code: closed.code)
                                    connection.abort()
                                }
                            } catch {
                                if connection.closingCode == nil {
                                    logger.warning("session handler failed", metadata: ["fleetgate.error": "\(error)"])
                                }
                                connection.close(code: GatewayCloseCode.internalError, reason: "internal error")
                            }
                            // Nobody takes messages any more: a reader waiting on the full queue goes back to reading
                            // (and sees the client's close answer, or the socket's end).
                            queue.finish()
                        }
                        if let pending { connection.close(code: pending.code, reason: pending.reason) }
                        await self.read(inbound, connection: connection, queue: queue)
                        // Ended without a closing handshake of ours: the client vanished (1006), unless the read
                        // recorded what NIO answered a broken frame with.
                        connection.noteClosed(code: GatewayCloseCode.abnormal)
                        queue.finish()
                        group.cancelAll()
                    }
                } onGracefulShutdown: {
                    connection.close(code: GatewayCloseCode.goingAway, reason: "node shutting down")
                }
                // Our close frame must be out before the channel closes at the end of this scope.
                await connection.closeFrameWritten()
                connection.cancelCloseTimer()
            }
        } catch {
            logger.debug("WebSocket connection ended with an error", metadata: ["fleetgate.error": "\(error)"])
        }
    }

    /// Reads frames until the closing handshake completes or the socket closes: answers pings, reassembles messages
    /// (bounded), validates text, and hands messages to the handler's queue.
    func read(_ inbound: NIOAsyncChannelInboundStream<WebSocketFrame>, connection: SessionConnection, queue: MessageQueue) async {
        var partial: (opcode: WebSocketOpcode, data: ByteBuffer)?
        do {
            for try await frame in inbound {
                connection.clientIsAlive()
                guard frame.maskKey != nil else {
                    return protocolError(connection, "client frames must be masked")
                }
                guard !frame.rsv1, !frame.rsv2, !frame.rsv3 else {
                    return protocolError(connection, "reserved bits set without a negotiated extension")
                }
                switch frame.opcode {
                case .ping:
                    guard frame.fin else { return protocolError(connection, "fragmented ping") }
                    connection.pong(frame.unmaskedData)
                case .pong:
                    break
                case .connectionClose:
                    if connection.closingCode == nil {
                        // The client closes: echo its code (RFC 6455 §5.5.1); the socket closes once that is out.
                        connection.close(code: Self.answer(toClose: frame.unmaskedData), reason: "", waitForAnswer: false)
                    } else {
                        // The answer to our close: the handshake is complete.
                        connection.abort()
                    }
                    return
                case .text, .binary:
                    guard connection.closingCode == nil else { continue }
                    guard partial == nil else { return protocolError(connection, "a new message began before the last one ended") }
                    if frame.fin {
                        await deliver(frame.opcode, frame.unmaskedData, connection: connection, queue: queue)
                    } else {
                        partial = (frame.opcode, frame.unmaskedData)
                    }
                case .continuation:
                    guard connection.closingCode == nil else { continue }
                    guard var message = partial else { return protocolError(connection, "a continuation frame without a message") }
                    var data = frame.unmaskedData
                    guard message.data.readableBytes + data.readableBytes <= configuration.maxMessageSize else {
                        partial = nil
                        connection.close(code: GatewayCloseCode.messageTooBig, reason: "message larger than \(configuration.maxMessageSize) bytes")
                        continue
                    }
                    message.data.writeBuffer(&data)
                    if frame.fin {
                        partial = nil
                        await deliver(message.opcode, message.data, connection: connection, queue: queue)
                    } else {
                        partial = message
                    }
                default:
                    return protocolError(connection, "unknown opcode")
                }
            }
        } catch let error as NIOWebSocketError {
            // NIO's frame decoder answered a broken frame itself and closes the socket.
            connection.noteClosed(code: error == .invalidFrameLength ? GatewayCloseCode.messageTooBig : GatewayCloseCode.protocolError)
            logger.debug("WebSocket read ended", metadata: ["fleetgate.error": "\(error)"])
        } catch {
            logger.debug("WebSocket read ended", metadata: ["fleetgate.error": "\(error)"])
        }
    }

    /// The code to echo to a client's close frame: its own code, 1000 for an empty payload, 1002 for a 1-byte payload
    /// or an invalid code, 1007 for a reason that is not UTF-8 (RFC 6455 §5.5.1, §7.4).
    static func answer(toClose payload: ByteBuffer) -> UInt16 {
        var data = payload
        guard data.readableBytes > 0 else { return GatewayCloseCode.normal }
        guard let code = data.readInteger(as: UInt16.self), isValidCloseCode(code) else { return GatewayCloseCode.protocolError }
        guard String(validating: data.readableBytesView, as: UTF8.self) != nil else { return GatewayCloseCode.invalidData }
        return code
    }

    func protocolError(_ connection: SessionConnection, _ reason: String) {
        connection.close(code: GatewayCloseCode.protocolError, reason: reason, waitForAnswer: false)
    }

    /// Hands one message to the handler (invalid text starts the close instead).
    func deliver(_ opcode: WebSocketOpcode, _ data: ByteBuffer, connection: SessionConnection, queue: MessageQueue) async {
        if opcode == .text {
            guard let text = String(validating: data.readableBytesView, as: UTF8.self) else {
                connection.close(code: GatewayCloseCode.invalidData, reason: "text message is not valid UTF-8")
                return
            }
            await queue.push(.text(text))
        } else {
            await queue.push(.binary(Array(data.readableBytesView)))
        }
    }

    /// After a close-at-once, reads until the client answers the close (or the close timer closes the socket).
    static func drainUntilClosed(_ inbound: NIOAsyncChannelInboundStream<WebSocketFrame>, connection: SessionConnection) async {
        do {
            for try await frame in inbound where frame.opcode == .connectionClose {
                connection.abort()
                return
            }
        } catch {}
    }

    static func isValidCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: return true
        default: return false
        }
    }
}
