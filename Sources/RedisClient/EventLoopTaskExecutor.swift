import NIOCore

/// A Swift concurrency `TaskExecutor` that runs jobs on a client connection's event loop.
///
/// Tasks that issue many Redis requests can prefer it (`Task(executorPreference:)`,
/// `group.addTask(executorPreference:)`): their continuations then resume on the thread that decoded the reply,
/// without a hop to the global executor and back, and their commands join the next write without a wake-up.
/// Don't run long CPU-bound work on it: it shares the thread with the connection's I/O.
public final class EventLoopTaskExecutor: TaskExecutor {
    let eventLoop: any EventLoop

    init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        eventLoop.execute {
            job.runSynchronously(on: self.asUnownedTaskExecutor())
        }
    }
}

extension RedisClient {
    /// A task executor on the event loop of the client's command connection; see ``EventLoopTaskExecutor``.
    public var taskExecutor: EventLoopTaskExecutor { EventLoopTaskExecutor(eventLoop: connection.eventLoop) }
}
