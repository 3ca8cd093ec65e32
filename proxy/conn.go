package proxy

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/time/rate"
)

// epoch is the base of the monotonic nanosecond clock used for heartbeats.
var epoch = time.Now()

func mono() int64 { return int64(time.Since(epoch)) }

// peer is one side of a relayed connection: its reader, its writer, and
// the state of the message it is sending.
type peer struct {
	side    side
	rd      wireReader
	w       writer
	limits  Limits
	msgLim  *rate.Limiter
	byteLim *rate.Limiter
	byteMax int64 // byteLim's burst

	// reader state, owned by the goroutine reading this side
	fragmented bool // a message is in progress
	text       bool // ... and it is text
	dropping   bool // ... and it is being dropped (rate limit)
	msgSize    int64
	utf8       utf8State
	msg        []byte    // a message being assembled for inspection
	msgOp      ws.OpCode // its opcode
	rest       int64     // bytes of the frame being handled still unread, from rd.pos()

	closeIn   closeBody   // this side's close payload, set before closeRecv
	closeRecv atomic.Bool // this side's close frame arrived
	gone      atomic.Bool // this side is not read any more (it failed, or stopped reading)

	// parking (park.go)
	other  *peer        // the side this one's frames go to
	pstate atomic.Int32 // sideRunning, sideParking, sideWoken or sideParked
	pl     *poller      // the poller it registered with
	pollID uint64       // registration with pl, 0 before the first park
	pollFD int
	polled bool // pollFD is in the poller's epoll set
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

func (p *peer) setLimits(l Limits) {
	p.limits = l
	if r := l.Rate; r.enabled() {
		if r.Messages > 0 {
			b := r.MessageBurst
			if b == 0 {
				b = max(1, int(math.Ceil(r.Messages)))
			}
			p.msgLim = rate.NewLimiter(rate.Limit(r.Messages), b)
		}
		if r.Bytes > 0 {
			b := r.ByteBurst
			if b == 0 {
				b = max(1, int(math.Ceil(r.Bytes)))
			}
			p.byteLim = rate.NewLimiter(rate.Limit(r.Bytes), b)
			p.byteMax = int64(b)
		}
	}
}

// relay is one client connection and its upstream connection.
type relay struct {
	g        *Gateway
	cfg      *Config
	client   peer
	upstream *peer // noUpstream in solo mode (allocated only for a real upstream)
	solo     bool  // no upstream: the gateway itself serves the client (rooms)

	closing      atomic.Bool
	closeBy      atomic.Int64 // mono deadline of the closing handshake
	ended        atomic.Int32
	lastData     atomic.Int64 // mono time of the last data message, if idle timeout is on
	finishedOnce sync.Once

	// cmu guards the closing state below and the quit channel.
	cmu        sync.Mutex
	pending    closeBody     // the client's close frame, held until the upstream is done
	hasPending bool          // pending is set
	upDone     bool          // the upstream's reader has ended
	quit       chan struct{} // closed when closing begins; made on first use
	quitClosed bool

	onClose      func()
	onStart      func(Session)
	control      func(msg []byte) bool
	inspect      func(msg []byte, text bool) (Verdict, []byte)
	refresh      func(token string) (time.Time, error)
	refreshField []byte // `"field"`

	// heartbeat and expiry state, owned by the client's reader
	expiry    int64 // mono time the client's credentials expire; 0: never
	pingOut   bool
	pingAt    int64
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
	p.w.side = upstreamSide
	p.w.closed.Store(true)
	p.gone.Store(true)
	return p
}()

func newRelay(g *Gateway, client, upstream net.Conn, info *RequestInfo) *relay {
	c := &relay{g: g, cfg: &g.cfg, upstream: noUpstream, solo: upstream == nil}
	if !c.solo {
		c.upstream = &peer{other: &c.client}
		c.upstream.init(c, upstreamSide, upstream, g.cfg.Upstream)
	}
	c.client.other = c.upstream
	c.client.init(c, clientSide, client, g.cfg.Client)
	binary.LittleEndian.PutUint64(c.pingToken[:], rand.Uint64())
	c.onClose = info.OnClose
	if !info.Expiry.IsZero() {
		c.setExpiry(info.Expiry)
	}
	c.inspect = info.Inspect
	c.onStart = info.OnStart
	c.control = info.UpstreamControl
	if info.Refresh != nil && info.RefreshField != "" {
		c.refresh = info.Refresh
		c.refreshField = []byte(strconv.Quote(info.RefreshField))
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
func (p *peer) init(c *relay, s side, conn net.Conn, l Limits) {
	p.side = s
	p.rd.init(conn)
	p.w.conn, p.w.side, p.w.c = conn, s, c
	p.setLimits(l)
	// Waiting frames are written before the read buffer is refilled or
	// compacted (which would move or overwrite them).
	p.rd.beforeRefill = func() error { return c.flush(p, p.other) }
}

func (c *relay) start() {
	now := mono()
	c.lastData.Store(now)
	c.client.rd.lastRead = now
	if !c.g.reg.add(c) {
		c.end(&closeErr{side: gatewaySide, code: ws.StatusGoingAway, reason: "server shutting down"})
	}
	c.tick()
	if c.onStart != nil {
		c.onStart(c)
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
			err = c.relayFrames(src, src.other)
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

// stopReading ends src's reader with err: the connection closes for the
// reason err gives (if any), src is read until its close frame when one
// is still due, and the last reader to stop finishes the connection.
func (c *relay) stopReading(src *peer, err error) {
	e, readFailed := asCloseErr(src.side, err, c.closing.Load())
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

func (c *relay) finish() {
	c.finishedOnce.Do(func() {
		// A side whose close frame was never answered (the other side
		// went away without replying) is answered now.
		for _, p := range []*peer{&c.client, c.upstream} {
			if p.closeRecv.Load() && !p.w.closed.Load() {
				p.w.close(p.closeIn.bytes())
			}
		}
		c.unpoll(&c.client)
		c.unpoll(c.upstream)
		if c.timer != nil {
			c.timer.Stop()
		}
		c.client.w.stopQueue()
		c.client.w.conn.Close()
		if !c.solo {
			c.upstream.w.conn.Close()
		}
		c.g.reg.remove(c)
		if c.onClose != nil {
			c.onClose()
		}
	})
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
	if !c.closing.CompareAndSwap(false, true) {
		return
	}
	by := mono() + int64(c.cfg.CloseTimeout)
	c.closeBy.Store(by)
	for _, p := range []*peer{&c.client, c.upstream} {
		if p.w.conn == nil {
			continue
		}
		p.w.conn.SetReadDeadline(c.readDeadline(p))
		// A write in progress now ends by the closing deadline too,
		// unless its own deadline comes first.
		if dl := by + int64(closeGrace); p.w.dl.Load() == 0 || p.w.dl.Load() > dl {
			p.w.conn.SetWriteDeadline(epoch.Add(time.Duration(dl)))
		}
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
