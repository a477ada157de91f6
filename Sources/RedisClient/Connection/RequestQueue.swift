import NIOCore

/// The request state of one Redis connection, as a value: requests not yet written (with their encoded bytes),
/// requests written and waiting for their reply in FIFO order, and their deadlines.
///
/// It does no I/O; the connection that owns it (behind a lock) performs the actions its methods return. `Waiter` is
/// whatever completes a request (a continuation in production, a plain value in tests).
struct RequestQueue<Waiter> {
    struct Entry {
        var id: UInt64
        var deadline: NIODeadline
        /// `nil` once the request was abandoned (timed out or cancelled) while its reply is still due.
        var waiter: Waiter?
        /// Where the encoded bytes start in `pendingBytes` (only while pending).
        var start: Int
        var length: Int
    }

    /// Outcome of a reply arriving.
    enum ReplyTarget {
        /// Complete this waiter.
        case waiter(Waiter)
        /// The request was abandoned; drop the reply.
        case abandoned
        /// No request was waiting: the server sent more replies than requests (a protocol violation).
        case unexpected
    }

    /// Where an expired or removed waiter was.
    enum Place {
        case pending, inflight
        /// Pending, and queued behind an expired command sent without waiting for its reply: dropped with it, so
        /// nothing that relied on that command's effect goes out without it.
        case behindDropped
    }

    private var pending = CircularBuffer<Entry>()
    private var pendingBytes: ByteBuffer
    private var inflight = CircularBuffer<Entry>()
    private let allocator: ByteBufferAllocator

    init(allocator: ByteBufferAllocator = ByteBufferAllocator()) {
        self.allocator = allocator
        self.pendingBytes = allocator.buffer(capacity: 0)
    }

    /// Requests not yet written.
    var pendingCount: Int { pending.count }
    /// Requests written and waiting for a reply (including abandoned ones whose reply is still due).
    var inflightCount: Int { inflight.count }
    /// The deadline of the oldest in-flight request (the one the server is working on), abandoned or not.
    var oldestInflightDeadline: NIODeadline? { inflight.first?.deadline }

    /// Adds a request with its encoded bytes to the pending queue.
    mutating func enqueue(id: UInt64, deadline: NIODeadline, waiter: Waiter, bytes: UnsafeRawBufferPointer) {
        let start = pendingBytes.writerIndex
        pendingBytes.writeBytes(bytes)
        pending.append(Entry(id: id, deadline: deadline, waiter: waiter, start: start, length: bytes.count))
    }

    /// Adds a request straight to the in-flight queue: the caller writes its bytes itself, before any later write
    /// (used for the connection handshake, before pending requests may go out).
    mutating func enqueueWritten(id: UInt64, deadline: NIODeadline, waiter: Waiter) {
        inflight.append(Entry(id: id, deadline: deadline, waiter: waiter, start: 0, length: 0))
    }

    /// Moves every pending request to the in-flight queue and returns the bytes to write, or `nil` when none.
    mutating func takePendingForWrite() -> ByteBuffer? {
        guard !pending.isEmpty else { return nil }
        let bytes = pendingBytes
        pendingBytes = allocator.buffer(capacity: 0)
        inflight.reserveCapacity(inflight.count + pending.count)
        while let entry = pending.popFirst() { inflight.append(entry) }
        return bytes
    }

    /// A reply arrived: the oldest in-flight request is complete.
    mutating func replyReceived() -> ReplyTarget {
        guard let entry = inflight.popFirst() else { return .unexpected }
        if let waiter = entry.waiter { return .waiter(waiter) }
        return .abandoned
    }

    /// The connection broke: every in-flight request fails (pending ones stay for the next connection).
    mutating func failInflight() -> [Waiter] {
        let waiters = inflight.compactMap(\.waiter)
        inflight.removeAll()
        return waiters
    }

    /// Shutdown: every request fails.
    mutating func failAll() -> [Waiter] {
        let waiters = inflight.compactMap(\.waiter) + pending.compactMap(\.waiter)
        inflight.removeAll()
        pending.removeAll()
        pendingBytes.clear()
        return waiters
    }

    /// Removes every request whose deadline is at or before `now`: pending ones are dropped (never sent), in-flight
    /// ones are abandoned (their reply will be discarded). A dropped pending request for which `ordersFollowers` is
    /// true (a command sent without waiting for its reply, whose effect later commands may rely on) takes every
    /// pending request behind it along. Returns them and the earliest remaining deadline.
    mutating func expire(
        now: NIODeadline, ordersFollowers: (Waiter) -> Bool = { _ in false }
    ) -> (expired: [(Waiter, Place)], nextDeadline: NIODeadline?) {
        var expired: [(Waiter, Place)] = []
        var next: NIODeadline? = nil
        for index in inflight.indices {
            guard let waiter = inflight[index].waiter else { continue }
            if inflight[index].deadline <= now {
                expired.append((waiter, .inflight))
                inflight[index].waiter = nil
            } else {
                next = min(next ?? inflight[index].deadline, inflight[index].deadline)
            }
        }
        if pending.contains(where: { $0.deadline <= now }) {
            var kept = CircularBuffer<Entry>(initialCapacity: pending.count)
            var cut = false
            for entry in pending {
                if cut, let waiter = entry.waiter {
                    expired.append((waiter, .behindDropped))
                } else if entry.deadline <= now, let waiter = entry.waiter {
                    expired.append((waiter, .pending))
                    cut = ordersFollowers(waiter)
                } else {
                    kept.append(entry)
                }
            }
            rebuildPending(keeping: kept)
        }
        for entry in pending { next = min(next ?? entry.deadline, entry.deadline) }
        return (expired, next)
    }

    /// Removes the request `id` (task cancelled): a pending one is dropped, an in-flight one abandoned.
    mutating func cancel(id: UInt64) -> (Waiter, Place)? {
        if let index = inflight.firstIndex(where: { $0.id == id }), let waiter = inflight[index].waiter {
            inflight[index].waiter = nil
            return (waiter, .inflight)
        }
        if let index = pending.firstIndex(where: { $0.id == id }), let waiter = pending[index].waiter {
            var kept = pending
            kept.remove(at: index)
            rebuildPending(keeping: kept)
            return (waiter, .pending)
        }
        return nil
    }

    /// Removes every pending request (for example when authentication fails and waiting cannot help).
    mutating func failPending() -> [Waiter] {
        let waiters = pending.compactMap(\.waiter)
        pending.removeAll()
        pendingBytes.clear()
        return waiters
    }

    private mutating func rebuildPending(keeping kept: CircularBuffer<Entry>) {
        var bytes = allocator.buffer(capacity: pendingBytes.readableBytes)
        var entries = CircularBuffer<Entry>(initialCapacity: kept.count)
        for var entry in kept {
            let slice = pendingBytes.getSlice(at: entry.start, length: entry.length)!
            entry.start = bytes.writerIndex
            bytes.writeImmutableBuffer(slice)
            entries.append(entry)
        }
        pendingBytes = bytes
        pending = entries
    }
}

extension RequestQueue: Sendable where Waiter: Sendable {}
extension RequestQueue.Entry: Sendable where Waiter: Sendable {}
