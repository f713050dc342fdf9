"""The labelling queue's writes, each one Lua script (feedback/tasks.py): atomic, so no task is
leased twice, a lapsed lease returns its task exactly once and a label is counted once.

Every script that hands out or reads tasks first brings the queue up to date (`REFRESH`): new
entries of the completion log with at least `min_n` responses become tasks (a cursor key remembers
how far the log was read, and an existing task is never made again), and leases whose time is up
go back to the queue. The scripts build task, seen and completion keys from prefixes given as
arguments (feedback/keys.py spells them), so the queue needs a single Redis, as the store does.

Times are integer milliseconds (`now` comes from the caller, so one clock decides a lease).
"""

from __future__ import annotations

# Shared by every script: the settings (ARGV[1], JSON), the queue's refresh, the lease check.
# Settings: task_prefix, seen_prefix, cmpl_prefix, now, and per script more (see each).
_PRELUDE = """
redis.replicate_commands()
local cfg = cjson.decode(ARGV[1])
local now = tonumber(cfg.now)
local tp, sp, cp = cfg.task_prefix, cfg.seen_prefix, cfg.cmpl_prefix

local function ms(x) return string.format('%d', x) end

-- New completions with enough responses become tasks; returns true when more log is left.
local function ingest(cursor_key, seq_key, queue_key, log_key, stats_key, max, min_n)
  local cursor = redis.call('GET', cursor_key) or '0-0'
  local entries = redis.call('XRANGE', log_key, '(' .. cursor, '+', 'COUNT', max)
  for _, e in ipairs(entries) do
    local entry, cid = e[2], nil
    for i = 1, #entry, 2 do
      if entry[i] == 'completion_id' then cid = entry[i + 1] end
    end
    if cid and redis.call('EXISTS', tp .. cid) == 0 then
      -- the completion hash holds `r:<response id>` -> its index for each response
      local fields = {}
      for _, f in ipairs(redis.call('HKEYS', cp .. cid)) do
        if string.sub(f, 1, 2) == 'r:' then fields[#fields + 1] = f end
      end
      if #fields >= min_n then
        local pos = redis.call('HMGET', cp .. cid, unpack(fields))
        local ordered = {}
        for i = 1, #fields do ordered[i] = {tonumber(pos[i]), string.sub(fields[i], 3)} end
        table.sort(ordered, function(a, b) return a[1] < b[1] end)
        local rids = {}
        for i = 1, #ordered do rids[i] = ordered[i][2] end
        local seq = redis.call('INCR', seq_key)
        redis.call('HSET', tp .. cid, 'id', cid, 'seq', seq, 'created_at', ms(now),
                   'responses', cjson.encode(rids), 'state', 'open', 'labels', 0)
        redis.call('ZADD', queue_key, seq, cid)
        redis.call('HINCRBY', stats_key, 'tasks', 1)
      end
    end
    cursor = e[1]
  end
  if #entries > 0 then redis.call('SET', cursor_key, cursor) end
  return #entries >= max
end

-- Leases whose time is up: their tasks go back to the queue, in their old place.
local function reclaim(queue_key, leased_key, holders_key, stats_key)
  local lapsed = redis.call('ZRANGEBYSCORE', leased_key, '-inf', now, 'LIMIT', 0, 1000)
  for _, cid in ipairs(lapsed) do
    redis.call('ZREM', leased_key, cid)
    local t = redis.call('HMGET', tp .. cid, 'seq', 'holder', 'state')
    if t[3] == 'leased' then
      redis.call('HSET', tp .. cid, 'state', 'open')
      redis.call('HDEL', tp .. cid, 'lease', 'holder', 'until')
      redis.call('ZADD', queue_key, t[1], cid)
      if t[2] and redis.call('HGET', holders_key, t[2]) == cid then
        redis.call('HDEL', holders_key, t[2])
      end
      redis.call('HINCRBY', stats_key, 'lapsed', 1)
    end
  end
end

-- nil when `labeller` holds `lease` on the task now; else why not.
local function refusal(t, labeller, lease)
  if not t[1] then return {'NOTASK'} end
  if t[3] ~= lease or t[2] ~= labeller then return {'NOTYOURS', t[1]} end
  if tonumber(t[4]) <= now then return {'LAPSED', t[4]} end
  return nil
end
"""

# KEYS: 1 cursor, 2 seq, 3 queue, 4 leased, 5 holders, 6 stats, 7 completion log
# ARGV: 1 settings + ingest_max, min_n
# Returns {'MORE'} while log entries are left to read, else {'OK'}.
REFRESH_LUA = (
    _PRELUDE
    + """
local more = ingest(KEYS[1], KEYS[2], KEYS[3], KEYS[7], KEYS[6], cfg.ingest_max, cfg.min_n)
reclaim(KEYS[3], KEYS[4], KEYS[5], KEYS[6])
if more then return {'MORE'} end
return {'OK'}
"""
)

# KEYS: 1 cursor, 2 seq, 3 queue, 4 leased, 5 holders, 6 stats, 7 completion log
# ARGV: 1 settings + labeller, lease_id, lease_ms, ingest_max, min_n, scan_max
# Returns {'LEASED', task, lease, until}, {'HELD', task, lease, until} (the lease this labeller
# already holds), {'MORE'} (log left to read: call again) or {'EMPTY'}.
NEXT_LUA = (
    _PRELUDE
    + """
local more = ingest(KEYS[1], KEYS[2], KEYS[3], KEYS[7], KEYS[6], cfg.ingest_max, cfg.min_n)
reclaim(KEYS[3], KEYS[4], KEYS[5], KEYS[6])
local labeller = cfg.labeller
local held = redis.call('HGET', KEYS[5], labeller)
if held then
  local t = redis.call('HMGET', tp .. held, 'state', 'holder', 'lease', 'until')
  if t[1] == 'leased' and t[2] == labeller and tonumber(t[4]) > now then
    return {'HELD', held, t[3], t[4]}
  end
  redis.call('HDEL', KEYS[5], labeller)
end
local offset, scanned = 0, 0
while scanned < cfg.scan_max do
  local batch = redis.call('ZRANGE', KEYS[3], offset, offset + 99)
  if #batch == 0 then break end
  local removed = 0
  for _, cid in ipairs(batch) do
    scanned = scanned + 1
    if redis.call('SISMEMBER', sp .. cid, labeller) == 0 then
      if redis.call('EXISTS', cp .. cid) == 0 then
        -- its completion expired (retention): nobody can label it any more
        redis.call('ZREM', KEYS[3], cid)
        redis.call('HSET', tp .. cid, 'state', 'expired')
        redis.call('HINCRBY', KEYS[6], 'expired', 1)
        removed = removed + 1
      else
        local untilms = ms(now + tonumber(cfg.lease_ms))
        redis.call('ZREM', KEYS[3], cid)
        redis.call('ZADD', KEYS[4], untilms, cid)
        redis.call('HSET', tp .. cid, 'state', 'leased', 'lease', cfg.lease_id,
                   'holder', labeller, 'until', untilms)
        redis.call('HSET', KEYS[5], labeller, cid)
        redis.call('HINCRBY', KEYS[6], 'leases', 1)
        return {'LEASED', cid, cfg.lease_id, untilms}
      end
    end
    if scanned >= cfg.scan_max then break end
  end
  offset = offset + #batch - removed
end
if more then return {'MORE'} end
return {'EMPTY'}
"""
)

# KEYS: 1 task, 2 seen, 3 queue, 4 leased, 5 holders, 6 stats
# ARGV: 1 settings + labeller, lease, task, end (the JSON kept as `end:<lease>`)
# Returns {'OK'}, {'ENDED', end JSON} (this lease already ended) or a refusal.
SKIP_LUA = (
    _PRELUDE
    + """
local lease, labeller, task = cfg.lease, cfg.labeller, cfg.task
local ended = redis.call('HGET', KEYS[1], 'end:' .. lease)
if ended then return {'ENDED', ended} end
local t = redis.call('HMGET', KEYS[1], 'state', 'holder', 'lease', 'until', 'seq')
local no = refusal(t, labeller, lease)
if no then return no end
redis.call('SADD', KEYS[2], labeller)
redis.call('ZREM', KEYS[4], task)
redis.call('ZADD', KEYS[3], t[5], task)
redis.call('HSET', KEYS[1], 'state', 'open', 'end:' .. lease, cfg['end'])
redis.call('HDEL', KEYS[1], 'lease', 'holder', 'until')
redis.call('HINCRBY', KEYS[1], 'skips', 1)
if redis.call('HGET', KEYS[5], labeller) == task then redis.call('HDEL', KEYS[5], labeller) end
redis.call('HINCRBY', KEYS[6], 'skips', 1)
return {'OK'}
"""
)

# KEYS: 1 task, 2 queue, 3 leased, 4 holders, 5 stats, 6 flagged
# ARGV: 1 settings + labeller, lease, task, reason, end
FLAG_LUA = (
    _PRELUDE
    + """
local lease, labeller, task = cfg.lease, cfg.labeller, cfg.task
local ended = redis.call('HGET', KEYS[1], 'end:' .. lease)
if ended then return {'ENDED', ended} end
local t = redis.call('HMGET', KEYS[1], 'state', 'holder', 'lease', 'until')
local no = refusal(t, labeller, lease)
if no then return no end
redis.call('ZREM', KEYS[3], task)
redis.call('ZREM', KEYS[2], task)
redis.call('ZADD', KEYS[6], now, task)
redis.call('HSET', KEYS[1], 'state', 'flagged', 'flag', cfg['end'], 'end:' .. lease, cfg['end'])
redis.call('HDEL', KEYS[1], 'lease', 'holder', 'until')
if redis.call('HGET', KEYS[4], labeller) == task then redis.call('HDEL', KEYS[4], labeller) end
redis.call('HINCRBY', KEYS[5], 'flags', 1)
redis.call('HINCRBY', KEYS[5], 'flags:' .. cfg.reason, 1)
return {'OK'}
"""
)

# After the ranking is stored (feedback/store.py), the label is counted on its task.
# KEYS: 1 task, 2 seen, 3 queue, 4 leased, 5 holders, 6 stats, 7 done, 8 recent
# ARGV: 1 settings + labeller, lease, task, needed (R), ids, ranks, end, recent_ms
# Returns {'OK', labels so far} or {'ENDED', end JSON}.
# The lease was checked just before the ranking was stored, so the label counts even if the
# lease lapsed in between; the task's next state depends on who holds it now.
COMPLETE_LUA = (
    _PRELUDE
    + """
local lease, labeller, task = cfg.lease, cfg.labeller, cfg.task
local ended = redis.call('HGET', KEYS[1], 'end:' .. lease)
if ended then return {'ENDED', ended} end
local t = redis.call('HMGET', KEYS[1], 'state', 'holder', 'lease', 'until', 'seq', 'labels',
                     'orders')
if not t[1] then return {'NOTASK'} end
local ours = (t[3] == lease and t[2] == labeller)

-- Agreement with every earlier label of this task: over each pair of responses that both
-- labellers ordered strictly, the same order or not (ties are no judgement).
local ids, ranks = cfg.ids, cfg.ranks
local mine = {}
for i = 1, #ids do mine[ids[i]] = ranks[i] end
local orders = {}
if t[7] then orders = cjson.decode(t[7]) end
local judged, agreed = 0, 0
for _, o in ipairs(orders) do
  local theirs = {}
  for i = 1, #o[2] do theirs[o[2][i]] = o[3][i] end
  local pj, pa = 0, 0
  for i = 1, #ids do
    for j = i + 1, #ids do
      local a, b = ids[i], ids[j]
      if theirs[a] and theirs[b] then
        local m, th = mine[a] - mine[b], theirs[a] - theirs[b]
        if m ~= 0 and th ~= 0 then
          pj = pj + 1
          if (m < 0) == (th < 0) then pa = pa + 1 end
        end
      end
    end
  end
  if pj > 0 then
    redis.call('HINCRBY', KEYS[6], 'judged:' .. o[1], pj)
    redis.call('HINCRBY', KEYS[6], 'agreed:' .. o[1], pa)
  end
  judged, agreed = judged + pj, agreed + pa
end
if judged > 0 then
  redis.call('HINCRBY', KEYS[6], 'judged:' .. labeller, judged)
  redis.call('HINCRBY', KEYS[6], 'agreed:' .. labeller, agreed)
  redis.call('HINCRBY', KEYS[6], 'pairs_judged', judged)
  redis.call('HINCRBY', KEYS[6], 'pairs_agreed', agreed)
end
orders[#orders + 1] = {labeller, ids, ranks}

local labels = tonumber(t[6] or '0') + 1
redis.call('HSET', KEYS[1], 'labels', labels, 'orders', cjson.encode(orders),
           'end:' .. lease, cfg['end'])
redis.call('SADD', KEYS[2], labeller)
if ours then
  redis.call('ZREM', KEYS[4], task)
  redis.call('HDEL', KEYS[1], 'lease', 'holder', 'until')
  if redis.call('HGET', KEYS[5], labeller) == task then redis.call('HDEL', KEYS[5], labeller) end
end
local state = t[1]
if labels >= tonumber(cfg.needed) then
  if state == 'open' or state == 'leased' then
    -- enough labels: the task leaves the queue (another labeller's lease on it ends here)
    redis.call('ZREM', KEYS[3], task)
    redis.call('ZREM', KEYS[4], task)
    if not ours and t[2] and redis.call('HGET', KEYS[5], t[2]) == task then
      redis.call('HDEL', KEYS[5], t[2])
    end
    redis.call('HDEL', KEYS[1], 'lease', 'holder', 'until')
    redis.call('HSET', KEYS[1], 'state', 'done')
    redis.call('ZADD', KEYS[7], now, task)
    redis.call('HINCRBY', KEYS[6], 'done', 1)
  end
elseif ours then
  redis.call('HSET', KEYS[1], 'state', 'open')
  redis.call('ZADD', KEYS[3], t[5], task)
end
redis.call('HINCRBY', KEYS[6], 'labels', 1)
redis.call('HINCRBY', KEYS[6], 'labels:' .. labeller, 1)
redis.call('ZADD', KEYS[8], now, task .. ' ' .. lease)
redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', '(' .. ms(now - tonumber(cfg.recent_ms)))
return {'OK', labels}
"""
)
