#!lua
-- Admit one connection of one user, atomically.
--
-- KEYS[1]  P:{u:<user>}:conns   ZSET member "<node>:<conn>", score = lease expiry (ms, Redis clock)
-- KEYS[2]  P:{u:<user>}:limit   STRING optional per-user override of the limit
-- KEYS[3]  P:{u:<user>}:since   ZSET member -> admission time (ms); maintained only with ARGV[4] = "evict" or "yield"
-- KEYS[4]  P:{u:<user>}:kicked  ZSET member -> marker expiry (ms): evicted members are marked there, so their owner's
--          renewal never re-adds them (kick.lua does the same for operator kicks); marked for 2 × the lease TTL
-- ARGV[1]  member "<node>:<conn>"
-- ARGV[2]  limit to apply when KEYS[2] is absent (the caller's default or token claim)
-- ARGV[3]  lease TTL in ms
-- ARGV[4]  overflow policy: "reject", "evict" (evict the oldest admitted entry), or "yield" (a re-admission under
--          evict-oldest: admission times kept as with "evict", but at the limit it is denied as with "reject")
-- ARGV[5]  "1" = dry run: always admit, report what the limit would have decided
-- ARGV[6]  the member this connection was held under before ("" if none): a re-admission after a lease loss. If
--          it is marked kicked, the connection was kicked while its node was away: answered with status 5. Otherwise
--          its entry (if a renewal under the old id put it back) is replaced, keeping its admission time: one socket
--          is never counted twice
-- ARGV[7…] node ids the caller knows are dead; their members are dropped when the user is at the limit
--
-- Returns {status, count, limit, now, expiredRemoved, deadRemoved, extra…}
--   status 1 = admitted, 2 = admitted after evicting the oldest (extra = evicted members, oldest first),
--          3 = already admitted (lease refreshed), 0 = denied (extra = current holders, "<member>|<expiry ms>")
--          4 = dry run: admitted although the limit would have denied
--          5 = not admitted: ARGV[6] is marked kicked (the caller closes the connection)
-- Run by hand: redis-cli --eval admit.lua fg:{u:alice}:conns fg:{u:alice}:limit fg:{u:alice}:since fg:{u:alice}:kicked , n1:c1 20 30000 reject 0 ""
local conns, limitKey, sinceKey, kickedKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local member, ttl, policy, dryRun = ARGV[1], tonumber(ARGV[3]), ARGV[4], ARGV[5] == "1"
local keepSince = policy == "evict" or policy == "yield"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + ttl

-- An override counts only when it is an integer 0…1000000; anything else (nan, inf, 2.5, garbage) is ignored.
local limit = tonumber(ARGV[2])
local override = tonumber(redis.call('GET', limitKey) or '')
if override and override == override and override >= 0 and override <= 1000000 and override == math.floor(override) then
  limit = override
end

-- The common admission (reject policy, no earlier member) under the limit: ZCARD, then ZADD, whose reply tells a new
-- member from a lease refresh (no ZSCORE); expired entries change no decision below the limit, so they are only
-- removed at it (below, and by the owners' renewals). TIME, GET, ZCARD, ZADD, PEXPIRE: 5 calls instead of 7, and a
-- denial still writes nothing but the expired entries' removal.
if not keepSince and (ARGV[6] == nil or ARGV[6] == "") then
  local present = redis.call('ZCARD', conns)
  if present < limit then
    local added = redis.call('ZADD', conns, expiry, member)
    redis.call('PEXPIRE', conns, ttl)
    if added == 0 then return {3, present, limit, now, 0, 0} end
    return {1, present + 1, limit, now, 0, 0}
  end
end

local expired = redis.call('ZREMRANGEBYSCORE', conns, '-inf', now)
if expired > 0 and keepSince then
  -- Keep "since" to the members still present (it is small: at most the limit).
  for _, m in ipairs(redis.call('ZRANGE', sinceKey, 0, -1)) do
    if not redis.call('ZSCORE', conns, m) then redis.call('ZREM', sinceKey, m) end
  end
end

local previous = ARGV[6]
if previous and previous ~= "" then
  local mark = redis.call('ZSCORE', kickedKey, previous)
  if mark and tonumber(mark) > now then
    return {5, redis.call('ZCARD', conns), limit, now, expired, 0}
  end
end
local admittedAt = now
if previous and previous ~= "" and previous ~= member and redis.call('ZREM', conns, previous) == 1 and keepSince then
  admittedAt = tonumber(redis.call('ZSCORE', sinceKey, previous)) or now
  redis.call('ZREM', sinceKey, previous)
end

if redis.call('ZSCORE', conns, member) then
  redis.call('ZADD', conns, expiry, member)
  redis.call('PEXPIRE', conns, ttl)
  return {3, redis.call('ZCARD', conns), limit, now, expired, 0}
end

local count = redis.call('ZCARD', conns)
local deadRemoved = 0
if count >= limit and #ARGV > 6 then
  local dead = {}
  for i = 7, #ARGV do dead[ARGV[i]] = true end
  for _, m in ipairs(redis.call('ZRANGE', conns, 0, -1)) do
    local node = string.match(m, '^([^:]*):')
    if node and dead[node] then
      redis.call('ZREM', conns, m)
      if keepSince then redis.call('ZREM', sinceKey, m) end
      deadRemoved = deadRemoved + 1
    end
  end
  count = count - deadRemoved
end

local function add()
  redis.call('ZADD', conns, expiry, member)
  redis.call('PEXPIRE', conns, ttl)
  if keepSince then
    redis.call('ZADD', sinceKey, admittedAt, member)
    redis.call('PEXPIRE', sinceKey, ttl)
  end
end

if count < limit then
  add()
  return {1, count + 1, limit, now, expired, deadRemoved}
end
if dryRun then
  add()
  return {4, count + 1, limit, now, expired, deadRemoved}
end
if policy == "evict" and limit > 0 then
  -- Evict the oldest admitted entries still present, as many as needed to get under the limit (more than one when
  -- the limit was lowered). "since" may hold members that expired meanwhile: skip and drop those.
  local evicted = {}
  while count >= limit do
    local oldest = redis.call('ZRANGE', sinceKey, 0, 0)[1]
    if oldest then
      redis.call('ZREM', sinceKey, oldest)
      if redis.call('ZREM', conns, oldest) == 1 then
        count = count - 1
        evicted[#evicted + 1] = oldest
      end
    else
      -- No admission times (entries written under the reject policy): evict the entry whose lease ends first.
      oldest = redis.call('ZRANGE', conns, 0, 0)[1]
      redis.call('ZREM', conns, oldest)
      count = count - 1
      evicted[#evicted + 1] = oldest
    end
  end
  add()
  redis.call('ZREMRANGEBYSCORE', kickedKey, '-inf', now)
  for _, m in ipairs(evicted) do redis.call('ZADD', kickedKey, now + 2 * ttl, m) end
  redis.call('PEXPIRE', kickedKey, 2 * ttl)
  local result = {2, count + 1, limit, now, expired, deadRemoved}
  for _, m in ipairs(evicted) do result[#result + 1] = m end
  return result
end
local result = {0, count, limit, now, expired, deadRemoved}
local holders = redis.call('ZRANGE', conns, 0, -1, 'WITHSCORES')
for i = 1, #holders, 2 do
  result[#result + 1] = holders[i] .. '|' .. holders[i + 1]
end
return result
