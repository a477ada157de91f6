import NIOCore
import Testing

@testable import RedisClient

@Suite("RequestQueue state machine")
struct RequestQueueTests {
    private func enqueue(_ queue: inout RequestQueue<Int>, _ id: Int, _ text: String, deadline: NIODeadline = .distantFuture) {
        Array(text.utf8).withUnsafeBytes { queue.enqueue(id: UInt64(id), deadline: deadline, waiter: id, bytes: $0) }
    }

    @Test("pending requests leave in one write and complete in FIFO order")
    func fifo() {
        var queue = RequestQueue<Int>()
        enqueue(&queue, 1, "a")
        enqueue(&queue, 2, "bb")
        let bytes = queue.takePendingForWrite()
        #expect(bytes.map { String(buffer: $0) } == "abb")
        #expect(queue.takePendingForWrite() == nil)
        guard case .waiter(1) = queue.replyReceived(), case .waiter(2) = queue.replyReceived() else {
            Issue.record("replies not in FIFO order")
            return
        }
        guard case .unexpected = queue.replyReceived() else {
            Issue.record("an extra reply was not flagged")
            return
        }
    }

    @Test("a lost connection fails in-flight requests and keeps pending ones")
    func connectionLost() {
        var queue = RequestQueue<Int>()
        enqueue(&queue, 1, "a")
        _ = queue.takePendingForWrite()
        enqueue(&queue, 2, "b")
        #expect(queue.failInflight() == [1])
        #expect(queue.pendingCount == 1)
        #expect(queue.takePendingForWrite().map { String(buffer: $0) } == "b")
    }

    @Test("expired pending requests are never sent; expired in-flight ones are abandoned")
    func expiry() {
        var queue = RequestQueue<Int>()
        let now = NIODeadline.now()
        enqueue(&queue, 1, "a", deadline: now - .seconds(1))
        _ = queue.takePendingForWrite()
        enqueue(&queue, 2, "b", deadline: now - .seconds(1))
        enqueue(&queue, 3, "c", deadline: now + .seconds(5))
        let (expired, next) = queue.expire(now: now)
        #expect(expired.map(\.0).sorted() == [1, 2])
        #expect(next == now + .seconds(5))
        #expect(queue.takePendingForWrite().map { String(buffer: $0) } == "c")
        guard case .abandoned = queue.replyReceived(), case .waiter(3) = queue.replyReceived() else {
            Issue.record("an abandoned request's reply was not dropped")
            return
        }
    }

    @Test("cancelling a pending request removes its bytes")
    func cancelPending() {
        var queue = RequestQueue<Int>()
        enqueue(&queue, 1, "a")
        enqueue(&queue, 2, "bb")
        enqueue(&queue, 3, "ccc")
        #expect(queue.cancel(id: 2)?.0 == 2)
        #expect(queue.cancel(id: 2) == nil)
        #expect(queue.takePendingForWrite().map { String(buffer: $0) } == "accc")
    }

    @Test("shutdown fails everything once")
    func shutdown() {
        var queue = RequestQueue<Int>()
        enqueue(&queue, 1, "a")
        _ = queue.takePendingForWrite()
        enqueue(&queue, 2, "b")
        #expect(queue.failAll().sorted() == [1, 2])
        #expect(queue.failAll().isEmpty)
    }
}
