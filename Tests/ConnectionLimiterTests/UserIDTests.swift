import Testing

@testable import ConnectionLimiter

@Suite("User ids and keys")
struct UserIDTests {
    @Test("escaping keeps braces, percent and control characters out of keys and is reversible")
    func escaping() throws {
        let cases = ["alice", "a{b}c", "100%", "%7B", "tab\t", "é🚀", "}{"]
        var seen = Set<String>()
        for raw in cases {
            let id = try UserID(raw)
            #expect(!id.escaped.contains("{") && !id.escaped.contains("}"))
            #expect(!id.escaped.unicodeScalars.contains { $0.value < 0x20 })
            #expect(UserID(escaped: id.escaped)?.rawValue == raw)
            seen.insert(id.escaped)
        }
        #expect(seen.count == cases.count, "two ids share an escaped form")
        #expect(try UserID("a{b").escaped == "a%7Bb")
    }

    @Test("ids compare as bytes: NFC and NFD spellings of one name are two users, in the table and in keys")
    func bytesNotCanonicalEquivalence() throws {
        let composed = try UserID("caf\u{E9}")
        let decomposed = try UserID("cafe\u{301}")
        // Swift's String calls them equal; the limiter must not (Redis keys compare bytes).
        #expect(composed.rawValue == decomposed.rawValue)
        #expect(composed != decomposed)
        #expect(Set([composed, decomposed]).count == 2)
        #expect(!composed.escaped.utf8.elementsEqual(decomposed.escaped.utf8))
        let keys = LimiterKeys(prefix: "fg")
        #expect(!keys.conns(composed).utf8.elementsEqual(keys.conns(decomposed).utf8))
        #expect(try UserID("caf\u{E9}") == composed)
        #expect(UserID(escaped: decomposed.escaped) == decomposed)
        var table = LocalTable()
        let added = table.addPending("c1", user: composed, limit: 1)
        let admitted = table.admitted("c1", node: "n1")
        #expect(added && admitted)
        #expect(table.openCount(of: composed) == 1)
        #expect(table.openCount(of: decomposed) == 0)
        let taken = !table.addPending("c1", user: decomposed, limit: 1)
        #expect(taken, "a connection id belongs to one user, by bytes")
    }

    @Test("empty and oversized ids are refused with the reason")
    func bounds() throws {
        #expect(throws: LimiterError.self) { try UserID("") }
        let long = String(repeating: "x", count: 257)
        do {
            _ = try UserID(long)
            Issue.record("accepted 257 bytes")
        } catch {
            #expect(error.code == .invalidUser)
            #expect(error.message.contains("257"))
        }
        #expect(try UserID(String(repeating: "x", count: 256)).rawValue.count == 256)
        #expect(UserID(escaped: "%ZZ") == nil)
    }

    @Test("keys of one user share one hash tag")
    func keys() throws {
        let keys = LimiterKeys(prefix: "fg")
        let user = try UserID("a}b")
        #expect(keys.conns(user) == "fg:{u:a%7Db}:conns")
        #expect(keys.limit(user) == "fg:{u:a%7Db}:limit")
        #expect(keys.user(fromConnsKey: keys.conns(user)) == user)
        #expect(Member("k3Xq9aZ2:c:1") == Member(node: "k3Xq9aZ2", connection: "c:1"))
    }

    @Test("connection ids are validated")
    func connectionIDs() throws {
        try ConnectionIDs.validate("abc-DEF_1.2")
        #expect(throws: LimiterError.self) { try ConnectionIDs.validate("a:b") }
        #expect(throws: LimiterError.self) { try ConnectionIDs.validate("") }
        #expect(throws: LimiterError.self) { try ConnectionIDs.validate(String(repeating: "a", count: 65)) }
        #expect(ConnectionIDs.random(length: 8).count == 8)
    }

    @Test("the local table keeps pending and open connections live for verify, oldest first")
    func localTable() throws {
        var table = LocalTable()
        let alice = try UserID("alice")
        let first = table.addPending("c1", user: alice, limit: 2)
        let second = table.addPending("c2", user: alice, limit: 2)
        let clash = table.addPending("c1", user: try UserID("bob"), limit: 2)
        #expect(first && second && !clash)
        #expect(table.isLive("c1"))
        let openedSecond = table.admitted("c2", node: "n")
        let openedFirst = table.admitted("c1", node: "old")
        #expect(openedFirst && openedSecond)
        #expect(table.openCount == 2)
        #expect(table.openOldestFirst().map(\.id) == ["c1", "c2"])
        // Renewals of node "n" leave out c1, still held by an earlier incarnation.
        #expect(table.openByUser(node: "n").first?.1.map(\.id) == ["c2"])
        _ = table.markReleasing("c1")
        #expect(!table.isLive("c1"))
        #expect(table.openCount == 1)
        // A release that raced with a renewal or an admission wins.
        let adopted = table.adopt("c1", node: "n")
        let readmitted = table.admitted("c1", node: "n")
        #expect(!adopted && !readmitted)
        let removedFirst = table.remove("c1")
        let removedLast = table.remove("c2")
        #expect(removedFirst?.lastOfUser == false)
        #expect(removedLast?.lastOfUser == true)
        #expect(table.userCount == 0)
        #expect(table.openCount == 0)
    }
}
