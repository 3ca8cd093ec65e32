package proxy

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/wsgate/wsgate/internal/uring"
)

// batchSys is what a batch needs to write through io_uring.
type batchSys struct {
	ring   *uring.Ring // while writing
	failed bool        // the ring failed: it is not used again
	fds    []int
	bufs   [][]byte
	res    []int
	// holdFD[i] is the callback of item i's RawConn.Write in hold: with
	// the socket held, the batch goes on with the next item. Made once
	// per batch (batches are pooled).
	holdFD [batchMax]func(fd uintptr) bool
}

// writeAll writes every item of the batch in one io_uring submission,
// recording each one's result; false means there is no ring, and nothing
// was written.
func (b *Batch) writeAll() bool {
	s := &b.sys
	if s.ring = rings.get(); s.ring == nil {
		return false
	}
	s.failed = false
	rings.submissions.Add(1)
	b.hold(0)
	rings.put(s.ring, s.failed)
	s.ring = nil
	return true
}

// hold takes the socket of item i and of those after it, each inside its
// RawConn's Write, so that none can be closed (and its descriptor reused)
// until all are written, and then writes them.
func (b *Batch) hold(i int) {
	if i == len(b.items) {
		b.submit()
		return
	}
	it := &b.items[i]
	if b.sys.holdFD[i] == nil {
		b.sys.holdFD[i] = func(fd uintptr) bool {
			b.items[i].fd = int(fd)
			b.hold(i + 1)
			return true
		}
	}
	it.fd = -1
	err := it.w.p.rd.sock.Write(b.sys.holdFD[i])
	if it.fd < 0 { // the socket is closed: nothing is written to it
		it.err = err
		b.hold(i + 1)
	}
}

// submit writes every held item (fd ≥ 0) in one submission.
func (b *Batch) submit() {
	s := &b.sys
	s.fds, s.bufs = s.fds[:0], s.bufs[:0]
	for i := range b.items {
		if it := &b.items[i]; it.fd >= 0 {
			s.fds = append(s.fds, it.fd)
			s.bufs = append(s.bufs, it.b)
		}
	}
	if cap(s.res) < len(s.fds) {
		s.res = make([]int, batchMax)
	}
	res := s.res[:len(s.fds)]
	err := s.ring.Send(s.fds, s.bufs, res)
	s.failed = err != nil && err != uring.ErrNotSubmitted
	j := 0
	for i := range b.items {
		it := &b.items[i]
		if it.fd < 0 {
			continue
		}
		switch r := res[j]; {
		case err == uring.ErrNotSubmitted: // write it here
			n, werr := sysWrite(uintptr(it.fd), it.b)
			it.n, it.err = max(n, 0), werr
		case r >= 0:
			it.n = r
		default:
			it.err = syscall.Errno(-r)
		}
		j++
	}
	clear(s.bufs)
}

// ringPool holds the io_uring instances not in use. One is made when a
// batch finds none; one that failed is closed, and so is one beyond what
// two batches per processor need. When the kernel has no io_uring, or
// refuses it (a seccomp profile), off is set and batches write each item
// on its own; a ring that cannot be made for now (memory, open files)
// leaves that batch to do the same.
type ringPool struct {
	mu   sync.Mutex
	free []*uring.Ring
	off  bool

	submissions atomic.Int64 // batches written through a ring
}

var rings ringPool

func (rp *ringPool) get() *uring.Ring {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if rp.off {
		return nil
	}
	if n := len(rp.free); n > 0 {
		r := rp.free[n-1]
		rp.free = rp.free[:n-1]
		return r
	}
	r, err := uring.New(batchMax)
	if errors.Is(err, uring.ErrUnsupported) {
		rp.off = true
	}
	return r
}

func (rp *ringPool) put(r *uring.Ring, failed bool) {
	rp.mu.Lock()
	keep := !failed && len(rp.free) < 2*runtime.GOMAXPROCS(0)
	if keep {
		rp.free = append(rp.free, r)
	}
	rp.mu.Unlock()
	if !keep {
		r.Close()
	}
}

// setOff turns batched writes through io_uring off (true) or lets them
// be tried again (false); for tests.
func (rp *ringPool) setOff(off bool) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	rp.off = off
	for _, r := range rp.free {
		r.Close()
	}
	rp.free = nil
}
