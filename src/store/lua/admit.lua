-- Admits one request against a key's or a deployment's limits and, for a
-- key with a budget, reserves its cost under a lease; all or nothing, on
-- the server's clock, so every replica sees one state. Everything of one
-- key or deployment is one hash, read once and written once: GCRA cells
-- (`rpm:QUOTA`, `tpm:QUOTA`), what requests hold (`=`, and `r:ID` per
-- reservation) and spend (`d:DAY`, `m:MONTH`). Expired leases are released
-- by the exchange (sync.lua), so an admission does only what it must.
--
-- An admission may also ask for credit: `units` more of what it takes (a
-- request, its tokens and the cost it wanted), taken now for the replica
-- to admit its next requests from without a round trip. Credit is granted
-- only out of plenty, at most a sixteenth of what each limit has left, so
-- replicas' credits never starve one another; its budget is held as one
-- reservation under a lease like a request's (`r:CREDIT`), drawn down as
-- the requests admitted from it settle (sync.lua).
--
-- Several admissions come in one call, in the order they were asked, each
-- with 2 keys and 15 arguments; each is all or nothing on its own, and
-- each sees the ones before it.
--
-- KEYS: 1 and 2 the spend log (see spend_log.lua, which this script
--       follows), then per admission: the owner's hash, and its lease
--       expiries (sorted set)
-- ARGV, per admission: 1 rpm field, 2 rpm, 3 tpm field, 4 tpm (fields ""
--       and quotas 0: none), 5 tokens, 6 day field, 7 daily limit, 8 month
--       field, 9 monthly limit (nano-USD; -1: none), 10 the cost wanted,
--       11 the least cost the request can run on, 12 reservation id ("":
--       no budget), 13 lease (microseconds), 14 credit id (its budget's
--       reservation; "" without a budget), 15 credit units asked (0: none)
-- Returns, per admission: {0, granted, credit units granted} | {1, rpm
--       wait µs, µs until the rpm cell is full} | {2, tpm wait µs, or -1:
--       never, µs until the tpm cell is full} | {3, period (1 day, 2
--       month), limit, spent, held, needed}
local MINUTE = 60000000

-- A GCRA cell: when it is full again (the theoretical arrival time).
-- Taken, its new value; refused, the wait and how long until it is full.
local function gcra(full_at, per_minute, cells)
  if per_minute <= 0 then
    return true, nil
  end
  local full = math.max(tonumber(full_at or '0'), now)
  if cells > per_minute then
    return false, -1, full - now
  end
  local after = full + cells * MINUTE / per_minute
  local fits_at = after - MINUTE
  if fits_at <= now then
    return true, after
  end
  return false, fits_at - now, full - now
end

-- Cells of a GCRA limit left to take now, once it is full again at
-- `full_at`.
local function room(full_at, per_minute)
  return math.floor((now + MINUTE - full_at) * per_minute / MINUTE)
end

-- Of `units` asked, the most that take at most a sixteenth of what is
-- left, `each` at a time.
local function plenty(units, left, each)
  if each <= 0 then
    return units
  end
  return math.min(units, math.floor(left / 16 / each))
end

local function admit(home, leases, arg)
  local id, credit = arg[12], arg[14]
  local v = redis.call('HMGET', home, arg[1], arg[3], '=', arg[6], arg[8], 'r:' .. credit)
  local rpm, tpm, tokens = tonumber(arg[2]), tonumber(arg[4]), tonumber(arg[5])
  local ok, rpm_after, full_in = gcra(v[1], rpm, 1)
  if not ok then
    return {1, rpm_after, full_in}
  end
  local tpm_after
  ok, tpm_after, full_in = gcra(v[2], tpm, tokens)
  if not ok then
    return {2, tpm_after, full_in}
  end

  local granted, available = 0, nil
  local held = tonumber(v[3] or '0')
  local want = tonumber(arg[10])
  if id ~= '' then
    local floor = tonumber(arg[11])
    local periods = {{v[4], tonumber(arg[7])}, {v[5], tonumber(arg[9])}}
    for period, budget in ipairs(periods) do
      local limit = budget[2]
      if limit >= 0 then
        local spent = tonumber(budget[1] or '0')
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

  -- Credit, out of what this request leaves.
  local units = tonumber(arg[15])
  if units > 0 and granted == want then
    if rpm_after then
      units = plenty(units, room(rpm_after, rpm), 1)
    end
    if tpm_after then
      units = plenty(units, room(tpm_after, tpm), tokens)
    end
    if id ~= '' and available ~= nil then
      units = plenty(units, available - granted, want)
    end
  else
    units = 0
  end
  if units > 0 then
    if rpm_after then
      rpm_after = rpm_after + units * MINUTE / rpm
    end
    if tpm_after then
      tpm_after = tpm_after + units * tokens * MINUTE / tpm
    end
  end

  local set = {}
  if rpm_after then
    table.insert(set, arg[1])
    table.insert(set, int(rpm_after))
  end
  if tpm_after then
    table.insert(set, arg[3])
    table.insert(set, int(tpm_after))
  end
  if id ~= '' then
    local expiry = int(now + tonumber(arg[13]))
    held = held + granted
    table.insert(set, 'r:' .. id)
    table.insert(set, int(granted))
    redis.call('ZADD', leases, expiry, id)
    if units > 0 and credit ~= '' then
      local extra = units * want
      held = held + extra
      table.insert(set, 'r:' .. credit)
      table.insert(set, int(tonumber(v[6] or '0') + extra))
      redis.call('ZADD', leases, expiry, credit)
    end
    keep(leases)
    table.insert(set, '=')
    table.insert(set, int(held))
    changed(home)
  end
  if #set > 0 then
    redis.call('HSET', home, unpack(set))
    keep(home)
  end
  return {0, granted, units}
end

local results = {}
for i = 1, #KEYS / 2 - 1 do
  results[i] = admit(KEYS[2 * i + 1], KEYS[2 * i + 2], {unpack(ARGV, 15 * (i - 1) + 1, 15 * i)})
end
return results
