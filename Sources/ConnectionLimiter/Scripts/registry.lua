#!lua flags=no-writes
-- The node registry with the clock of the server that holds it: a denial's cleanup decides which owners are dead by
-- this clock, not by the user's shard (on Redis Cluster the two are different servers whose clocks may differ).
--
-- KEYS[1]  P:nodes   ZSET node id -> lease expiry (ms, Redis clock)
--
-- Returns {now in ms, {id, expiry, id, expiry, …}}.
-- Run by hand: redis-cli --eval registry.lua fg:nodes
local t = redis.call('TIME')
return {tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
