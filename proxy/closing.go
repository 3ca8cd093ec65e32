package proxy

import (
	"encoding/binary"

	"github.com/gobwas/ws"
)

// The closing handshake (RFC 6455 §5.5.1, §7). The gateway is each
// peer's endpoint: every close frame a peer sends is answered, by the
// other side's reply when it comes, or by the gateway itself when the
// other side goes away without one. A connection that ends because a
// peer broke a rule closes the other side first: when the client breaks
// one, the upstream is told, and what it still sends (answers to
// messages it got before) reaches the client before the client's own
// close frame. Everything is bounded by CloseTimeout.

// handleClose handles a close frame from src (its header, of size hs, not
// yet consumed): it is checked, then forwarded to dst, or answered when
// dst is already closed.
func (c *relay) handleClose(src, dst *peer, h ws.Header, hs int) error {
	rd := &src.rd
	n := int(h.Length)
	if err := rd.need(hs + n); err != nil {
		return err
	}
	payload := rd.peek(hs, n)
	if h.Masked {
		ws.Cipher(payload, h.Mask, 0)
	}
	src.consume(hs + n)
	bad := checkClosePayload(payload)
	c.closeFrame(src, true, payload)
	switch {
	case bad != nil:
		src.closeCode = bad.code
	case len(payload) >= 2:
		src.closeCode = ws.StatusCode(binary.BigEndian.Uint16(payload))
	}
	src.closeRecv.Store(true)
	c.closedFirst(src.side, src.closeCode, false)
	if bad != nil {
		return bad
	}
	// Frames read before the close leave before it.
	if err := c.flush(src, dst); err != nil {
		return err
	}
	c.beginClosing()
	switch {
	case c.solo:
		src.w.close(payload)
	case src.side == upstreamSide && c.takePending():
	case !dst.w.closed.Load():
		dst.w.close(payload)
	default:
		// dst was closed already: this answers the gateway's close to
		// src (nothing to write), or src is owed a reply now.
		src.w.close(payload)
	}
	return errGotClose
}

// end closes the connection because of e: each side is sent its close
// frame (the side that caused it its own code, the other what e.other
// says), and a side that is gone is no longer read. Any goroutine may
// call it.
func (c *relay) end(e *closeErr) {
	c.beginClosing()
	if e.err != nil && !isExpected(e.err) {
		c.g.log.Debug("connection failed", "side", e.side.String(), "reason", e.reason, "error", e.err.Error())
	}
	if e.gone {
		c.closedFirst(e.side, 0, e.timeout)
	} else {
		c.closedFirst(e.side, e.code, false)
	}
	code, reason := e.other()
	switch e.side {
	case clientSide:
		if e.gone {
			c.abandon(&c.client)
		}
		c.sendClose(c.upstream, code, reason)
		if !e.gone {
			c.closeClientAfterUpstream(e.code, e.reason)
		}
	case upstreamSide:
		if e.gone {
			c.abandon(c.upstream)
		} else {
			c.sendClose(c.upstream, e.code, e.reason)
		}
		c.sendClose(&c.client, code, reason)
	default:
		c.sendClose(&c.client, e.code, e.reason)
		c.sendClose(c.upstream, e.code, e.reason)
	}
}

// fail ends the connection because a write failed (from a goroutine that
// is not a reader).
func (c *relay) fail(err error) {
	if e, _ := asCloseErr(gatewaySide, err, false); e != nil {
		c.end(e)
	}
}

// shutdown closes the connection with code on both sides.
func (c *relay) shutdown(code ws.StatusCode, reason string) {
	c.end(&closeErr{side: gatewaySide, code: code, reason: reason})
}

// sendClose writes a close frame with code and reason to p (once).
func (c *relay) sendClose(p *peer, code ws.StatusCode, reason string) {
	if p.rd.conn == nil {
		return // no upstream
	}
	var cb closeBody
	cb.set(code, reason)
	if _, err := p.w.close(cb.bytes()); err != nil {
		c.abandon(p)
	}
}

// closeClientAfterUpstream sends the client its close frame once the
// upstream's reader is done (its close reply arrived, it went away, or
// the closing deadline passed), so that answers to the client's earlier
// messages still reach it first.
func (c *relay) closeClientAfterUpstream(code ws.StatusCode, reason string) {
	c.cmu.Lock()
	if c.solo || c.upDone || c.upstream.gone.Load() {
		c.cmu.Unlock()
		c.sendClose(&c.client, code, reason)
		return
	}
	if c.rec == nil {
		c.rec = &closeRecord{}
	}
	c.rec.pendingCode, c.rec.pendingReason = code, reason
	c.cmu.Unlock()
}

// takePending writes the client's held close frame, if there is one, and
// reports whether there was.
func (c *relay) takePending() bool {
	c.cmu.Lock()
	var code ws.StatusCode
	var reason string
	if r := c.rec; r != nil {
		code, reason = r.pendingCode, r.pendingReason
		r.pendingCode = 0
	}
	c.cmu.Unlock()
	if code == 0 {
		return false
	}
	c.sendClose(&c.client, code, reason)
	return true
}

// upstreamDone runs when the upstream's reader has ended.
func (c *relay) upstreamDone() {
	c.cmu.Lock()
	c.upDone = true
	c.cmu.Unlock()
	c.takePending()
}

// abandon stops reading p: it is gone, or not reading what it is sent.
func (c *relay) abandon(p *peer) {
	if p.rd.conn == nil || !p.gone.CompareAndSwap(false, true) {
		return
	}
	p.w.closed.Store(true)
	p.rd.conn.SetReadDeadline(longAgo)
	c.wake(p)
}

// drain reads and discards frames from p after the gateway has sent it a
// close frame (or is about to), until p's close frame arrives or the
// closing deadline passes. Waiting for it, instead of closing at once,
// keeps the kernel from resetting the connection before the peer has read
// the gateway's close frame.
func (c *relay) drain(p *peer) {
	rd := &p.rd
	// First the rest of the frame that ended the relay, if any of it is
	// still unread.
	if err := p.skipRest(); err != nil {
		return
	}
	for {
		rd.release()
		h, hs, err := rd.header()
		if err != nil {
			return
		}
		if h.OpCode == ws.OpClose && h.Length <= ws.MaxControlFramePayloadSize {
			if rd.need(hs+int(h.Length)) == nil {
				payload := append([]byte(nil), rd.peek(hs, int(h.Length))...)
				if h.Masked {
					ws.Cipher(payload, h.Mask, 0)
				}
				c.closeFrame(p, true, payload)
				p.closeRecv.Store(true)
			}
			return
		}
		if err := rd.skip(int64(hs) + h.Length); err != nil {
			return
		}
	}
}

// Close implements Session.
func (c *relay) Close(code uint16, reason string) {
	c.shutdown(ws.StatusCode(code), reason)
}
