package proxy

import (
	"errors"
	"iter"
	"sync/atomic"
	"syscall"
	"time"
)

// Driven reads. Go's read calls (net.Conn.Read, RawConn.Read) each begin
// by forgetting that the socket was ready, so each must try a read first:
// a reader that emptied its socket in one call finds nothing in the next
// (a read system call that returns EAGAIN) before it waits. On a busy
// connection that is one wasted system call per batch of frames.
//
// drive avoids it for a plain TCP side. relayFrames runs in a coroutine
// whose reads are made for it by the driver, inside one RawConn.Read held
// open across them. A read that returned less than it had room for
// emptied the socket, so the driver's next read waits first for the
// poller to report new bytes (a wake-up that arrives while the frames are
// handled is kept: the poller is edge-triggered, and its state is reset
// only when a RawConn.Read begins). relayFrames and everything under it
// run as before; only the read system calls move.

// A relayed side's reads start plain and become driven once they are
// busy: once driveAfter idle reads in a row found bytes within driveWithin
// of starting to wait. Driven reads take a second goroutine (the
// coroutine) until the side parks or ends, so a side that is mostly idle
// never pays for them, and only a side that parks (park_after, on Linux)
// has them: a driven side that falls idle gives both goroutines up.
const (
	driveAfter  = 4
	driveWithin = time.Millisecond
)

// errDrive ends plain reading so that the reads continue driven.
var errDrive = errors.New("wsgate: drive the reads")

// drives counts the times a side's reads became driven (the tests read it).
var drives atomic.Uint64

// busy counts an idle read that waited for waited nanoseconds and reports
// whether the reads are now busy.
func (wr *wireReader) busy(waited int64) bool {
	if waited >= int64(driveWithin) {
		wr.streak = 0
		return false
	}
	wr.streak++
	if wr.streak < driveAfter {
		return false
	}
	wr.streak = 0
	return true
}

// driver is the state of driven reads.
type driver struct {
	yield   func(struct{}) bool // hands the pending read to the driver
	resume  func() bool         // resumes the body; false once it ended
	pending func(uintptr) bool  // the read the body waits for
	serve   func(uintptr) bool  // wireReader.serve, the driver's callback
	more    func(uintptr) bool  // wireReader.readMore
	waitErr error               // the error that ended the pending read's wait
	space   int                 // the room the last read had
	drained bool                // the last read emptied the socket
	done    bool                // the body ended
}

// drive runs body (relayFrames) with driven reads; the reader must be of a
// plain TCP socket (drivable).
func (wr *wireReader) drive(body func() error) error {
	drives.Add(1)
	var err error
	d := &driver{serve: wr.serve, more: wr.readMore}
	next, stop := iter.Pull(func(yield func(struct{}) bool) {
		d.yield = yield
		wr.drv = d
		err = body()
		wr.drv = nil
	})
	defer stop()
	d.resume = func() bool { _, ok := next(); return ok }
	if !d.resume() {
		return err
	}
	for {
		// body waits for a read (d.pending): make it, and the ones after
		// it, in one RawConn.Read.
		d.drained, d.done = false, false
		rerr := wr.sock.Read(d.serve)
		if d.done {
			return err
		}
		// The wait for the pending read failed (a deadline, the socket
		// closing): that is the read's result.
		d.waitErr = rerr
		if !d.resume() {
			return err
		}
	}
}

// driven hands read to the driver and waits until it was made: the
// result is in n and rerr as read leaves it, or the error that ended the
// driver's wait.
func (wr *wireReader) driven(read func(uintptr) bool) error {
	d := wr.drv
	d.pending = read
	d.yield(struct{}{})
	err := d.waitErr
	d.waitErr = nil
	return err
}

// serve is the driver's RawConn.Read callback: it makes the pending read
// and resumes the body with its result, until the body ends (true) or a
// read has to wait for the socket (false).
func (wr *wireReader) serve(fd uintptr) bool {
	d := wr.drv
	for {
		if d.drained {
			// The last read emptied the socket: wait for news.
			d.drained = false
			return false
		}
		d.space = 0
		if !d.pending(fd) {
			return false // it found nothing and waits
		}
		d.drained = wr.rerr == nil && wr.n > 0 && wr.n < d.space
		if !d.resume() {
			d.done = true
			return true
		}
	}
}

// readMore is fillMore's read callback when driven: it reads into the
// free end of the buffer once the kernel has bytes.
func (wr *wireReader) readMore(fd uintptr) bool {
	b := (*wr.buf)[wr.w:]
	wr.n, wr.rerr = sysRead(fd, b)
	if wr.rerr == syscall.EAGAIN {
		return false
	}
	wr.drv.space = len(b)
	return true
}

// drivable says whether this reader's reads can be driven.
func (wr *wireReader) drivable() bool { return wr.direct && wr.sock != nil }
