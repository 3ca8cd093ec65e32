package proxy

import (
	"errors"
	"math"
	"time"
)

// Parking: a side of a connection that has waited ParkAfter for data gives
// up its goroutine. The registry's sweeper finds such waits and kicks them
// (moves the read deadline into the past); the woken reader registers its
// socket with the poller and returns. When the socket becomes readable,
// when the client's next heartbeat or expiry check is due, or when the
// connection starts closing, a new goroutine takes over where the old one
// stopped. Idle connections then cost their sockets and a few hundred bytes
// of state, and no stack.
//
// A side parks only between frames, with nothing buffered and nothing
// waiting to be written, so all its state is in the relay. A TLS side
// parks like a plain one: its reader was kicked out of a socket read, so
// crypto/tls holds no complete record for it, and the socket under the
// TLS connection is watched. Platforms without epoll never park.

// errPark ends a pump that is to park.
var errPark = errors.New("wsgate: park")

// sweepEvery is how often the registry looks for waits to kick and for
// writes that have lasted WriteTimeout (more often when ParkAfter or
// WriteTimeout is shorter than twice that).
const sweepEvery = time.Second

// sweepPeriod is how often the connections of c need a sweep; 0: never.
func (c *Config) sweepPeriod() time.Duration {
	var p time.Duration
	for _, d := range []time.Duration{c.ParkAfter, c.WriteTimeout} {
		if d > 0 {
			q := max(time.Millisecond, min(sweepEvery, d/2))
			if p == 0 || q < p {
				p = q
			}
		}
	}
	return p
}

// enableParking makes the idle waits of p kickable, if p can park.
func (c *relay) enableParking(p *peer) {
	if c.cfg.ParkAfter <= 0 || p.rd.sock == nil || !getPoller().usable() {
		return
	}
	p.rd.onKick = func(gotData bool) error { return c.kicked(p, gotData) }
	// A client with no upstream (rooms) sends little once subscribed, and
	// its heartbeat and fan-out need no reader: it parks at once.
	p.rd.parkNow = c.solo
}

// kicked runs on p's reader when a kick ended its idle wait.
func (c *relay) kicked(p *peer, gotData bool) error {
	if gotData || c.closing.Load() {
		return c.restoreDeadline(p)
	}
	return errPark
}

// sweep is the registry sweeper's visit: writes that have lasted
// WriteTimeout are ended, and the idle waits of c that began ParkAfter or
// more ago are kicked. It returns how many it kicked.
func (c *relay) sweep(now int64) int {
	c.client.w.expire(now)
	c.upstream.w.expire(now)
	if c.cfg.ParkAfter <= 0 || c.closing.Load() || !getPoller().usable() {
		return 0
	}
	after := int64(c.cfg.ParkAfter)
	n := 0
	if c.client.rd.onKick != nil && c.client.rd.kick(now, after) {
		n++
	}
	if c.upstream.rd.onKick != nil && c.upstream.rd.kick(now, after) {
		n++
	}
	return n
}

// After a wave of connections has parked, the stacks their goroutines
// held, and the garbage their handshakes left, are free memory of the
// process, which the runtime would hand back to the system only slowly.
// Once at least releaseAfter sides have parked and releaseQuiet (or a
// sweep period, when shorter) has passed in which none parked or was
// kicked, the sweeper returns free memory at once (debug.FreeOSMemory),
// at most every releaseEvery.
const (
	releaseAfter = 1024
	releaseEvery = 10 * time.Second
	releaseQuiet = 100 * time.Millisecond
)

// restoreDeadline puts p's read deadline back after a kick moved it.
func (c *relay) restoreDeadline(p *peer) error {
	if !c.closing.Load() {
		if p.side == clientSide && p.rd.onTimeout != nil {
			return c.tick() // sets the next deadline
		}
		p.rd.conn.SetReadDeadline(time.Time{})
	}
	if c.closing.Load() {
		p.rd.conn.SetReadDeadline(c.readDeadline(p))
	}
	return nil
}

// Parking states of a side (peer.pstate).
const (
	sideRunning  int32 = iota // a goroutine reads the side
	sideParking               // its goroutine is parking
	sideWoken                 // a wake came while it was parking or serviced: it goes on reading
	sideParked                // no goroutine: a wake starts one
	sideServiced              // parked, its heartbeat being handled (service), maybe with the flags below
)

// Events that came while a side was serviced, or-ed into sideServiced:
// the servicer handles them before the side is parked again.
const (
	pendingReadable int32 = 1 << (iota + 4) // the socket became readable
	pendingTimer                            // the heartbeat timer fired
)

// park registers src with the poller; it reports false when src cannot
// park (or was woken while parking), and the caller goes on reading.
// After true, src belongs to whoever wakes it.
func (c *relay) park(src *peer) bool {
	src.pstate.Store(sideParking)
	if src.pollID == 0 {
		src.pl = getPoller()
		src.pollID = src.pl.register(func() { c.service(src, true) })
	}
	if !c.arm(src) || c.closing.Load() || !src.pstate.CompareAndSwap(sideParking, sideParked) {
		src.pstate.Store(sideRunning)
		return false
	}
	c.countParked(1)
	c.g.reg.parks.Add(1)
	return true
}

// arm watches src's socket with the poller (an arming fires once) and,
// for the client, sets the timer of its next heartbeat check. It records
// the socket's number: a parked or serviced side's socket stays open (only
// finish closes it, once the side's reader has stopped), so servicing
// uses that number directly.
func (c *relay) arm(src *peer) bool {
	pl := src.pl
	var aerr error
	cerr := src.rd.sock.Control(func(fd uintptr) {
		src.pollFD = int32(fd)
		if aerr = pl.arm(src.pollID, int(fd), src.polled); aerr == nil {
			src.polled = true
		}
	})
	if cerr != nil || aerr != nil {
		return false
	}
	c.setTimer(src)
	return true
}

// setTimer sets the parked client's heartbeat timer for nextTick.
func (c *relay) setTimer(src *peer) {
	if src.side != clientSide || c.nextTick <= 0 || c.nextTick == math.MaxInt64 {
		return
	}
	d := time.Duration(c.nextTick - mono())
	if c.timer == nil {
		c.timer = time.AfterFunc(d, func() { c.service(&c.client, false) })
	} else {
		c.timer.Reset(d)
	}
}

// service runs, on the poller's goroutine (readable) or the heartbeat
// timer's, what a parked client needs for its heartbeat alone: the
// timer's check, which may send a ping through the client's writer, and
// the answer to that ping when it is all the socket holds. The side stays
// parked: no goroutine starts and no read buffer is taken. Anything else
// (data, a close that is due, the connection closing, an upstream side)
// resumes the side's reader, as wake does. An event that comes while the
// side is serviced (the answer to the ping just sent, say) is handled by
// the servicer before it parks the side again.
func (c *relay) service(p *peer, readable bool) {
	if p.side != clientSide {
		c.wake(p)
		return
	}
	for {
		st := p.pstate.Load()
		switch {
		case st == sideParked:
			if p.pstate.CompareAndSwap(sideParked, sideServiced) {
				c.serviceParked(p, readable)
				return
			}
		case st&^(pendingReadable|pendingTimer) == sideServiced:
			ev := pendingTimer
			if readable {
				ev = pendingReadable
			}
			if p.pstate.CompareAndSwap(st, st|ev) {
				return
			}
		default:
			c.wake(p)
			return
		}
	}
}

// serviceParked handles the events of a serviced side until none is left,
// then parks it again, or resumes its reader.
func (c *relay) serviceParked(p *peer, readable bool) {
	for {
		// A readiness is used up: the socket is armed again. The timer is
		// set again by every pass.
		if c.closing.Load() || (readable && !c.readable(p)) || c.tick() != nil {
			break
		}
		if readable && p.pl.arm(p.pollID, int(p.pollFD), true) != nil {
			break
		}
		c.setTimer(p)
		if p.pstate.CompareAndSwap(sideServiced, sideParked) {
			return
		}
		st := p.pstate.Load()
		if st == sideWoken || !p.pstate.CompareAndSwap(st, sideServiced) {
			break
		}
		readable = st&pendingReadable != 0
	}
	p.pstate.Store(sideRunning)
	c.countParked(-1)
	go c.pump(p, true)
}

// What a parked side's readable socket holds (peekSocket).
const (
	holdsNothing = iota // no bytes: the readiness was already handled
	holdsOwnPong        // the answer to the gateway's ping, now taken
	holdsOther          // bytes for the reader, or the end of the stream
)

// readable handles a parked client's readable socket in place: a
// readiness with no bytes behind it (one an earlier look already took
// care of) is nothing, and the answer to the gateway's ping is taken
// when it is all the socket holds. It reports false, taking nothing, when
// the reader must run. On TLS, whose records are sealed, any byte needs
// the reader.
func (c *relay) readable(p *peer) bool {
	var token *[8]byte
	if c.pingOut && p.rd.direct {
		token = &c.pingToken
	}
	switch peekSocket(int(p.pollFD), token) {
	case holdsNothing:
		return true
	case holdsOwnPong:
		c.pingOut = false
		p.rd.lastRead = mono()
		return true
	}
	return false
}

// wake resumes a parked side in a new goroutine. It never blocks.
func (c *relay) wake(p *peer) {
	for {
		switch st := p.pstate.Load(); st {
		case sideRunning, sideWoken:
			return
		case sideParked:
			if p.pstate.CompareAndSwap(sideParked, sideRunning) {
				c.countParked(-1)
				go c.pump(p, true)
				return
			}
		default: // parking or serviced: whoever has it goes on reading
			if p.pstate.CompareAndSwap(st, sideWoken) {
				return
			}
		}
	}
}

// unpoll forgets p's registration with the poller; the connection is
// ending and p no longer parks.
func (c *relay) unpoll(p *peer) {
	if p.pollID == 0 {
		return
	}
	pl := p.pl
	done := false
	if p.polled && p.rd.sock != nil {
		// Only while the socket is still open: its number may be reused
		// once it is closed (and closing removes it from epoll anyway).
		p.rd.sock.Control(func(fd uintptr) {
			if int32(fd) == p.pollFD {
				pl.forget(p.pollID, int(p.pollFD), true)
				done = true
			}
		})
	}
	if !done {
		pl.forget(p.pollID, -1, false)
	}
	p.pollID = 0
}
