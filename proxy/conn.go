package proxy

import (
	"encoding/binary"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// epoch is the base of the monotonic nanosecond clock used for heartbeats.
var epoch = time.Now()

func mono() int64 { return int64(time.Since(epoch)) }

// peer is one side of a relayed connection: its reader, its writer, and
// the state of the message it is sending.
//
// Small fields are grouped so that the struct packs tightly: every live
// connection holds two.
type peer struct {
	c      *relay
	rd     wireReader
	w      writer
	other  *peer // the side this one's frames go to
	limits *Limits
	rate   *rateLimits // nil: no rate limits

	// reader state, owned by the goroutine reading this side
	msgSize int64
	rest    int64 // bytes of the frame being handled still unread, from rd.pos()

	// parking (park.go)
	pl     *poller      // the poller it registered with
	pollID uint64       // registration with pl, 0 before the first park
	pollFD int32        // the socket armed in pl
	pstate atomic.Int32 // sideRunning, sideParking, sideWoken or sideParked

	sent counter // data this side sent that was passed on (stats.go)

	closeRecv atomic.Bool   // this side's close frame arrived
	gone      atomic.Bool   // this side is not read any more (it failed, or stopped reading)
	closeCode ws.StatusCode // the code of this side's close frame (0: none), set before closeRecv
	utf8      utf8State
	side      side
	polled    bool // pollFD is in pl's epoll set

	z *deflate // permessage-deflate, when this side agreed to it

	upIdx      uint16 // upstream side: the upstream dialled, in Config.Upstreams
	fragmented bool   // a message is in progress
	compressed bool   // ... and it is compressed
	text       bool   // ... and it is text
	dropping   bool   // ... and it is being dropped (rate limit)
}

// consume marks n bytes of the frame being handled as read.
func (p *peer) consume(n int) {
	p.rd.consume(n)
	p.rest -= int64(n)
}

// skipRest reads and discards what is left of the frame being handled.
func (p *peer) skipRest() error {
	for p.rest > 0 {
		b, err := p.rd.chunk(p.rest)
		if err != nil {
			return err
		}
		p.consume(len(b))
	}
	return nil
}

func (p *peer) state() ws.State {
	s := ws.StateClientSide
	if p.side == clientSide {
		s = ws.StateServerSide
	}
	if p.fragmented {
		s |= ws.StateFragmented
	}
	return s
}

func (p *peer) setLimits(l *Limits) {
	p.limits = l
	p.rate = newRateLimits(l.Rate)
}

// relay is one client connection and its upstream connection.
type relay struct {
	g        *Gateway
	cfg      *Config
	client   peer
	upstream *peer   // noUpstream in solo mode (allocated only for a real upstream)
	msg      *[]byte // a client message being assembled for inspection

	closeBy  atomic.Int64 // mono deadline of the closing handshake
	lastData atomic.Int64 // mono time of the last data message, if idle timeout is on
	ended    atomic.Int32
	closing  atomic.Bool

	// cmu guards the closing state below, the quit channel and rec.
	cmu        sync.Mutex
	quit       chan struct{} // closed when closing begins; made on first use
	upDone     bool          // the upstream's reader has ended
	quitClosed bool

	solo    bool // no upstream: the gateway itself serves the client (rooms)
	pingOut bool // owned by the client's reader, like the heartbeat state below

	meta    *ConnInfo
	onClose func()
	onEnd   func(*ConnEnd)
	rec     *closeRecord // how it closed, made when closing begins (cmu)
	fanout  counter      // publications queued for the client
	control func(msg []byte) bool
	inspect func(msg []byte, text bool) (Verdict, []byte)
	refresh *refresher // nil: no in-band token refresh

	// heartbeat and expiry state, owned by the client's reader
	expiry    int64 // mono time the client's credentials expire; 0: never
	pingAt    int64
	pingAfter int64 // the silence before a ping: this connection's share of PingInterval
	lockMiss  int64
	pingToken [8]byte
	nextTick  int64       // mono time tick wants to run next; 0 or MaxInt64: never
	timer     *time.Timer // wakes the parked client when nextTick is due
}

// noUpstream is the upstream side of every solo (rooms) relay: a side with
// no connection, whose writer is closed from the start so that nothing is
// ever written to it, and which solo relays need not allocate.
var noUpstream = func() *peer {
	p := &peer{side: upstreamSide}
	p.w.p = p
	p.w.closed.Store(true)
	p.gone.Store(true)
	return p
}()

func newRelay(g *Gateway, client, upstream net.Conn, info *RequestInfo) *relay {
	c := &relay{g: g, cfg: &g.cfg, upstream: noUpstream, solo: upstream == nil}
	if !c.solo {
		c.upstream = &peer{other: &c.client}
		c.upstream.init(c, upstreamSide, upstream, &c.cfg.Upstream)
	}
	c.client.other = c.upstream
	c.client.init(c, clientSide, client, &c.cfg.Client)
	binary.LittleEndian.PutUint64(c.pingToken[:], rand.Uint64())
	c.pingAfter = pingAfter(c.cfg.PingInterval, c.cfg.Rand)
	c.meta = newConnInfo(info.Meta, client)
	c.onClose = info.OnClose
	c.onEnd = info.OnEnd
	if !info.Expiry.IsZero() {
		c.setExpiry(info.Expiry)
	}
	c.inspect = info.Inspect
	c.control = info.UpstreamControl
	if info.Refresh != nil && info.RefreshField != "" {
		c.refresh = &refresher{verify: info.Refresh, field: strconv.Quote(info.RefreshField)}
	}
	if c.cfg.PingInterval > 0 || c.cfg.IdleTimeout > 0 || c.expiry != 0 {
		c.client.rd.onTimeout = c.tick
		c.client.rd.track = true
	}
	c.enableParking(&c.client)
	if !c.solo {
		c.enableParking(c.upstream)
	}
	return c
}

// init sets up one side: its reader and writer on conn, and its limits.
func (p *peer) init(c *relay, s side, conn net.Conn, l *Limits) {
	p.c, p.side = c, s
	p.rd.init(conn)
	p.w.p = p
	p.setLimits(l)
	// Waiting frames are written before the read buffer is refilled or
	// compacted (which would move or overwrite them).
	p.rd.beforeRefill = func() error { return c.flush(p, p.other) }
}

// start registers the connection, hands it to onStart (if not nil) and
// starts reading both sides.
func (c *relay) start(onStart func(Session)) {
	now := mono()
	c.lastData.Store(now)
	c.client.rd.lastRead = now
	if s := c.stats(); s != nil {
		s.started(c)
	}
	if !c.g.reg.add(c) {
		c.end(&closeErr{side: gatewaySide, code: ws.StatusGoingAway, reason: "server shutting down"})
	}
	if err := c.tick(); err != nil {
		// The credentials expired before the connection started.
		c.fail(err)
	}
	if onStart != nil {
		onStart(c)
	}
	go c.pump(&c.client, false)
	if !c.solo {
		go c.pump(c.upstream, false)
	}
}

// pump reads src until it ends or parks; resumed says a parked side is
// being taken up again.
func (c *relay) pump(src *peer, resumed bool) {
	var err error
	if resumed {
		err = c.restoreDeadline(src)
	}
	for {
		if err == nil {
			err = c.read(src)
		}
		if err != errPark {
			break
		}
		if c.park(src) {
			return
		}
		err = c.restoreDeadline(src)
	}
	c.stopReading(src, err)
}

// read relays src's frames until it parks or ends. A relayed side on
// plain TCP that can park starts with plain reads and has them driven once
// it is busy (drive.go): the coroutine they take ends when the side parks.
// A rooms client, mostly idle, parks after every read instead.
func (c *relay) read(src *peer) error {
	rd := &src.rd
	if c.solo || !rd.drivable() || rd.onKick == nil {
		return c.relayFrames(src, src.other)
	}
	rd.mayDrive, rd.streak = true, 0
	err := c.relayFrames(src, src.other)
	rd.mayDrive = false
	if err != errDrive {
		return err
	}
	return rd.drive(func() error { return c.relayFrames(src, src.other) })
}

// stopReading ends src's reader with err: the connection closes for the
// reason err gives (if any), src is read until its close frame when one
// is still due, and the last reader to stop finishes the connection.
func (c *relay) stopReading(src *peer, err error) {
	e, readFailed := asCloseErr(src.side, err, c.closing.Load())
	if readFailed && src.gone.Load() {
		// src was given up (its read deadline moved into the past) by
		// whoever found out why: that is the reason to report, not this
		// read's failure.
		e = nil
	}
	if e != nil {
		c.end(e)
	} else if readFailed || err == errGotClose {
		c.beginClosing()
	}
	if !readFailed && !src.gone.Load() && !src.closeRecv.Load() && err != errGotClose {
		c.drain(src)
	}
	if readFailed && err != nil && !isExpected(err) {
		c.g.log.Debug("connection read failed", "side", src.side.String(), "error", err.Error())
	}
	src.rd.releaseAll()
	if src.side == upstreamSide {
		c.upstreamDone()
	}
	pumps := int32(2)
	if c.solo {
		pumps = 1
	}
	if c.ended.Add(1) == pumps {
		c.finish()
	}
}

// finish ends the connection; the last of its readers to stop runs it,
// once.
func (c *relay) finish() {
	// A side whose close frame was never answered (the other side went
	// away without replying) is answered now, with its code.
	for _, p := range []*peer{&c.client, c.upstream} {
		if p.closeRecv.Load() && !p.w.closed.Load() {
			var cb closeBody
			if p.closeCode != 0 {
				cb.set(p.closeCode, "")
			}
			p.w.close(cb.bytes())
		}
	}
	c.unpoll(&c.client)
	c.unpoll(c.upstream)
	if c.timer != nil {
		c.timer.Stop()
	}
	c.client.w.stopQueue()
	c.client.rd.conn.Close()
	if !c.solo {
		c.upstream.rd.conn.Close()
	}
	c.g.reg.remove(c)
	if !c.solo {
		c.g.connEnded(c)
	}
	if s, f := c.stats(), c.onEnd; s != nil || f != nil {
		e := c.summary()
		if s != nil {
			s.ended(c, e)
		}
		if f != nil {
			f(e)
		}
	}
	if c.onClose != nil {
		c.onClose()
	}
}

// quitChan is closed when the connection starts closing. It is made only
// when something waits on it (a throttled reader), not for every
// connection.
func (c *relay) quitChan() <-chan struct{} {
	c.cmu.Lock()
	defer c.cmu.Unlock()
	if c.quit == nil {
		c.quit = make(chan struct{})
		if c.quitClosed {
			close(c.quit)
		}
	}
	return c.quit
}

// beginClosing bounds everything that follows by CloseTimeout: reads end
// by then, and writes shortly after.
func (c *relay) beginClosing() {
	// closeBy is set first, and only once: whoever sees closing sees it.
	by := mono() + int64(c.cfg.CloseTimeout)
	if !c.closeBy.CompareAndSwap(0, by) {
		return
	}
	c.closing.Store(true)
	for _, p := range []*peer{&c.client, c.upstream} {
		if p.rd.conn == nil {
			continue
		}
		p.rd.conn.SetReadDeadline(c.readDeadline(p))
		// A write in progress now ends by the closing deadline too.
		p.rd.conn.SetWriteDeadline(epoch.Add(time.Duration(by + int64(closeGrace))))
	}
	c.cmu.Lock()
	if c.quit != nil && !c.quitClosed {
		close(c.quit)
	}
	c.quitClosed = true
	c.cmu.Unlock()
	// Parked sides must read the closing handshake.
	c.wake(&c.client)
	if !c.solo {
		c.wake(c.upstream)
	}
}

// readDeadline is p's read deadline while closing: the closing deadline,
// or at once for a side that is not read any more.
func (c *relay) readDeadline(p *peer) time.Time {
	if p.gone.Load() {
		return longAgo
	}
	return epoch.Add(time.Duration(c.closeBy.Load()))
}

// Extend implements Session.
func (c *relay) Extend(exp time.Time) error {
	if err := c.extend(exp); err != nil {
		return err
	}
	// An error here (the client timed out meanwhile) comes back at the
	// next read deadline, which it leaves where it was.
	c.tick()
	return nil
}
