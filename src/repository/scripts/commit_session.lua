-- Compare-and-set of one session together with the agent records whose leases it changes,
-- and everything that must change with them.
--
-- KEYS: 1 session hash, 2 index of all sessions, 3 index of active sessions, 4 timers (zset),
--       5 timer data (hash), 6 outbox messages (hash), 7 outbox due times (zset),
--       8 applied event ids of the reporting agent (zset), 9 idempotency key, 10 counters (hash),
--       11 agent liveness timers (zset),
--       12.. agent hashes, then waiting indexes to leave, then waiting indexes to join, then
--       waiting indexes to look in
-- ARGV: 1 expected session version, 2 session JSON, 3 session id, 4 "1" when ended,
--       5 event id or "", 6 now (ms), 7 forget event ids applied before this (ms),
--       8 idempotency key lifetime (s), 9 "1" to claim the idempotency key,
--       10 agents, 11 waiting indexes to leave, 12 to join, 13 timers to set, 14 to clear,
--       15 outbox messages, 16 outbox due time (ms), 17 counters to move,
--       18 agent heard from or "", 19 its liveness deadline (ms), 20 waiting indexes to look in,
--       21.. per agent: expected version, expected incarnation or "" to not check it, record
--            JSON;
--            timers to clear: key; timers to set: key, due (ms), JSON;
--            outbox: message id, payload; counters: field, delta
-- Returns {status, session id or "", waiting}:
--         {"ok", "", 1 if a session waits in any of the waiting indexes to look in else 0}
--       | {"duplicate", "", 0} | {"key_taken", session id, 0} | {"conflict", "", 0}

local function version(key)
  return tonumber(redis.call('HGET', key, 'v') or '0')
end

-- Whether the agent record is still the one read: the same version and, when the change names
-- one, the same incarnation (see commit_agent.lua).
local function unchanged(key, expected_version, expected_incarnation)
  local stored = redis.call('HMGET', key, 'v', 'i')
  return tonumber(stored[1] or '0') == tonumber(expected_version)
    and (expected_incarnation == '' or expected_incarnation == (stored[2] or ''))
end

local agents = tonumber(ARGV[10])
local leave = tonumber(ARGV[11])
local join = tonumber(ARGV[12])
local set = tonumber(ARGV[13])
local clear = tonumber(ARGV[14])
local outbox = tonumber(ARGV[15])
local session_id = ARGV[3]
local event_id = ARGV[5]

if event_id ~= '' and redis.call('ZSCORE', KEYS[8], event_id) then
  return {'duplicate', '', 0}
end
if ARGV[9] == '1' then
  local owner = redis.call('GET', KEYS[9])
  if owner then
    return {'key_taken', owner, 0}
  end
end
if version(KEYS[1]) ~= tonumber(ARGV[1]) then
  return {'conflict', '', 0}
end
for i = 1, agents do
  if not unchanged(KEYS[11 + i], ARGV[18 + 3 * i], ARGV[19 + 3 * i]) then
    return {'conflict', '', 0}
  end
end

redis.call('HSET', KEYS[1], 'v', tonumber(ARGV[1]) + 1, 'd', ARGV[2])
redis.call('ZADD', KEYS[2], 0, session_id)
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[3], session_id)
else
  redis.call('ZADD', KEYS[3], 0, session_id)
end
for i = 1, agents do
  redis.call('HSET', KEYS[11 + i], 'v', tonumber(ARGV[18 + 3 * i]) + 1, 'd', ARGV[20 + 3 * i])
end
if ARGV[18] ~= '' then
  redis.call('ZADD', KEYS[11], ARGV[19], ARGV[18])
end

if event_id ~= '' then
  redis.call('ZADD', KEYS[8], ARGV[6], event_id)
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', '(' .. ARGV[7])
end
if ARGV[9] == '1' then
  redis.call('SET', KEYS[9], session_id, 'EX', tonumber(ARGV[8]))
end

for i = 1, leave do
  redis.call('ZREM', KEYS[11 + agents + i], session_id)
end
for i = 1, join do
  redis.call('ZADD', KEYS[11 + agents + leave + i], 'NX', ARGV[6], session_id)
end

-- Clear before set: a progress report re-arms a lease timer under the same key.
local p = 21 + 3 * agents
for _ = 1, clear do
  redis.call('ZREM', KEYS[4], ARGV[p])
  redis.call('HDEL', KEYS[5], ARGV[p])
  p = p + 1
end
for _ = 1, set do
  redis.call('ZADD', KEYS[4], ARGV[p + 1], ARGV[p])
  redis.call('HSET', KEYS[5], ARGV[p], ARGV[p + 2])
  p = p + 3
end
for _ = 1, outbox do
  redis.call('HSET', KEYS[6], ARGV[p], ARGV[p + 1])
  redis.call('ZADD', KEYS[7], ARGV[16], ARGV[p])
  p = p + 2
end
for _ = 1, tonumber(ARGV[17]) do
  redis.call('HINCRBY', KEYS[10], ARGV[p], ARGV[p + 1])
  p = p + 2
end

local waiting = 0
for i = 12 + agents + leave + join, 11 + agents + leave + join + tonumber(ARGV[20]) do
  -- ZRANGE rather than EXISTS, as in commit_agent.lua.
  if redis.call('ZRANGE', KEYS[i], 0, 0)[1] then
    waiting = 1
    break
  end
end

return {'ok', '', waiting}
