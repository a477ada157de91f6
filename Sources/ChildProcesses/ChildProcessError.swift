import Glibc

/// A child process could not be launched or its files could not be set up; the message says which and why.
public struct ChildProcessError: Error, CustomStringConvertible, Sendable {
    public let description: String

    public init(_ description: String) {
        self.description = description
    }

    /// `strerror(errno)` with the number, for messages about a failed system call.
    static func errnoDescription() -> String {
        let code = errno
        return "\(String(cString: strerror(code))) (errno \(code))"
    }
}
