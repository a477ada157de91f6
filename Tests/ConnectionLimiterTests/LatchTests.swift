import ConnectionLimiter
import TestSupport
import Testing

@Suite("Latch: waiting for something to have happened once, without polling", .timeLimit(.minutes(1)))
struct LatchTests {
    @Test("waiters parked before open() are all resumed by it, and report it open")
    func openResumesWaiters() async throws {
        let latch = Latch()
        let waiters = (0..<3).map { _ in Task { await latch.wait(timeout: .seconds(600)) } }
        #expect(await eventually { latch.waitingCount == 3 })
        // Were they not resumed, they would wait 600 s and the suite's one-minute limit would fail the test.
        latch.open()
        for waiter in waiters { #expect(await waiter.value) }
        #expect(latch.waitingCount == 0)
    }

    @Test("a wait on a closed latch ends at its timeout and reports it still closed; on an open one it returns at once")
    func timeoutAndAlreadyOpen() async throws {
        let latch = Latch()
        #expect(await latch.wait(timeout: .milliseconds(20)) == false)
        #expect(latch.waitingCount == 0)
        latch.open()
        latch.open()
        #expect(await latch.wait(timeout: .seconds(600)))
    }

    @Test("cancelling a waiting task ends its wait long before the timeout and leaves no waiter behind")
    func cancellationEndsTheWait() async throws {
        let latch = Latch()
        let waiter = Task { await latch.wait(timeout: .seconds(600)) }
        #expect(await eventually { latch.waitingCount == 1 })
        waiter.cancel()
        // The suite's one-minute limit fails this test if the cancelled wait ran to its 600 s timeout.
        #expect(await waiter.value == false)
        #expect(latch.waitingCount == 0)
    }
}
