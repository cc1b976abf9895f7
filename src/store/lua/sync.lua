-- One replica's periodic exchange with the fleet, in one round trip:
-- settles budget reservations into spend, charges the tokens its requests
-- generated to the shared rate limits, renews its leases, publishes what
-- upstreams told it (429 cooldowns, x-ratelimit counts, open circuits),
-- and reads back what the others published, what keys have spent, and
-- how many replicas are alive.
--
-- KEYS: 1 the replicas seen (sorted set), 2 the last batch applied for
--       this replica
-- ARGV[1]: JSON {replica, lease, seed, batches, renew, push, pull, spent};
-- amounts travel as strings (JSON numbers lose digits past 2^53).
-- Times are microseconds; sent and returned relative to now.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local MINUTE = 60000000
local DAY_TTL, MONTH_TTL = 3 * 86400, 35 * 86400
local ask = cjson.decode(ARGV[1])

local function int(n)
  return string.format('%.0f', n)
end

-- Spend counters that Redis lost (a restart without persistence) start
-- again from the ledger.
for _, s in ipairs(ask.seed) do
  redis.call('SET', s[1], s[2], 'NX', 'EX', s[3])
end

-- Batches of spend and token charges, each applied once: KEYS[2] holds
-- the highest batch number applied for this replica.
local applied = tonumber(redis.call('GET', KEYS[2]) or '0')
for _, batch in ipairs(ask.batches) do
  if batch.number > applied then
    -- Per key and day: the held and leases keys, the day's and the
    -- month's spend keys, the spend, then each reservation released and
    -- what it holds.
    for _, s in ipairs(batch.settle) do
      local held, leases, day, month, cost = s[1], s[2], s[3], s[4], s[5]
      local released = 0
      for i = 6, #s, 2 do
        if redis.call('HDEL', held, s[i]) == 1 then
          released = released + tonumber(s[i + 1])
        end
        redis.call('ZREM', leases, s[i])
      end
      if released > 0 then
        redis.call('HINCRBY', held, '=', '-' .. int(released))
      end
      if cost ~= '0' then
        redis.call('INCRBY', day, cost)
        redis.call('EXPIRE', day, DAY_TTL)
        redis.call('INCRBY', month, cost)
        redis.call('EXPIRE', month, MONTH_TTL)
      end
    end
    -- Tokens past (positive) or short of (negative) what admission took.
    for _, c in ipairs(batch.charge) do
      local key, per_minute, cells = c[1], c[2], c[3]
      local full_at = tonumber(redis.call('GET', key) or '0')
      local span = math.abs(cells) * MINUTE / per_minute
      local after
      if cells >= 0 then
        after = math.max(full_at, now) + span
      else
        after = math.max(full_at - span, now)
      end
      redis.call('SET', key, int(after), 'PX', math.ceil((after - now) / 1000) + 1000)
    end
    applied = batch.number
  end
end
redis.call('SET', KEYS[2], int(applied), 'EX', 86400)

for _, r in ipairs(ask.renew) do
  local held, leases = r[1], r[2]
  for i = 3, #r do
    redis.call('ZADD', leases, 'XX', int(now + ask.lease), r[i])
  end
  local ttl = math.ceil(ask.lease / 1000) * 2
  redis.call('PEXPIRE', held, ttl)
  redis.call('PEXPIRE', leases, ttl)
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

-- Per budgeted key: leases past their time are released (a replica that
-- died stopped renewing them), then its day's and month's spend and what
-- requests hold are read.
local spent = {}
local ttl = math.ceil(ask.lease / 1000) * 2
for i, s in ipairs(ask.spent) do
  local held, leases = s[3], s[4]
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
  if #expired > 0 then
    local released = 0
    for _, gone in ipairs(expired) do
      local amount = redis.call('HGET', held, gone)
      if amount then
        released = released + tonumber(amount)
        redis.call('HDEL', held, gone)
      end
    end
    if released > 0 then
      redis.call('HINCRBY', held, '=', '-' .. int(released))
    end
    redis.call('ZREMRANGEBYSCORE', leases, '-inf', now)
  end
  redis.call('PEXPIRE', held, ttl)
  redis.call('PEXPIRE', leases, ttl)
  spent[i] = {
    redis.call('GET', s[1]) or '0',
    redis.call('GET', s[2]) or '0',
    redis.call('HGET', held, '=') or '0',
  }
end

redis.call('ZADD', KEYS[1], now, ask.replica)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - MINUTE)
redis.call('PEXPIRE', KEYS[1], 120000)
local replicas = redis.call('ZCARD', KEYS[1])

return cjson.encode({replicas = replicas, pressure = pressure, spent = spent})
