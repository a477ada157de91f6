#!lua
-- Renew the leases of one node's open connections of one user; re-add members that are missing (lost in a Redis
-- restart or failover) while the user is under the limit, oldest first.
--
-- KEYS[1]  P:{u:<user>}:conns
-- KEYS[2]  P:{u:<user>}:limit
-- KEYS[3]  P:{u:<user>}:since
-- ARGV[1]  lease TTL in ms
-- ARGV[2]  limit to apply when KEYS[2] is absent
-- ARGV[3]  overflow policy: "reject" or "evict" (then "since" is kept too)
-- ARGV[4…] members "<node>:<conn>", oldest admission first
--
-- Returns {renewed, readded, lost…}: lost members could not be re-added (the user is at the limit); their
-- owner must close them.
-- Run by hand: redis-cli --eval renew.lua fg:{u:alice}:conns fg:{u:alice}:limit fg:{u:alice}:since , 30000 20 reject n1:c1
local conns, limitKey, sinceKey = KEYS[1], KEYS[2], KEYS[3]
local ttl, policy = tonumber(ARGV[1]), ARGV[3]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + ttl
redis.call('ZREMRANGEBYSCORE', conns, '-inf', now)
local limit = tonumber(redis.call('GET', limitKey) or ARGV[2]) or tonumber(ARGV[2])
local members = {}
for i = 4, #ARGV do members[#members + 1] = ARGV[i] end
local result = {0, 0}
if #members == 0 then return result end
local scores = redis.call('ZMSCORE', conns, unpack(members))
local count = redis.call('ZCARD', conns)
for i, member in ipairs(members) do
  if scores[i] then
    redis.call('ZADD', conns, 'XX', expiry, member)
    result[1] = result[1] + 1
  elseif count < limit then
    redis.call('ZADD', conns, expiry, member)
    if policy == "evict" then redis.call('ZADD', sinceKey, 'NX', now, member) end
    count = count + 1
    result[2] = result[2] + 1
  else
    result[#result + 1] = member
  end
end
redis.call('PEXPIRE', conns, ttl)
if policy == "evict" then redis.call('PEXPIRE', sinceKey, ttl) end
return result
