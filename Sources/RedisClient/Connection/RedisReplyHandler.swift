import NIOCore

/// Decodes replies with hiredis as bytes arrive and hands them to the connection. Lives on the channel's event loop.
final class RedisReplyHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer

    private let connection: RedisConnection
    private let reader = Hiredis.Reader()
    private var replies: [RESPValue] = []
    private var failure: (any Error)?

    init(connection: RedisConnection) {
        self.connection = connection
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let bytes = unwrapInboundIn(data)
        do {
            try reader.feed(bytes)
            while let reply = try reader.next() { replies.append(reply) }
        } catch {
            failure = error
            context.close(promise: nil)
            return
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        guard !replies.isEmpty else { return }
        let batch = replies
        replies.removeAll(keepingCapacity: true)
        connection.received(batch, on: context.channel)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !replies.isEmpty {
            let batch = replies
            replies.removeAll()
            connection.received(batch, on: context.channel)
        }
        connection.channelClosed(context.channel, cause: failure)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if failure == nil { failure = error }
        context.close(promise: nil)
    }
}
