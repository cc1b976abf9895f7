-- What admit.lua and sync.lua begin with: the server's clock, and the log
-- of budget changes that each replica's exchange reads the fleet's spend
-- from. KEYS[1] is the log's position, a hash of `epoch` (the server's
-- time when the log began: a Redis that lost its data begins a new one)
-- and `n` (one more for each script call that changed some key's spend or
-- what its requests hold); KEYS[2] the budget hashes changed, a sorted set
-- scored by the position of each one's last change. An exchange reads
-- only the hashes changed after the position it read last.
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])

local function int(n)
  return string.format('%.0f', n)
end

-- How long a key's or a deployment's hash, and its leases, outlive their
-- last write (ms): longer than a month, so that a month's spend is kept
-- to its end, and a key no config names any more leaves nothing behind.
local KEEP = 40 * 86400 * 1000

local function keep(key)
  redis.call('PEXPIRE', key, KEEP)
end

local logged
-- Logs a change of `hash`'s spend fields or of its `=`.
local function changed(hash)
  if not logged then
    logged = redis.call('HINCRBY', KEYS[1], 'n', 1)
    if logged == 1 then
      redis.call('HSET', KEYS[1], 'epoch', int(now))
    end
  end
  redis.call('ZADD', KEYS[2], logged, hash)
end
