package broker

import (
	"context"
	"sync"
	"time"

	"github.com/redis/go-redis/v9"
)

// Presence entries live in two keys per channel (see channelKey): a hash
// of connection id → info and a sorted set of connection id → expiry in
// ms. An entry outlives its node by at most its TTL: the node that made it
// pushes its expiry forward at least every TTL/3, and whoever reads the
// presence first removes the entries past their expiry. The keys
// themselves expire TTL after their last write, by Redis's clock.

// defaultPresenceTTL is PresenceOptions.TTL when none is set.
const defaultPresenceTTL = time.Minute

// minRefresh bounds how often the refresher runs, whatever the TTLs.
const minRefresh = 10 * time.Millisecond

func presenceTTL(opt PresenceOptions) time.Duration {
	if opt.TTL <= 0 {
		return defaultPresenceTTL
	}
	return opt.TTL
}

// presenceLua is the part every presence script shares.
const presenceLua = `
local p, z = KEYS[1], KEYS[2]
-- The keys must outlive the longest entry in them.
local function extend(ttl)
  for _, k in ipairs({p, z}) do
    if redis.call('PTTL', k) < ttl then
      redis.call('PEXPIRE', k, ttl)
    end
  end
end
local function publish(channel, sharded, payload)
  if sharded == '1' then
    redis.call('SPUBLISH', channel, payload)
  else
    redis.call('PUBLISH', channel, payload)
  end
end
`

// joinScript: ARGV id, info, expiry (ms), key TTL (ms), pub/sub channel,
// "1" to publish a join event, "1" for SPUBLISH.
var joinScript = redis.NewScript(presenceLua + `
redis.call('HSET', p, ARGV[1], ARGV[2])
redis.call('ZADD', z, ARGV[3], ARGV[1])
extend(tonumber(ARGV[4]))
if ARGV[6] == '1' then
  publish(ARGV[5], ARGV[7], '#j\n' .. ARGV[2])
end
return 1
`)

// leaveScript: ARGV id, pub/sub channel, "1" to publish a leave event,
// "1" for SPUBLISH. The event carries the info the entry had.
var leaveScript = redis.NewScript(presenceLua + `
local info = redis.call('HGET', p, ARGV[1])
redis.call('ZREM', z, ARGV[1])
if not info then
  return 0
end
redis.call('HDEL', p, ARGV[1])
if ARGV[3] == '1' then
  publish(ARGV[2], ARGV[4], '#l\n' .. info)
end
return 1
`)

// refreshScript: ARGV expiry (ms), key TTL (ms), then ids. It pushes the
// expiry of the ids forward (adding those Redis lost) and returns the ids
// that have no info, for the caller to write it back.
var refreshScript = redis.NewScript(presenceLua + `
local n = #ARGV
for i = 3, n, 500 do
  local args = {}
  for j = i, math.min(i + 499, n) do
    args[#args + 1] = ARGV[1]
    args[#args + 1] = ARGV[j]
  end
  redis.call('ZADD', z, unpack(args))
end
local missing = {}
for i = 3, n do
  if redis.call('HEXISTS', p, ARGV[i]) == 0 then
    missing[#missing + 1] = ARGV[i]
  end
end
extend(tonumber(ARGV[2]))
return missing
`)

// presenceScript: ARGV now (ms), "1" to count only. It removes the
// entries past their expiry, then answers HGETALL or HLEN.
var presenceScript = redis.NewScript(presenceLua + `
local dead = redis.call('ZRANGEBYSCORE', z, '-inf', '(' .. ARGV[1])
for i = 1, #dead, 500 do
  local chunk = {}
  for j = i, math.min(i + 499, #dead) do
    chunk[#chunk + 1] = dead[j]
  end
  redis.call('ZREM', z, unpack(chunk))
  redis.call('HDEL', p, unpack(chunk))
end
if ARGV[2] == '1' then
  return redis.call('HLEN', p)
end
return redis.call('HGETALL', p)
`)

// presence is what a Redis broker remembers of the entries it made, to
// keep them alive while it lives and remove them when it closes.
type presence struct {
	// gate is held shared by Join and Leave across their round trip, and
	// exclusively by the refresher and Close across theirs: a refresh
	// never writes back an entry a Leave removed meanwhile.
	gate   sync.RWMutex
	mu     sync.Mutex
	joined map[string]*joinedChannel
	// leaves are Leaves Redis did not take (it was down); the refresher
	// does them when it is back.
	leaves map[string]map[string]PresenceOptions
	period time.Duration // the refresher's, 0 while nothing is joined
	wake   chan struct{} // Join: a channel needs a shorter period
	back   chan struct{} // the probe: Redis is reachable again
	stop   chan struct{} // Close
	done   chan struct{} // the refresher has returned
}

type joinedChannel struct {
	opt PresenceOptions // of the last Join
	ids map[string][]byte
}

func (ps *presence) init() {
	ps.joined = map[string]*joinedChannel{}
	ps.leaves = map[string]map[string]PresenceOptions{}
	ps.wake, ps.back = make(chan struct{}, 1), make(chan struct{}, 1)
	ps.stop, ps.done = make(chan struct{}), make(chan struct{})
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func flag(b bool) string {
	if b {
		return "1"
	}
	return "0"
}

func (r *Redis) presenceKeys(channel string) []string {
	return []string{r.channelKey(channel, presenceKey), r.channelKey(channel, expiryKey)}
}

// Join writes the entry and, with opt.Events, publishes the join event,
// in one script; the broker then keeps the entry alive until Leave or
// Close.
func (r *Redis) Join(ctx context.Context, channel, id string, info []byte, opt PresenceOptions) error {
	if err := r.usable(); err != nil {
		return err
	}
	ttl := presenceTTL(opt)
	ps := &r.pres
	ps.gate.RLock()
	defer ps.gate.RUnlock()
	err := joinScript.Run(ctx, r.client, r.presenceKeys(channel), id, info, r.clock().Add(ttl).UnixMilli(), ms(ttl),
		r.opt.Prefix+channel, flag(opt.Events), r.spublish()).Err()
	if err != nil {
		return r.failed(ctx, err)
	}
	ps.mu.Lock()
	defer ps.mu.Unlock()
	jc := ps.joined[channel]
	if jc == nil {
		jc = &joinedChannel{ids: map[string][]byte{}}
		ps.joined[channel] = jc
	}
	jc.opt = opt
	jc.ids[id] = info
	if l := ps.leaves[channel]; l != nil {
		delete(l, id)
		if len(l) == 0 {
			delete(ps.leaves, channel)
		}
	}
	if ps.period == 0 || refreshPeriod(ttl) < ps.period {
		signal(ps.wake)
	}
	return nil
}

// Leave removes the entry and publishes the leave event when it existed.
// When Redis cannot be reached it answers nil: the broker removes the
// entry when Redis is back (and the entry expires after its TTL anyway).
func (r *Redis) Leave(ctx context.Context, channel, id string, opt PresenceOptions) error {
	if r.closed.Load() {
		return ErrClosed
	}
	ps := &r.pres
	ps.gate.RLock()
	defer ps.gate.RUnlock()
	ps.mu.Lock()
	if jc := ps.joined[channel]; jc != nil {
		delete(jc.ids, id)
		if len(jc.ids) == 0 {
			delete(ps.joined, channel)
		}
	}
	ps.mu.Unlock()
	if r.usable() == nil {
		err := r.leaveCall(channel, id, opt).run(ctx, r, leaveScript)
		if err == nil {
			return nil
		}
		if isReply(err) {
			return r.failed(ctx, err)
		}
		r.failed(ctx, err)
	}
	ps.mu.Lock()
	if ps.leaves[channel] == nil {
		ps.leaves[channel] = map[string]PresenceOptions{}
	}
	ps.leaves[channel][id] = opt
	ps.mu.Unlock()
	return nil
}

func (r *Redis) leaveCall(channel, id string, opt PresenceOptions) scriptCall {
	return scriptCall{r.presenceKeys(channel), []any{id, r.opt.Prefix + channel, flag(opt.Events), r.spublish()}}
}

func (c scriptCall) run(ctx context.Context, r *Redis, s *redis.Script) error {
	return s.Run(ctx, r.client, c.keys, c.args...).Err()
}

// Presence removes the expired entries of channel and lists the others.
func (r *Redis) Presence(ctx context.Context, channel string) (map[string][]byte, error) {
	if err := r.usable(); err != nil {
		return nil, err
	}
	v, err := presenceScript.Run(ctx, r.client, r.presenceKeys(channel), r.clock().UnixMilli(), "0").StringSlice()
	if err != nil {
		return nil, r.failed(ctx, err)
	}
	list := make(map[string][]byte, len(v)/2)
	for i := 0; i+1 < len(v); i += 2 {
		list[v[i]] = []byte(v[i+1])
	}
	return list, nil
}

// PresenceCount removes the expired entries of channel and counts the
// others.
func (r *Redis) PresenceCount(ctx context.Context, channel string) (int, error) {
	if err := r.usable(); err != nil {
		return 0, err
	}
	n, err := presenceScript.Run(ctx, r.client, r.presenceKeys(channel), r.clock().UnixMilli(), "1").Int()
	if err != nil {
		return 0, r.failed(ctx, err)
	}
	return n, nil
}

func refreshPeriod(ttl time.Duration) time.Duration { return max(ttl/3, minRefresh) }

// refresher refreshes the node's entries every period (the shortest
// TTL/3 of the channels joined), and at once when Redis is back after an
// outage, until Close.
func (r *Redis) refresher() {
	ps := &r.pres
	defer close(ps.done)
	last := time.Now()
	for {
		ps.mu.Lock()
		ps.period = 0
		for _, jc := range ps.joined {
			if p := refreshPeriod(presenceTTL(jc.opt)); ps.period == 0 || p < ps.period {
				ps.period = p
			}
		}
		if ps.period == 0 && len(ps.leaves) > 0 {
			ps.period = time.Second // retry the leaves Redis did not take
		}
		period := ps.period
		ps.mu.Unlock()
		var tick <-chan time.Time
		var timer *time.Timer
		if period > 0 {
			timer = time.NewTimer(time.Until(last.Add(period)))
			tick = timer.C
		} else {
			last = time.Now()
		}
		due := true
		select {
		case <-tick:
		case <-ps.back:
		case <-ps.wake:
			due = false // the period changed: wait again
		case <-ps.stop:
			due = false
		}
		if timer != nil {
			timer.Stop()
		}
		select {
		case <-ps.stop:
			return
		default:
		}
		if !due {
			continue
		}
		last = time.Now()
		r.refresh()
	}
}

// refresh does the pending leaves, then pushes the expiry of every entry
// of the node forward (one script per channel, all in one round trip),
// and writes back the info of entries Redis lost.
func (r *Redis) refresh() {
	if r.usable() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(r.ctx, 3*ioTimeout)
	defer cancel()
	ps := &r.pres
	ps.gate.Lock()
	defer ps.gate.Unlock()

	ps.mu.Lock()
	var leaves []scriptCall
	type leaveRef struct{ channel, id string }
	var refs []leaveRef
	for ch, ids := range ps.leaves {
		for id, opt := range ids {
			leaves = append(leaves, r.leaveCall(ch, id, opt))
			refs = append(refs, leaveRef{ch, id})
		}
	}
	var calls []scriptCall
	var chans []string
	now := r.clock()
	for ch, jc := range ps.joined {
		ttl := presenceTTL(jc.opt)
		args := make([]any, 0, len(jc.ids)+2)
		args = append(args, now.Add(ttl).UnixMilli(), ms(ttl))
		for id := range jc.ids {
			args = append(args, id)
		}
		calls = append(calls, scriptCall{r.presenceKeys(ch), args})
		chans = append(chans, ch)
	}
	ps.mu.Unlock()

	if len(leaves) > 0 {
		cmds, err := r.runScripts(ctx, leaveScript, leaves)
		if err != nil {
			r.log.Debug("presence: leaving after an outage failed", "error", r.failed(ctx, err))
			return
		}
		ps.mu.Lock()
		for i, c := range cmds {
			if c.Err() == nil {
				if l := ps.leaves[refs[i].channel]; l != nil {
					delete(l, refs[i].id)
					if len(l) == 0 {
						delete(ps.leaves, refs[i].channel)
					}
				}
			}
		}
		ps.mu.Unlock()
	}
	if len(calls) == 0 {
		return
	}
	cmds, err := r.runScripts(ctx, refreshScript, calls)
	if err != nil {
		r.log.Debug("presence: refresh failed", "error", r.failed(ctx, err))
		return
	}
	// Entries Redis lost (it restarted without persistence) get their
	// info back; HSETNX never overwrites the info of a later Join.
	restore := map[string]map[string][]byte{}
	ps.mu.Lock()
	for i, c := range cmds {
		missing, err := c.StringSlice()
		if err != nil || len(missing) == 0 {
			continue
		}
		jc := ps.joined[chans[i]]
		if jc == nil {
			continue
		}
		restore[chans[i]] = map[string][]byte{}
		for _, id := range missing {
			if info, ok := jc.ids[id]; ok {
				restore[chans[i]][id] = info
			}
		}
	}
	ps.mu.Unlock()
	if len(restore) == 0 {
		return
	}
	_, err = r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for ch, ids := range restore {
			key := r.channelKey(ch, presenceKey)
			for id, info := range ids {
				p.HSetNX(ctx, key, id, info)
			}
		}
		return nil
	})
	if err != nil {
		r.log.Debug("presence: restoring entries failed", "error", r.failed(ctx, err))
	}
}

// leaveAll removes the node's entries, publishing their leave events, as
// a clean shutdown does (a node that is killed leaves them to expire).
func (r *Redis) leaveAll() {
	ps := &r.pres
	ps.gate.Lock()
	defer ps.gate.Unlock()
	ps.mu.Lock()
	var calls []scriptCall
	for ch, jc := range ps.joined {
		for id := range jc.ids {
			calls = append(calls, r.leaveCall(ch, id, jc.opt))
		}
	}
	for ch, ids := range ps.leaves {
		for id, opt := range ids {
			calls = append(calls, r.leaveCall(ch, id, opt))
		}
	}
	clear(ps.joined)
	clear(ps.leaves)
	ps.mu.Unlock()
	if len(calls) == 0 || r.usable() != nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*ioTimeout)
	defer cancel()
	if _, err := r.runScripts(ctx, leaveScript, calls); err != nil {
		r.log.Warn("presence: entries left to expire at close", "entries", len(calls), "error", err)
	}
}
