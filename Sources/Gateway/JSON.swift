import Foundation

/// Small JSON bodies for HTTP answers.
enum JSON {
    /// A JSON object with sorted keys (values: strings, numbers, booleans, arrays and objects of those).
    static func object(_ fields: [String: Any]) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys, .withoutEscapingSlashes]),
            let text = String(data: data, encoding: .utf8)
        else { return "{}" }
        return text
    }

    /// Parses a JSON object, or nil if `text` is not one.
    static func parseObject(_ text: String) -> [String: Any]? {
        guard let data = text.data(using: .utf8) else { return nil }
        return (try? JSONSerialization.jsonObject(with: data, options: [.fragmentsAllowed])) as? [String: Any]
    }
}
