import Foundation

/// Polls `condition` every 10 ms until it holds or `timeout` passes, and says whether it held. For states that no
/// event announces (a server-side subscriber count, bytes reaching a socket, a registry entry disappearing).
public func eventually(timeout: Duration = .seconds(10), _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return try await condition()
}

/// The wall clock in milliseconds since the Unix epoch, the unit of Redis's `PEXPIRETIME` (same machine, same clock).
public func unixMilliseconds() -> Int64 {
    Int64((Date().timeIntervalSince1970 * 1000).rounded(.down))
}
