/// Returns a key prefix that is unique per call, e.g. `"t:3fZq81Kc:"`; callers prefix every key with it so tests can
/// share a server (see ``SharedRedisServer``) without seeing each other's keys.
///
/// The prefix is `"t:"`, 8 random base62 characters and `":"` (62^8 ≈ 2·10^14 possibilities). `label` (the calling
/// function by default) only makes call sites self-describing; it is deliberately not embedded, which keeps keys
/// short and free of characters such as `(` or `{` (a `{` would turn part of the key into a Redis Cluster hash tag).
public func uniqueKeyPrefix(_ label: String = #function) -> String {
    let alphabet = Array("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
    var generator = SystemRandomNumberGenerator()
    let random = String((0..<8).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &generator)] })
    return "t:\(random):"
}
