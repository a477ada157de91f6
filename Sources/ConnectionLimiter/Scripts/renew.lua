#!lua flags=allow-oom
-- Renew the leases of one node's open connections of one user; re-add members that are missing (lost in a Redis
-- restart or failover) while the user is under the limit (in dry run: always), oldest first.
--
-- KEYS[1]  P:{u:<user>}:conns
-- KEYS[2]  P:{u:<user>}:limit
-- KEYS[3]  P:{u:<user>}:since
-- KEYS[4]  P:{u:<user>}:kicked   ZSET of kicked members (kick.lua, admit.lua's evictions): never renewed or re-added
-- ARGV[1]  lease TTL in ms
-- ARGV[2]  limit to apply when KEYS[2] is absent
-- ARGV[3]  overflow policy: "reject" or "evict" (then "since" is kept too)
-- ARGV[4]  "1" = dry run: re-add missing members even over the limit (a dry run never closes a connection)
-- ARGV[5]  n = how many dead node ids follow (this node's earlier incarnations, expired nodes)
-- ARGV[6…5+n]  dead node ids: their members are dropped before counting
-- ARGV[6+n…]   members "<node>:<conn>", oldest admission first (at most a few thousand per call)
--
-- Returns {renewed, readded, lost…, "|", readded…, "|", kicked…}: lost members could not be re-added (the user is at
-- the limit) and their owner must close them; re-added ones are listed after the first "|" so the owner can check
-- they are still open; kicked ones (removed again if a renewal had re-added them) must be closed as kicked.
-- Run by hand: redis-cli --eval renew.lua fg:{u:alice}:conns fg:{u:alice}:limit fg:{u:alice}:since fg:{u:alice}:kicked , 30000 20 reject 0 0 n1:c1
local conns, limitKey, sinceKey, kickedKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, policy, dryRun = tonumber(ARGV[1]), ARGV[3], ARGV[4] == "1"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + ttl
redis.call('ZREMRANGEBYSCORE', conns, '-inf', now)
local limit = tonumber(ARGV[2])
local override = tonumber(redis.call('GET', limitKey) or '')
if override and override == override and override >= 0 and override <= 1000000 and override == math.floor(override) then
  limit = override
end
local deadCount = tonumber(ARGV[5])
local members = {}
local kicked = {}
for i = 6 + deadCount, #ARGV do members[#members + 1] = ARGV[i] end
local result = {0, 0}
if #members == 0 then return result end
if redis.call('EXISTS', kickedKey) == 1 then
  local marks = redis.call('ZMSCORE', kickedKey, unpack(members))
  local kept = {}
  for i, member in ipairs(members) do
    if marks[i] and tonumber(marks[i]) > now then
      redis.call('ZREM', conns, member)
      redis.call('ZREM', sinceKey, member)
      kicked[#kicked + 1] = member
    else
      kept[#kept + 1] = member
    end
  end
  members = kept
end
local count = redis.call('ZCARD', conns)
if deadCount > 0 and count >= limit then
  local dead = {}
  for i = 6, 5 + deadCount do dead[ARGV[i]] = true end
  for _, m in ipairs(redis.call('ZRANGE', conns, 0, -1)) do
    local node = string.match(m, '^([^:]*):')
    if node and dead[node] then
      redis.call('ZREM', conns, m)
      redis.call('ZREM', sinceKey, m)
    end
  end
  count = redis.call('ZCARD', conns)
end
local scores = #members > 0 and redis.call('ZMSCORE', conns, unpack(members)) or {}
local readded = {}
for i, member in ipairs(members) do
  if scores[i] then
    redis.call('ZADD', conns, 'XX', expiry, member)
    result[1] = result[1] + 1
  elseif count < limit or dryRun then
    redis.call('ZADD', conns, expiry, member)
    if policy == "evict" then redis.call('ZADD', sinceKey, 'NX', now, member) end
    count = count + 1
    result[2] = result[2] + 1
    readded[#readded + 1] = member
  else
    result[#result + 1] = member
  end
end
redis.call('PEXPIRE', conns, ttl)
if policy == "evict" then redis.call('PEXPIRE', sinceKey, ttl) end
result[#result + 1] = "|"
for _, member in ipairs(readded) do result[#result + 1] = member end
result[#result + 1] = "|"
for _, member in ipairs(kicked) do result[#result + 1] = member end
return result
