/// Where a command goes in a Redis Cluster, from its name and the positions of its keys.
enum CommandRoute: Equatable, Sendable {
    /// Every key of the command is in this slot.
    case slot(Int)
    /// The command names no key (`PING`, `TIME`, `INFO`, an `EVALSHA` with no keys): any primary answers it.
    case anyNode
    /// The keys span several slots: Redis would answer `CROSSSLOT`, so the client refuses it before sending.
    case crossSlot(keys: [String], slots: [Int])

    private static let keyless: Set<String> = [
        "PING", "ECHO", "INFO", "TIME", "SCRIPT", "CLUSTER", "CONFIG", "CLIENT", "DBSIZE", "COMMAND", "WAIT", "ROLE", "DEBUG",
        "SLOWLOG", "LATENCY", "PUBLISH", "SUBSCRIBE", "PSUBSCRIBE", "UNSUBSCRIBE", "PUNSUBSCRIBE", "PUBSUB", "SCAN", "KEYS",
        "RANDOMKEY", "READONLY", "READWRITE", "ASKING", "AUTH", "HELLO", "SELECT", "FLUSHALL", "FLUSHDB", "LASTSAVE", "SAVE",
        "BGSAVE", "BGREWRITEAOF", "FUNCTION", "MULTI", "EXEC", "DISCARD", "QUIT", "RESET", "ACL", "MODULE", "SHUTDOWN",
        "SWAPDB", "FAILOVER", "REPLICAOF", "SLAVEOF", "MONITOR", "LOLWUT",
    ]
    /// Commands whose every argument is a key.
    private static let allKeys: Set<String> = [
        "DEL", "UNLINK", "EXISTS", "MGET", "TOUCH", "WATCH", "SINTER", "SUNION", "SDIFF", "SINTERSTORE", "SUNIONSTORE",
        "SDIFFSTORE", "PFCOUNT", "PFMERGE", "SSUBSCRIBE", "SUNSUBSCRIBE",
    ]
    /// Commands whose first two arguments are keys.
    private static let twoKeys: Set<String> = ["RENAME", "RENAMENX", "RPOPLPUSH", "LMOVE", "SMOVE", "COPY", "BLMOVE", "BRPOPLPUSH"]
    private static let scripts: Set<String> = ["EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"]

    /// The route of `command`; every key-bearing command not listed has its key first (`GET`, `ZADD`, `SPUBLISH`, …).
    init(_ command: RedisCommand) {
        let name = command.name.uppercased()
        let count = command.argumentCount
        let positions: [Int]
        if Self.keyless.contains(name) || count == 0 {
            positions = []
        } else if Self.scripts.contains(name) {
            let keys = count >= 2 ? Int(String(decoding: command.argument(1), as: UTF8.self)) ?? 0 : 0
            positions = keys > 0 ? Array(2..<min(count, 2 + keys)) : []
        } else if Self.allKeys.contains(name) {
            positions = Array(0..<count)
        } else if Self.twoKeys.contains(name) {
            positions = Array(0..<min(count, 2))
        } else if name == "MSET" || name == "MSETNX" {
            positions = Array(stride(from: 0, to: count, by: 2))
        } else if name == "MEMORY" || name == "OBJECT" || name == "XINFO" {
            // MEMORY USAGE key, OBJECT ENCODING key, XINFO STREAM key.
            positions = count >= 2 ? [1] : []
        } else {
            positions = [0]
        }
        guard let first = positions.first else {
            self = .anyNode
            return
        }
        let slot = HashSlot.of(command.argument(first))
        var slots = [slot]
        for position in positions.dropFirst() {
            let other = HashSlot.of(command.argument(position))
            if !slots.contains(other) { slots.append(other) }
        }
        if slots.count == 1 {
            self = .slot(slot)
        } else {
            self = .crossSlot(keys: positions.map { String(decoding: command.argument($0), as: UTF8.self) }, slots: slots)
        }
    }
}
