-- Compare-and-set of one agent record, with everything that must change with it.
--
-- KEYS: 1 record hash, 2 applied event ids (zset), 3 history (list), 4 liveness timers (zset),
--       5 index of all agents (zset), 6 outbox messages (hash), 7 outbox due times (zset),
--       8 counters (hash), 9.. capability indexes: first those to leave, then those to join,
--       then the waiting indexes (zsets) of the capabilities to look for waiting sessions in
-- ARGV: 1 expected version, 2 record JSON, 3 agent id, 4 event id or "", 5 now (ms),
--       6 forget event ids applied before this (ms), 7 history entry JSON or "",
--       8 history length, 9 liveness deadline (ms) or "", 10 outbox due time (ms),
--       11 capability indexes to leave, 12 capability indexes to join, 13 counters to move,
--       14 waiting indexes to look in, 15 expected incarnation or "" to not check it,
--       16 incarnation to give a record that has none, 17.. counter field and delta, in
--       pairs; then outbox message id and payload, in pairs
-- The incarnation (field `i`) names one life of the record: a record deleted or lost and
-- created again gets a new one, so a version read in its earlier life never matches.
-- Returns {status, version, record JSON, waiting, incarnation}:
--         {"ok", version, "", 1 if a session waits in any of the waiting indexes else 0, i}
--       | {"duplicate", version, "", 0, i}
--       | {"conflict", version, current record JSON or "" when there is none, 0, i}

local stored = redis.call('HMGET', KEYS[1], 'v', 'i')
local current = tonumber(stored[1] or '0')
local incarnation = stored[2] or ''
local event_id = ARGV[4]
if event_id ~= '' and redis.call('ZSCORE', KEYS[2], event_id) then
  return {'duplicate', current, '', 0, incarnation}
end
if current ~= tonumber(ARGV[1]) or (ARGV[15] ~= '' and ARGV[15] ~= incarnation) then
  return {'conflict', current, redis.call('HGET', KEYS[1], 'd') or '', 0, incarnation}
end
if incarnation == '' then
  incarnation = ARGV[16]
end

local version = current + 1
local agent_id = ARGV[3]
redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[2], 'i', incarnation)

if event_id ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], event_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[6])
end

if ARGV[7] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[7])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[8]) - 1)
end

if ARGV[9] ~= '' then
  redis.call('ZADD', KEYS[4], ARGV[9], agent_id)
else
  redis.call('ZREM', KEYS[4], agent_id)
end

redis.call('ZADD', KEYS[5], 0, agent_id)
local leave = tonumber(ARGV[11])
local join = tonumber(ARGV[12])
for i = 1, leave do
  redis.call('ZREM', KEYS[8 + i], agent_id)
end
for i = 1, join do
  redis.call('ZADD', KEYS[8 + leave + i], 0, agent_id)
end

local counters = tonumber(ARGV[13])
for i = 17, 16 + 2 * counters, 2 do
  redis.call('HINCRBY', KEYS[8], ARGV[i], ARGV[i + 1])
end

for i = 17 + 2 * counters, #ARGV, 2 do
  redis.call('HSET', KEYS[6], ARGV[i], ARGV[i + 1])
  redis.call('ZADD', KEYS[7], ARGV[10], ARGV[i])
end

local waiting = 0
for i = 9 + leave + join, 8 + leave + join + tonumber(ARGV[14]) do
  -- ZRANGE rather than EXISTS: the commands a Redis ACL user needs stay the same.
  if redis.call('ZRANGE', KEYS[i], 0, 0)[1] then
    waiting = 1
    break
  end
end

return {'ok', version, '', waiting, incarnation}
