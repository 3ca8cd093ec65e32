package proxy

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/gobwas/ws"
)

// readBufSize is the size of the pooled read buffers. A frame larger than
// this streams through the buffer in chunks; it never needs a bigger one.
const readBufSize = 64 << 10

// longAgo is a deadline that has always passed.
var longAgo = time.Unix(1, 0)

var readBufPool = sync.Pool{New: func() any { b := make([]byte, readBufSize); return &b }}

// wireReader reads from one side of a relayed connection. It holds a pooled
// buffer only while it has unconsumed bytes: when the connection is idle it
// holds nothing but the socket.
//
// On sockets that expose syscall.RawConn (plain TCP), waiting for data costs
// no buffer at all: the buffer is taken from the pool inside the readiness
// callback, after the kernel has bytes for it. Other connections (TLS) wait
// in a Read on a small inline array and move to a pooled buffer once bytes
// have arrived.
type wireReader struct {
	conn  net.Conn
	raw   syscall.RawConn
	buf   *[]byte
	r, w  int
	small [16]byte

	// onTimeout, if set, is called when a read deadline passes; a nil
	// result means "deadline moved, keep reading".
	onTimeout func() error
	// track makes successful reads record lastRead (mono time).
	track    bool
	lastRead int64

	// readFD is readReady as a func value, made once; n and rerr are its
	// results.
	readFD func(uintptr) bool
	n      int
	rerr   error

	// beforeRefill runs before the buffer is refilled or compacted: bytes
	// still waiting in it (frames to be written) must leave first.
	beforeRefill func() error

	// Parking (park.go). onKick, if set, makes idle waits kickable: the
	// sweeper moves the read deadline into the past to end a wait that
	// has lasted too long, and onKick decides what happens next (gotData:
	// bytes arrived anyway). It returns errPark to give up the goroutine,
	// nil to go on.
	onKick    func(gotData bool) error
	pmu       sync.Mutex
	waiting   bool  // guarded by pmu: in an idle wait a kick may end
	kicked    bool  // guarded by pmu: the sweeper ended this wait
	waitSince int64 // guarded by pmu: mono time the wait began
}

// init sets the reader up for c.
func (wr *wireReader) init(c net.Conn) {
	wr.conn = c
	if sc, ok := c.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			wr.raw = raw
		}
	}
}

// prime hands bytes that were read ahead of the frame stream (left in a
// handshake's bufio.Reader) to the reader.
func (wr *wireReader) prime(p []byte) {
	if len(p) == 0 {
		return
	}
	if len(p) > readBufSize {
		// bufio readers used by net/http and gobwas are 4 KiB; guard anyway.
		b := make([]byte, len(p))
		wr.buf = &b
	} else {
		wr.acquire()
	}
	wr.w = copy(*wr.buf, p)
}

func (wr *wireReader) acquire() {
	wr.buf = readBufPool.Get().(*[]byte)
	wr.r, wr.w = 0, 0
}

// release returns the buffer to the pool if everything in it was consumed.
func (wr *wireReader) release() {
	if wr.buf != nil && wr.r == wr.w {
		if cap(*wr.buf) == readBufSize {
			readBufPool.Put(wr.buf)
		}
		wr.buf = nil
		wr.r, wr.w = 0, 0
	}
}

// releaseAll drops the buffer whatever it holds; used when the connection ends.
func (wr *wireReader) releaseAll() {
	if wr.buf != nil {
		wr.r = wr.w
		wr.release()
	}
}

func (wr *wireReader) buffered() int { return wr.w - wr.r }

// fill reads more bytes into the buffer; it blocks until at least one byte
// arrived or the read failed.
func (wr *wireReader) fill() error {
	if wr.beforeRefill != nil {
		if err := wr.beforeRefill(); err != nil {
			return err
		}
	}
	for {
		var err error
		if wr.buf == nil {
			err = wr.fillIdle()
		} else {
			err = wr.fillMore()
		}
		if err == nil {
			if wr.track {
				wr.lastRead = mono()
			}
			return nil
		}
		if wr.onTimeout == nil || !errors.Is(err, os.ErrDeadlineExceeded) {
			return err
		}
		if err := wr.onTimeout(); err != nil {
			return err
		}
	}
}

func (wr *wireReader) fillMore() error {
	b := *wr.buf
	if wr.r > 0 && wr.w == len(b) {
		// compact: make room at the end
		wr.w = copy(b, b[wr.r:wr.w])
		wr.r = 0
	}
	if wr.w == len(b) {
		return errors.New("wsgate: read buffer full")
	}
	n, err := wr.conn.Read(b[wr.w:])
	wr.w += n
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return err
}

// fillIdle waits for data without holding a buffer.
func (wr *wireReader) fillIdle() error {
	if wr.onKick == nil {
		return wr.waitIdle()
	}
	for {
		wr.pmu.Lock()
		wr.waiting, wr.waitSince = true, mono()
		wr.pmu.Unlock()
		err := wr.waitIdle()
		wr.pmu.Lock()
		kicked := wr.kicked
		wr.waiting, wr.kicked = false, false
		wr.pmu.Unlock()
		if !kicked {
			return err
		}
		switch {
		case err == nil:
			if wr.track {
				wr.lastRead = mono()
			}
			return wr.onKick(true)
		case errors.Is(err, os.ErrDeadlineExceeded):
			if err := wr.onKick(false); err != nil {
				return err
			}
		default:
			return err
		}
	}
}

func (wr *wireReader) waitIdle() error {
	if wr.raw == nil {
		n, err := wr.conn.Read(wr.small[:])
		if n > 0 {
			wr.acquire()
			wr.w = copy(*wr.buf, wr.small[:n])
			return nil
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return err
	}
	if wr.readFD == nil {
		wr.readFD = wr.readReady
	}
	wr.n, wr.rerr = 0, nil
	err := wr.raw.Read(wr.readFD)
	n, rerr := wr.n, wr.rerr
	wr.rerr = nil
	if err != nil {
		if wr.buf != nil {
			readBufPool.Put(wr.buf)
			wr.buf = nil
		}
		return err
	}
	if rerr != nil {
		wr.releaseAll()
		return rerr
	}
	if n <= 0 {
		wr.releaseAll()
		return io.EOF
	}
	wr.w = n
	return nil
}

// readReady is the raw read callback of waitIdle: it reads into a pooled
// buffer once the kernel has bytes (n, rerr hold the result).
func (wr *wireReader) readReady(fd uintptr) bool {
	buf := readBufPool.Get().(*[]byte)
	for {
		wr.n, wr.rerr = syscall.Read(int(fd), *buf)
		if wr.rerr != syscall.EINTR {
			break
		}
	}
	if wr.rerr == syscall.EAGAIN {
		readBufPool.Put(buf)
		return false
	}
	wr.buf, wr.r, wr.w = buf, 0, 0
	return true
}

// kick ends the current idle wait if it began at least after ago (mono
// time now), by moving the read deadline into the past. It reports
// whether it did.
func (wr *wireReader) kick(now, after int64) bool {
	wr.pmu.Lock()
	defer wr.pmu.Unlock()
	if !wr.waiting || wr.kicked || now-wr.waitSince < after {
		return false
	}
	wr.kicked = true
	wr.conn.SetReadDeadline(longAgo)
	return true
}

// need makes sure at least n (≤ readBufSize) bytes are buffered.
func (wr *wireReader) need(n int) error {
	for wr.buffered() < n {
		if wr.beforeRefill != nil {
			if err := wr.beforeRefill(); err != nil {
				return err
			}
		}
		if wr.buf != nil && len(*wr.buf)-wr.r < n {
			b := *wr.buf
			wr.w = copy(b, b[wr.r:wr.w])
			wr.r = 0
		}
		if err := wr.fill(); err != nil {
			return err
		}
	}
	return nil
}

// errLengthMSB is a frame length with the most significant bit set, which
// RFC 6455 §5.2 forbids.
var errLengthMSB = errors.New("frame length has its most significant bit set")

// readHeader reads and decodes one frame header. It returns the header and
// the offset in the buffer where the header started (so a relay can rewrite
// it in place). Only the header bytes are consumed. When the payload is at
// most whole bytes long (and always for control frames) it is buffered
// too, right after the header.
func (wr *wireReader) readHeader(whole int) (h ws.Header, start int, err error) {
	if err = wr.need(2); err != nil {
		return h, 0, err
	}
	b := (*wr.buf)[wr.r:wr.w]
	size := 2
	if b[1]&0x80 != 0 {
		size += 4
	}
	switch b[1] & 0x7f {
	case 126:
		size += 2
	case 127:
		size += 8
	}
	if err = wr.need(size); err != nil {
		return h, 0, err
	}
	h, err = decodeHeader((*wr.buf)[wr.r : wr.r+size])
	if err != nil {
		return h, 0, err
	}
	if h.OpCode.IsControl() {
		whole = max(whole, ws.MaxControlFramePayloadSize)
	}
	if h.Length <= int64(whole) {
		if err = wr.need(size + int(h.Length)); err != nil {
			return h, 0, err
		}
	}
	start = wr.r
	wr.r += size
	return h, start, nil
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

// skip discards the next n bytes of the stream.
func (wr *wireReader) skip(n int64) error {
	for {
		k := int(min(n, int64(wr.buffered())))
		wr.r += k
		n -= int64(k)
		if n == 0 {
			return nil
		}
		wr.r, wr.w = 0, 0
		if err := wr.fill(); err != nil {
			return err
		}
	}
}
