#!lua flags=allow-oom
-- A node's heartbeat. Never revives an expired or missing node: it must re-register under a new id.
--
-- KEYS[1]  P:nodes   ZSET member <node>, score = node lease expiry (ms, Redis clock)
-- ARGV[1]  node id
-- ARGV[2]  node TTL in ms
-- ARGV[3]  "register" to add the node (a new incarnation), "beat" to extend an existing lease, "revive" to extend it
--          even if Redis's clock says it ran out, or put it back if the jump expired the registry key or a peer swept
--          it: sent only by a node whose own monotonic clock says its lease is current, right after Redis's clock
--          jumped forward (its renewal puts its entries back at once)
--
-- Returns {status, now, live, expired node ids…}: status 1 = lease extended (or registered), 0 = unknown node,
-- -1 = lease expired; live = how many nodes hold a current lease (the local fallback's share of a limit is
-- ceil(limit / live)). The expired ids (at most 1000) are nodes whose lease ran out and are not swept yet.
-- Run by hand: redis-cli --eval heartbeat.lua fg:nodes , k3Xq9aZ2 5000 register
local nodes, node, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local status = 1
if ARGV[3] == "register" then
  if redis.call('ZADD', nodes, 'NX', now + ttl, node) == 0 then status = 0 end
else
  local score = redis.call('ZSCORE', nodes, node)
  if ARGV[3] == "revive" then
    redis.call('ZADD', nodes, now + ttl, node)
  elseif not score then
    status = 0
  elseif tonumber(score) <= now then
    status = -1
  else
    redis.call('ZADD', nodes, 'XX', now + ttl, node)
  end
end
-- The registry outlives its last live node by a few TTLs, so a fleet that stops entirely leaves no key behind.
if status == 1 then redis.call('PEXPIRE', nodes, ttl * 3) end
local result = {status, now, redis.call('ZCOUNT', nodes, '(' .. now, '+inf')}
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now, 'LIMIT', 0, 1000)) do
  result[#result + 1] = dead
end
return result
