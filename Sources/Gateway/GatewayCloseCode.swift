/// Every WebSocket close code the gateway sends or records, in one place.
///
/// Each reason the gateway closes a connection for has a code of its own, so clients, logs and the
/// `fleetgate_gateway_closes_total{code}` metric tell them apart: a ping timeout (4408), a failed liveness probe
/// (4410) and a node going away (1001) are different events. The 4xxx codes follow the HTTP status they resemble.
public enum GatewayCloseCode {
    /// The handler finished normally.
    public static let normal: UInt16 = 1000
    /// The node is shutting down (drain).
    public static let goingAway: UInt16 = 1001
    /// The client broke the WebSocket protocol.
    public static let protocolError: UInt16 = 1002
    /// The connection ended without a closing handshake (the client vanished); recorded, never sent.
    public static let abnormal: UInt16 = 1006
    /// A text message was not valid UTF-8.
    public static let invalidData: UInt16 = 1007
    /// The client broke a rule of this gateway (too many pings).
    public static let policyViolation: UInt16 = 1008
    /// A message was larger than the limit.
    public static let messageTooBig: UInt16 = 1009
    /// The handler failed.
    public static let internalError: UInt16 = 1011
    /// The node lost its lease in Redis and, with policy `close`, closes everything (clients should reconnect).
    public static let serviceRestart: UInt16 = 1012
    /// Redis is unavailable and the policy is `reject` (try again later).
    public static let tryAgainLater: UInt16 = 1013
    /// The client missed too many pongs of the regular pings (or read nothing for as long). Like HTTP 408.
    public static let pingTimeout: UInt16 = 4408
    /// The connection was kicked: evicted by a newer one (evict-oldest) or by an operator. Like HTTP 409.
    public static let kicked: UInt16 = 4409
    /// The client did not answer the liveness probe of an emergency cleanup in time: it is presumed gone and its
    /// slot was given to a new connection of the same user. Like HTTP 410.
    public static let probeFailed: UInt16 = 4410
    /// The connection was denied (`--deny-mode close`): the user is at their limit. Like HTTP 429.
    public static let limitExceeded: UInt16 = 4429

    /// Every code the gateway sends or records (the close metric has one series each).
    static let all: [UInt16] = [
        normal, goingAway, protocolError, abnormal, invalidData, policyViolation, messageTooBig, internalError, serviceRestart, tryAgainLater,
        pingTimeout, kicked, probeFailed, limitExceeded,
    ]
}
