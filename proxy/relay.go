package proxy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gobwas/ws"
	"golang.org/x/time/rate"
)

// epoch is the base of the monotonic nanosecond clock used for heartbeats.
var epoch = time.Now()

func mono() int64 { return int64(time.Since(epoch)) }

// closeErr ends a connection with a close code: sent to the side that
// caused it, and (as otherCode) to the other side.
type closeErr struct {
	code   ws.StatusCode
	reason string
}

func (e *closeErr) Error() string { return e.reason }

var (
	errClosed  = errors.New("closed by peer")
	errClosing = errors.New("connection is closing")
)

// writeErr is a failed write to the destination side.
type writeErr struct{ err error }

func (e writeErr) Error() string { return "write: " + e.err.Error() }

// peer is one side of a relayed connection.
type peer struct {
	conn     net.Conn
	rd       wireReader
	isClient bool
	limits   Limits
	msgLim   *rate.Limiter
	byteLim  *rate.Limiter
	byteMax  int64 // byteLim's burst

	wmu       sync.Mutex
	broken    bool        // guarded by wmu: a frame to this side was cut short
	writing   atomic.Bool // a write to this side is in progress right now
	closeSent atomic.Bool

	// reader state, owned by the pump reading this side
	fragmented bool
	text       bool
	dropping   bool
	msgSize    int64
	utf8       utf8State
	msg        []byte    // a message being assembled for inspection
	msgOp      ws.OpCode // its opcode
	rest       int64     // payload of the frame being read still on the wire

	// parking (park.go)
	other  *peer        // the side this one's frames go to
	pstate atomic.Int32 // sideRunning, sideParking, sideWoken or sideParked
	pollID uint64       // registration with the poller, 0 before the first park
	pollFD int
	polled bool // pollFD is in the poller's epoll set

	// out is a run of complete frames, rewritten in place in this side's
	// read buffer, that is still to be written to the other side: frames
	// that arrived together leave together, in one write.
	out struct{ start, end int }
}

func (p *peer) state() ws.State {
	s := ws.StateClientSide
	if p.isClient {
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

	closing      atomic.Bool
	closeBy      atomic.Int64 // mono deadline of the closing handshake
	ended        atomic.Int32
	lastData     atomic.Int64  // mono time of the last data message, if idle timeout is on
	quit         chan struct{} // closed when closing begins; made on first use (guarded by qmu)
	quitClosed   bool          // guarded by qmu
	finishedOnce sync.Once

	onClose func()
	onStart func(Session)
	control func(msg []byte) bool
	solo    bool // no upstream: the gateway itself serves the client (rooms)
	inspect func(msg []byte, text bool) (Verdict, []byte)

	// frames queued for the client by other goroutines (fan-out); a writer
	// goroutine exists only while the queue is not empty
	qmu          sync.Mutex
	queue        [][]byte
	writing      bool
	slow         bool
	refresh      func(token string) (time.Time, error)
	refreshField []byte // `"field"`

	// heartbeat and expiry state, owned by the client pump
	expiry    int64 // mono time the client's credentials expire; 0: never
	pingOut   bool
	pingAt    int64
	lockMiss  int64
	pingToken [8]byte
	nextTick  int64       // mono time tick wants to run next; 0 or MaxInt64: never
	timer     *time.Timer // wakes the parked client when nextTick is due
}

// noUpstream is the upstream side of every solo (rooms) relay: a side with
// no connection, which nothing writes to (writes to a side without a
// connection return at once, and a solo relay never passes a message on),
// so that solo relays need not allocate one.
var noUpstream peer

func newRelay(g *Gateway, client, upstream net.Conn, info *RequestInfo) *relay {
	c := &relay{g: g, cfg: &g.cfg}
	c.client.conn, c.client.isClient = client, true
	c.client.rd.init(client)
	if upstream != nil {
		c.upstream = &peer{conn: upstream}
		c.upstream.rd.init(upstream)
		c.upstream.setLimits(g.cfg.Upstream)
	} else {
		c.solo = true
		c.upstream = &noUpstream
	}
	c.client.setLimits(g.cfg.Client)
	// Waiting frames are written before the read buffer is refilled or
	// compacted (which would move or overwrite them).
	c.client.rd.beforeRefill = func() error { return c.flush(&c.client, c.upstream) }
	if !c.solo {
		c.upstream.rd.beforeRefill = func() error { return c.flush(c.upstream, &c.client) }
	}
	binary.LittleEndian.PutUint64(c.pingToken[:], rand.Uint64())
	if info.OnClose != nil {
		c.onClose = info.OnClose
	}
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
	c.enableParking(&c.client, c.upstream)
	if !c.solo {
		c.enableParking(c.upstream, &c.client)
	}
	return c
}

func (c *relay) start() {
	now := mono()
	c.lastData.Store(now)
	c.client.rd.lastRead = now
	if !c.g.reg.add(c) {
		// the registry is shutting down
		c.beginClosing()
		c.writeClose(&c.client, ws.StatusGoingAway, "server shutting down")
		c.writeClose(c.upstream, ws.StatusGoingAway, "gateway shutting down")
	}
	c.tick()
	if c.onStart != nil {
		c.onStart(c)
	}
	go c.pump(&c.client, c.upstream, false)
	if !c.solo {
		go c.pump(c.upstream, &c.client, false)
	}
}

// quitChan is closed when the connection starts closing. It is made only
// when something waits on it (a throttled reader), not for every
// connection.
func (c *relay) quitChan() <-chan struct{} {
	c.qmu.Lock()
	defer c.qmu.Unlock()
	if c.quit == nil {
		c.quit = make(chan struct{})
		if c.quitClosed {
			close(c.quit)
		}
	}
	return c.quit
}

// Shutdown starts a closing handshake with code on both sides.
func (c *relay) shutdown(code ws.StatusCode, reason string) {
	c.beginClosing()
	c.writeClose(&c.client, code, reason)
	c.writeClose(c.upstream, code, reason)
}

// beginClosing bounds everything that follows by CloseTimeout.
func (c *relay) beginClosing() {
	if !c.closing.CompareAndSwap(false, true) {
		return
	}
	by := mono() + int64(c.cfg.CloseTimeout)
	c.closeBy.Store(by)
	t := epoch.Add(time.Duration(by))
	c.client.conn.SetDeadline(t)
	if !c.solo {
		c.upstream.conn.SetDeadline(t)
	}
	c.qmu.Lock()
	if c.quit != nil && !c.quitClosed {
		close(c.quit)
	}
	c.quitClosed = true
	c.qmu.Unlock()
	// Parked sides must read the closing handshake.
	c.wake(&c.client)
	if !c.solo {
		c.wake(c.upstream)
	}
}

// pump reads src until it ends or parks; resumed says a parked side is
// being taken up again.
func (c *relay) pump(src, dst *peer, resumed bool) {
	var err error
	if resumed {
		err = c.restoreDeadline(src)
	}
	for {
		if err == nil {
			err = c.relayFrames(src, dst)
		}
		if err != errPark {
			break
		}
		if c.park(src) {
			return
		}
		err = c.restoreDeadline(src)
	}
	var ce *closeErr
	var we writeErr
	switch {
	case err == errClosed:
	case errors.As(err, &ce):
		c.beginClosing()
		c.writeClose(src, ce.code, ce.reason)
		if src.isClient {
			c.writeClose(dst, ce.code, ce.reason)
		} else {
			c.writeClose(dst, ws.StatusInternalServerError, "upstream error: "+ce.reason)
		}
		c.drain(src)
	case errors.As(err, &we):
		c.beginClosing()
		if dst.isClient {
			c.writeClose(src, ws.StatusGoingAway, "client went away")
		} else {
			c.writeClose(src, ws.StatusInternalServerError, "upstream went away")
		}
		c.drain(src)
	default:
		if !c.closing.Load() {
			c.beginClosing()
			if src.isClient {
				c.writeClose(dst, ws.StatusGoingAway, "client went away")
			} else {
				c.writeClose(dst, ws.StatusInternalServerError, "upstream went away")
			}
		}
		if err != nil && !isExpected(err) {
			c.g.log.Debug("connection read failed", "side", src.name(), "error", err.Error())
		}
	}
	src.rd.releaseAll()
	pumps := int32(2)
	if c.solo {
		pumps = 1
	}
	if c.ended.Add(1) == pumps {
		c.finish()
	} else {
		c.beginClosing()
	}
}

func (p *peer) name() string {
	if p.isClient {
		return "client"
	}
	return "upstream"
}

func isExpected(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.Is(err, errClosing)
}

func (c *relay) finish() {
	c.finishedOnce.Do(func() {
		c.unpoll(&c.client)
		c.unpoll(c.upstream)
		if c.timer != nil {
			c.timer.Stop()
		}
		c.client.conn.Close()
		if !c.solo {
			c.upstream.conn.Close()
		}
		c.qmu.Lock()
		c.queue = nil
		c.qmu.Unlock()
		c.g.reg.remove(c)
		if c.onClose != nil {
			c.onClose()
		}
	})
}

// relayFrames reads frames from src and forwards them to dst until src
// closes, fails or breaks a rule.
func (c *relay) relayFrames(src, dst *peer) error {
	rd := &src.rd
	// Frames that fit in the read buffer are read whole before they are
	// forwarded: they can be inspected in place, and they leave in one
	// write with the frames around them instead of in pieces.
	whole := maxWholeMessage
	defer c.flush(src, dst)
	for {
		if rd.buffered() == 0 {
			if err := c.flush(src, dst); err != nil {
				return err
			}
			rd.release()
		}
		src.rest = 0
		h, start, err := rd.readHeader(whole)
		if err == nil {
			src.rest = h.Length
		}
		if err != nil {
			if err == errLengthMSB {
				return &closeErr{ws.StatusProtocolError, err.Error()}
			}
			return err
		}
		if err := ws.CheckHeader(h, src.state()); err != nil {
			return &closeErr{ws.StatusProtocolError, err.Error()}
		}
		if h.OpCode == ws.OpClose {
			return c.handleClose(src, dst, h)
		}
		if h.OpCode.IsControl() {
			if drop, err := c.limit(src, dst, true, h.Length); err != nil {
				return err
			} else if drop {
				rd.r += int(h.Length)
				continue
			}
			if src.isClient && h.OpCode == ws.OpPong && c.ownPong(h) {
				rd.r += int(h.Length)
				continue
			}
			if c.solo {
				// No upstream: the gateway answers pings itself.
				payload := (*rd.buf)[rd.r : rd.r+int(h.Length)]
				rd.r += len(payload)
				if h.OpCode == ws.OpPing {
					ws.Cipher(payload, h.Mask, 0)
					if err := c.writeControl(src, ws.OpPong, payload); err != nil {
						return writeErr{err}
					}
				}
				continue
			}
			if err := c.forward(src, dst, h, start, false); err != nil {
				return err
			}
			continue
		}

		if c.refresh != nil && src.isClient && h.OpCode == ws.OpText && h.Fin && h.Length <= maxRefreshMessage {
			// A refresh message is consumed here; anything else goes on,
			// already unmasked.
			payload := (*rd.buf)[rd.r : rd.r+int(h.Length)]
			ws.Cipher(payload, h.Mask, 0)
			h.Masked = false
			if consumed, err := c.tryRefresh(payload); err != nil {
				return err
			} else if consumed {
				rd.r += len(payload)
				continue
			}
		}
		if c.control != nil && !src.isClient && h.OpCode == ws.OpText && h.Fin && h.Length <= int64(whole) {
			// Upstream control messages (a configured prefix) are consumed.
			payload := (*rd.buf)[rd.r : rd.r+int(h.Length)]
			if c.control(payload) {
				rd.r += len(payload)
				continue
			}
		}
		newMsg := h.OpCode != ws.OpContinuation
		if newMsg {
			src.msgSize = 0
			src.text = h.OpCode == ws.OpText
			src.dropping = false
			src.utf8.reset()
		}
		src.fragmented = !h.Fin
		if m := src.limits.MaxMessage; m > 0 && h.Length > m-src.msgSize {
			return &closeErr{ws.StatusMessageTooBig, "message too big"}
		}
		src.msgSize += h.Length
		if c.cfg.IdleTimeout > 0 && h.Fin {
			c.lastData.Store(mono())
		}
		drop := src.dropping
		if !drop {
			if drop, err = c.limit(src, dst, newMsg, h.Length); err != nil {
				return err
			}
		}
		if drop {
			if err := rd.skip(h.Length); err != nil {
				return err
			}
			continue
		}
		checked := false // the payload was already checked as UTF-8
		if c.inspect != nil && src.isClient {
			if newMsg && h.Fin && h.Length <= int64(whole) {
				// The whole message is in the read buffer: inspect it in place.
				payload := (*rd.buf)[rd.r : rd.r+int(h.Length)]
				if h.Masked {
					ws.Cipher(payload, h.Mask, 0)
					h.Masked = false
				}
				if src.text && !utf8.Valid(payload) {
					return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
				}
				checked = true
				if pass, err := c.judge(src, payload); err != nil {
					return err
				} else if !pass {
					rd.r += len(payload)
					continue
				}
			} else {
				if err := c.assemble(src, dst, h); err != nil {
					return err
				}
				continue
			}
		}
		if err := c.forward(src, dst, h, start, checked); err != nil {
			return err
		}
	}
}

// maxWholeMessage is the largest frame payload inspected in place in the
// read buffer (larger or fragmented messages are assembled).
const maxWholeMessage = readBufSize - ws.MaxHeaderSize

// assembleCap bounds an assembled message when MaxMessage is unlimited.
const assembleCap = 16 << 20

// judge asks the inspector about a complete client message. It reports
// whether the message may be forwarded; a drop may send a reply to the
// client, and a close verdict ends the connection.
func (c *relay) judge(src *peer, msg []byte) (bool, error) {
	v, reply := c.inspect(msg, src.text)
	switch v {
	case Pass:
		if c.solo {
			return false, nil // nowhere to pass it on to
		}
		return true, nil
	case Close:
		return false, &closeErr{ws.StatusPolicyViolation, "forbidden"}
	}
	if len(reply) > 0 {
		if err := c.writeMessage(src, ws.OpText, reply); err != nil {
			return false, writeErr{err}
		}
	}
	return false, nil
}

// assemble collects a fragmented (or large) client message, unmasked, so
// the inspector sees all of it; the message is forwarded as one frame.
// Control frames between fragments are relayed meanwhile by relayFrames.
func (c *relay) assemble(src, dst *peer, h ws.Header) error {
	rd := &src.rd
	if h.OpCode != ws.OpContinuation {
		src.msg = append(src.msg[:0], make([]byte, ws.MaxHeaderSize)...)
		src.msgOp = h.OpCode
	}
	limit := src.limits.MaxMessage
	if limit <= 0 {
		limit = assembleCap
	}
	if int64(len(src.msg)-ws.MaxHeaderSize)+h.Length > limit {
		return &closeErr{ws.StatusMessageTooBig, "message too big"}
	}
	remaining := h.Length
	offset := 0
	for {
		avail := int(min(remaining, int64(rd.buffered())))
		chunk := (*rd.buf)[rd.r : rd.r+avail]
		if h.Masked {
			ws.Cipher(chunk, h.Mask, offset)
		}
		if src.text && !src.utf8.feed(chunk) {
			return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
		}
		src.msg = append(src.msg, chunk...)
		rd.r += avail
		remaining -= int64(avail)
		offset += avail
		if remaining == 0 {
			break
		}
		rd.r, rd.w = 0, 0
		if err := rd.fill(); err != nil {
			return err
		}
	}
	if !h.Fin {
		return nil
	}
	msg := src.msg
	src.msg = nil // no payload buffer is kept between messages
	if src.text && !src.utf8.done() {
		return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
	}
	pass, err := c.judge(src, msg[ws.MaxHeaderSize:])
	if err != nil || !pass {
		return err
	}
	if err := c.flush(src, dst); err != nil {
		return err
	}
	return c.writeFramed(dst, src.msgOp, msg)
}

// writeMessage writes one unfragmented message to p.
func (c *relay) writeMessage(p *peer, op ws.OpCode, payload []byte) error {
	buf := make([]byte, ws.MaxHeaderSize+len(payload))
	copy(buf[ws.MaxHeaderSize:], payload)
	return c.writeFramed(p, op, buf)
}

// writeFramed writes buf[MaxHeaderSize:] as one frame to p, encoding the
// header into the headroom in front of it (and masking the payload in
// place for an upstream).
func (c *relay) writeFramed(p *peer, op ws.OpCode, buf []byte) error {
	payload := buf[ws.MaxHeaderSize:]
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: !p.isClient}
	if h.Masked {
		binary.LittleEndian.PutUint32(h.Mask[:], rand.Uint32())
		ws.Cipher(payload, h.Mask, 0)
	}
	hs := headerSize(h)
	encodeHeader(buf[ws.MaxHeaderSize-hs:ws.MaxHeaderSize], h)
	p.wmu.Lock()
	defer p.wmu.Unlock()
	if p.broken || p.closeSent.Load() {
		return nil
	}
	p.writing.Store(true)
	_, err := p.conn.Write(buf[ws.MaxHeaderSize-hs:])
	p.writing.Store(false)
	if err != nil {
		p.broken = true
		return writeErr{err}
	}
	return nil
}

// ownPong reports whether a pong (fully buffered) answers the gateway's own
// ping; such pongs are not forwarded.
func (c *relay) ownPong(h ws.Header) bool {
	if h.Length != int64(len(c.pingToken)) {
		return false
	}
	rd := &c.client.rd
	p := (*rd.buf)[rd.r : rd.r+len(c.pingToken)]
	var tok [8]byte
	copy(tok[:], p)
	ws.Cipher(tok[:], h.Mask, 0)
	if tok != c.pingToken {
		return false
	}
	c.pingOut = false
	return true
}

// limit applies the rate limits of src to a frame of n payload bytes
// (msg: the frame starts a message, or is a control frame). It reports
// whether the frame is to be dropped.
func (c *relay) limit(src, dst *peer, msg bool, n int64) (drop bool, err error) {
	if src.msgLim == nil && src.byteLim == nil {
		return false, nil
	}
	now := c.cfg.now()
	if src.limits.Rate.OnExceed == ExceedThrottle {
		var wait time.Duration
		if msg && src.msgLim != nil {
			wait = src.msgLim.ReserveN(now, 1).DelayFrom(now)
		}
		if src.byteLim != nil {
			wait = max(wait, src.byteLim.ReserveN(now, int(min(n, src.byteMax))).DelayFrom(now))
		}
		if wait > 0 {
			// Frames read before this one leave now, not after the wait.
			if err := c.flush(src, dst); err != nil {
				return false, err
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			select {
			case <-t.C:
			case <-c.quitChan():
				return false, errClosing
			}
		}
		return false, nil
	}
	ok := true
	if msg && src.msgLim != nil {
		ok = src.msgLim.AllowN(now, 1)
	}
	if ok && src.byteLim != nil {
		ok = src.byteLim.AllowN(now, int(min(n, src.byteMax)))
	}
	if ok {
		return false, nil
	}
	if src.limits.Rate.OnExceed == ExceedDrop && (msg || src.msgSize == n) {
		// A whole message (or control frame) can be dropped; half of one can't.
		if msg && src.fragmented {
			src.dropping = true
		}
		return true, nil
	}
	return false, &closeErr{ws.StatusPolicyViolation, "rate limit exceeded"}
}

// forward writes the frame whose header has just been read from src to dst
// (checked: its payload was already validated as UTF-8),
// streaming its payload through src's read buffer: unmasked, checked, masked
// again for an upstream, and written with the new header in place of the
// old one (no copy).
func (c *relay) forward(src, dst *peer, h ws.Header, start int, checked bool) error {
	out := h
	out.Masked = !dst.isClient
	if out.Masked {
		binary.LittleEndian.PutUint32(out.Mask[:], rand.Uint32())
	}
	hs := headerSize(out)
	rd := &src.rd
	text := src.text && !h.OpCode.IsControl() && !checked
	remaining := h.Length
	offset := 0
	first := true

	if int64(rd.buffered()) >= remaining {
		// The whole frame is here: rewrite it in place and add it to the
		// run of frames waiting to be written.
		n := int(remaining)
		payload := (*rd.buf)[rd.r : rd.r+n]
		if h.Masked {
			ws.Cipher(payload, h.Mask, 0)
		}
		if text && (!src.utf8.feed(payload) || (h.Fin && !src.utf8.done())) {
			return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
		}
		if out.Masked {
			ws.Cipher(payload, out.Mask, 0)
		}
		p := rd.r - hs
		if p < start {
			panic("wsgate: header does not fit in place")
		}
		encodeHeader((*rd.buf)[p:rd.r], out)
		rd.r += n
		src.rest = 0
		if src.out.end > src.out.start && src.out.end == p {
			src.out.end = rd.r
			return nil
		}
		if err := c.flush(src, dst); err != nil {
			return err
		}
		src.out.start, src.out.end = p, rd.r
		return nil
	}
	if err := c.flush(src, dst); err != nil {
		return err
	}
	dst.wmu.Lock()
	defer dst.wmu.Unlock()
	for {
		avail := int(min(remaining, int64(rd.buffered())))
		chunk := (*rd.buf)[rd.r : rd.r+avail]
		if h.Masked {
			ws.Cipher(chunk, h.Mask, offset)
		}
		if text {
			last := int64(avail) == remaining && h.Fin
			if !src.utf8.feed(chunk) || (last && !src.utf8.done()) {
				if !first {
					dst.broken = true
				}
				return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in text message"}
			}
		}
		if out.Masked {
			ws.Cipher(chunk, out.Mask, offset)
		}
		wbuf := chunk
		if first {
			p := rd.r - hs
			if p < start {
				panic("wsgate: header does not fit in place")
			}
			encodeHeader((*rd.buf)[p:rd.r], out)
			wbuf = (*rd.buf)[p : rd.r+avail]
			first = false
		}
		// Nothing goes to a peer after a close frame; the frame is still
		// read from src.
		if !dst.broken && !dst.closeSent.Load() {
			dst.writing.Store(true)
			_, err := dst.conn.Write(wbuf)
			dst.writing.Store(false)
			if err != nil {
				dst.broken = true
				return writeErr{err}
			}
		}
		rd.r += avail
		remaining -= int64(avail)
		src.rest = remaining
		offset += avail
		if remaining == 0 {
			return nil
		}
		rd.r, rd.w = 0, 0
		if err := rd.fill(); err != nil {
			dst.broken = true
			return err
		}
	}
}

// flush writes src's run of waiting frames to dst.
func (c *relay) flush(src, dst *peer) error {
	o := &src.out
	if o.end <= o.start {
		return nil
	}
	b := (*src.rd.buf)[o.start:o.end]
	o.start, o.end = 0, 0
	dst.wmu.Lock()
	defer dst.wmu.Unlock()
	if dst.broken || dst.closeSent.Load() {
		return nil
	}
	dst.writing.Store(true)
	_, err := dst.conn.Write(b)
	dst.writing.Store(false)
	if err != nil {
		dst.broken = true
		return writeErr{err}
	}
	return nil
}

// handleClose handles a close frame from src: it is checked, then forwarded
// to dst, or answered directly when dst is already closing.
func (c *relay) handleClose(src, dst *peer, h ws.Header) error {
	rd := &src.rd
	payload := (*rd.buf)[rd.r : rd.r+int(h.Length)]
	rd.r += int(h.Length)
	src.rest = 0
	if h.Masked {
		ws.Cipher(payload, h.Mask, 0)
	}
	var body [ws.MaxControlFramePayloadSize]byte
	n := copy(body[:], payload)
	if n == 1 {
		return &closeErr{ws.StatusProtocolError, "malformed close frame"}
	}
	if n >= 2 {
		if !validCloseCode(ws.StatusCode(binary.BigEndian.Uint16(body[:2]))) {
			return &closeErr{ws.StatusProtocolError, "invalid close code"}
		}
		if !utf8.Valid(body[2:n]) {
			return &closeErr{ws.StatusInvalidFramePayloadData, "invalid UTF-8 in close reason"}
		}
	}
	if err := c.flush(src, dst); err != nil {
		return err
	}
	c.beginClosing()
	if !c.solo && !dst.closeSent.Load() {
		c.writeControl(dst, ws.OpClose, body[:n])
	} else if !src.closeSent.Load() {
		c.writeControl(src, ws.OpClose, body[:n])
	}
	return errClosed
}

// validCloseCode reports whether a close code may appear on the wire
// (RFC 6455 §7.4 and the IANA registry).
func validCloseCode(code ws.StatusCode) bool {
	switch {
	case code >= 1000 && code <= 1003, code >= 1007 && code <= 1014, code >= 3000 && code <= 4999:
		return true
	}
	return false
}

// writeClose sends a close frame with code and reason (cut to fit) to p,
// unless one was sent already.
func (c *relay) writeClose(p *peer, code ws.StatusCode, reason string) {
	var body [ws.MaxControlFramePayloadSize]byte
	binary.BigEndian.PutUint16(body[:2], uint16(code))
	n := 2 + copy(body[2:], reason)
	for n > 2 && !utf8.Valid(body[2:n]) {
		n--
	}
	c.writeControl(p, ws.OpClose, body[:n])
}

// writeControl writes a control frame to p. A close frame is written at
// most once per side.
func (c *relay) writeControl(p *peer, op ws.OpCode, payload []byte) error {
	p.wmu.Lock()
	defer p.wmu.Unlock()
	return c.writeControlLocked(p, op, payload)
}

func (c *relay) writeControlLocked(p *peer, op ws.OpCode, payload []byte) error {
	if p.conn == nil {
		return nil // solo mode has no upstream
	}
	if p.broken {
		return errClosing
	}
	if op == ws.OpClose && !p.closeSent.CompareAndSwap(false, true) {
		return nil
	}
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: !p.isClient}
	if h.Masked {
		binary.LittleEndian.PutUint32(h.Mask[:], rand.Uint32())
	}
	var frame [ws.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	hs := headerSize(h)
	encodeHeader(frame[:hs], h)
	n := hs + copy(frame[hs:], payload)
	if h.Masked {
		ws.Cipher(frame[hs:n], h.Mask, 0)
	}
	p.writing.Store(true)
	_, err := p.conn.Write(frame[:n])
	p.writing.Store(false)
	if err != nil {
		p.broken = true
	}
	return err
}

// drain reads and discards frames from p after the gateway has sent it a
// close frame, until its close frame arrives (or the closing deadline).
// Waiting for it, instead of closing at once, keeps the kernel from
// resetting the connection before the peer has read our close frame.
func (c *relay) drain(p *peer) {
	rd := &p.rd
	// First the rest of the frame that broke the rules, if any of it is
	// still unread: it is payload, not frame headers.
	if err := rd.skip(p.rest); err != nil {
		return
	}
	p.rest = 0
	for {
		rd.release()
		h, _, err := rd.readHeader(0)
		if err != nil {
			return
		}
		if h.OpCode == ws.OpClose {
			return
		}
		if err := rd.skip(h.Length); err != nil {
			return
		}
	}
}

// tick runs when the client's read deadline passes: it sends a ping after
// PingInterval of silence, drops a client that did not answer within
// PongTimeout, enforces IdleTimeout, and sets the next deadline. Deadlines
// change only here, never per frame.
func (c *relay) tick() error {
	if c.closing.Load() {
		return errClosing
	}
	cfg := c.cfg
	now := mono()
	next := int64(math.MaxInt64)
	if cfg.PingInterval > 0 {
		if c.pingOut && c.client.rd.lastRead > c.pingAt {
			c.pingOut = false
		}
		if c.pingOut {
			due := c.pingAt + int64(cfg.PongTimeout)
			if now >= due {
				return &closeErr{ws.StatusGoingAway, "ping timeout"}
			}
			next = due
		} else if due := c.client.rd.lastRead + int64(cfg.PingInterval); now >= due {
			if c.client.wmu.TryLock() {
				c.lockMiss = 0
				c.client.conn.SetWriteDeadline(epoch.Add(time.Duration(now + int64(cfg.PongTimeout))))
				err := c.writeControlLocked(&c.client, ws.OpPing, c.pingToken[:])
				c.client.conn.SetWriteDeadline(time.Time{})
				c.client.wmu.Unlock()
				if err != nil {
					return writeErr{err}
				}
				c.pingOut, c.pingAt = true, now
				next = now + int64(cfg.PongTimeout)
			} else if !c.client.writing.Load() {
				// The lock is held by a frame whose payload is still coming
				// from the upstream: the client is not the one stalling.
				c.lockMiss = 0
				next = now + int64(min(time.Second, cfg.PongTimeout))
			} else {
				// A frame is being written to the client right now. If that
				// lasts longer than PongTimeout the client is not reading.
				if c.lockMiss == 0 {
					c.lockMiss = now
				} else if now-c.lockMiss >= int64(cfg.PongTimeout) {
					return &closeErr{ws.StatusGoingAway, "ping timeout"}
				}
				next = now + int64(min(time.Second, cfg.PongTimeout))
			}
		} else {
			next = due
		}
	}
	if c.expiry != 0 {
		if now >= c.expiry {
			return &closeErr{ws.StatusPolicyViolation, "token expired"}
		}
		next = min(next, c.expiry)
	}
	if cfg.IdleTimeout > 0 {
		due := c.lastData.Load() + int64(cfg.IdleTimeout)
		if now >= due {
			return &closeErr{ws.StatusGoingAway, "idle timeout"}
		}
		next = min(next, due)
	}
	c.nextTick = next
	if next != math.MaxInt64 {
		c.client.conn.SetReadDeadline(epoch.Add(time.Duration(next)))
	}
	if c.closing.Load() {
		// beginClosing raced with us: its deadline wins.
		c.client.conn.SetDeadline(epoch.Add(time.Duration(c.closeBy.Load())))
	}
	return nil
}

// maxRefreshMessage bounds the client text messages inspected for an
// in-band token refresh.
const maxRefreshMessage = 12 << 10

// setExpiry records when the client's credentials expire.
func (c *relay) setExpiry(exp time.Time) {
	c.expiry = max(1, mono()+int64(exp.Sub(c.cfg.Now())))
}

// tryRefresh consumes a client message {"<field>": "<token>"}: the token is
// verified, and the connection's expiry moves to the new token's. A refresh
// with a bad token closes the connection (1008 "invalid token").
func (c *relay) tryRefresh(payload []byte) (bool, error) {
	if len(payload) == 0 || payload[0] != '{' || !bytes.Contains(payload, c.refreshField) {
		return false, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(payload, &m) != nil {
		return false, nil
	}
	raw, ok := m[string(c.refreshField[1:len(c.refreshField)-1])]
	if !ok {
		return false, nil
	}
	var token string
	if json.Unmarshal(raw, &token) != nil || token == "" {
		return true, &closeErr{ws.StatusPolicyViolation, "invalid token"}
	}
	exp, err := c.refresh(token)
	if err != nil {
		return true, &closeErr{ws.StatusPolicyViolation, "invalid token"}
	}
	return true, c.extend(exp)
}

// Session is what code outside the relay may do with a live connection.
type Session interface {
	// Enqueue queues an encoded server frame (shared, not modified) for the
	// client without blocking. When the queue is full the client is a slow
	// consumer: the connection is closed with 1013 (or, with SlowConsumer
	// drop, the frame is dropped) and Enqueue returns false.
	Enqueue(frame []byte) bool
	// Close closes the connection with code and reason.
	Close(code uint16, reason string)
}

// Enqueue implements Session.
func (c *relay) Enqueue(frame []byte) bool {
	c.qmu.Lock()
	if c.closing.Load() || c.slow {
		c.qmu.Unlock()
		return false
	}
	if len(c.queue) >= c.cfg.SendQueue {
		if c.cfg.SlowConsumer == SlowDrop {
			c.qmu.Unlock()
			return false
		}
		// Slow consumer: nothing more is queued; the writer finishes the
		// frame it is writing, then sends close 1013. Closing bounds it all
		// by CloseTimeout, so a client that never reads is still dropped.
		c.slow = true
		c.queue = nil
		writing := c.writing
		c.qmu.Unlock()
		c.g.log.Info("slow consumer: closing with 1013", "remote", c.client.conn.RemoteAddr().String(), "send_queue", c.cfg.SendQueue)
		c.beginClosing()
		if !writing {
			go c.closeSlow()
		}
		return false
	}
	c.queue = append(c.queue, frame)
	if !c.writing {
		c.writing = true
		go c.writeQueued()
	}
	c.qmu.Unlock()
	return true
}

// Close implements Session.
func (c *relay) Close(code uint16, reason string) {
	c.shutdownSide(ws.StatusCode(code), reason)
}

func (c *relay) shutdownSide(code ws.StatusCode, reason string) {
	c.beginClosing()
	c.writeClose(&c.client, code, reason)
	c.writeClose(c.upstream, code, reason)
}

func (c *relay) closeSlow() {
	c.writeClose(&c.client, ws.StatusCode(1013), "slow consumer")
	c.writeClose(c.upstream, ws.StatusCode(1013), "slow consumer")
}

// writeQueued drains the queue with vectored writes, then exits.
func (c *relay) writeQueued() {
	var batch net.Buffers
	for {
		c.qmu.Lock()
		if c.slow {
			c.writing = false
			c.qmu.Unlock()
			c.closeSlow()
			return
		}
		if len(c.queue) == 0 {
			c.writing = false
			c.queue = nil
			c.qmu.Unlock()
			return
		}
		frames := c.queue
		c.queue = nil
		c.qmu.Unlock()

		p := &c.client
		p.wmu.Lock()
		if p.broken || p.closeSent.Load() {
			p.wmu.Unlock()
			continue
		}
		batch = append(batch[:0], frames...)
		p.writing.Store(true)
		_, err := batch.WriteTo(p.conn)
		p.writing.Store(false)
		if err != nil {
			p.broken = true
		}
		p.wmu.Unlock()
		if err != nil {
			c.qmu.Lock()
			c.writing = false
			c.queue = nil
			c.qmu.Unlock()
			c.beginClosing()
			return
		}
	}
}

// EncodeServerFrame encodes payload as one unmasked (server-to-client)
// frame: the bytes fan-out writes to every subscriber.
func EncodeServerFrame(op ws.OpCode, payload []byte) []byte {
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload))}
	hs := headerSize(h)
	b := make([]byte, hs+len(payload))
	encodeHeader(b[:hs], h)
	copy(b[hs:], payload)
	return b
}

// Extend moves the connection's expiry (a refreshed token). It must be
// called from the Inspect hook, which runs on the client's reader.
func (c *relay) Extend(exp time.Time) { c.extend(exp) }

func (c *relay) extend(exp time.Time) error {
	if exp.IsZero() {
		c.expiry = 0
	} else {
		c.setExpiry(exp)
	}
	if c.client.rd.onTimeout == nil {
		c.client.rd.onTimeout = c.tick
	}
	return c.tick()
}
