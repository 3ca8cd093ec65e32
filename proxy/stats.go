package proxy

import (
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Counting what connections do, for metrics and connection logs. Nothing
// here costs a frame more than an atomic add or two on its own
// connection's counters (no lock, no lookup): data messages and bytes are
// counted on each side of each connection, and summed over the live
// connections only when someone asks (Snapshot).
// Rare events (a close, a slow consumer, a rate-limit hit) are counted
// where they happen, on the Stats the connection was configured with.

// Direction is which way data messages go.
type Direction uint8

// Directions.
const (
	ClientToUpstream Direction = iota // client messages (rooms: requests to the gateway)
	UpstreamToClient                  // upstream messages relayed to the client
	Fanout                            // publications queued for the client
	directions
)

func (d Direction) String() string {
	switch d {
	case ClientToUpstream:
		return "client_to_upstream"
	case UpstreamToClient:
		return "upstream_to_client"
	}
	return "fanout"
}

// Traffic is data messages and payload bytes by Direction.
type Traffic struct {
	Messages [directions]uint64
	Bytes    [directions]uint64
}

func (t *Traffic) add(o Traffic) {
	for d := range directions {
		t.Messages[d] += o.Messages[d]
		t.Bytes[d] += o.Bytes[d]
	}
}

// counter counts data messages and their payload bytes: those a side sent
// (added by its reader), or those queued for the client (by fan-out
// publishers). It is read at any time.
type counter struct {
	msgs, bytes atomic.Uint64
}

func (n *counter) add(msgs, bytes uint64) {
	if msgs > 0 {
		n.msgs.Add(msgs)
	}
	n.bytes.Add(bytes)
}

// traffic reads a connection's counters.
func (c *relay) traffic() Traffic {
	var t Traffic
	t.Messages[ClientToUpstream], t.Bytes[ClientToUpstream] = c.client.sent.msgs.Load(), c.client.sent.bytes.Load()
	if !c.solo {
		t.Messages[UpstreamToClient], t.Bytes[UpstreamToClient] = c.upstream.sent.msgs.Load(), c.upstream.sent.bytes.Load()
	}
	t.Messages[Fanout], t.Bytes[Fanout] = c.fanout.msgs.Load(), c.fanout.bytes.Load()
	return t
}

// CloseKey is a close counted by Stats: the side that closed first (the
// one that sent the first close frame, or was sent it by the gateway, or
// went away) and the code of that close ("none" when the side went away
// without a close frame).
type CloseKey struct {
	Side string // "client" or "upstream"
	Code string // "1000", "1008", ..., or "none"
}

// Stats counts what the connections of one or more Gateways do. Its zero
// value is not usable: make it with NewStats. It may be shared by
// Gateways of successive configurations, so counts go on across reloads.
type Stats struct {
	// OnDial, if set, is told how long each upstream dial took and whether
	// it succeeded.
	OnDial func(d time.Duration, ok bool)

	mu     sync.Mutex
	live   map[*relay]struct{}
	done   Traffic // of the connections that have ended
	closes map[CloseKey]uint64

	open          [2]atomic.Int64 // relay, solo (rooms)
	parked        atomic.Int64
	writeTimeouts [2]atomic.Uint64 // client, upstream
	slow          [2]atomic.Uint64 // closed, dropped
	limited       [2][3]atomic.Uint64
}

// NewStats makes an empty Stats.
func NewStats() *Stats {
	return &Stats{live: map[*relay]struct{}{}, closes: map[CloseKey]uint64{}}
}

// Snapshot is what Stats has counted so far.
type Snapshot struct {
	OpenRelay, OpenRooms int64 // connections open now, by mode
	Parked               int64 // connection sides parked now (no reader goroutine)
	Traffic              Traffic
	Closes               map[CloseKey]uint64
	// WriteTimeouts by side: writes that lasted WriteTimeout.
	WriteTimeoutsClient, WriteTimeoutsUpstream uint64
	// SlowClosed and SlowDropped count slow consumers closed with 1013,
	// and fan-out messages dropped for a full send queue.
	SlowClosed, SlowDropped uint64
	// RateLimited counts messages over a rate limit, by side that sent
	// them (0 client, 1 upstream) and by OnExceed (close, drop, throttle).
	RateLimited [2]map[OnExceed]uint64
}

var exceeds = [3]OnExceed{ExceedClose, ExceedDrop, ExceedThrottle}

func exceedIndex(o OnExceed) int {
	switch o {
	case ExceedDrop:
		return 1
	case ExceedThrottle:
		return 2
	}
	return 0
}

// Snapshot reads the counts: those of ended connections, plus what live
// ones have done so far.
func (s *Stats) Snapshot() Snapshot {
	snap := Snapshot{
		OpenRelay: s.open[0].Load(), OpenRooms: s.open[1].Load(), Parked: s.parked.Load(),
		WriteTimeoutsClient: s.writeTimeouts[0].Load(), WriteTimeoutsUpstream: s.writeTimeouts[1].Load(),
		SlowClosed: s.slow[0].Load(), SlowDropped: s.slow[1].Load(),
	}
	for i := range snap.RateLimited {
		snap.RateLimited[i] = map[OnExceed]uint64{}
		for j, o := range exceeds {
			snap.RateLimited[i][o] = s.limited[i][j].Load()
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	snap.Traffic = s.done
	for c := range s.live {
		snap.Traffic.add(c.traffic())
	}
	snap.Closes = make(map[CloseKey]uint64, len(s.closes))
	for k, v := range s.closes {
		snap.Closes[k] = v
	}
	return snap
}

func (s *Stats) started(c *relay) {
	s.mu.Lock()
	s.live[c] = struct{}{}
	s.mu.Unlock()
	s.open[soloIndex(c)].Add(1)
}

// ended moves a connection's traffic to the totals and counts its close.
func (s *Stats) ended(c *relay, e *ConnEnd) {
	s.open[soloIndex(c)].Add(-1)
	key := CloseKey{Side: "client", Code: "none"}
	if e.First == "upstream" {
		key.Side = "upstream"
	}
	if e.FirstCode != 0 {
		key.Code = strconv.Itoa(int(e.FirstCode))
	}
	s.mu.Lock()
	delete(s.live, c)
	s.done.add(e.Traffic)
	s.closes[key]++
	s.mu.Unlock()
}

func soloIndex(c *relay) int {
	if c.solo {
		return 1
	}
	return 0
}

// stats is the connection's Stats, or nil.
func (c *relay) stats() *Stats { return c.cfg.Stats }

func (c *relay) countLimited(src *peer, o OnExceed) {
	if s := c.stats(); s != nil {
		i := 0
		if src.side == upstreamSide {
			i = 1
		}
		s.limited[i][exceedIndex(o)].Add(1)
	}
}

func (c *relay) countSlow(dropped bool) {
	if s := c.stats(); s != nil {
		i := 0
		if dropped {
			i = 1
		}
		s.slow[i].Add(1)
	}
}

func (c *relay) countParked(delta int64) {
	if s := c.stats(); s != nil {
		s.parked.Add(delta)
	}
}

// CloseFrame is a close frame sent or received on one side.
type CloseFrame struct {
	Code   uint16 // 0: the frame carried no code
	Reason string
}

// ConnEnd describes a connection that has ended, for its log line.
type ConnEnd struct {
	Upstream string // the upstream URL dialled (password redacted); "" in rooms mode
	Traffic  Traffic
	// First is who closed first: "client" or "upstream" (it sent a close
	// frame, broke a rule, or went away), or "gateway" (shutdown, idle
	// timeout, slow consumer, a disconnect).
	First     string
	FirstCode ws.StatusCode // the code of that close; 0: the side went away without one
	// FromClient and FromUpstream are the close frames the sides sent
	// (nil: none); ToClient and ToUpstream the ones the gateway sent them.
	FromClient, ToClient, FromUpstream, ToUpstream *CloseFrame
}

// closeRecord collects how a connection closed; it is made when closing
// begins, so open connections do not pay for it.
type closeRecord struct {
	first     side
	firstCode ws.StatusCode
	from, to  [2]*CloseFrame // by client (0) and upstream (1)

	// the client's close frame, held until the upstream is done
	// (closeClientAfterUpstream); pendingCode 0: none
	pendingReason string
	pendingCode   ws.StatusCode
}

func sideIndex(s side) int {
	if s == upstreamSide {
		return 1
	}
	return 0
}

// record runs f on the connection's close record (under cmu).
func (c *relay) record(f func(r *closeRecord)) {
	c.cmu.Lock()
	if c.rec == nil {
		c.rec = &closeRecord{}
	}
	f(c.rec)
	c.cmu.Unlock()
}

// closedFirst notes who closed first, if nobody has yet.
func (c *relay) closedFirst(s side, code ws.StatusCode, writeTimeout bool) {
	first := false
	c.record(func(r *closeRecord) {
		if r.first == noSide {
			r.first, r.firstCode, first = s, code, true
		}
	})
	if first && writeTimeout && (s == clientSide || s == upstreamSide) {
		if st := c.stats(); st != nil {
			st.writeTimeouts[sideIndex(s)].Add(1)
		}
	}
}

// closeFrame notes a close frame received from (in true) or sent to p.
func (c *relay) closeFrame(p *peer, in bool, payload []byte) {
	f := &CloseFrame{}
	if len(payload) >= 2 {
		f.Code = uint16(payload[0])<<8 | uint16(payload[1])
		f.Reason = string(payload[2:])
	}
	c.record(func(r *closeRecord) {
		i := sideIndex(p.side)
		if in && r.from[i] == nil {
			r.from[i] = f
		} else if !in && r.to[i] == nil {
			r.to[i] = f
		}
	})
}

// summary makes the connection's ConnEnd.
func (c *relay) summary() *ConnEnd {
	e := &ConnEnd{Traffic: c.traffic(), First: "gateway"}
	if !c.solo {
		e.Upstream = c.cfg.upstreamURLs[c.upstream.upIdx].Redacted()
	}
	c.cmu.Lock()
	if r := c.rec; r != nil {
		switch r.first {
		case clientSide:
			e.First = "client"
		case upstreamSide:
			e.First = "upstream"
		}
		e.FirstCode = r.firstCode
		e.FromClient, e.ToClient = r.from[0], r.to[0]
		e.FromUpstream, e.ToUpstream = r.from[1], r.to[1]
	}
	c.cmu.Unlock()
	if e.First == "gateway" && e.FirstCode == 0 && e.ToClient != nil {
		e.FirstCode = ws.StatusCode(e.ToClient.Code)
	}
	return e
}
