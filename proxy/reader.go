package proxy

import (
	"crypto/tls"
	"errors"
	"io"
	"math"
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
// buffer only while it has unconsumed bytes (or frames waiting to be
// written): when the connection is idle it holds nothing but the socket.
//
// On sockets that expose syscall.RawConn (plain TCP), waiting for data costs
// no buffer at all: the buffer is taken from the pool inside the readiness
// callback, after the kernel has bytes for it. Other connections (TLS) wait
// in a Read on a small inline array and move to a pooled buffer once bytes
// have arrived.
//
// The bytes in [r, w) are unread. Complete frames before r may still be
// waiting to be written (the run): they are rewritten in place and leave
// together, in one write, before the buffer is refilled or compacted.
type wireReader struct {
	conn net.Conn
	// sock is the socket under conn (plain TCP, or the TCP connection
	// under TLS), watched while the side is parked; direct says conn is
	// the socket itself, read through sock while idle.
	sock  syscall.RawConn
	buf   *[]byte
	r, w  int
	small [16]byte

	// run is a span of complete frames in buf, rewritten in place, still
	// to be written to the other side; runData says it holds a data frame
	// and runOpen that its last data frame is not final.
	runStart, runEnd int

	// onTimeout, if set, is called when a read deadline passes; a nil
	// result means "deadline moved, keep reading".
	onTimeout func() error
	lastRead  int64 // mono time of the last read, if track

	// readFD is readReady as a func value, made once, and readOnceFD
	// readOnce; n and rerr are their results.
	readFD     func(uintptr) bool
	readOnceFD func(uintptr) bool
	n          int
	rerr       error

	// beforeRefill runs before the buffer is refilled or compacted: the
	// run must be written first.
	beforeRefill func() error

	// Parking (park.go). onKick, if set, makes idle waits kickable: the
	// sweeper moves the read deadline into the past to end a wait that
	// has lasted too long, and onKick decides what happens next (gotData:
	// bytes arrived anyway). It returns errPark to give up the goroutine,
	// nil to go on.
	onKick func(gotData bool) error
	// parkNow makes the reader of a plain TCP socket park as soon as it
	// finds nothing to read (onKick(false) decides), without waiting.
	parkNow   bool
	waitSince int64 // guarded by pmu: mono time the wait began
	pmu       sync.Mutex
	waiting   bool // guarded by pmu: in an idle wait a kick may end
	kicked    bool // guarded by pmu: the sweeper ended this wait

	// drv makes the reads while they are driven (drive.go).
	drv *driver

	// mayDrive says the reads may become driven: fill returns errDrive,
	// at a frame boundary, once they are busy; streak counts the idle
	// reads in a row that found bytes soon.
	mayDrive bool
	streak   uint8

	direct  bool
	track   bool // successful reads record lastRead
	fresh   bool // bytes were read since the rate limits last took the time (limits.go)
	runData bool
	runOpen bool
}

// init sets the reader up for c. A TLS connection is read through
// crypto/tls, and its socket is watched while the side is parked: a
// reader whose deadline fired while it waited in the socket read holds no
// complete TLS record, so the socket's readiness is the right wake-up.
func (wr *wireReader) init(c net.Conn) {
	wr.conn = c
	under := c
	if tc, ok := c.(*tls.Conn); ok {
		under = tc.NetConn()
	}
	if sc, ok := under.(syscall.Conn); ok {
		if raw, err := sc.SyscallConn(); err == nil {
			wr.sock, wr.direct = raw, rawIO && under == c
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
		wr.r = 0
	} else {
		wr.acquire()
	}
	wr.w = copy(*wr.buf, p)
	wr.fresh = true
}

func (wr *wireReader) acquire() {
	wr.buf = readBufPool.Get().(*[]byte)
	wr.r, wr.w = 0, 0
}

// release returns the buffer to the pool if everything in it was consumed
// and written.
func (wr *wireReader) release() {
	if wr.buf != nil && wr.r == wr.w && wr.runEnd == wr.runStart {
		if cap(*wr.buf) == readBufSize {
			readBufPool.Put(wr.buf)
		}
		wr.buf = nil
		wr.r, wr.w = 0, 0
	}
}

// releaseAll drops the buffer whatever it holds; used when the side ends.
func (wr *wireReader) releaseAll() {
	if wr.buf != nil {
		wr.r = wr.w
		wr.runStart, wr.runEnd = 0, 0
		wr.release()
	}
}

// buffered is the number of unread bytes.
func (wr *wireReader) buffered() int { return wr.w - wr.r }

// peek returns n unread bytes starting off bytes ahead (they must be
// buffered).
func (wr *wireReader) peek(off, n int) []byte { return (*wr.buf)[wr.r+off : wr.r+off+n] }

// back returns the n bytes before the next unread one (already consumed,
// still in the buffer).
func (wr *wireReader) back(n int) []byte { return (*wr.buf)[wr.r-n : wr.r] }

// consume marks n buffered bytes as read.
func (wr *wireReader) consume(n int) { wr.r += n }

// pos is the buffer offset of the next unread byte.
func (wr *wireReader) pos() int { return wr.r }

// addRun adds the frame in buf[start:end] to the run if it follows the
// run directly (or the run is empty) and reports whether it did.
func (wr *wireReader) addRun(start, end int, data, open bool) bool {
	if wr.runEnd > wr.runStart && wr.runEnd != start {
		return false
	}
	if wr.runEnd == wr.runStart {
		wr.runStart, wr.runData = start, false
	}
	wr.runEnd = end
	if data {
		wr.runData, wr.runOpen = true, open
	}
	return true
}

// takeRun returns the run and empties it.
func (wr *wireReader) takeRun() (b []byte, data, open bool) {
	if wr.runEnd <= wr.runStart {
		return nil, false, false
	}
	b, data, open = (*wr.buf)[wr.runStart:wr.runEnd], wr.runData, wr.runOpen
	wr.runStart, wr.runEnd, wr.runData = 0, 0, false
	return b, data, open
}

// fill reads more bytes into the buffer; it blocks until at least one byte
// arrived or the read failed.
func (wr *wireReader) fill() error {
	if wr.beforeRefill != nil {
		if err := wr.beforeRefill(); err != nil {
			return err
		}
	}
	if wr.buf != nil && wr.r == wr.w {
		// Nothing unread: start over at the front of the buffer.
		wr.r, wr.w = 0, 0
	}
	for {
		var err error
		var start int64
		idle := wr.buf == nil
		if idle && wr.mayDrive {
			start = mono()
		}
		if idle {
			err = wr.fillIdle()
		} else {
			err = wr.fillMore()
		}
		if err == nil {
			wr.fresh = true
			drive := idle && wr.mayDrive
			if wr.track || drive {
				now := mono()
				if wr.track {
					wr.lastRead = now
				}
				if drive && wr.busy(now-start) {
					return errDrive
				}
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
	if wr.drv != nil {
		return wr.fillDriven()
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

// fillDriven is fillMore's read when driven (drive.go).
func (wr *wireReader) fillDriven() error {
	wr.n, wr.rerr = 0, nil
	if err := wr.driven(wr.drv.more); err != nil {
		return err
	}
	n, err := wr.n, wr.rerr
	wr.rerr = nil
	if err != nil {
		return err
	}
	if n <= 0 {
		return io.EOF
	}
	wr.w += n
	return nil
}

// fillIdle waits for data without holding a buffer.
func (wr *wireReader) fillIdle() error {
	if wr.onKick == nil {
		return wr.waitIdle()
	}
	if wr.parkNow && wr.direct {
		if err := wr.readNow(); err != syscall.EAGAIN {
			return err
		}
		if err := wr.onKick(false); err != nil {
			return err
		}
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
	if !wr.direct {
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
	return wr.rawRead(wr.readFD)
}

// rawRead reads the socket through f, readReady or readOnce, and takes
// its result: the bytes read, or the error (EAGAIN from readOnce: the
// socket held nothing).
func (wr *wireReader) rawRead(f func(uintptr) bool) error {
	wr.n, wr.rerr = 0, nil
	var err error
	if wr.drv != nil {
		err = wr.driven(f)
	} else {
		err = wr.sock.Read(f)
	}
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

// readNow reads what the socket holds without waiting for more; EAGAIN
// says it held nothing.
func (wr *wireReader) readNow() error {
	if wr.readOnceFD == nil {
		wr.readOnceFD = wr.readOnce
	}
	return wr.rawRead(wr.readOnceFD)
}

// readOnce is readNow's raw read callback: readReady, never waiting.
func (wr *wireReader) readOnce(fd uintptr) bool {
	wr.readReady(fd)
	return true
}

// readReady is the raw read callback of waitIdle: it reads into a pooled
// buffer once the kernel has bytes (n, rerr hold the result).
func (wr *wireReader) readReady(fd uintptr) bool {
	buf := readBufPool.Get().(*[]byte)
	wr.n, wr.rerr = sysRead(fd, *buf)
	if wr.rerr == syscall.EAGAIN {
		readBufPool.Put(buf)
		return false
	}
	wr.buf, wr.r, wr.w = buf, 0, 0
	if wr.drv != nil {
		wr.drv.space = len(*buf)
	}
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

// need makes sure at least n (≤ readBufSize) unread bytes are buffered.
func (wr *wireReader) need(n int) error {
	for wr.buffered() < n {
		if err := wr.more(n); err != nil {
			return err
		}
	}
	return nil
}

// more reads at least once, making room for n unread bytes first.
func (wr *wireReader) more(n int) error {
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
	return wr.fill()
}

// header decodes the next frame header, reading until it is buffered. It
// consumes nothing: the header's size is returned, and its bytes stay in
// place in front of the payload (so the relay can rewrite it there).
func (wr *wireReader) header() (h ws.Header, size int, err error) {
	if err = wr.need(2); err != nil {
		return h, 0, err
	}
	size = headerLen((*wr.buf)[wr.r+1])
	if err = wr.need(size); err != nil {
		return h, 0, err
	}
	h, err = decodeHeader((*wr.buf)[wr.r : wr.r+size])
	if err == nil && h.Length > math.MaxInt64-int64(size) {
		// Header and payload together would overflow an int64: no such
		// frame can ever be read, and its size would count backwards.
		err = errFrameTooLong
	}
	return h, size, err
}

// chunk returns up to n unread bytes without reading; it reads first (from
// the start of the buffer) when nothing is buffered.
func (wr *wireReader) chunk(n int64) ([]byte, error) {
	if wr.buffered() == 0 {
		if err := wr.fill(); err != nil {
			return nil, err
		}
	}
	return (*wr.buf)[wr.r : wr.r+int(min(n, int64(wr.buffered())))], nil
}

// skip discards the next n bytes of the stream.
func (wr *wireReader) skip(n int64) error {
	for n > 0 {
		b, err := wr.chunk(n)
		if err != nil {
			return err
		}
		wr.r += len(b)
		n -= int64(len(b))
	}
	return nil
}
