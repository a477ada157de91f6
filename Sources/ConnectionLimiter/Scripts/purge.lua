#!lua flags=allow-oom
-- Remove every member of one user that belongs to the given nodes (dead nodes, or the caller's own stale members).
--
-- KEYS[1]  P:{u:<user>}:conns
-- KEYS[2]  P:{u:<user>}:since
-- ARGV[1]  "node" to remove all members of these node ids (ARGV[2…]),
--          or "members" to remove exactly the members ARGV[2…]
--
-- Returns the number of members removed.
-- Run by hand: redis-cli --eval purge.lua fg:{u:alice}:conns fg:{u:alice}:since , node deadnode1
local conns, sinceKey = KEYS[1], KEYS[2]
local removed = 0
if ARGV[1] == "members" then
  for i = 2, #ARGV do
    removed = removed + redis.call('ZREM', conns, ARGV[i])
    redis.call('ZREM', sinceKey, ARGV[i])
  end
  return removed
end
local nodes = {}
for i = 2, #ARGV do nodes[ARGV[i]] = true end
for _, member in ipairs(redis.call('ZRANGE', conns, 0, -1)) do
  local node = string.match(member, '^([^:]*):')
  if node and nodes[node] then
    removed = removed + redis.call('ZREM', conns, member)
    redis.call('ZREM', sinceKey, member)
  end
end
return removed
