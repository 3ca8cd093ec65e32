package wsgate

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsutil"
)

// Subprotocol is the rooms protocol the client speaks.
const Subprotocol = "wsgate.v1"

// conn is one WebSocket connection: a reader goroutine, a writer goroutine
// that owns every write, and the serve loop (on the client's run
// goroutine) that watches liveness and the token.
type conn struct {
	nc  net.Conn
	src io.Reader
	tok string

	ctx    context.Context // ends when the connection does
	cancel context.CancelFunc

	pending map[uint64]*call // under the client's mu

	wmu      sync.Mutex
	out      []outFrame
	wake     chan struct{}
	stopW    chan struct{} // the writer writes what is queued, then returns
	closing  bool          // a close frame is queued: nothing after it
	wdone    chan struct{}
	rdone    chan struct{}
	resub    chan struct{} // a subscription waits to be made again
	lastRecv atomic.Int64  // clock time, Unix ns, of the last frame read
	frames   atomic.Uint64 // frames read so far

	// set by the reader before rdone is closed
	closeCode   int
	closeReason string
	readErr     error
}

type outFrame struct {
	op   ws.OpCode // 0: text
	text []byte
	call *call
}

// dial makes a connection with a fresh token.
func (c *Client) dial() (*conn, error) {
	protos := []string{Subprotocol}
	var tok string
	if c.opts.Token != nil {
		var err error
		if tok, err = c.opts.Token(c.ctx); err != nil {
			return nil, err
		}
		protos = append(protos, "bearer", tok)
	}
	d := ws.Dialer{Protocols: protos, Timeout: c.opts.HandshakeTimeout, NetDial: c.opts.NetDial}
	if len(c.opts.Header) > 0 {
		d.Header = ws.HandshakeHeaderHTTP(c.opts.Header)
	}
	nc, br, hs, err := d.Dial(c.ctx, c.url)
	if err != nil {
		return nil, err
	}
	if hs.Protocol != Subprotocol {
		nc.Close()
		return nil, errors.New("wsgate: the gateway did not accept subprotocol " + Subprotocol)
	}
	cn := &conn{nc: nc, src: nc, tok: tok, pending: map[uint64]*call{},
		wake: make(chan struct{}, 1), stopW: make(chan struct{}), wdone: make(chan struct{}), rdone: make(chan struct{}), resub: make(chan struct{}, 1)}
	if br != nil {
		// The gateway wrote frames right behind its handshake.
		cn.src = io.MultiReader(br, nc)
	}
	cn.ctx, cn.cancel = context.WithCancel(c.ctx)
	return cn, nil
}

func (cn *conn) enqueue(f outFrame) {
	cn.wmu.Lock()
	if cn.closing {
		cn.wmu.Unlock()
		return
	}
	if f.op == ws.OpClose {
		cn.closing = true
	}
	cn.out = append(cn.out, f)
	cn.wmu.Unlock()
	select {
	case cn.wake <- struct{}{}:
	default:
	}
}

// writeLoop is the only writer of the socket.
func (c *Client) writeLoop(cn *conn) {
	defer c.wg.Done()
	defer close(cn.wdone)
	bw := bufio.NewWriter(cn.nc)
	stopping := false
	for {
		cn.wmu.Lock()
		q := cn.out
		cn.out = nil
		cn.wmu.Unlock()
		if len(q) == 0 {
			if stopping {
				return
			}
			select {
			case <-cn.wake:
			case <-cn.stopW:
				stopping = true
			}
			continue
		}
		cn.nc.SetWriteDeadline(time.Now().Add(c.opts.WriteTimeout))
		for _, f := range q {
			if f.call != nil {
				c.mu.Lock()
				f.call.written = true
				c.mu.Unlock()
			}
			op := f.op
			if op == 0 {
				op = ws.OpText
			}
			// The payload is ours (encoded for this frame), so mask it in place.
			if err := ws.WriteFrame(bw, ws.MaskFrameInPlace(ws.NewFrame(op, true, f.text))); err != nil {
				cn.nc.Close()
				return
			}
			if op == ws.OpClose {
				bw.Flush()
				return
			}
		}
		if err := bw.Flush(); err != nil {
			cn.nc.Close()
			return
		}
	}
}

var errCloseFrame = errors.New("close frame")

// readLoop reads until the connection ends; it handles every message.
func (c *Client) readLoop(cn *conn) {
	defer c.wg.Done()
	defer close(cn.rdone)
	rd := &wsutil.Reader{Source: cn.src, State: ws.StateClientSide, CheckUTF8: true, MaxMessageSize: c.opts.MaxMessageSize}
	rd.OnIntermediate = func(h ws.Header, r io.Reader) error {
		b, err := io.ReadAll(r)
		if err != nil {
			return err
		}
		return cn.control(h.OpCode, b)
	}
	for {
		hdr, err := rd.NextFrame()
		if err != nil {
			if err != errCloseFrame {
				cn.readErr = err
			}
			return
		}
		// Counted at its header, its time stored once it is whole:
		// whoever sees the new time sees the frame counted too, and no
		// later store moves it.
		cn.frames.Add(1)
		b, err := io.ReadAll(rd)
		if err != nil {
			if err == errCloseFrame {
				return
			}
			cn.readErr = err
			return
		}
		cn.lastRecv.Store(c.clock.Now().UnixNano())
		if hdr.OpCode.IsControl() {
			if cn.control(hdr.OpCode, b) == errCloseFrame {
				return
			}
			continue
		}
		if hdr.OpCode == ws.OpText {
			c.handle(cn, b)
		}
	}
}

// control answers a control frame through the writer.
func (cn *conn) control(op ws.OpCode, b []byte) error {
	switch op {
	case ws.OpPing:
		cn.enqueue(outFrame{op: ws.OpPong, text: b})
	case ws.OpClose:
		code, reason := ws.ParseCloseFrameData(b)
		cn.closeCode, cn.closeReason = int(code), reason
		if code == 0 {
			cn.closeCode = 1005
		}
		echo := ws.NewCloseFrameBody(code, "")
		if code == 0 {
			echo = nil
		}
		cn.enqueue(outFrame{op: ws.OpClose, text: echo})
		return errCloseFrame
	}
	return nil
}

// inMsg is any message from the gateway.
type inMsg struct {
	ID           *uint64         `json:"id"`
	Op           string          `json:"op"`
	Channel      string          `json:"channel"`
	Data         json.RawMessage `json:"data"`
	Offset       *uint64         `json:"offset"`
	Epoch        string          `json:"epoch"`
	Recovered    *bool           `json:"recovered"`
	Code         string          `json:"code"`
	Message      string          `json:"message"`
	Conn         string          `json:"conn"`
	Subject      string          `json:"subject"`
	Claims       map[string]any  `json:"claims"`
	Count        int             `json:"count"`
	Presence     []PresenceEntry `json:"presence"`
	Publications []Publication   `json:"publications"`
}

// handle routes one message, on the reader goroutine.
func (c *Client) handle(cn *conn, b []byte) {
	m := &inMsg{}
	if err := json.Unmarshal(b, m); err != nil {
		derr := errors.New("wsgate: undecodable message from the gateway: " + err.Error())
		c.emit(Event{Type: EventError, Err: derr})
		// A reply whose id is readable still answers its call, or the
		// caller would wait for a reply that has come.
		var head struct {
			ID *uint64 `json:"id"`
		}
		if json.Unmarshal(b, &head) != nil || head.ID == nil {
			return
		}
		c.mu.Lock()
		cl := cn.pending[*head.ID]
		delete(cn.pending, *head.ID)
		c.mu.Unlock()
		switch {
		case cl == nil:
		case cl.onFail != nil:
			cl.onFail(derr)
		default:
			cl.settle(nil, derr)
		}
		return
	}
	if m.ID != nil {
		c.mu.Lock()
		cl := cn.pending[*m.ID]
		delete(cn.pending, *m.ID)
		c.mu.Unlock()
		switch {
		case cl == nil:
		case cl.onReply != nil:
			cl.onReply(m)
		default:
			cl.settle(m, nil)
		}
		return
	}
	switch m.Op {
	case "message", "reset", "join", "leave":
		c.mu.Lock()
		s := c.byCh[m.Channel]
		c.mu.Unlock()
		if s != nil {
			s.deliver(m)
		}
	}
}

// connEnd is how a connection ended.
type connEnd struct {
	code   int
	reason string
	err    error
}

// serve runs an open connection until it ends.
func (c *Client) serve(cn *conn) connEnd {
	c.mu.Lock()
	if c.state == Closed {
		c.mu.Unlock()
		cn.nc.Close()
		cn.cancel()
		return connEnd{code: 1000}
	}
	now := c.clock.Now()
	cn.lastRecv.Store(now.UnixNano())
	c.cur = cn
	c.setStateLocked(Connected)
	c.emit(Event{Type: EventConnected})
	for _, s := range c.subs {
		s.sendLocked(cn)
	}
	for _, cl := range c.queue {
		c.sendLocked(cn, cl)
	}
	c.queue = nil
	c.wg.Add(2)
	go c.readLoop(cn)
	go c.writeLoop(cn)
	c.mu.Unlock()

	var end connEnd
	live := c.clock.NewTimer(c.opts.LivenessInterval)
	defer func() { live.Stop() }()
	pinged := false         // a ping is out
	var framesAtPing uint64 // frames read when it was sent
	refresh, refreshC := c.armRefresh(cn.tok)
	defer func() {
		if refresh != nil {
			refresh.Stop()
		}
	}()
	refreshRes := make(chan error, 1)
	resub := c.clock.NewTimer(time.Hour)
	resub.Stop()
	var resubC <-chan time.Time
	// armResub gives each refused subscription its time to try again (the
	// reconnect backoff over its own count of refusals in a row) and sets
	// the timer to the earliest.
	armResub := func() {
		c.mu.Lock()
		now := c.clock.Now()
		var next time.Time
		for _, s := range c.subs {
			if !s.retry {
				continue
			}
			if s.retryAt.IsZero() {
				d := time.Duration(backoff(s.attempt, int64(c.opts.MinReconnectDelay), int64(c.opts.MaxReconnectDelay), c.opts.Rand))
				s.attempt++
				s.retryAt = now.Add(d)
			}
			if next.IsZero() || s.retryAt.Before(next) {
				next = s.retryAt
			}
		}
		c.mu.Unlock()
		resub.Stop()
		resubC = nil
		if !next.IsZero() {
			resub = c.clock.NewTimer(next.Sub(now))
			resubC = resub.C()
		}
	}
loop:
	for {
		select {
		case <-cn.rdone:
			end = connEnd{code: cn.closeCode, reason: cn.closeReason, err: cn.readErr}
			if end.code == 0 {
				end.code = 1006
			}
			break loop
		case <-c.ctx.Done():
			cn.enqueue(outFrame{op: ws.OpClose, text: ws.NewCloseFrameBody(1000, "")})
			c.awaitClose(cn)
			end = connEnd{code: 1000}
			break loop
		case <-live.C():
			now := c.clock.Now()
			last := time.Unix(0, cn.lastRecv.Load())
			switch {
			case pinged && cn.frames.Load() == framesAtPing:
				// Nothing at all since the ping: the path is dead, and a
				// close frame would not get through either.
				cn.nc.Close()
				<-cn.rdone
				end = connEnd{code: CloseLivenessTimeout, reason: "liveness timeout"}
				break loop
			case now.Sub(last) >= c.opts.LivenessInterval:
				pinged, framesAtPing = true, cn.frames.Load()
				c.mu.Lock()
				c.sendLocked(cn, &call{req: request{Op: "ping"}})
				c.mu.Unlock()
				live = c.clock.NewTimer(c.opts.LivenessTimeout)
			default:
				pinged = false
				live = c.clock.NewTimer(c.opts.LivenessInterval - now.Sub(last))
			}
		case <-refreshC:
			refreshC = nil
			c.wg.Add(1)
			go c.refresh(cn, refreshRes)
		case err := <-refreshRes:
			if err != nil {
				c.emit(Event{Type: EventError, Err: err})
				cn.enqueue(outFrame{op: ws.OpClose, text: ws.NewCloseFrameBody(ws.StatusCode(CloseRefreshFailed), "token refresh failed")})
				c.awaitClose(cn)
				end = connEnd{code: CloseRefreshFailed, reason: "token refresh failed", err: err}
				break loop
			}
			refresh, refreshC = c.armRefresh(cn.tok)
		case <-cn.resub:
			armResub()
		case <-resubC:
			c.mu.Lock()
			now := c.clock.Now()
			for _, s := range c.subs {
				if s.retry && !s.retryAt.IsZero() && !s.retryAt.After(now) {
					s.retry, s.retryAt = false, time.Time{}
					s.sendLocked(cn)
				}
			}
			c.mu.Unlock()
			armResub()
		}
	}
	resub.Stop()
	cn.cancel()
	close(cn.stopW)
	<-cn.wdone // bounded by WriteTimeout: a close frame queued goes out first
	cn.nc.Close()
	<-cn.rdone

	c.mu.Lock()
	c.cur = nil
	c.setStateLocked(Disconnected)
	// Requests the writer never began are sent again on the next
	// connection, in their order, before those queued meanwhile.
	var again []*call
	for id, cl := range cn.pending {
		delete(cn.pending, id)
		switch {
		case cl.onReply != nil || cl.req.Op == "ping" || cl.req.Op == "refresh" || cl.req.Op == "unsubscribe":
			cl.settle(nil, ErrConnectionLost)
		case cl.written:
			cl.settle(nil, ErrConnectionLost)
		default:
			again = append(again, cl)
		}
	}
	slices.SortFunc(again, func(a, b *call) int { return int(a.req.ID - b.req.ID) })
	c.queue = append(again, c.queue...)
	for _, s := range c.subs {
		s.lostLocked()
	}
	c.mu.Unlock()
	return end
}

// awaitClose waits a little for the gateway's answer to our close frame.
func (c *Client) awaitClose(cn *conn) {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	select {
	case <-cn.rdone:
	case <-t.C:
	}
}

// armRefresh starts the refresh timer for tok, if it has an exp.
func (c *Client) armRefresh(tok string) (Timer, <-chan time.Time) {
	if c.opts.Token == nil {
		return nil, nil
	}
	exp, ok := tokenExpiry(tok)
	if !ok {
		return nil, nil
	}
	now := c.clock.Now()
	t := c.clock.NewTimer(refreshAt(now, exp, c.opts.RefreshBefore).Sub(now))
	return t, t.C()
}

// refresh gets a new token and sends it; the result goes to res.
func (c *Client) refresh(cn *conn, res chan<- error) {
	defer c.wg.Done()
	tok, err := c.opts.Token(cn.ctx)
	if err != nil {
		res <- errors.New("wsgate: token refresh: " + err.Error())
		return
	}
	cl := &call{req: request{Op: "refresh", Token: tok}, res: make(chan callResult, 1)}
	c.mu.Lock()
	if c.cur != cn {
		c.mu.Unlock()
		return
	}
	c.sendLocked(cn, cl)
	c.mu.Unlock()
	select {
	case r := <-cl.res:
		switch {
		case r.err != nil:
			res <- r.err
		case r.msg.Op == "error":
			res <- &Error{Code: r.msg.Code, Message: r.msg.Message}
		default:
			cn.tok = tok // read by the serve loop only after res
			res <- nil
		}
	case <-cn.ctx.Done():
	}
}
