/// Redis Cluster's key → slot mapping: CRC16 (XMODEM) of the key, or of its hash tag, modulo 16,384.
public enum HashSlot {
    /// The number of slots of a Redis Cluster.
    public static let count = 16_384

    /// The slot of `key`: when the key holds a non-empty `{tag}` (the first `{` and the first `}` after it), only the
    /// tag is hashed, so `P:{u:alice}:conns` and `P:{u:alice}:limit` share a slot.
    public static func of<Bytes: Collection<UInt8>>(_ key: Bytes) -> Int where Bytes.Index == Int {
        let hashed: Bytes.SubSequence
        if let open = key.firstIndex(of: UInt8(ascii: "{")),
            let close = key[(open + 1)...].firstIndex(of: UInt8(ascii: "}")), close > open + 1
        {
            hashed = key[(open + 1)..<close]
        } else {
            hashed = key[...]
        }
        return Int(crc16(hashed) & 0x3FFF)
    }

    /// The slot of a text key.
    public static func of(_ key: String) -> Int {
        of(Array(key.utf8))
    }

    /// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as Redis's `crc16.c`.
    static func crc16(_ bytes: some Sequence<UInt8>) -> UInt16 {
        var crc: UInt16 = 0
        for byte in bytes {
            crc = (crc << 8) ^ table[Int(((crc >> 8) ^ UInt16(byte)) & 0xFF)]
        }
        return crc
    }

    private static let table: [UInt16] = (0..<256).map { index in
        var crc = UInt16(index) << 8
        for _ in 0..<8 { crc = crc & 0x8000 != 0 ? (crc << 1) ^ 0x1021 : crc << 1 }
        return crc
    }
}
