import Testing

@testable import RedisClient

@Suite("RedisClientConfiguration")
struct ConfigurationTests {
    @Test("a full URL sets host, port, user, password and database")
    func fullURL() throws {
        let configuration = try RedisClientConfiguration(url: "redis://app%40x:p%3Ass@cache.local:6380/3")
        #expect(configuration.host == "cache.local")
        #expect(configuration.port == 6380)
        #expect(configuration.username == "app@x")
        #expect(configuration.password == "p:ss")
        #expect(configuration.database == 3)
        #expect(configuration.address == "cache.local:6380")
    }

    @Test("defaults: port 6379, db 0, no auth; password-only URL")
    func defaults() throws {
        let plain = try RedisClientConfiguration(url: "redis://127.0.0.1")
        #expect(plain.port == 6379)
        #expect(plain.database == 0)
        #expect(plain.username == nil)
        #expect(plain.password == nil)
        let passwordOnly = try RedisClientConfiguration(url: "redis://:secret@[::1]:7000")
        #expect(passwordOnly.username == nil)
        #expect(passwordOnly.password == "secret")
        #expect(passwordOnly.host == "::1")
        #expect(passwordOnly.address == "[::1]:7000")
    }

    @Test(
        "bad URLs are refused with a reason, and the password is not echoed",
        arguments: [
            ("http://h:1", "scheme"),
            ("rediss://h:1", "TLS"),
            ("redis://:hunter2@h:1/x", "database"),
            ("redis://h:1?timeout=3", "query"),
            ("h:1", "scheme"),
            ("redis://:hunter2@h:abc", "URL"),
        ])
    func badURLs(url: String, reason: String) {
        do {
            _ = try RedisClientConfiguration(url: url)
            Issue.record("\(url) was accepted")
        } catch {
            #expect(error.code == .invalidConfiguration)
            #expect(error.message.contains(reason))
            #expect(!error.message.contains("hunter2"))
        }
    }

    @Test("backoff grows exponentially and is capped")
    func backoff() {
        let backoff = RedisClientConfiguration.Backoff(initialDelay: .milliseconds(100), maximumDelay: .seconds(1))
        #expect(backoff.delay(attempt: 0) >= .milliseconds(80))
        #expect(backoff.delay(attempt: 0) <= .milliseconds(120))
        #expect(backoff.delay(attempt: 2) >= .milliseconds(320))
        #expect(backoff.delay(attempt: 50) <= .seconds(1))
        #expect(backoff.delay(attempt: 50) >= .milliseconds(800))
    }
}
