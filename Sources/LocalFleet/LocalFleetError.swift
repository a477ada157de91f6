/// An error of the local fleet's processes, e.g. when `redis-server` cannot be found or fails to start.
///
/// The ``message`` is written for humans (a failed test, a chaos run): it names the server address involved and,
/// where relevant, quotes the tail of the server's log.
public struct LocalFleetError: Error, CustomStringConvertible {
    /// What went wrong, in a form that can be printed as-is.
    public var message: String

    /// Creates an error carrying `message`.
    public init(_ message: String) {
        self.message = message
    }

    /// The ``message``.
    public var description: String {
        message
    }
}
