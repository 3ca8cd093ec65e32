package proxy

import (
	"github.com/gobwas/ws"
)

// relayFrames reads frames from src and hands each to its handler until
// src closes, fails, breaks a rule or parks.
func (c *relay) relayFrames(src, dst *peer) error {
	rd := &src.rd
	defer func() {
		// Frames read before src's reader stopped still leave.
		if err := c.flush(src, dst); err != nil {
			c.fail(err)
		}
	}()
	for {
		if rd.buffered() == 0 {
			if err := c.flush(src, dst); err != nil {
				return err
			}
			rd.release()
		}
		src.rest = 0
		h, hs, err := rd.header()
		if err != nil {
			if err == errLengthMSB {
				return &closeErr{code: ws.StatusProtocolError, reason: err.Error()}
			}
			if err == errFrameTooLong {
				return tooBig()
			}
			return err
		}
		src.rest = int64(hs) + h.Length
		if h.Rsv != 0 {
			// RSV1 marks the first frame of a compressed message, where
			// permessage-deflate was agreed; nothing else may set a bit.
			if src.z == nil || h.Rsv != rsv1 || h.OpCode.IsControl() || h.OpCode == ws.OpContinuation {
				return &closeErr{code: ws.StatusProtocolError, reason: "unexpected RSV bits"}
			}
			h.Rsv = 0
			src.compressed = true
		} else if !h.OpCode.IsControl() && h.OpCode != ws.OpContinuation {
			src.compressed = false
		}
		if err := ws.CheckHeader(h, src.state()); err != nil {
			e := &closeErr{code: ws.StatusProtocolError, reason: err.Error()}
			if h.OpCode == ws.OpClose {
				// A bad close frame is still src's close: no other is
				// coming, so src is not waited for after the gateway's.
				src.closeCode = e.code
				src.closeRecv.Store(true)
			}
			return e
		}
		switch {
		case h.OpCode == ws.OpClose:
			return c.handleClose(src, dst, h, hs)
		case h.OpCode.IsControl():
			err = c.controlFrame(src, dst, h, hs)
		default:
			err = c.dataFrame(src, dst, h, hs)
		}
		if err != nil {
			return err
		}
	}
}

// controlFrame handles a ping or pong from src: the client's answer to the
// gateway's own ping is consumed, the rest count against src's rate
// limits, and are forwarded (or, without an upstream, answered).
func (c *relay) controlFrame(src, dst *peer, h ws.Header, hs int) error {
	rd := &src.rd
	n := int(h.Length)
	if err := rd.need(hs + n); err != nil {
		return err
	}
	if src.side == clientSide && h.OpCode == ws.OpPong && c.ownPong(rd.peek(hs, n), h) {
		src.consume(hs + n)
		return nil
	}
	if drop, err := c.limit(src, dst, true, false, h.Length); err != nil {
		return err
	} else if drop {
		src.consume(hs + n)
		return nil
	}
	if c.solo {
		payload := rd.peek(hs, n)
		src.consume(hs + n)
		if h.OpCode == ws.OpPing {
			ws.Cipher(payload, h.Mask, 0)
			return src.w.control(ws.OpPong, payload)
		}
		return nil
	}
	payload := rd.peek(hs, n)
	if h.Masked {
		ws.Cipher(payload, h.Mask, 0)
		h.Masked = false
	}
	return c.forwardLoaded(src, dst, h, hs)
}

// ownPong reports whether a pong answers the gateway's own ping; such
// pongs are consumed, not forwarded, and do not count as the client's
// messages.
func (c *relay) ownPong(p []byte, h ws.Header) bool {
	if len(p) != len(c.pingToken) {
		return false
	}
	var tok [8]byte
	copy(tok[:], p)
	ws.Cipher(tok[:], h.Mask, 0)
	if tok != c.pingToken {
		return false
	}
	c.pingOut = false
	return true
}
