#!lua flags=allow-oom
-- Release one connection: remove its member.
--
-- KEYS[1]  P:{u:<user>}:conns
-- KEYS[2]  P:{u:<user>}:since
-- ARGV[1]  member "<node>:<conn>"
--
-- Returns 1 when the member was present, 0 otherwise (already released, expired or purged).
-- Run by hand: redis-cli --eval release.lua fg:{u:alice}:conns fg:{u:alice}:since , n1:c1
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
