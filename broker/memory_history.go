package broker

import (
	"context"
	"sync"
	"time"
)

// memChannel is the memory broker's record of a channel that keeps history
// or presence. Its order lock is held from giving a publication its offset
// to handing it to the handler, which keeps deliveries in offset order;
// mu guards the record, and is never held while the handler runs (the
// handler may read history).
type memChannel struct {
	order   sync.Mutex
	mu      sync.Mutex
	epoch   string
	top     uint64
	last    time.Time // the last publication, or when the epoch was made
	metaTTL time.Duration
	ring    []memEntry // the latest publications, oldest first
	members map[string][]byte
	dead    bool // swept: whoever holds it must look the channel up again
}

type memEntry struct {
	off  uint64
	at   time.Time
	data []byte
}

// sweepEvery is how many history publications pass between sweeps of
// channels whose epoch has expired.
const sweepEvery = 1024

func (m *Memory) clock() time.Time {
	m.mu.RLock()
	now := m.now
	m.mu.RUnlock()
	if now != nil {
		return now()
	}
	return time.Now()
}

// channel returns channel's record, making it when create is set (nil
// otherwise when there is none).
func (m *Memory) channel(name string, create bool) *memChannel {
	m.cmu.Lock()
	c := m.chans[name]
	if c == nil {
		if !create {
			m.cmu.Unlock()
			return nil
		}
		c = &memChannel{}
		m.chans[name] = c
	}
	m.cmu.Unlock()
	return c
}

// lock looks channel up and locks its record (its order lock first, when
// order is set); nil when there is none and create is not set.
func (m *Memory) lock(name string, create, order bool) *memChannel {
	for {
		c := m.channel(name, create)
		if c == nil {
			return nil
		}
		if order {
			c.order.Lock()
		}
		c.mu.Lock()
		if !c.dead {
			return c
		}
		c.mu.Unlock()
		if order {
			c.order.Unlock()
		}
	}
}

// deliverLocked hands msg to the handler if channel is subscribed; the
// caller holds the channel's order lock.
func (m *Memory) deliverLocked(channel string, msg Message) {
	m.mu.RLock()
	ok := m.subs[channel]
	m.mu.RUnlock()
	if ok {
		m.h(channel, msg)
	}
}

// freshen starts a new epoch when c's has expired (or there is none).
func (c *memChannel) freshen(now time.Time, metaTTL time.Duration) {
	if c.epoch == "" || now.Sub(c.last) > c.metaTTL {
		c.epoch, c.top, c.ring, c.last = newEpoch(), 0, nil, now
	}
	c.metaTTL = metaTTL
}

// PublishHistory appends to the channels' rings and delivers, in order.
func (m *Memory) PublishHistory(_ context.Context, pubs []HistoryPub) ([]Position, error) {
	if m.isClosed() {
		return nil, ErrClosed
	}
	now := m.clock()
	pos := make([]Position, len(pubs))
	for i, p := range pubs {
		c := m.lock(p.Channel, true, true)
		c.freshen(now, p.Opt.metaTTL())
		c.top++
		c.last = now
		c.ring = append(c.ring, memEntry{off: c.top, at: now, data: p.Data})
		if n := len(c.ring) - max(p.Opt.Size, 0); n > 0 {
			clear(c.ring[:n])
			c.ring = c.ring[n:]
		}
		pos[i] = Position{c.epoch, c.top}
		c.mu.Unlock()
		m.deliverLocked(p.Channel, Message{Data: p.Data, Pos: pos[i]})
		c.order.Unlock()
	}
	m.cmu.Lock()
	m.sweep += len(pubs)
	if m.sweep >= sweepEvery {
		m.sweep = 0
		m.sweepLocked(now)
	}
	m.cmu.Unlock()
	return pos, nil
}

// sweepLocked forgets channels whose epoch expired and that have no
// presence entries. The caller holds cmu.
func (m *Memory) sweepLocked(now time.Time) {
	for name, c := range m.chans {
		if !c.mu.TryLock() {
			continue // busy: not idle
		}
		if len(c.members) == 0 && (c.epoch == "" || now.Sub(c.last) > c.metaTTL) {
			c.dead = true
			delete(m.chans, name)
		}
		c.mu.Unlock()
	}
}

// History reads a channel's ring.
func (m *Memory) History(_ context.Context, channel string, q HistoryQuery) (HistoryResult, error) {
	if m.isClosed() {
		return HistoryResult{}, ErrClosed
	}
	now := m.clock()
	c := m.lock(channel, true, false)
	defer c.mu.Unlock()
	c.freshen(now, q.Opt.metaTTL())
	res := HistoryResult{Top: Position{c.epoch, c.top}}
	if q.Limit <= 0 {
		return res, nil
	}
	live := c.ring
	for len(live) > 0 && q.Opt.TTL > 0 && now.Sub(live[0].at) > q.Opt.TTL {
		live = live[1:]
	}
	if q.Latest {
		live = live[max(0, len(live)-q.Limit):]
	} else {
		for len(live) > 0 && live[0].off <= q.After {
			live = live[1:]
		}
		live = live[:min(len(live), q.Limit)]
	}
	res.Pubs = make([]Stored, len(live))
	for i, e := range live {
		res.Pubs[i] = Stored{e.off, e.data}
	}
	return res, nil
}

// Join records id in channel's presence.
func (m *Memory) Join(_ context.Context, channel, id string, info []byte, opt PresenceOptions) error {
	if m.isClosed() {
		return ErrClosed
	}
	c := m.lock(channel, true, true)
	defer c.order.Unlock()
	if c.members == nil {
		c.members = map[string][]byte{}
	}
	c.members[id] = info
	c.mu.Unlock()
	if opt.Events {
		m.deliverLocked(channel, Message{Kind: KindJoin, Data: info})
	}
	return nil
}

// Leave removes id from channel's presence.
func (m *Memory) Leave(_ context.Context, channel, id string, opt PresenceOptions) error {
	if m.isClosed() {
		return ErrClosed
	}
	c := m.lock(channel, false, true)
	if c == nil {
		return nil
	}
	defer c.order.Unlock()
	info, ok := c.members[id]
	delete(c.members, id)
	if len(c.members) == 0 && c.epoch == "" {
		// A record of presence only: gone with its last member, so
		// channels joined once do not pile up.
		m.cmu.Lock()
		c.dead = true
		delete(m.chans, channel)
		m.cmu.Unlock()
	}
	c.mu.Unlock()
	if ok && opt.Events {
		m.deliverLocked(channel, Message{Kind: KindLeave, Data: info})
	}
	return nil
}

// Presence lists channel's entries.
func (m *Memory) Presence(_ context.Context, channel string) (map[string][]byte, error) {
	if m.isClosed() {
		return nil, ErrClosed
	}
	list := map[string][]byte{}
	if c := m.lock(channel, false, false); c != nil {
		for id, info := range c.members {
			list[id] = info
		}
		c.mu.Unlock()
	}
	return list, nil
}

// PresenceCount counts channel's entries.
func (m *Memory) PresenceCount(_ context.Context, channel string) (int, error) {
	if m.isClosed() {
		return 0, ErrClosed
	}
	c := m.lock(channel, false, false)
	if c == nil {
		return 0, nil
	}
	defer c.mu.Unlock()
	return len(c.members), nil
}

func (m *Memory) isClosed() bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.closed
}

// Interface guards
var (
	_ Historian = (*Memory)(nil)
	_ Presencer = (*Memory)(nil)
)
