package broker

import (
	"context"
	_ "embed"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// A channel's history and presence live in keys next to its pub/sub name
// (<prefix><channel>), in the same Redis Cluster slot, so that one script
// can write them and publish on the channel (SPUBLISH from a script must
// stay in the slot of its keys):
//
//	<key>:s  stream: the latest publications, IDs <offset>-0, fields d (data), t (ms)
//	<key>:m  hash: e (epoch), o (offset of the last publication)
//	<key>:p  hash: presence, connection id → info
//	<key>:z  sorted set: presence, connection id → expiry (ms)
//
// where <key> is the name itself when it holds a hash tag ({…} with
// something inside), and {name} otherwise. A name holding a '}' without a
// hash tag cannot be wrapped so; its keys are {n}name, n being the
// smallest decimal number whose slot is the name's.
const (
	streamKey   = ":s"
	metaKey     = ":m"
	presenceKey = ":p"
	expiryKey   = ":z"
)

// channelKey is the key of channel's suffix (one of the *Key constants).
func (r *Redis) channelKey(channel, suffix string) string {
	return keyOf(r.opt.Prefix+channel, suffix)
}

func keyOf(name, suffix string) string {
	if i := strings.IndexByte(name, '{'); i >= 0 {
		if j := strings.IndexByte(name[i+1:], '}'); j > 0 {
			return name + suffix
		}
	}
	if !strings.Contains(name, "}") {
		return "{" + name + "}" + suffix
	}
	return "{" + slotTag(Slot(name)) + "}" + name + suffix
}

var (
	slotTagsOnce sync.Once
	slotTags     []string
)

// slotTag is the smallest decimal number whose slot is slot.
func slotTag(slot int) string {
	slotTagsOnce.Do(func() {
		slotTags = make([]string, 16384)
		for n, left := 0, len(slotTags); left > 0; n++ {
			s := strconv.Itoa(n)
			if k := Slot(s); slotTags[k] == "" {
				slotTags[k] = s
				left--
			}
		}
	})
	return slotTags[slot]
}

//go:embed publish.lua
var publishSource string

// publishScript appends to history and publishes (see publish.lua).
var publishScript = redis.NewScript(publishSource)

// historyScript reads a channel's position and publications, and gives a
// channel without an epoch one (so that the position read stays valid for
// the publications that follow).
//
// KEYS: stream, meta. ARGV: start ("(<after>-0"; "" for the latest),
// limit, the oldest t kept (ms; 0: any), meta TTL (ms), the epoch to start.
// Returns {epoch, top, id, data, id, data, …}, oldest first.
var historyScript = redis.NewScript(`
local stream, meta = KEYS[1], KEYS[2]
local m = redis.call('HMGET', meta, 'e', 'o')
local epoch, top = m[1], m[2]
if not epoch then
  epoch, top = ARGV[5], '0'
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 'o', 0)
  redis.call('PEXPIRE', meta, ARGV[4])
end
local out = {epoch, top or '0'}
local limit, oldest = tonumber(ARGV[2]), tonumber(ARGV[3])
if limit <= 0 then
  return out
end
local function keep(entry)
  local f, data, t = entry[2], nil, nil
  for i = 1, #f, 2 do
    if f[i] == 'd' then
      data = f[i + 1]
    elseif f[i] == 't' then
      t = tonumber(f[i + 1])
    end
  end
  if data and (oldest == 0 or not t or t >= oldest) then
    return data
  end
end
if ARGV[1] == '' then
  local got = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit)
  for i = #got, 1, -1 do
    local data = keep(got[i])
    if data then
      out[#out + 1] = got[i][1]
      out[#out + 1] = data
    end
  end
  return out
end
-- Expired entries come first: read on past them until limit are found.
local start, found = ARGV[1], 0
while found < limit do
  local want = limit - found
  local got = redis.call('XRANGE', stream, start, '+', 'COUNT', want)
  for i = 1, #got do
    local data = keep(got[i])
    if data then
      out[#out + 1] = got[i][1]
      out[#out + 1] = data
      found = found + 1
    end
  end
  if #got < want then
    break
  end
  start = '(' .. got[#got][1]
end
return out
`)

// SetClock replaces the clock that history and presence entries age by
// (time.Now); for tests. Redis expires keys by its own clock, and the
// presence refresher runs on real time.
func (r *Redis) SetClock(now func() time.Time) {
	r.nowMu.Lock()
	r.now = now
	r.nowMu.Unlock()
}

func (r *Redis) clock() time.Time {
	r.nowMu.RLock()
	now := r.now
	r.nowMu.RUnlock()
	if now != nil {
		return now()
	}
	return time.Now()
}

// ms is d in milliseconds, at least 1 (PEXPIRE 0 deletes).
func ms(d time.Duration) int64 { return max(d.Milliseconds(), 1) }

func (r *Redis) spublish() string {
	if r.cluster != nil {
		return "1"
	}
	return "0"
}

// publishArgs are publish.lua's keys and arguments for p.
func (r *Redis) publishArgs(p HistoryPub, now int64) ([]string, []any) {
	meta := p.Opt.metaTTL()
	ttl := p.Opt.TTL
	if ttl <= 0 {
		ttl = meta // entries do not age: the stream lasts as long as its epoch
	}
	keys := []string{r.channelKey(p.Channel, streamKey), r.channelKey(p.Channel, metaKey)}
	return keys, []any{r.opt.Prefix + p.Channel, p.Data, max(p.Opt.Size, 0), ms(ttl), ms(meta), newEpoch(), now, r.spublish()}
}

// PublishHistory runs publish.lua once per publication: one EVALSHA, or
// one pipeline of them for several (and EVALs for those the server did
// not know the script for, which then did not run).
func (r *Redis) PublishHistory(ctx context.Context, pubs []HistoryPub) ([]Position, error) {
	if err := r.usable(); err != nil {
		return nil, err
	}
	if len(pubs) == 0 {
		return nil, nil
	}
	now := r.clock().UnixMilli()
	calls := make([]scriptCall, len(pubs))
	for i, p := range pubs {
		calls[i].keys, calls[i].args = r.publishArgs(p, now)
	}
	cmds, err := r.runScripts(ctx, publishScript, calls)
	if err != nil {
		return nil, r.failed(ctx, err)
	}
	pos := make([]Position, len(pubs))
	for i, c := range cmds {
		v, err := c.Slice()
		if err != nil {
			return nil, r.failed(ctx, err)
		}
		if len(v) == 2 {
			epoch, _ := v[0].(string)
			off, _ := v[1].(int64)
			pos[i] = Position{epoch, uint64(off)}
		}
		if pos[i].Epoch == "" || pos[i].Offset == 0 {
			return nil, fmt.Errorf("%w: publish script answered %v (%v)", ErrUnavailable, v, err)
		}
	}
	return pos, nil
}

// History runs one script that reads the channel's position and entries
// (XRANGE after q.After, or XREVRANGE for the latest).
func (r *Redis) History(ctx context.Context, channel string, q HistoryQuery) (HistoryResult, error) {
	if err := r.usable(); err != nil {
		return HistoryResult{}, err
	}
	now := r.clock()
	start := ""
	if !q.Latest {
		start = "(" + strconv.FormatUint(q.After, 10) + "-0"
	}
	var oldest int64
	if q.Opt.TTL > 0 {
		oldest = now.Add(-q.Opt.TTL).UnixMilli()
	}
	keys := []string{r.channelKey(channel, streamKey), r.channelKey(channel, metaKey)}
	v, err := historyScript.Run(ctx, r.client, keys, start, max(q.Limit, 0), oldest, ms(q.Opt.metaTTL()), newEpoch()).Slice()
	if err != nil {
		return HistoryResult{}, r.failed(ctx, err)
	}
	res, err := readHistory(v)
	if err != nil {
		return HistoryResult{}, fmt.Errorf("%w: history of %s: %v", ErrUnavailable, channel, err)
	}
	return res, nil
}

// readHistory reads historyScript's answer.
func readHistory(v []any) (HistoryResult, error) {
	if len(v) < 2 || len(v)%2 != 0 {
		return HistoryResult{}, fmt.Errorf("%d values", len(v))
	}
	epoch, _ := v[0].(string)
	top, _ := v[1].(string)
	off, err := strconv.ParseUint(top, 10, 64)
	if epoch == "" || err != nil {
		return HistoryResult{}, fmt.Errorf("bad position %v %v", v[0], v[1])
	}
	res := HistoryResult{Top: Position{epoch, off}}
	if len(v) > 2 {
		res.Pubs = make([]Stored, 0, (len(v)-2)/2)
	}
	for i := 2; i < len(v); i += 2 {
		id, _ := v[i].(string)
		data, _ := v[i+1].(string)
		ms, _, _ := strings.Cut(id, "-")
		o, err := strconv.ParseUint(ms, 10, 64)
		if err != nil {
			return HistoryResult{}, fmt.Errorf("bad entry id %q", id)
		}
		res.Pubs = append(res.Pubs, Stored{o, []byte(data)})
	}
	return res, nil
}

// scriptCall is one run of a script.
type scriptCall struct {
	keys []string
	args []any
}

// runScripts runs s once per call in one round trip: EVALSHA, and EVAL
// for the calls the server answered NOSCRIPT (Redis restarted, or its
// script cache was flushed), which did not run. If another client loaded
// the script while the pipeline ran, a call after one refused may have
// run before it. It returns the commands, in the order of calls, and the
// first error that is not a reply of the script itself.
func (r *Redis) runScripts(ctx context.Context, s *redis.Script, calls []scriptCall) ([]*redis.Cmd, error) {
	if len(calls) == 1 {
		c := s.Run(ctx, r.client, calls[0].keys, calls[0].args...)
		if err := c.Err(); err != nil && !isReply(err) {
			return nil, err
		}
		return []*redis.Cmd{c}, nil
	}
	cmds := make([]*redis.Cmd, len(calls))
	_, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, c := range calls {
			cmds[i] = s.EvalSha(ctx, p, c.keys, c.args...)
		}
		return nil
	})
	var again []int
	for i, c := range cmds {
		if redis.HasErrorPrefix(c.Err(), "NOSCRIPT") {
			again = append(again, i)
		}
	}
	if len(again) > 0 {
		_, err = r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, i := range again {
				cmds[i] = s.Eval(ctx, p, calls[i].keys, calls[i].args...)
			}
			return nil
		})
	}
	if err != nil {
		for _, c := range cmds {
			if err := c.Err(); err != nil && !isReply(err) {
				return nil, err
			}
		}
	}
	return cmds, nil
}

// isReply reports whether err is an error reply from Redis (not a failure
// to reach it).
func isReply(err error) bool {
	var reply redis.Error
	return errors.As(err, &reply)
}

// Interface guards
var (
	_ Historian = (*Redis)(nil)
	_ Presencer = (*Redis)(nil)
)
