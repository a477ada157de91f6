import Foundation

/// JSON for HTTP answers and WebSocket messages, always from `Codable` types: keys in snake_case and sorted, slashes
/// not escaped, optional fields left out when nil.
enum JSON {
    /// `value` as one line of JSON ("{}" if it cannot be encoded, which these plain types never cause).
    static func encode(_ value: some Encodable) -> String {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        encoder.keyEncodingStrategy = .convertToSnakeCase
        guard let data = try? encoder.encode(value) else { return "{}" }
        return String(decoding: data, as: UTF8.self)
    }

    /// `text` decoded as `T` (snake_case keys), or nil if it is not one.
    static func decode<T: Decodable>(_ type: T.Type, from text: String) -> T? {
        let decoder = JSONDecoder()
        decoder.keyDecodingStrategy = .convertFromSnakeCase
        return try? decoder.decode(type, from: Data(text.utf8))
    }
}

/// Every refusal and error answer: `{"error": code, "message": ..., "check": ...}`.
struct ErrorBody: Encodable {
    var error: String
    var message: String?
    /// Which token check failed (401 answers).
    var check: String?
}

/// The 429 answer to a denied upgrade.
struct DenialBody: Encodable {
    var error = "connection_limit_exceeded"
    var user: String
    var limit: Int
    var current: Int
    var retryAfterMs: Int
    var message: String
}

/// `/healthz`.
struct HealthBody: Encodable {
    var status = "ok"
}

/// `/readyz`: the limiter fields are absent on a node running without the limiter.
struct ReadinessBody: Encodable {
    var ready: Bool
    var draining: Bool
    var limiter: String?
    var registered: Bool?
    var redis: String?
    var node: String?
    var liveNodes: Int?
}

/// `/admin/nodes`.
struct NodesBody: Encodable {
    struct Node: Encodable {
        var id: String
        var name: String
        var address: String
        var alive: Bool
        var connections: Int
        var users: Int
        var leaseRemainingMs: Int
    }

    struct Totals: Encodable {
        var liveNodes: Int
        var deadNodes: Int
        var connections: Int
        var userNodePairs: Int
    }

    /// The answering node's id.
    var this: String
    var nodes: [Node]
    var totals: Totals

    enum CodingKeys: String, CodingKey {
        case this = "self"
        case nodes, totals
    }
}

/// `/admin/users/:id`.
struct UserBody: Encodable {
    struct Entry: Encodable {
        var node: String
        var connection: String
        var leaseRemainingMs: Int
        var admittedMsAgo: Int?
    }

    var user: String
    var count: Int
    var defaultLimit: Int
    var entries: [Entry]
    var override: Int?
}
