#!lua flags=allow-oom
-- Take, keep or release the sweeper lock: only its holder sweeps dead nodes.
--
-- KEYS[1]  P:sweeper   STRING holder node id, with a TTL
-- ARGV[1]  this node's id
-- ARGV[2]  lock TTL in ms, or "release" to give the lock up (only if this node holds it)
--
-- Returns 1 when this node holds the lock (taken or extended; released: 1 if it held it), 0 otherwise.
-- Run by hand: redis-cli --eval sweeper-lock.lua fg:sweeper , k3Xq9aZ2 3000
local holder = redis.call('GET', KEYS[1])
if ARGV[2] == "release" then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
    return 1
  end
  return 0
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
