#!lua flags=allow-oom
-- Kick members of one user: remove them and leave a marker, so the owner's lease renewal never re-adds them (it
-- answers them to their owner as kicked instead, and the owner closes the connection even if the kick message
-- never reached it).
--
-- KEYS[1]  P:{u:<user>}:conns
-- KEYS[2]  P:{u:<user>}:since
-- KEYS[3]  P:{u:<user>}:kicked   ZSET member -> marker expiry (ms, Redis clock)
-- ARGV[1]  marker lifetime in ms (longer than any node's renewal interval)
-- ARGV[2…] members "<node>:<conn>"
--
-- Returns the number of members removed from KEYS[1].
-- Run by hand: redis-cli --eval kick.lua fg:{u:alice}:conns fg:{u:alice}:since fg:{u:alice}:kicked , 60000 n1:c1
local conns, sinceKey, kicked, ttl = KEYS[1], KEYS[2], KEYS[3], tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', kicked, '-inf', now)
local removed = 0
for i = 2, #ARGV do
  removed = removed + redis.call('ZREM', conns, ARGV[i])
  redis.call('ZREM', sinceKey, ARGV[i])
  redis.call('ZADD', kicked, now + ttl, ARGV[i])
end
redis.call('PEXPIRE', kicked, ttl)
return removed
