#!lua flags=no-writes
-- registry.lua: the node registry with this server's clock, for a denial's dead-owner check.
--
-- KEYS[1]  P:nodes   ZSET member <node>, score = node lease expiry (ms, Redis clock)
--
-- Returns {now, {id, expiry, id, expiry, …}}: now in ms by the clock that wrote the scores. On Redis Cluster the
-- user's shard (where the admission ran) and the registry's shard may be different servers with different clocks.
-- Run by hand: redis-cli --eval registry.lua fg:nodes
local t = redis.call('TIME')
return {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
