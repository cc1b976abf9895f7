-- One replica's periodic exchange with the fleet, in one round trip:
-- settles budget reservations into spend, charges the tokens its requests
-- generated to the shared rate limits, renews its leases, publishes what
-- upstreams told it (429 cooldowns, x-ratelimit counts, open circuits),
-- and reads back what the others published, what keys have spent, and
-- how many replicas are alive. A key's or deployment's state is one hash
-- (see admit.lua).
--
-- KEYS: 1 and 2 the spend log (see spend_log.lua, which this script
--       follows), 3 the replicas seen (sorted set), 4 the last batch
--       applied for this replica
-- ARGV[1]: JSON {replica, lease, seed, seeding, batches, renew, push,
--          pull, read, sweep, since, fields, stale, prefix (the periodic
--          exchange only)};
-- amounts travel as strings (JSON numbers lose digits past 2^53).
-- Times are microseconds; sent and returned relative to now.
local MINUTE = 60000000
local ask = cjson.decode(ARGV[1])
-- Every replica's exchange keeps the set of replicas: without it, Redis
-- lost its data (a restart without persistence, a FLUSHALL). Nothing is
-- applied then but by an exchange that seeds the spend counters first:
-- spend added to an empty counter would keep the seed out.
if redis.call('EXISTS', KEYS[3]) == 0 and not ask.seeding then
  return cjson.encode({replicas = 0, pressure = {}, spent = {}, lost = true})
end

-- Releases reservations `ids` (without their `r:` prefix) from a key's
-- hash: what they held leaves its `=`.
local function release(hash, ids)
  if #ids == 0 then
    return
  end
  local fields = {}
  for i, id in ipairs(ids) do
    fields[i] = 'r:' .. id
  end
  local amounts = redis.call('HMGET', hash, '=', unpack(fields))
  local held = tonumber(amounts[1] or '0')
  for i = 2, #amounts do
    held = held - tonumber(amounts[i] or '0')
  end
  redis.call('HDEL', hash, unpack(fields))
  redis.call('HSET', hash, '=', int(math.max(held, 0)))
  changed(hash)
end

-- Spend counters that Redis lost (a restart without persistence) start
-- again from the ledger: [hash, field, value].
for _, s in ipairs(ask.seed) do
  if redis.call('HSETNX', s[1], s[2], s[3]) == 1 then
    changed(s[1])
    keep(s[1])
  end
end

-- Batches of spend and token charges, each applied once: KEYS[4] holds
-- the highest batch number applied for this replica.
local applied = tonumber(redis.call('GET', KEYS[4]) or '0')
for _, batch in ipairs(ask.batches) do
  if batch.number > applied then
    -- Per key and day: its hash and leases, its day and month fields, the
    -- spend, how many credits it was drawn from, those credits' ids and
    -- amounts, then the reservations released. Every credit's draws are
    -- applied before any release, so a credit released in the batch that
    -- settles its last draws releases only what was left of it.
    for _, s in ipairs(batch.settle) do
      local hash = s[1]
      for i = 7, 6 + 2 * s[6], 2 do
        local field = 'r:' .. s[i]
        local v = redis.call('HMGET', hash, field, '=')
        if v[1] then
          local taken = math.min(tonumber(v[1]), tonumber(s[i + 1]))
          redis.call('HSET', hash, field, int(tonumber(v[1]) - taken),
            '=', int(math.max(tonumber(v[2] or '0') - taken, 0)))
          changed(hash)
        end
      end
    end
    for _, s in ipairs(batch.settle) do
      local hash, leases, day, month, cost = s[1], s[2], s[3], s[4], s[5]
      local ids = {}
      for i = 7 + 2 * s[6], #s do
        ids[#ids + 1] = s[i]
      end
      if #ids > 0 then
        release(hash, ids)
        redis.call('ZREM', leases, unpack(ids))
      end
      if cost ~= '0' then
        redis.call('HINCRBY', hash, day, cost)
        redis.call('HINCRBY', hash, month, cost)
        changed(hash)
      end
      keep(hash)
    end
    -- Tokens past (positive) or short of (negative) what admission took,
    -- and the cells of a credit released unused (negative): [hash, field,
    -- quota, cells].
    for _, c in ipairs(batch.charge) do
      local hash, field, per_minute, cells = c[1], c[2], c[3], c[4]
      local full_at = tonumber(redis.call('HGET', hash, field) or '0')
      local span = math.abs(cells) * MINUTE / per_minute
      local after
      if cells >= 0 then
        after = math.max(full_at, now) + span
      else
        after = math.max(full_at - span, now)
      end
      redis.call('HSET', hash, field, int(after))
      keep(hash)
    end
    applied = batch.number
  end
end
redis.call('SET', KEYS[4], int(applied), 'EX', 86400)

for _, r in ipairs(ask.renew) do
  local leases = r[1]
  for i = 2, #r do
    redis.call('ZADD', leases, 'XX', int(now + ask.lease), r[i])
  end
  keep(leases)
end

-- Pressure: cool, requests left, tokens left, open; each until a time.
local FIELDS = {'cool', 'rq', 'rq_until', 'tk', 'tk_until', 'open'}
for _, p in ipairs(ask.push) do
  local key, longest = p.key, 0
  local set = {'at', int(now), 'by', ask.replica}
  for _, f in ipairs({'cool', 'rq_until', 'tk_until', 'open'}) do
    if p[f] then
      table.insert(set, f)
      table.insert(set, int(now + p[f]))
      longest = math.max(longest, p[f])
    end
  end
  for _, f in ipairs({'rq', 'tk'}) do
    if p[f] then
      table.insert(set, f)
      table.insert(set, int(p[f]))
    end
  end
  redis.call('HSET', key, unpack(set))
  redis.call('PEXPIRE', key, math.ceil(longest / 1000) + 1000)
end

local pressure = {}
for i, key in ipairs(ask.pull) do
  local v = redis.call('HMGET', key, 'by', 'at', unpack(FIELDS))
  local seen = {by = v[1] or '', at = tonumber(v[2] or '0')}
  for j, f in ipairs(FIELDS) do
    local value = tonumber(v[j + 2] or '')
    if value and (f == 'rq' or f == 'tk') then
      seen[f] = value
    elseif value and value > now then
      seen[f] = value - now
    end
  end
  pressure[i] = seen
end

-- Prompt blocks replicas routed with prefix affinity: per deployment, a
-- sorted set of block hashes (16 hex digits) scored by when a replica
-- last routed them. This replica reads what the others added since its
-- last read (the newest `most`) before it adds its own, so its own do
-- not come back to it; a set keeps the newest `cap` and ends `keep` ms
-- after its last addition.
local blocks = {}
if ask.prefix then
  local p = ask.prefix
  for i, set in ipairs(p.pull) do
    local found = redis.call('ZREVRANGEBYSCORE', set[1], '+inf', '(' .. set[2],
      'LIMIT', 0, p.most)
    blocks[i] = table.concat(found)
  end
  local at = int(now)
  for _, set in ipairs(p.push) do
    local key, hashes = set[1], set[2]
    -- ZADD in slices: Lua's unpack takes at most a few thousand values.
    local args = {}
    for from = 1, #hashes, 16 do
      args[#args + 1] = at
      args[#args + 1] = string.sub(hashes, from, from + 15)
      if #args == 2000 then
        redis.call('ZADD', key, unpack(args))
        args = {}
      end
    end
    if #args > 0 then
      redis.call('ZADD', key, unpack(args))
    end
    redis.call('ZREMRANGEBYRANK', key, 0, -(p.cap + 1))
    redis.call('PEXPIRE', key, p.keep)
  end
end

-- Keys swept, [hash, leases]: their leases past their time are released
-- (a replica that died stopped renewing them) and their spend fields of
-- past periods (`stale`) dropped.
for _, s in ipairs(ask.sweep) do
  local hash, leases = s[1], s[2]
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired > 0 then
    release(hash, expired)
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  end
  if #ask.stale > 0 then
    redis.call('HDEL', hash, unpack(ask.stale))
  end
end

-- The day's and month's spend (`fields`) and what requests hold: of each
-- hash in `read`, and, with `since` (the log's position the replica read
-- last, [epoch, n]), of each hash changed after it, as [hash, day, month,
-- held]; all the log has when it began anew since (`reset`: what it does
-- not name has nothing).
local function spend(hash)
  local v = redis.call('HMGET', hash, ask.fields[1], ask.fields[2], '=')
  return {v[1] or '0', v[2] or '0', v[3] or '0'}
end
local spent = {}
for i, hash in ipairs(ask.read) do
  spent[i] = spend(hash)
end
local position = redis.call('HMGET', KEYS[1], 'epoch', 'n')
local epoch, n = position[1] or '', position[2] or '0'
local changes, reset = {}, false
if ask.since then
  local after = '(' .. ask.since[2]
  if ask.since[1] ~= epoch then
    after, reset = '-inf', true
  end
  for i, hash in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], after, '+inf')) do
    local v = spend(hash)
    changes[i] = {hash, v[1], v[2], v[3]}
  end
end
-- A hash gone (unwritten for longer than KEEP) leaves the log: the oldest
-- few are looked at in each exchange.
for _, hash in ipairs(redis.call('ZRANGE', KEYS[2], 0, 15)) do
  if redis.call('EXISTS', hash) == 0 then
    redis.call('ZREM', KEYS[2], hash)
  end
end

redis.call('ZADD', KEYS[3], now, ask.replica)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - MINUTE)
redis.call('PEXPIRE', KEYS[3], 120000)
local replicas = redis.call('ZCARD', KEYS[3])

return cjson.encode({replicas = replicas, pressure = pressure, spent = spent,
  changed = changes, reset = reset, version = {epoch, n}, blocks = blocks,
  prefix_at = int(now)})
