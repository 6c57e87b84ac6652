-- The durable tier's Lua (state_service/storage/tiered.py), split at "--- name"
-- markers like scripts.lua, whose `common` section comes first in every
-- script. Single Redis node only: `durable_common` writes the archive backlog,
-- a key no script declares (tiered.py refuses a cluster).
--
-- The archive backlog: <prefix>:archive:dirty, a sorted set of "tenant:session"
-- members (score: when the session first became dirty, ms) of sessions with
-- writes not yet copied to PostgreSQL.

--- durable_common
-- Replaces scripts.lua's apply_ttl in every script when the durable tier is
-- on. Every write step ends by calling apply_ttl, so here it (1) marks the
-- session dirty in the same atomic step as the write (a write cannot be
-- acknowledged without its mark, nor a mark be lost after it), and (2) takes
-- the session's TTL away: a session with writes not yet archived must not
-- expire. The archiver (archive_done) gives the TTL back once the copy is in
-- PostgreSQL. The placeholders are filled in by tiered.py.
--
-- (3) It also queues the request_id record the write made (if any) on the
-- session's ":q" list, so the archiver copies new records without scanning
-- them all (the records hash has no order). Every script that records one
-- takes its request_id as ARGV[1] (append a:, pop p:, view_commit c:,
-- fork_install f:); update's ARGV[1] is an etag, which names no record.
local function apply_ttl(ttl_setting, default_ttl)
  for i = 1, 4 do redis.call('PERSIST', KEYS[i]) end
  local now = redis.call('TIME')
  local member = string.sub(KEYS[1], __PREFIX_LENGTH__ + 3, -4)
  redis.call('ZADD', __DIRTY_KEY__, 'NX',
    tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000), member)
  local request_id = ARGV[1]
  if request_id and request_id ~= '' then
    local queue = string.sub(KEYS[1], 1, -2) .. 'q'
    for _, kind in ipairs({'a:', 'p:', 'c:', 'f:'}) do
      if redis.call('HEXISTS', KEYS[3], kind .. request_id) == 1 then
        redis.call('RPUSH', queue, kind .. request_id)
      end
    end
  end
end

--- archive_read
-- KEYS: the session's keys. The head, summary and queued request records as
-- one snapshot (the log is read after, in `read` steps checked against this
-- head's inc and trunc). Returns {meta hash as a flat list, summary hash as a
-- flat list, records queued (to trim once archived), the queued records as
-- a flat field/response list}.
local queue = string.sub(KEYS[1], 1, -2) .. 'q'
local fields = redis.call('LRANGE', queue, 0, -1)
local records = {}
for _, field in ipairs(fields) do
  local response = redis.call('HGET', KEYS[3], field)
  if response then
    records[#records + 1] = field
    records[#records + 1] = response
  end
end
return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[4]), #fields, records}

--- archive_done
-- KEYS: the session's keys, KEYS[5] the archive backlog.
-- ARGV: incarnation and version archived ('' if the session was gone),
--       default ttl (s), backlog member, records queued that were archived.
-- Ends an archive pass: if no write came since the version archived, the
-- session is clean: it gets its TTL back and leaves the backlog. A write
-- that came since keeps it there (its own step marked it), so the next pass
-- copies it. Returns 1 if clean, else 0.
-- The records this pass copied leave the queue whatever follows (newer
-- ones were queued after them); a session gone takes its queue along.
local queue = string.sub(KEYS[1], 1, -2) .. 'q'
local archived = tonumber(ARGV[5]) or 0
if archived > 0 then redis.call('LTRIM', queue, archived, -1) end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'ttl')
if not h[1] then redis.call('DEL', queue) end
if h[1] then
  if h[1] ~= ARGV[1] or h[2] ~= ARGV[2] then return 0 end
  local ttl = tonumber(h[3]) or 0
  for i = 1, 4 do
    if ttl < 0 then
      redis.call('PERSIST', KEYS[i])
    else
      redis.call('EXPIRE', KEYS[i], ttl > 0 and ttl or tonumber(ARGV[3]))
    end
  end
  if ttl >= 0 then redis.call('EXPIRE', queue, ttl > 0 and ttl or tonumber(ARGV[3])) end
elseif ARGV[1] ~= '' then
  return 0
end
redis.call('ZREM', KEYS[5], ARGV[4])
return 1

--- stage_hash
-- KEYS[1] a rehydration's staging hash of request records (in the session's
-- slot, read by nothing but rehydrate_install). ARGV: its TTL (s), field,
-- value, ... Returns its length.
local pairs_ = {}
for i = 2, #ARGV do pairs_[#pairs_ + 1] = ARGV[i] end
if #pairs_ > 0 then redis.call('HSET', KEYS[1], unpack(pairs_)) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return redis.call('HLEN', KEYS[1])

--- rehydrate_install
-- KEYS: the session's keys, KEYS[5] the staged log (a list), KEYS[6] the
-- staged request records (a hash), KEYS[7] the tenant's session index.
-- ARGV: items staged, records staged, default ttl (s), session id (index
--       member), number of meta fields m, m meta field/value pairs, then the
--       summary's field/value pairs.
-- Brings an archived session back in one step, or does nothing: if the
-- session exists (another replica, or a write, was first) or the staged
-- copy is incomplete (expired). Clean (it is what the archive holds), so it
-- gets its TTL. Returns 'ok', 'exists' or 'stale'.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[5], KEYS[6])
  return 'exists'
end
local n, r = tonumber(ARGV[1]), tonumber(ARGV[2])
if redis.call('LLEN', KEYS[5]) ~= n or redis.call('HLEN', KEYS[6]) ~= r then
  redis.call('DEL', KEYS[5], KEYS[6])
  return 'stale'
end
local m = tonumber(ARGV[5])
local meta = {}
for i = 6, 5 + 2 * m do meta[#meta + 1] = ARGV[i] end
-- HSET first (refused at maxmemory, then nothing is written), as in append.
redis.call('HSET', KEYS[1], unpack(meta))
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
local summary = {}
for i = 6 + 2 * m, #ARGV do summary[#summary + 1] = ARGV[i] end
if #summary > 0 then redis.call('HSET', KEYS[4], unpack(summary)) end
if n > 0 then redis.call('RENAME', KEYS[5], KEYS[2]) end
if r > 0 then redis.call('RENAME', KEYS[6], KEYS[3]) end
local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl')) or 0
for i = 1, 4 do
  if ttl < 0 then
    redis.call('PERSIST', KEYS[i])
  else
    redis.call('EXPIRE', KEYS[i], ttl > 0 and ttl or tonumber(ARGV[3]))
  end
end
if KEYS[7] then redis.call('ZADD', KEYS[7], 'NX', 0, ARGV[4]) end
return 'ok'
