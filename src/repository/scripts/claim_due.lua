-- Claims the members of a timer zset that are due, pushing their score to the claim deadline
-- so that other workers skip them until then.
--
-- KEYS: 1 timer zset
-- ARGV: 1 now (ms), 2 claim deadline (ms), 3 limit
-- Returns the claimed members.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[2], member)
end
return due
