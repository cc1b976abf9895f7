-- Admits one request against a key's or a deployment's limits and, for a
-- key with a budget, reserves its cost under a lease; all or nothing, on
-- the server's clock, so every replica sees one state. Expired leases are
-- released, and the keys' lifetimes kept, by the exchange (sync.lua), so
-- an admission does only what it must.
--
-- KEYS: 1 rpm cell, 2 tpm cell, 3 held amounts (hash; field "=" is their
--       sum), 4 lease expiries (sorted set), 5 day's spend, 6 month's spend
-- ARGV: 1 rpm (0: none), 2 tpm (0: none), 3 tokens, 4 daily limit and
--       5 monthly limit (nano-USD; -1: none), 6 the cost wanted, 7 the least
--       cost the request can run on, 8 reservation id ("": no budget),
--       9 lease (microseconds)
-- Returns {0, granted} | {1, rpm wait µs} | {2, tpm wait µs, or -1: never}
--       | {3, period (1 day, 2 month), limit, spent, held, needed}
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local MINUTE = 60000000

local function int(n)
  return string.format('%.0f', n)
end

-- A GCRA cell: when it is full again (the theoretical arrival time).
local function gcra(key, per_minute, cells)
  if per_minute <= 0 then
    return true, nil
  end
  if cells > per_minute then
    return false, -1
  end
  local full_at = tonumber(redis.call('GET', key) or '0')
  local after = math.max(full_at, now) + cells * MINUTE / per_minute
  local fits_at = after - MINUTE
  if fits_at <= now then
    return true, after
  end
  return false, fits_at - now
end

local ok, rpm_after = gcra(KEYS[1], tonumber(ARGV[1]), 1)
if not ok then
  return {1, rpm_after}
end
local tpm_after
ok, tpm_after = gcra(KEYS[2], tonumber(ARGV[2]), tonumber(ARGV[3]))
if not ok then
  return {2, tpm_after}
end

local granted = 0
local id = ARGV[8]
if id ~= '' then
  local held = tonumber(redis.call('HGET', KEYS[3], '=') or '0')
  local want, floor = tonumber(ARGV[6]), tonumber(ARGV[7])
  local available
  local periods = {{KEYS[5], tonumber(ARGV[4])}, {KEYS[6], tonumber(ARGV[5])}}
  for period, budget in ipairs(periods) do
    local limit = budget[2]
    if limit >= 0 then
      local spent = tonumber(redis.call('GET', budget[1]) or '0')
      if spent + held + floor > limit then
        return {3, period, limit, spent, held, floor}
      end
      local left = limit - spent - held
      if available == nil or left < available then
        available = left
      end
    end
  end
  granted = want
  if available ~= nil and available < granted then
    granted = available
  end
end

local function keep(key, after)
  if after then
    redis.call('SET', key, int(after), 'PX', math.ceil((after - now) / 1000) + 1000)
  end
end
keep(KEYS[1], rpm_after)
keep(KEYS[2], tpm_after)
if id ~= '' then
  local lease = tonumber(ARGV[9])
  redis.call('HSET', KEYS[3], id, int(granted))
  redis.call('HINCRBY', KEYS[3], '=', int(granted))
  redis.call('ZADD', KEYS[4], int(now + lease), id)
end
return {0, granted}
