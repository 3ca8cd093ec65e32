package proxy

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// Frame headers are decoded and encoded here rather than with gobwas/ws's
// reader and writer: the relay rewrites them in place in its read buffer.

// errLengthMSB is a frame length with the most significant bit set, which
// RFC 6455 §5.2 forbids.
var errLengthMSB = errors.New("frame length has its most significant bit set")

// errFrameTooLong is a frame whose header and payload together come to
// more than 2^63-1 bytes (its length is under 2^63, but only just).
var errFrameTooLong = errors.New("frame too long")

// headerLen is the size of a header whose second byte is b1.
func headerLen(b1 byte) int {
	size := 2
	if b1&0x80 != 0 {
		size += 4
	}
	switch b1 & 0x7f {
	case 126:
		size += 2
	case 127:
		size += 8
	}
	return size
}

// decodeHeader decodes a complete frame header (b holds exactly its bytes).
func decodeHeader(b []byte) (h ws.Header, err error) {
	h.Fin = b[0]&0x80 != 0
	h.Rsv = (b[0] & 0x70) >> 4
	h.OpCode = ws.OpCode(b[0] & 0x0f)
	h.Masked = b[1]&0x80 != 0
	i := 2
	switch l := b[1] & 0x7f; l {
	case 126:
		h.Length = int64(binary.BigEndian.Uint16(b[2:4]))
		i = 4
	case 127:
		u := binary.BigEndian.Uint64(b[2:10])
		if u&(1<<63) != 0 {
			return h, errLengthMSB
		}
		h.Length = int64(u)
		i = 10
	default:
		h.Length = int64(l)
	}
	if h.Masked {
		copy(h.Mask[:], b[i:i+4])
	}
	return h, nil
}

// headerSize is the encoded size of h.
func headerSize(h ws.Header) int {
	n := 2
	switch {
	case h.Length > 0xffff:
		n += 8
	case h.Length > 125:
		n += 2
	}
	if h.Masked {
		n += 4
	}
	return n
}

// encodeHeader writes h into b (which must be headerSize(h) long).
func encodeHeader(b []byte, h ws.Header) {
	b[0] = byte(h.OpCode) | h.Rsv<<4
	if h.Fin {
		b[0] |= 0x80
	}
	i := 2
	switch {
	case h.Length > 0xffff:
		b[1] = 127
		binary.BigEndian.PutUint64(b[2:10], uint64(h.Length))
		i = 10
	case h.Length > 125:
		b[1] = 126
		binary.BigEndian.PutUint16(b[2:4], uint16(h.Length))
		i = 4
	default:
		b[1] = byte(h.Length)
	}
	if h.Masked {
		b[1] |= 0x80
		copy(b[i:i+4], h.Mask[:])
	}
}

// newMask draws a fresh masking key (RFC 6455 §5.3).
func newMask() (m [4]byte) {
	binary.LittleEndian.PutUint32(m[:], rand.Uint32())
	return m
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

// closeBody is the payload of a close frame: at most 125 bytes.
type closeBody struct {
	b [ws.MaxControlFramePayloadSize]byte
	n uint8
}

func (cb *closeBody) bytes() []byte { return cb.b[:cb.n] }

// set stores code and reason, the reason cut to fit on a UTF-8 boundary.
func (cb *closeBody) set(code ws.StatusCode, reason string) {
	binary.BigEndian.PutUint16(cb.b[:2], uint16(code))
	n := 2 + copy(cb.b[2:], reason)
	for n > 2 && !utf8.Valid(cb.b[2:n]) {
		n--
	}
	cb.n = uint8(n)
}

// checkClosePayload checks a received close payload (RFC 6455 §5.5.1,
// §7.4): empty, or a valid code followed by a UTF-8 reason.
func checkClosePayload(p []byte) *closeErr {
	switch {
	case len(p) == 0:
		return nil
	case len(p) == 1:
		return &closeErr{code: ws.StatusProtocolError, reason: "malformed close frame"}
	case !validCloseCode(ws.StatusCode(binary.BigEndian.Uint16(p))):
		return &closeErr{code: ws.StatusProtocolError, reason: "invalid close code"}
	case !utf8.Valid(p[2:]):
		return &closeErr{code: ws.StatusInvalidFramePayloadData, reason: "invalid UTF-8 in close reason"}
	}
	return nil
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
