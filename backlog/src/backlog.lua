-- The backlog of one stream for one consumer group, read in one atomic step.
-- KEYS[1] stream, ARGV[1] group, ARGV[2] most entries counted per side when Redis cannot
-- say the group's lag (tombstones after XDEL).
-- Returns {length, undelivered, pending, oldest_id, exact, group_exists, oldest_pending_id,
-- oldest_undelivered_id}.
local key, group, cap = KEYS[1], ARGV[1], tonumber(ARGV[2])
if redis.call('EXISTS', key) == 0 then
  return {0, 0, 0, '', 1, 0, '', ''}
end
local length = redis.call('XLEN', key)

local function ms(id) return tonumber(string.match(id, '^(%d+)')) or 0 end

local function first_id(from)
  local r = redis.call('XRANGE', key, from, '+', 'COUNT', 1)
  if r[1] then return r[1][1] end
  return ''
end

-- Entries in [from, to], at most `cap` (then `false`).
local function count(from, to)
  local n = 0
  while true do
    local r = redis.call('XRANGE', key, from, to, 'COUNT', 1000)
    n = n + #r
    if #r < 1000 then return n end
    if n >= cap then return false end
    from = '(' .. r[#r][1]
  end
end

local g = nil
for _, info in ipairs(redis.call('XINFO', 'GROUPS', key)) do
  local m = {}
  for i = 1, #info, 2 do m[info[i]] = info[i + 1] end
  if m['name'] == group then g = m end
end
if not g then
  -- Not created yet: the group will start from the beginning (the worker creates it at 0).
  local first = first_id('-')
  return {length, length, 0, first, 1, 0, '', first}
end

local last = g['last-delivered-id']
local pending = g['pending']
local undelivered, exact = g['lag'], 1
if undelivered then
  -- Trimming can make lag count entries that are gone.
  if undelivered > length then undelivered = length end
else
  -- Redis lost count (entries deleted after the group's position, or a group created or
  -- moved after deletions; or Redis < 7). Count whichever side of the position is small:
  -- with DELETE_ON_ACK the delivered side holds little more than the pending entries.
  local below = count('-', last)
  if below then
    undelivered = length - below
  else
    local above = count('(' .. last, '+')
    if above then
      undelivered = above
    else
      -- Both sides hold more than the cap: estimate from the entries' times (IDs from
      -- XADD *), never below the cap, never above what the other side leaves.
      local newest = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1][1]
      local span = ms(newest) - ms(first_id('-'))
      local est = cap
      if span > 0 then est = math.floor(length * (ms(newest) - ms(last)) / span) end
      undelivered, exact = math.max(cap, math.min(est, length - cap)), 0
    end
  end
end

local oldest = ''
if pending > 0 then
  local p = redis.call('XPENDING', key, group)
  if p[2] then oldest = p[2] end
end
local oldest_pending = oldest
local nxt = ''
if undelivered > 0 then
  nxt = first_id('(' .. last)
  if nxt ~= '' then
    if oldest == '' or ms(nxt) < ms(oldest) then oldest = nxt end
  end
end
return {length, undelivered, pending, oldest, exact, 1, oldest_pending, nxt}
