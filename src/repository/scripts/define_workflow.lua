-- Stores one version of a workflow definition; versions are immutable.
--
-- KEYS: 1 workflow hash (fields "latest" and "v:<version>"), 2 index of workflows
-- ARGV: 1 workflow id, 2 version, 3 definition JSON
-- Returns "created" | "unchanged" | "exists"

local field = 'v:' .. ARGV[2]
local existing = redis.call('HGET', KEYS[1], field)
if existing then
  if existing == ARGV[3] then
    return 'unchanged'
  end
  return 'exists'
end
redis.call('HSET', KEYS[1], field, ARGV[3], 'latest', ARGV[2])
redis.call('ZADD', KEYS[2], 0, ARGV[1])
return 'created'
