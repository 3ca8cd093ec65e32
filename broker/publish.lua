-- Appends a publication to a channel's history and publishes it with its
-- position, as one atomic step: no subscriber sees a publication that is
-- not in history, nor offsets out of order.
--
-- KEYS[1]  the channel's stream (<key>:s)
-- KEYS[2]  the channel's meta hash (<key>:m): e = epoch, o = last offset
-- ARGV[1]  the pub/sub channel (<prefix><channel>)
-- ARGV[2]  the publication (one JSON value)
-- ARGV[3]  how many publications the stream keeps (XADD MAXLEN)
-- ARGV[4]  how long the stream lives after this publication, ms
-- ARGV[5]  how long the epoch lives after this publication, ms
-- ARGV[6]  the epoch to start if the channel has none: random, no spaces
-- ARGV[7]  now, ms since the Unix epoch (entries older than the TTL are
--          not read back)
-- ARGV[8]  "1": SPUBLISH (Redis Cluster), anything else: PUBLISH
--
-- Returns {epoch, offset}.
local stream, meta = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  -- A stream without its epoch belongs to a lost history.
  epoch = ARGV[6]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
end
local off = redis.call('HINCRBY', meta, 'o', 1)
local id = string.format('%d', off)
local added = redis.pcall('XADD', stream, 'MAXLEN', ARGV[3], id .. '-0', 'd', ARGV[2], 't', ARGV[7])
if type(added) == 'table' and added.err then
  -- The stream is ahead of the counter (someone changed one without the
  -- other): neither can be trusted, so the history starts again.
  epoch, off, id = ARGV[6], 1, '1'
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 1)
  redis.call('XADD', stream, 'MAXLEN', ARGV[3], '1-0', 'd', ARGV[2], 't', ARGV[7])
end
redis.call('PEXPIRE', stream, ARGV[4])
redis.call('PEXPIRE', meta, ARGV[5])
local cmd = 'PUBLISH'
if ARGV[8] == '1' then
  cmd = 'SPUBLISH'
end
redis.call(cmd, ARGV[1], '#p ' .. epoch .. ' ' .. id .. '\n' .. ARGV[2])
return {epoch, off}
