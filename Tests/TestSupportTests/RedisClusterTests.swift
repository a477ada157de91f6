import Glibc
import TestSupport
import Testing

/// Tests against real Redis Clusters of six `redis-server` processes (3 primaries, 1 replica each); one cluster per
/// test, one test at a time, as a cluster settling keeps a two-core machine busy.
@Suite("RedisCluster", .serialized, .timeLimit(.minutes(3)))
struct RedisClusterTests {
    @Test("start gives 3 primaries and 3 replicas serving all slots; every key is readable; teardown leaves no process")
    func startAndTeardown() async throws {
        let pids = try await RedisCluster.withCluster { cluster in
            let servers = cluster.servers
            #expect(servers.count == 6)
            #expect(Set(servers.map(\.port)).count == 6)
            let primaries = try await cluster.primaries()
            let replicas = try await cluster.replicas()
            #expect(primaries.count == 3)
            #expect(replicas.count == 3)
            #expect(Set((primaries + replicas).map(\.port)) == Set(servers.map(\.port)))
            #expect(cluster.seedURL == "redis+cluster://" + primaries.map(\.address).joined(separator: ","))

            for server in servers {
                let info = try await server.cli("CLUSTER", "INFO")
                #expect(info.contains("cluster_state:ok"), "\(server.address): \(info)")
                #expect(info.contains("cluster_slots_assigned:16384"), "\(server.address): \(info)")
                #expect(info.contains("cluster_known_nodes:6"), "\(server.address): \(info)")
                #expect(try await cluster.nodeID(of: server) == server.cli("CLUSTER", "MYID"))
            }
            for replica in replicas {
                let replication = try await replica.cli("INFO", "replication")
                #expect(replication.contains("role:slave") && replication.contains("master_link_status:up"), "\(replica.address)")
            }

            // Written through every node in turn with redirects followed, read back through another node, and found
            // on the primary that primary(forSlot:) names, without redirects.
            let prefix = uniqueKeyPrefix()
            var owners: Set<Int> = []
            for index in 0..<30 {
                let key = "\(prefix)\(index)"
                #expect(try await servers[index % 6].cli("-c", "SET", key, "value \(index)") == "OK")
                #expect(try await servers[(index + 1) % 6].cli("-c", "GET", key) == "value \(index)")
                let owner = try await cluster.primary(forSlot: RedisCluster.slot(of: key))
                #expect(try await owner.cli("GET", key) == "value \(index)", "\(key) is not on \(owner.address)")
                owners.insert(owner.port)
            }
            #expect(owners == Set(primaries.map(\.port)))
            return servers.compactMap(\.pid)
        }
        #expect(pids.count == 6)
        for pid in pids {
            #expect(isGone(pid), "redis-server \(pid) outlived the cluster")
        }
    }

    @Test("withCluster kills every server when the body throws")
    func withClusterTearsDownOnError() async throws {
        struct Boom: Error {}
        var pids: [Int32] = []
        await #expect(throws: Boom.self) {
            try await RedisCluster.withCluster { cluster in
                pids = cluster.servers.compactMap(\.pid)
                throw Boom()
            }
        }
        #expect(pids.count == 6)
        for pid in pids {
            #expect(isGone(pid), "redis-server \(pid) outlived the cluster")
        }
    }

    @Test("slot(of:) agrees with CLUSTER KEYSLOT, hash tags included")
    func slotsMatchRedis() async throws {
        // The CRC16 (XMODEM) check value: CRC of "123456789" is 0x31C3.
        #expect(RedisCluster.slot(of: "123456789") == 0x31C3)
        #expect(RedisCluster.slot(of: "{user1}:a") == RedisCluster.slot(of: "user1"))
        #expect(RedisCluster.slot(of: "x{y}z") == RedisCluster.slot(of: "y"))
        #expect(RedisCluster.slot(of: "a{}b") != RedisCluster.slot(of: ""))

        let edgeCases = [
            "", "a", "foo", "{user1}:a", "{user1}:b", "user1", "a{}b", "{}{x}", "{}", "{", "}", "}{", "x{y}z", "x{y}z{w}",
            "{{a}}", "a{b{c}d}", "{a", "a}", "{ }", "é", "日本語のキー", "🙂{🙂}", "{🙂}x", "emoji 🙂 key", "tab\tkey",
        ]
        let alphabet = Array("abcXYZ019 :_-{}{}éß日本🙂\t")
        var generator = SystemRandomNumberGenerator()
        let generated = (0..<200).map { _ in
            String((0..<Int.random(in: 1...24, using: &generator)).map { _ in alphabet.randomElement(using: &generator)! })
        }
        try await RedisCluster.withCluster { cluster in
            let servers = cluster.servers
            for (index, key) in (edgeCases + generated).enumerated() {
                let expected = try await servers[index % servers.count].cli("CLUSTER", "KEYSLOT", key)
                #expect(String(RedisCluster.slot(of: key)) == expected, "key \(key.debugDescription)")
            }
        }
    }

    @Test("killPrimary promotes the replica, which serves a key written before the kill")
    func killPrimaryPromotesReplica() async throws {
        try await RedisCluster.withCluster { cluster in
            let key = uniqueKeyPrefix() + "survivor"
            let slot = RedisCluster.slot(of: key)
            let oldPrimary = try await cluster.primary(forSlot: slot)
            let replicasBefore = try await cluster.replicas()
            #expect(try await oldPrimary.cli("SET", key, "kept") == "OK")
            #expect(try await oldPrimary.cli("WAIT", "1", "1000") == "1")
            let oldPID = try #require(oldPrimary.pid)

            let newPrimary = try await cluster.killPrimary(oldPrimary)

            #expect(newPrimary !== oldPrimary)
            #expect(replicasBefore.contains { $0 === newPrimary })
            #expect(oldPrimary.pid == nil)
            #expect(isGone(oldPID))
            #expect(try await newPrimary.cli("ROLE").hasPrefix("master"))
            #expect(try await newPrimary.cli("GET", key) == "kept")
            #expect(try await cluster.primary(forSlot: slot) === newPrimary)
            let primaries = try await cluster.primaries()
            #expect(primaries.count == 3)
            #expect(primaries.contains { $0 === newPrimary } && !primaries.contains { $0 === oldPrimary })
            for server in cluster.servers where server.pid != nil {
                #expect(try await server.cli("CLUSTER", "INFO").contains("cluster_state:ok"), "\(server.address)")
            }
            // Through any survivor, with redirects followed.
            #expect(try await cluster.servers.first { $0.pid != nil && $0 !== newPrimary }?.cli("-c", "GET", key) == "kept")
        }
    }

    @Test("migrateSlot moves a slot's keys; between beginMigration and finishMigration the source answers ASK")
    func migrateSlot() async throws {
        try await RedisCluster.withCluster { cluster in
            // All at once: 250 keys of one slot (a hash tag), more than one batch.
            let tag = "{\(uniqueKeyPrefix())moved}"
            let slot = RedisCluster.slot(of: tag)
            let source = try await cluster.primary(forSlot: slot)
            let target = try #require(try await cluster.primaries().first { $0 !== source })
            let keys = (0..<250).map { "\(tag):\($0)" }
            #expect(try await source.cli(arguments: ["MSET"] + keys.flatMap { [$0, "value of \($0)"] }) == "OK")
            #expect(try await source.cli("CLUSTER", "COUNTKEYSINSLOT", String(slot)) == "250")

            try await cluster.migrateSlot(slot, to: target, keysPerBatch: 100)

            #expect(try await target.cli("CLUSTER", "COUNTKEYSINSLOT", String(slot)) == "250")
            #expect(try await source.cli("CLUSTER", "COUNTKEYSINSLOT", String(slot)) == "0")
            #expect(try await cluster.primary(forSlot: slot) === target)
            for key in [keys[0], keys[99], keys[100], keys[249]] {
                #expect(try await source.cli("GET", key) == "MOVED \(slot) \(target.address)")
                #expect(try await target.cli("GET", key) == "value of \(key)")
            }

            // In two phases: while the slot is migrating, the source serves what it still has and sends new keys on.
            let askTag = "{\(uniqueKeyPrefix())asked}"
            let askSlot = RedisCluster.slot(of: askTag)
            let askSource = try await cluster.primary(forSlot: askSlot)
            let askTarget = try #require(try await cluster.primaries().first { $0 !== askSource })
            let staying = askTag + ":old"
            let arriving = askTag + ":new"
            #expect(try await askSource.cli("SET", staying, "old") == "OK")

            try await cluster.beginMigration(slot: askSlot, to: askTarget)

            #expect(try await askSource.cli("GET", staying) == "old")
            #expect(try await askSource.cli("SET", arriving, "new") == "ASK \(askSlot) \(askTarget.address)")
            #expect(try await askTarget.cli("GET", arriving) == "MOVED \(askSlot) \(askSource.address)")
            #expect(try await askSource.cli("-c", "SET", arriving, "new") == "OK")  // redis-cli follows ASK with ASKING
            #expect(try await askTarget.cli("CLUSTER", "COUNTKEYSINSLOT", String(askSlot)) == "1")
            #expect(try await cluster.primary(forSlot: askSlot) === askSource)

            try await cluster.finishMigration(slot: askSlot, to: askTarget)

            #expect(try await cluster.primary(forSlot: askSlot) === askTarget)
            #expect(try await askTarget.cli("GET", staying) == "old")
            #expect(try await askTarget.cli("GET", arriving) == "new")
            #expect(try await askSource.cli("GET", staying) == "MOVED \(askSlot) \(askTarget.address)")
            let error = await #expect(throws: LocalFleetError.self) { try await cluster.finishMigration(slot: askSlot, to: askSource) }
            #expect(error?.message.contains("beginMigration") == true)
        }
    }

    @Test("reshard moves the source's lowest slots with their keys")
    func reshard() async throws {
        try await RedisCluster.withCluster { cluster in
            let source = try await cluster.primary(forSlot: 0)
            let target = try #require(try await cluster.primaries().first { $0 !== source })
            let prefix = uniqueKeyPrefix()
            let key = try #require((0..<100_000).lazy.map { "\(prefix)\($0)" }.first { RedisCluster.slot(of: $0) < 10 })
            #expect(try await source.cli("SET", key, "resharded") == "OK")

            try await cluster.reshard(slots: 10, from: source, to: target)

            for slot in [0, 9] {
                #expect(try await cluster.primary(forSlot: slot) === target)
            }
            #expect(try await cluster.primary(forSlot: 10) === source)
            #expect(try await target.cli("GET", key) == "resharded")
        }
    }
}

/// Whether `pid` no longer exists (already reaped, so `kill(pid, 0)` fails with `ESRCH`).
private func isGone(_ pid: Int32) -> Bool {
    Glibc.kill(pid, 0) == -1 && errno == ESRCH
}
