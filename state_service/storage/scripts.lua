-- statecar Lua scripts. Loaded by state_service/storage/redis.py, which splits
-- this file at the "--- name" markers. Every script takes the session's keys in
-- the same order, all in one hash slot:
--   KEYS[1] meta hash   KEYS[2] log list   KEYS[3] request-id hash
--   KEYS[4] summary hash (inc, upto, from, text, tok: a summary of seqs
--           from..upto of incarnation inc; beside the log, never part of it)
-- meta fields: inc (incarnation id), ver (version), last (newest seq ever
-- assigned), n (items in the log), trunc (count of pops, so caches know whether
-- the log only grew), ttl (0 default, -1 persist, >0 seconds), ctime, mtime (ms),
-- strat (context strategy number, absent = service default), shares (tier
-- shares "recent,summary,retrieval", absent = service default), tok (tokens
-- of the items appended, as counted by the service).
-- The etag of a session is inc .. "." .. ver; of a missing session "0".
-- Scripts that may create a session (append, update) take an optional KEYS[5],
-- the tenant's session index (a single node only: on a cluster it lives in
-- another slot and is added in an earlier step), and add the session id to it
-- in the same atomic step that creates the session, so a write refused at
-- maxmemory leaves nothing behind, not even an index entry.
-- The fork scripts (fork_read on the source, fork_check, fork_stage and
-- fork_install on the new session) are separate steps because a fork spans two
-- sessions, hence two slots on a cluster; see RedisStorage.fork_install.

--- common
local function etag_of(inc, ver)
  if not inc then return '0' end
  return inc .. '.' .. ver
end

local function apply_ttl(ttl_setting, default_ttl)
  local ttl = tonumber(ttl_setting) or 0
  for i = 1, 4 do
    if ttl < 0 then
      redis.call('PERSIST', KEYS[i])
    else
      redis.call('EXPIRE', KEYS[i], ttl > 0 and ttl or default_ttl)
    end
  end
end

local function index_created(member)
  if KEYS[5] then redis.call('ZADD', KEYS[5], 'NX', 0, member) end
end

local function head()
  local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'last', 'n', 'trunc', 'ttl', 'ctime',
    'mtime', 'strat', 'shares', 'tok')
  if h[1] then
    h[12] = redis.call('PTTL', KEYS[1])
    local s = redis.call('HMGET', KEYS[4], 'inc', 'upto')
    h[13] = (s[1] == h[1] and s[2]) or '0'
  end
  return h
end

-- Log indexes lo..hi (absolute), from the newest if `back`, within the bounds;
-- returns them in log order and the index of the first one returned. At most
-- `most_items` entries and, past the first, `most_bytes` bytes (0: no byte
-- bound), fetched in small LRANGEs: see `read` for why no step may grow with
-- the log.
local function bounded(lo, hi, back, most_items, most_bytes)
  local got, bytes = {}, 0
  local step = 32
  local at = back and hi or lo
  while #got < most_items and (back and at >= lo or not back and at <= hi) do
    local first, last
    if back then first, last = math.max(lo, at - step + 1), at
    else first, last = at, math.min(hi, at + step - 1) end
    local chunk = redis.call('LRANGE', KEYS[2], first, last)
    if #chunk == 0 then break end
    local from, to, by = 1, #chunk, 1
    if back then from, to, by = #chunk, 1, -1 end
    for i = from, to, by do
      local size = #chunk[i]
      if #got >= most_items or (most_bytes > 0 and #got > 0 and bytes + size > most_bytes) then
        at = back and lo - 1 or hi + 1
        break
      end
      got[#got + 1] = chunk[i]
      bytes = bytes + size
    end
    if back then at = math.min(at, first - 1) else at = math.max(at, last + 1) end
  end
  if back then
    local count = #got
    for i = 1, math.floor(count / 2) do got[i], got[count + 1 - i] = got[count + 1 - i], got[i] end
    return got, hi - count + 1
  end
  return got, lo
end

--- append
-- ARGV: request_id, expected etag, default ttl (s), now (ms), new incarnation,
--       tokens of the payloads, session id (index member), payload...
-- Returns {'ok'|'replay', "etag first last[ tokens]"} or {'conflict', current etag}
-- (or {'missing', ''}: no session, and no new incarnation to create one);
-- an 'ok' that appended also the log's token count after it (the background
-- summarizer's trigger, so it needs no read of its own).
local request_id, expected, default_ttl, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local field = 'a:' .. request_id
if request_id ~= '' then
  local prior = redis.call('HGET', KEYS[3], field)
  if prior then return {'replay', prior} end
end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'last', 'n', 'ttl')
local inc = h[1]
local current = etag_of(inc, h[2])
if expected ~= '' and expected ~= current then return {'conflict', current} end
local count = #ARGV - 7
local response
if count == 0 then
  response = current .. ' 0 0'
  if inc then
    if request_id ~= '' then redis.call('HSET', KEYS[3], field, response) end
    apply_ttl(h[5], default_ttl)
  end
  return {'ok', response}
end
local ver, last, n, ttl = 0, 0, 0, 0
if inc then
  ver, last, n, ttl = tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), tonumber(h[5])
else
  -- A new incarnation never inherits what an expiring predecessor left behind.
  -- No new incarnation given: the caller (the durable tier, tiered.py) must
  -- look for an archived copy before a session may be created.
  if ARGV[5] == '' then return {'missing', ''} end
  -- HSET (refused at maxmemory) before DEL (never refused): once a script has
  -- written, Redis lets the rest of it exceed maxmemory.
  inc = ARGV[5]
  redis.call('HSET', KEYS[1], 'inc', inc, 'ctime', now, 'trunc', 0, 'ttl', 0)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  index_created(ARGV[7])
end
local batch = {}
for i = 1, count do
  batch[#batch + 1] = (last + i) .. ':' .. ARGV[7 + i]
  if #batch == 500 then
    redis.call('RPUSH', KEYS[2], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('RPUSH', KEYS[2], unpack(batch)) end
ver = ver + 1
redis.call('HSET', KEYS[1], 'ver', ver, 'last', last + count, 'n', n + count, 'mtime', now)
local tok = redis.call('HINCRBY', KEYS[1], 'tok', tonumber(ARGV[6]) or 0)
response = etag_of(inc, ver) .. ' ' .. (last + 1) .. ' ' .. (last + count)
-- The record keeps the token count too: a replay answers as the first did.
if request_id ~= '' then redis.call('HSET', KEYS[3], field, response .. ' ' .. tok) end
apply_ttl(ttl, default_ttl)
return {'ok', response, tok}

--- pop
-- ARGV: request_id, expected etag, default ttl (s), now (ms).
-- Returns {'ok'|'replay', "etag entry"} (entry empty when nothing was popped)
-- or {'conflict', current etag}.
local request_id, expected, default_ttl, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local field = 'p:' .. request_id
if request_id ~= '' then
  local prior = redis.call('HGET', KEYS[3], field)
  if prior then return {'replay', prior} end
end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'n', 'trunc', 'ttl')
local inc = h[1]
local current = etag_of(inc, h[2])
if expected ~= '' and expected ~= current then return {'conflict', current} end
if not inc then return {'ok', '0 '} end
local entry = redis.call('RPOP', KEYS[2])
local response
if not entry then
  response = current .. ' '
else
  local ver = tonumber(h[2]) + 1
  redis.call('HSET', KEYS[1], 'ver', ver, 'n', tonumber(h[3]) - 1,
    'trunc', tonumber(h[4]) + 1, 'mtime', now)
  -- A summary that covers the popped item no longer describes the log.
  local s = redis.call('HMGET', KEYS[4], 'inc', 'upto')
  local popped = tonumber(string.match(entry, '^(%d+):'))
  if s[1] == inc and popped and tonumber(s[2]) >= popped then redis.call('DEL', KEYS[4]) end
  response = etag_of(inc, ver) .. ' ' .. entry
end
if request_id ~= '' then redis.call('HSET', KEYS[3], field, response) end
apply_ttl(h[5], default_ttl)
return {'ok', response}

--- update
-- ARGV: expected etag, default ttl (s), now (ms), new incarnation,
--       allow_missing ('1'|'0'), new ttl setting ('' = unchanged),
--       strategy ('' = unchanged, '0' = service default), shares ('' =
--       unchanged, '-' = service default), session id (index member).
-- Returns {'ok', head} or {'conflict', etag} or {'missing', ''}.
local expected, default_ttl, now = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'ttl')
local inc = h[1]
local current = etag_of(inc, h[2])
if expected ~= '' and expected ~= current then return {'conflict', current} end
local ver, ttl = 0, 0
if inc then
  ver, ttl = tonumber(h[2]), tonumber(h[3])
elseif ARGV[5] == '1' then
  if ARGV[4] == '' then return {'missing', ''} end  -- as in append
  redis.call('HSET', KEYS[1], 'inc', ARGV[4], 'ctime', now, 'trunc', 0, 'last', 0, 'n', 0)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])  -- after HSET, as in append
  index_created(ARGV[9])
else
  return {'missing', ''}
end
if ARGV[6] ~= '' then ttl = tonumber(ARGV[6]) end
redis.call('HSET', KEYS[1], 'ver', ver + 1, 'ttl', ttl, 'mtime', now)
if ARGV[7] == '0' then redis.call('HDEL', KEYS[1], 'strat')
elseif ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'strat', ARGV[7]) end
if ARGV[8] == '-' then redis.call('HDEL', KEYS[1], 'shares')
elseif ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'shares', ARGV[8]) end
apply_ttl(ttl, default_ttl)
return {'ok', head()}

--- delete
-- ARGV: expected etag. Returns {'ok'|'missing'|'conflict', current etag}.
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
local current = etag_of(h[1], h[2])
if ARGV[1] ~= '' and ARGV[1] ~= current then return {'conflict', current} end
if not h[1] then return {'missing', current} end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
return {'ok', current}

--- read
-- ARGV: known incarnation, known trunc, known version, known item count,
--       tail window, range start, range stop ('' = no explicit range),
--       range direction ('back' = keep the newest of the range when cut),
--       most items, most bytes (0 = no byte bound) this step returns.
-- One consistent snapshot: the head plus either the explicit index range, or
-- what a cache that knows (inc, trunc, ver, n) is missing of the newest
-- `window` items. Returns {head, mode, entries...}; mode 'hit' (nothing
-- changed), 'delta' (entries are indexes n.. of the log), 'reset' (entries are
-- the newest items), 'range' (entries are the explicit range, or the part of
-- it at its start, or with 'back' at its end, that fits the bounds).
-- Bounded work: at most `most items` entries and, past the first entry,
-- `most bytes` bytes, fetched in small LRANGEs, so no step is proportional to
-- the log or to the caller's window (Lua interns every string it touches, and
-- entries that differ only in their seq prefix can collide in its hash table:
-- tens of thousands of them in one step kept Redis busy for seconds).
local h = head()
if not h[1] then return {h, 'missing'} end
local n = tonumber(h[4])
local most_items, most_bytes = tonumber(ARGV[9]), tonumber(ARGV[10])

local result = {h}
local entries
if ARGV[6] ~= '' then
  result[2] = 'range'
  local lo, hi = tonumber(ARGV[6]), tonumber(ARGV[7])
  if lo < 0 then lo = n + lo end
  if hi < 0 then hi = n + hi end
  lo, hi = math.max(lo, 0), math.min(hi, n - 1)
  entries = {}
  if lo <= hi then entries = bounded(lo, hi, ARGV[8] == 'back', most_items, most_bytes) end
else
  local window = tonumber(ARGV[5])
  local lo = math.max(0, n - window)
  if h[1] == ARGV[1] and h[5] == ARGV[2] then
    if h[2] == ARGV[3] then return {h, 'hit'} end
    local known = tonumber(ARGV[4])
    if n - known <= window then lo = known end
  end
  local first
  entries, first = {}, n
  if window > 0 and lo < n then entries, first = bounded(lo, n - 1, true, most_items, most_bytes) end
  if h[1] == ARGV[1] and h[5] == ARGV[2] and first == tonumber(ARGV[4]) then
    result[2] = 'delta'
  else
    result[2] = 'reset'
  end
end
for i = 1, #entries do result[i + 2] = entries[i] end
return result

--- summary_commit
-- ARGV: incarnation, trunc, expected covered-up-to seq ('0' = none yet), new
--       covered-up-to seq, first covered seq, summary text, its tokens.
-- The compare-and-set of the background summarizer: commits only if the
-- session is still the incarnation (and pop count) the summary was built
-- from, and the stored summary still covers exactly what it was folded onto.
-- Returns {'ok', upto} or {'conflict', current upto} or {'stale', ''}.
local h = redis.call('HMGET', KEYS[1], 'inc', 'trunc', 'last')
if not h[1] or h[1] ~= ARGV[1] or (h[2] or '0') ~= ARGV[2] then return {'stale', ''} end
if tonumber(ARGV[4]) > tonumber(h[3]) then return {'stale', ''} end
local s = redis.call('HMGET', KEYS[4], 'inc', 'upto')
local upto = '0'
if s[1] == ARGV[1] then upto = s[2] end
if upto ~= ARGV[3] then return {'conflict', upto} end
redis.call('HSET', KEYS[4], 'inc', ARGV[1], 'upto', ARGV[4], 'from', ARGV[5], 'text', ARGV[6],
  'tok', ARGV[7])
local pttl = redis.call('PTTL', KEYS[1])
if pttl > 0 then redis.call('PEXPIRE', KEYS[4], pttl) else redis.call('PERSIST', KEYS[4]) end
return {'ok', ARGV[4]}

--- workflow_update
-- KEYS[1] workflow hash (inc, ver, body, ctime, mtime).
-- ARGV: expected etag, allow_missing ('1'|'0'), ttl (s), now (ms), new incarnation, body.
-- Returns {'ok', inc, ver, ctime, mtime} or {'conflict', etag} or {'missing', ''}.
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'ctime')
local current = etag_of(h[1], h[2])
if ARGV[1] ~= '' and ARGV[1] ~= current then return {'conflict', current} end
local inc, ver, ctime = h[1], tonumber(h[2] or 0), h[3]
if not inc then
  if ARGV[2] ~= '1' then return {'missing', ''} end
  inc, ctime = ARGV[5], ARGV[4]
end
ver = ver + 1
redis.call('HSET', KEYS[1], 'inc', inc, 'ver', ver, 'body', ARGV[6], 'ctime', ctime, 'mtime', ARGV[4])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return {'ok', inc, tostring(ver), ctime, ARGV[4]}

--- workflow_delete
-- KEYS[1] workflow hash. ARGV: expected etag. Returns {'ok'|'missing'|'conflict', etag}.
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
local current = etag_of(h[1], h[2])
if ARGV[1] ~= '' and ARGV[1] ~= current then return {'conflict', current} end
if not h[1] then return {'missing', current} end
redis.call('DEL', KEYS[1])
return {'ok', current}

--- fork_read
-- KEYS: the source session's keys. ARGV: first index, last index (inclusive),
--       most items, most bytes (as in `read`: the chunk is cut at its end).
-- One chunk of a fork's copy, with the head it was read at: the fork checks
-- that inc and trunc stay the same across its chunks (the log only changes at
-- its tail, so then the prefix it copies cannot have changed).
-- Returns {'missing'} or {'ok', inc, trunc, last, n, ttl, strat, shares,
-- entries...} (absent settings as '').
local h = redis.call('HMGET', KEYS[1], 'inc', 'trunc', 'last', 'n', 'ttl', 'strat', 'shares')
if not h[1] then return {'missing'} end
local result = {'ok', h[1], h[2] or '0', h[3] or '0', h[4] or '0', h[5] or '0', h[6] or '',
  h[7] or ''}
local lo, hi = tonumber(ARGV[1]), math.min(tonumber(ARGV[2]), (tonumber(h[4]) or 0) - 1)
if hi >= lo then
  local entries = bounded(lo, hi, false, tonumber(ARGV[3]), tonumber(ARGV[4]))
  for i = 1, #entries do result[#result + 1] = entries[i] end
end
return result

--- fork_check
-- KEYS: the new session's keys. ARGV: request_id.
-- Before a fork copies anything: {'replay', response} if request_id made this
-- session already, {'exists', ''} if the session exists, else {'absent', ''}.
-- fork_install checks both again; this only spares copying for nothing.
if ARGV[1] ~= '' then
  local prior = redis.call('HGET', KEYS[3], 'f:' .. ARGV[1])
  if prior then return {'replay', prior} end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists', ''} end
return {'absent', ''}

--- fork_stage
-- KEYS[1] a fork's staging list (in the new session's slot, never read by
-- anything but fork_install). ARGV: its TTL (s), entries... Appends a chunk;
-- the TTL removes what a fork that died half-way left behind.
-- Returns the staging list's length.
local batch = {}
for i = 2, #ARGV do
  batch[#batch + 1] = ARGV[i]
  if #batch == 500 then
    redis.call('RPUSH', KEYS[1], unpack(batch))
    batch = {}
  end
end
if #batch > 0 then redis.call('RPUSH', KEYS[1], unpack(batch)) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return redis.call('LLEN', KEYS[1])

--- fork_install
-- KEYS: the new session's keys, KEYS[5] the fork's staging list, KEYS[6] the
-- tenant's session index (one node only, as for append).
-- ARGV: request_id, items staged, up_to seq (the new session's last), tokens
--       of the items, now (ms), default ttl (s), new incarnation, ttl setting,
--       strategy ('' = default), shares ('' = default), session id (index member).
-- The step that makes a fork visible: the staged list becomes the session's
-- log (RENAME, O(1)) together with a new head, or nothing happens.
-- Returns {'ok', head, response} or {'replay', response} or {'exists', ''} or
-- {'stale', ''} (the staging list is not what was staged: it expired).
local request_id = ARGV[1]
local field = 'f:' .. request_id
if request_id ~= '' then
  local prior = redis.call('HGET', KEYS[3], field)
  if prior then
    redis.call('DEL', KEYS[5])
    return {'replay', prior}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('DEL', KEYS[5])
  return {'exists', ''}
end
local count = tonumber(ARGV[2])
if redis.call('LLEN', KEYS[5]) ~= count then return {'stale', ''} end
local inc, now = ARGV[7], ARGV[5]
-- HSET first (refused at maxmemory, then nothing is written), then the
-- leftovers of an expiring predecessor go, as in append.
redis.call('HSET', KEYS[1], 'inc', inc, 'ver', 1, 'last', ARGV[3], 'n', count, 'trunc', 0,
  'ttl', ARGV[8], 'ctime', now, 'mtime', now, 'tok', ARGV[4])
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
if count > 0 then redis.call('RENAME', KEYS[5], KEYS[2]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'strat', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[1], 'shares', ARGV[10]) end
local response = etag_of(inc, 1) .. ' ' .. count .. ' ' .. ARGV[3]
if request_id ~= '' then redis.call('HSET', KEYS[3], field, response) end
apply_ttl(ARGV[8], tonumber(ARGV[6]))
if KEYS[6] then redis.call('ZADD', KEYS[6], 'NX', 0, ARGV[11]) end
return {'ok', head(), response}

--- view_read
-- KEYS: the session's keys. ARGV: most items, most bytes (as in `read`).
-- The compacted view is stored in the summary hash (KEYS[4]), beside the
-- summary, so it expires and is deleted with the session by the steps that
-- already handle that hash: vinc (incarnation), vupto (last seq it stands
-- in for), vidx (log items it stands in for), vitems (its stored items),
-- vcount. It is current while the session is the same incarnation and the
-- log still holds the vidx items it covered: the log only changes at its
-- tail, seqs only grow, so that holds iff the entry at index vidx-1 still has
-- a seq <= vupto (a pop below it and new appends would put a larger seq
-- there). Returns {head} (no session), {head, 'log'} (no current view) or
-- {head, 'view', vupto, vidx, vitems, vcount, log entries from vidx...}: the
-- first of them that fit the bounds; the caller reads the rest in `read` steps.
local h = head()
if not h[1] then return {h} end
local v = redis.call('HMGET', KEYS[4], 'vinc', 'vupto', 'vidx', 'vitems', 'vcount')
if v[1] ~= h[1] then return {h, 'log'} end
local vidx = tonumber(v[3])
if tonumber(h[4]) < vidx then return {h, 'log'} end
if vidx > 0 then
  local edge = redis.call('LINDEX', KEYS[2], vidx - 1)
  local seq = edge and tonumber(string.match(edge, '^(%d+):'))
  if not seq or seq > tonumber(v[2]) then return {h, 'log'} end
end
local result = {h, 'view', v[2], v[3], v[4], v[5]}
local n = tonumber(h[4])
local entries = {}
if vidx < n then entries = bounded(vidx, n - 1, false, tonumber(ARGV[1]), tonumber(ARGV[2])) end
for i = 1, #entries do result[#result + 1] = entries[i] end
return result

--- view_commit
-- KEYS: the session's keys. ARGV: request_id, expected etag, default ttl (s),
--       now (ms), vupto, vidx, vitems, vcount.
-- Stores a compacted view (see view_read) if the etag is still the one the
-- view was computed from; bumps the version (the session's history as
-- get_items sees it changed) and leaves the log alone.
-- Returns {'ok'|'replay', "etag count upto"} or {'conflict', etag} or
-- {'missing', ''}.
local request_id, expected = ARGV[1], ARGV[2]
local field = 'c:' .. request_id
if request_id ~= '' then
  local prior = redis.call('HGET', KEYS[3], field)
  if prior then return {'replay', prior} end
end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'ttl')
local current = etag_of(h[1], h[2])
if expected ~= current then return {'conflict', current} end
if not h[1] then return {'missing', ''} end
local ver = tonumber(h[2]) + 1
redis.call('HSET', KEYS[4], 'vinc', h[1], 'vupto', ARGV[5], 'vidx', ARGV[6], 'vitems', ARGV[7],
  'vcount', ARGV[8])
redis.call('HSET', KEYS[1], 'ver', ver, 'mtime', ARGV[4])
local response = etag_of(h[1], ver) .. ' ' .. ARGV[8] .. ' ' .. ARGV[5]
if request_id ~= '' then redis.call('HSET', KEYS[3], field, response) end
apply_ttl(h[3], tonumber(ARGV[3]))
return {'ok', response}

--- unlock
-- KEYS[1] a lock key; ARGV: the holder's token.
-- Deletes the lock only if this holder still has it (it may have expired and
-- been taken by another replica). Returns 1 if deleted.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0

--- paused_put
-- KEYS[1] the session's meta hash, KEYS[2] its paused-runs hash
-- (<prefix>:{<tenant>:<session>}:p). A paused run is three fields: <id> the
-- header "status expire_ms create_ms claim" (status paused|claimed|resolved,
-- claim "-" when none), <id>:b its body (the run state, or the result once
-- resolved), <id>:a its approvals and <id>:i the session's incarnation when
-- it paused ('' if the session did not exist). Expiry is per run (the header); the key
-- itself expires with the newest run.
-- ARGV: expected etag ('' = any), run id, now (ms), ttl (ms), max live runs,
-- body, approvals.
-- Drops expired runs first, so the scan is bounded by the live-run limit.
-- Returns {'ok'|'replay', header} or {'conflict', etag} or {'full', count}.
local run, now, ttl = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local prior = redis.call('HGET', KEYS[2], run)
if prior then
  local expire = tonumber(string.match(prior, '^%a+ (%d+)'))
  if expire > now then return {'replay', prior} end
end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver')
if ARGV[1] ~= '' then
  local current = etag_of(h[1], h[2])
  if ARGV[1] ~= current then return {'conflict', current} end
end
local live = 0
for _, name in ipairs(redis.call('HKEYS', KEYS[2])) do
  if not string.find(name, ':', 1, true) then
    local header = redis.call('HGET', KEYS[2], name)
    local expire = tonumber(string.match(header, '^%a+ (%d+)'))
    if expire <= now then
      redis.call('HDEL', KEYS[2], name, name .. ':b', name .. ':a', name .. ':i')
    else
      live = live + 1
    end
  end
end
if live >= tonumber(ARGV[5]) then return {'full', tostring(live)} end
local header = 'paused ' .. (now + ttl) .. ' ' .. now .. ' -'
redis.call('HSET', KEYS[2], run, header, run .. ':b', ARGV[6], run .. ':a', ARGV[7],
  run .. ':i', h[1] or '')
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return {'ok', header}

--- paused_list
-- KEYS[1] a paused-runs hash (see paused_put), KEYS[2] its session's meta
-- hash. ARGV: now (ms).
-- Returns {id, header, approvals, ...} of the live runs (bounded by the
-- live-run limit paused_put enforces), leaving out paused runs of an earlier
-- incarnation of the session (see paused_claim).
local now = tonumber(ARGV[1])
local inc = redis.call('HGET', KEYS[2], 'inc') or ''
local out = {}
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not string.find(name, ':', 1, true) then
    local got = redis.call('HMGET', KEYS[1], name, name .. ':a', name .. ':i')
    local stale = string.sub(got[1] or '', 1, 7) == 'paused ' and (got[3] or '') ~= ''
      and got[3] ~= inc
    if got[1] and not stale and tonumber(string.match(got[1], '^%a+ (%d+)')) > now then
      out[#out + 1] = name
      out[#out + 1] = got[1]
      out[#out + 1] = got[2] or ''
    end
  end
end
return out

--- paused_claim
-- KEYS[1] a paused-runs hash, KEYS[2] its session's meta hash. ARGV: run id,
-- claim id, now (ms). A run whose session was deleted (or deleted and
-- created again) since it paused is gone: resuming it would revive a
-- conversation its owner deleted.
-- The one step that decides who resumes a run: paused -> claimed by this
-- claim id, atomically. Returns {'claimed', header, body, approvals} (taken
-- now), {'resolved', header, result, approvals} (this claim id resolved it
-- before), {'held', header, body, approvals} (this claim id holds it: a retry
-- while the first attempt runs, or after it died), {'busy', header} (claimed
-- by another), {'done', header} (resolved by another
-- claim id) or {'missing'} (unknown or expired).
local run, claim, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local got = redis.call('HMGET', KEYS[1], run, run .. ':b', run .. ':a', run .. ':i')
local header = got[1]
if not header then return {'missing'} end
local status, expire, created, holder = string.match(header, '^(%a+) (%d+) (%d+) (%S+)$')
local paused_inc = got[4] or ''
local inc = redis.call('HGET', KEYS[2], 'inc') or ''
if tonumber(expire) <= now or (status == 'paused' and paused_inc ~= '' and inc ~= paused_inc) then
  redis.call('HDEL', KEYS[1], run, run .. ':b', run .. ':a', run .. ':i')
  return {'missing'}
end
if status == 'paused' then
  header = 'claimed ' .. expire .. ' ' .. created .. ' ' .. claim
  redis.call('HSET', KEYS[1], run, header)
  return {'claimed', header, got[2], got[3]}
end
if status == 'resolved' and holder == claim then
  return {'resolved', header, got[2], got[3]}
end
if status == 'claimed' and holder == claim then return {'held', header, got[2], got[3]} end
if status == 'claimed' then return {'busy', header} end
return {'done', header}

--- paused_resolve
-- KEYS[1] a paused-runs hash. ARGV: run id, claim id, now (ms), result.
-- claimed by this claim id -> resolved, the state replaced by the result.
-- Returns {'ok', header} (also when already resolved by this claim id),
-- {'busy', header} (another claim id holds or resolved it) or {'missing'}.
local run, claim, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local header = redis.call('HGET', KEYS[1], run)
if not header then return {'missing'} end
local status, expire, created, holder = string.match(header, '^(%a+) (%d+) (%d+) (%S+)$')
if holder ~= claim then return {'busy', header} end
if status == 'resolved' then return {'ok', header} end
header = 'resolved ' .. expire .. ' ' .. created .. ' ' .. claim
redis.call('HSET', KEYS[1], run, header, run .. ':b', ARGV[4])
return {'ok', header}

--- import
-- Appends entries that keep their seqs (ImportItems), atomically like append.
-- ARGV: request_id, expected etag, default ttl (s), now (ms), new incarnation,
--       tokens of the payloads, session id (index member), first seq, last
--       seq, entry ("<seq>:<payload>", seqs increasing)...
-- Returns {'ok'|'replay', "etag first last"} (an 'ok' that wrote also the
-- log's token count after it, as append), {'conflict', current etag} or
-- {'behind', "etag last"} when the first seq is not above the session's last
-- (or {'missing', ''}: no session, and no new incarnation to create one).
local request_id, expected, default_ttl, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local field = 'i:' .. request_id
if request_id ~= '' then
  local prior = redis.call('HGET', KEYS[3], field)
  if prior then return {'replay', prior} end
end
local h = redis.call('HMGET', KEYS[1], 'inc', 'ver', 'last', 'n', 'ttl')
local inc = h[1]
local current = etag_of(inc, h[2])
if expected ~= '' and expected ~= current then return {'conflict', current} end
local count = #ARGV - 9
if count == 0 then return {'ok', current .. ' 0 0'} end
local first, newest = tonumber(ARGV[8]), tonumber(ARGV[9])
local ver, last, n, ttl = 0, 0, 0, 0
if inc then
  ver, last, n, ttl = tonumber(h[2]), tonumber(h[3]), tonumber(h[4]), tonumber(h[5])
end
if first <= last then return {'behind', current .. ' ' .. last} end
if not inc then
  if ARGV[5] == '' then return {'missing', ''} end  -- as in append
  inc = ARGV[5]  -- as in append: HSET before DEL, a new incarnation inherits nothing
  redis.call('HSET', KEYS[1], 'inc', inc, 'ctime', now, 'trunc', 0, 'ttl', 0)
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  index_created(ARGV[7])
end
for i = 10, #ARGV, 500 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 499, #ARGV)))
end
ver = ver + 1
redis.call('HSET', KEYS[1], 'ver', ver, 'last', newest, 'n', n + count, 'mtime', now)
local tok = redis.call('HINCRBY', KEYS[1], 'tok', tonumber(ARGV[6]) or 0)
local response = etag_of(inc, ver) .. ' ' .. first .. ' ' .. newest
if request_id ~= '' then redis.call('HSET', KEYS[3], field, response) end
apply_ttl(ttl, default_ttl)
return {'ok', response, tok}
