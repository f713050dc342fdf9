"""The store's two writes, each one Lua script: atomic, so a record and its log entry, index and
counters land together or not at all (what "acknowledged" rests on).

Sent by SHA (EVALSHA) with the source as fallback; the SHA is computed here once.
"""

from __future__ import annotations

import hashlib

# KEYS: 1 completion hash, 2 completion stream, 3 stats, 4.. response index keys
# ARGV: 1 completion id, 2 record JSON, 3 ttl (0 = none), 4 stream maxlen (0 = none),
#       5.. response ids (same order as KEYS 4..)
LOG_COMPLETION_LUA = """
redis.replicate_commands()
local existing = redis.call('HGET', KEYS[1], 'record')
if existing then
  if existing == ARGV[2] then return {'DUP'} end
  return {'CONFLICT'}
end
local n = #KEYS - 3
for i = 1, n do
  local other = redis.call('GET', KEYS[3 + i])
  if other then return {'RESP_TAKEN', ARGV[4 + i], other} end
end
local fields = {'record', ARGV[2]}
for i = 1, n do
  fields[#fields + 1] = 'r:' .. ARGV[4 + i]
  fields[#fields + 1] = tostring(i - 1)
end
redis.call('HSET', KEYS[1], unpack(fields))
local ttl = tonumber(ARGV[3])
for i = 1, n do
  if ttl > 0 then
    redis.call('SET', KEYS[3 + i], ARGV[1], 'EX', ttl)
  else
    redis.call('SET', KEYS[3 + i], ARGV[1])
  end
end
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
local maxlen = tonumber(ARGV[4])
if maxlen > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'completion_id', ARGV[1])
else
  redis.call('XADD', KEYS[2], '*', 'completion_id', ARGV[1])
end
redis.call('HINCRBY', KEYS[3], 'completions', 1)
return {'OK'}
"""

# KEYS: 1 feedback hash, 2 idempotency hash (= KEYS[1] when no key), 3 the user's rate counter,
#       4 feedback stream, 5 stats, 6.. referenced keys (ranking: completion hash;
#       comparison: chosen's and rejected's response index keys; rating: the response's),
#       last: the principal's rate counter
# ARGV: 1 settings "<rate limit> <window s> <ttl s> <stream maxlen> <principal rate limit>
#       <response key prefix>" (0 = off), 2 JSON [kind, feedback id, user id, idempotency key
#       or "", created_at, principal], 3 data JSON (the kind-specific fields, stored verbatim)
# Few, packed arguments: packing each argument is most of the client's cost per write.
SUBMIT_FEEDBACK_LUA = """
redis.replicate_commands()
local limit, window, ttl, maxlen, plimit, rprefix =
  string.match(ARGV[1], '^(%d+) (%d+) (%d+) (%d+) (%d+) (.*)$')
limit, window, ttl, maxlen = tonumber(limit), tonumber(window), tonumber(ttl), tonumber(maxlen)
plimit = tonumber(plimit)
local meta = cjson.decode(ARGV[2])
local kind, fid, user, ikey, now, principal = meta[1], meta[2], meta[3], meta[4], meta[5], meta[6]
local pkey = KEYS[#KEYS]
local data = ARGV[3]
local digest = redis.sha1hex(kind .. '\\n' .. data)
if ikey ~= '' then
  local prev = redis.call('HMGET', KEYS[2], 'feedback_id', 'created_at', 'digest',
                          'completion_id')
  if prev[1] then
    if prev[3] == digest then return {'DUP', prev[1], prev[2], prev[4]} end
    return {'CONFLICT', prev[1]}
  end
else
  -- no key from the caller: only a retry of this very write (same feedback id) can exist
  local prev = redis.call('HMGET', KEYS[1], 'created_at', 'completion_id')
  if prev[1] then return {'DUP', fid, prev[1], prev[2]} end
end
local d = cjson.decode(data)
local cid
if kind == 'ranking' then
  cid = d.completion_id
  if redis.call('EXISTS', KEYS[6]) == 0 then
    return {'NOTFOUND', 'completion ' .. cid .. ' is unknown (never logged, or expired)'}
  end
  local ids = d.response_ids
  local fields = {}
  for i = 1, #ids do fields[i] = 'r:' .. ids[i] end
  local idx = redis.call('HMGET', KEYS[6], unpack(fields))
  for i = 1, #ids do
    if not idx[i] then
      local other = redis.call('GET', rprefix .. ids[i])
      if other then
        return {'INVALID', 'response ' .. ids[i] .. ' belongs to completion ' .. other ..
                ', not to ' .. cid .. '; a ranking orders responses of one completion'}
      end
      return {'NOTFOUND', 'response ' .. ids[i] .. ' is unknown (never logged, or expired)'}
    end
  end
elseif kind == 'comparison' then
  local a = redis.call('GET', KEYS[6])
  if not a then
    return {'NOTFOUND', 'response ' .. d.chosen_response_id ..
            ' is unknown (never logged, or expired)'}
  end
  local b = redis.call('GET', KEYS[7])
  if not b then
    return {'NOTFOUND', 'response ' .. d.rejected_response_id ..
            ' is unknown (never logged, or expired)'}
  end
  if a ~= b then
    return {'INVALID', 'responses ' .. d.chosen_response_id .. ' (completion ' .. a ..
            ') and ' .. d.rejected_response_id .. ' (completion ' .. b .. ') belong to ' ..
            'different completions; a comparison judges two responses of one completion'}
  end
  cid = a
else
  cid = redis.call('GET', KEYS[6])
  if not cid then
    return {'NOTFOUND', 'response ' .. d.response_id .. ' is unknown (never logged, or expired)'}
  end
end
if limit > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= limit then return {'RATE', tostring(used)} end
end
if plimit > 0 then
  local used = tonumber(redis.call('GET', pkey) or '0')
  if used >= plimit then return {'PRATE', tostring(used)} end
end
redis.call('HSET', KEYS[1], 'feedback_id', fid, 'kind', kind, 'user_id', user,
           'idempotency_key', ikey, 'completion_id', cid, 'created_at', now, 'data', data,
           'principal', principal)
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
if ikey ~= '' then
  redis.call('HSET', KEYS[2], 'feedback_id', fid, 'created_at', now, 'digest', digest,
             'completion_id', cid)
  if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
end
if maxlen > 0 then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', 'feedback_id', fid, 'kind', kind,
             'completion_id', cid)
else
  redis.call('XADD', KEYS[4], '*', 'feedback_id', fid, 'kind', kind, 'completion_id', cid)
end
redis.call('HINCRBY', KEYS[5], 'feedback:' .. kind, 1)
if limit > 0 then
  if redis.call('INCR', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], 2 * window) end
end
if plimit > 0 then
  if redis.call('INCR', pkey) == 1 then redis.call('EXPIRE', pkey, 2 * window) end
end
return {'OK', cid}
"""


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


LOG_SHA = sha1(LOG_COMPLETION_LUA)
FEEDBACK_SHA = sha1(SUBMIT_FEEDBACK_LUA)
