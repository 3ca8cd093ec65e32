package proxy

import (
	"github.com/gobwas/ws"
)

// maxWholeFrame is the largest frame payload read whole into the read
// buffer (checked, and rewritten in place there); larger frames stream
// through it.
const maxWholeFrame = readBufSize - ws.MaxHeaderSize

// assembleCap bounds an assembled message when MaxMessage is unlimited.
const assembleCap = 16 << 20

var (
	errTooBig      = &closeErr{code: ws.StatusMessageTooBig, reason: "message too big"}
	errInvalidUTF8 = &closeErr{code: ws.StatusInvalidFramePayloadData, reason: "invalid UTF-8 in text message"}
)

// Each frame error is a new closeErr: asCloseErr fills in its side.
func tooBig() *closeErr      { e := *errTooBig; return &e }
func invalidUTF8() *closeErr { e := *errInvalidUTF8; return &e }

// dataFrame handles a text, binary or continuation frame from src (its
// header, of size hs, not yet consumed): size and rate limits, UTF-8, the
// gateway's own consumers (token refresh, channel policy, upstream
// control), then forwarding.
func (c *relay) dataFrame(src, dst *peer, h ws.Header, hs int) error {
	newMsg := h.OpCode != ws.OpContinuation
	if newMsg {
		src.msgSize = 0
		src.text = h.OpCode == ws.OpText
		src.dropping = false
		if src.z != nil {
			src.z.drop = false
		}
		src.utf8.reset()
		if src.side == clientSide {
			c.msg = nil
		}
	}
	src.fragmented = !h.Fin
	m := src.limits.MaxMessage
	if src.compressed {
		// A compressed message's frames are held until it is inflated,
		// to at most assembleCap bytes when MaxMessage is unlimited: its
		// compressed bytes are bound all the same. Deflate may add a
		// little to data that does not compress. The inflated size is
		// checked as it is inflated.
		if m <= 0 {
			m = assembleCap
		}
		m += m>>12 + 64
	}
	if m > 0 && h.Length > m-src.msgSize {
		return tooBig()
	}
	src.msgSize += h.Length
	if c.cfg.IdleTimeout > 0 && h.Fin {
		c.lastData.Store(mono())
	}
	drop := src.dropping
	if !drop {
		var err error
		if drop, err = c.limit(src, dst, false, newMsg, h.Length); err != nil {
			return err
		}
	}
	if drop {
		if !src.compressed || src.z.inBits == 0 {
			return src.skipRest()
		}
		// The peer's next messages may refer back into this one: it is
		// inflated all the same, then dropped.
		src.z.drop = true
	}
	if src.compressed {
		return c.compressedFrame(src, dst, h, hs)
	}
	inspect := c.inspect != nil && src.side == clientSide
	if h.Length > maxWholeFrame {
		if inspect {
			return c.assembleStream(src, dst, h, hs)
		}
		return c.stream(src, dst, h, hs)
	}
	payload, err := c.load(src, h, hs)
	if err != nil {
		return err
	}
	h.Masked = false
	whole := newMsg && h.Fin
	switch {
	case src.side == clientSide && c.refresh != nil && whole && src.text && len(payload) <= maxRefreshMessage:
		// A refresh message is consumed here; anything else goes on.
		if consumed, err := c.tryRefresh(payload); err != nil || consumed {
			src.consume(hs + len(payload))
			return err
		}
	case src.side == upstreamSide && c.control != nil && whole && src.text:
		// Upstream control messages (a configured prefix) are consumed.
		if c.control(payload) {
			src.consume(hs + len(payload))
			return nil
		}
	}
	if inspect {
		if !whole {
			// A fragment: the message is judged once it is complete.
			err := c.collect(src, dst, h.Fin, payload)
			src.consume(hs + len(payload))
			return err
		}
		if pass, err := c.judge(src, payload); err != nil || !pass {
			src.consume(hs + len(payload))
			return err
		}
	}
	if whole && dst.z.compresses(len(payload)) {
		if err := c.flush(src, dst); err != nil {
			return err
		}
		sent, err := dst.w.deflated(h.OpCode, payload)
		if sent || err != nil {
			src.consume(hs + len(payload))
			if err == nil {
				src.sent.add(1, uint64(len(payload)))
			}
			return err
		}
	}
	return c.forwardLoaded(src, dst, h, hs)
}

// compressedFrame handles a frame of a compressed message: the message is
// inflated once its last frame is in, from the read buffer when it is one
// frame that fits there, else from its frames' bytes collected.
func (c *relay) compressedFrame(src, dst *peer, h ws.Header, hs int) error {
	z := src.z
	if h.Fin && h.OpCode != ws.OpContinuation && h.Length <= maxWholeFrame {
		wire, err := c.load(src, h, hs)
		if err != nil {
			return err
		}
		err = c.inflated(src, dst, wire)
		src.consume(hs + len(wire))
		return err
	}
	rd := &src.rd
	src.consume(hs)
	var off int64
	for src.rest > 0 {
		chunk, err := rd.chunk(src.rest)
		if err != nil {
			return err
		}
		if h.Masked {
			ws.Cipher(chunk, h.Mask, int(off))
		}
		z.wire = append(z.wire, chunk...)
		src.consume(len(chunk))
		off += int64(len(chunk))
	}
	if !h.Fin {
		return nil
	}
	err := c.inflated(src, dst, z.wire)
	z.wire = nil // an idle connection holds no message
	return err
}

// inflated inflates a compressed message from src and passes it on.
func (c *relay) inflated(src, dst *peer, wire []byte) error {
	limit := src.limits.MaxMessage
	if limit <= 0 {
		limit = assembleCap
	}
	buf, pooled, err := src.z.inflate(wire, limit, src.text, &src.utf8)
	if err != nil {
		return err
	}
	if pooled {
		defer putMessage(buf)
	}
	if src.z.drop {
		return nil
	}
	return c.whole(src, dst, buf)
}

// whole passes on a whole message of src held in buf, after
// ws.MaxHeaderSize bytes of headroom: the gateway's consumers see it (token
// refresh, upstream control, inspection), then it is written to dst.
func (c *relay) whole(src, dst *peer, buf []byte) error {
	payload := buf[ws.MaxHeaderSize:]
	switch {
	case src.side == clientSide && c.refresh != nil && src.text && len(payload) <= maxRefreshMessage:
		if consumed, err := c.tryRefresh(payload); err != nil || consumed {
			return err
		}
	case src.side == upstreamSide && c.control != nil && src.text && len(payload) <= maxWholeFrame:
		if c.control(payload) {
			return nil
		}
	}
	if c.inspect != nil && src.side == clientSide {
		if pass, err := c.judge(src, payload); err != nil || !pass {
			return err
		}
	}
	return c.send(src, dst, buf)
}

// send writes a whole message of src, held in buf after headroom, to dst
// as one frame, after src's frames waiting to be written.
func (c *relay) send(src, dst *peer, buf []byte) error {
	if err := c.flush(src, dst); err != nil {
		return err
	}
	op := ws.OpBinary
	if src.text {
		op = ws.OpText
	}
	if err := dst.w.data(op, buf); err != nil {
		return err
	}
	src.sent.add(1, uint64(len(buf)-ws.MaxHeaderSize))
	return nil
}

// load reads the payload of a frame of at most maxWholeFrame bytes into
// the buffer, right after its header, unmasked. Text is checked as UTF-8
// as it arrives, so that a bad byte fails the connection at once rather
// than when the frame is complete.
func (c *relay) load(src *peer, h ws.Header, hs int) ([]byte, error) {
	rd := &src.rd
	n := int(h.Length)
	done := 0
	for {
		if avail := min(n, rd.buffered()-hs); avail > done || n == 0 {
			if err := src.unmask(h, rd.peek(hs+done, avail-done), done, avail == n); err != nil {
				return nil, err
			}
			done = avail
		}
		if done == n {
			return rd.peek(hs, n), nil
		}
		if err := rd.more(hs + n); err != nil {
			return nil, err
		}
	}
}

// unmask unmasks part of a frame's payload (b, off bytes into it; last:
// the payload ends with it) and, for text, checks it as UTF-8 following
// what came before.
func (p *peer) unmask(h ws.Header, b []byte, off int, last bool) error {
	if h.Masked {
		ws.Cipher(b, h.Mask, off)
	}
	if p.text && !p.compressed && (!p.utf8.feed(b) || (last && h.Fin && !p.utf8.done())) {
		return invalidUTF8()
	}
	return nil
}

// forwardLoaded forwards a frame whose payload is in the buffer, unmasked
// (h.Masked false): the header is rewritten in place (masked again with a
// fresh key toward an upstream) and the frame joins the run of frames that
// leave together.
func (c *relay) forwardLoaded(src, dst *peer, h ws.Header, hs int) error {
	rd := &src.rd
	n := int(h.Length)
	out := h
	out.Masked = dst.side == upstreamSide
	if out.Masked {
		out.Mask = newMask()
		ws.Cipher(rd.peek(hs, n), out.Mask, 0)
	}
	ohs := headerSize(out) // never more than hs: peers' frames are masked alike
	encodeHeader(rd.peek(hs-ohs, ohs), out)
	start := rd.pos() + hs - ohs
	src.consume(hs + n)
	data := !h.OpCode.IsControl()
	if data {
		src.sent.add(fin(h), uint64(n))
	}
	if rd.addRun(start, start+ohs+n, data, !h.Fin) {
		return nil
	}
	if err := c.flush(src, dst); err != nil {
		return err
	}
	rd.addRun(start, start+ohs+n, data, !h.Fin)
	return nil
}

// flush writes src's run of waiting frames to dst.
func (c *relay) flush(src, dst *peer) error {
	b, data, open := src.rd.takeRun()
	if b == nil {
		return nil
	}
	return dst.w.frames(b, data, open)
}

// stream forwards a frame larger than the read buffer, chunk by chunk as
// it arrives, holding dst's writer for the whole frame. Text is checked
// as UTF-8 before each chunk is passed on; a frame cut short (the source
// failed, or sent bad text) leaves dst's writer broken.
func (c *relay) stream(src, dst *peer, h ws.Header, hs int) error {
	if err := c.flush(src, dst); err != nil {
		return err
	}
	rd := &src.rd
	out := h
	out.Masked = dst.side == upstreamSide
	if out.Masked {
		out.Mask = newMask()
	}
	ohs := headerSize(out)
	encodeHeader(rd.peek(hs-ohs, ohs), out)
	src.consume(hs)

	w := &dst.w
	w.mu.Lock()
	wrote := false
	err := func() error {
		var off int64
		for src.rest > 0 {
			var wbuf []byte
			if !wrote && rd.buffered() == 0 {
				// The header is at the end of the buffer: it goes alone,
				// before the buffer is refilled.
				wbuf = rd.back(ohs)
			} else {
				chunk, err := rd.chunk(src.rest)
				if err != nil {
					return err
				}
				if err := src.unmask(h, chunk, int(off), int64(len(chunk)) == src.rest); err != nil {
					return err
				}
				if out.Masked {
					ws.Cipher(chunk, out.Mask, int(off))
				}
				wbuf = chunk
				if !wrote {
					// The header sits right in front of the first chunk.
					hdr := rd.back(ohs)
					wbuf = hdr[:ohs+len(chunk)]
				}
				src.consume(len(chunk))
				off += int64(len(chunk))
			}
			if !w.closed.Load() {
				if err := w.put(wbuf, nil); err != nil {
					return err
				}
			}
			wrote = true
		}
		return nil
	}()
	ended := false
	if err == nil {
		src.sent.add(fin(h), uint64(h.Length))
	}
	cut := err != nil && wrote
	if cut {
		w.cut()
	} else if err == nil {
		ended = w.endFrame(h)
	}
	w.mu.Unlock()
	if cut {
		c.abandon(dst) // no close frame can follow a cut frame
	}
	if ended {
		w.resume()
	}
	return err
}

// judge asks the inspector about a complete client message. It reports
// whether the message may be forwarded; a drop may send a reply to the
// client, and a close verdict ends the connection.
func (c *relay) judge(src *peer, msg []byte) (bool, error) {
	if c.solo {
		src.sent.add(1, uint64(len(msg))) // the gateway is the client's peer
	}
	v, reply := c.inspect(msg, src.text)
	switch v {
	case Pass:
		return !c.solo, nil // without an upstream there is nowhere to pass it on to
	case Close:
		return false, &closeErr{code: ws.StatusPolicyViolation, reason: "forbidden"}
	}
	if len(reply) > 0 {
		return false, c.reply(reply)
	}
	return false, nil
}

// collect adds a fragment of a client message to the message being
// assembled for inspection; the last one has the message judged and, if it
// passes, forwarded as one frame.
func (c *relay) collect(src, dst *peer, fin bool, chunk []byte) error {
	if c.msg == nil {
		// headroom for the frame header, written in front of the message
		b := make([]byte, ws.MaxHeaderSize, ws.MaxHeaderSize+len(chunk))
		c.msg = &b
	}
	limit := src.limits.MaxMessage
	if limit <= 0 {
		limit = assembleCap
	}
	if int64(len(*c.msg)-ws.MaxHeaderSize+len(chunk)) > limit {
		return tooBig()
	}
	*c.msg = append(*c.msg, chunk...)
	if !fin {
		return nil
	}
	msg := *c.msg
	c.msg = nil // no payload buffer is kept between messages
	pass, err := c.judge(src, msg[ws.MaxHeaderSize:])
	if err != nil || !pass {
		return err
	}
	return c.send(src, dst, msg)
}

// fin is 1 for the last frame of a message, else 0.
func fin(h ws.Header) uint64 {
	if h.Fin {
		return 1
	}
	return 0
}

// assembleStream collects a client frame larger than the read buffer, for
// inspection, checking text as it arrives.
func (c *relay) assembleStream(src, dst *peer, h ws.Header, hs int) error {
	rd := &src.rd
	src.consume(hs)
	var off int64
	for src.rest > 0 {
		chunk, err := rd.chunk(src.rest)
		if err != nil {
			return err
		}
		last := int64(len(chunk)) == src.rest
		if err := src.unmask(h, chunk, int(off), last); err != nil {
			return err
		}
		src.consume(len(chunk))
		off += int64(len(chunk))
		if err := c.collect(src, dst, h.Fin && last, chunk); err != nil {
			return err
		}
	}
	return nil
}
