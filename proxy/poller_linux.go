//go:build linux

package proxy

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// poller tells parked connections that their socket is readable. It is a
// second epoll instance next to the Go runtime's own: a parked side is
// registered here (one-shot, level-triggered) and holds no goroutine until
// it fires. One goroutine waits on it while anything is registered.
//
// That goroutine waits in the runtime's netpoller, like any socket read:
// the epoll instance is itself a file the runtime's epoll watches (it is
// readable while it has events), and the goroutine takes the events with a
// non-blocking epoll_wait. A goroutine blocked in epoll_wait instead would
// hold its thread in a system call: the runtime's monitor takes the
// processor from such a call after 10 ms and then polls every 20 µs for a
// millisecond or more, and with each wake-up of a mostly idle gateway (a
// handshake, a parked client's message) it starts over.
type poller struct {
	epfd int
	file *os.File        // epfd, registered with the runtime's netpoller
	rc   syscall.RawConn // file's
	// wait is epoll_wait (replaced in tests).
	wait func(epfd int, events []syscall.EpollEvent, msec int) (int, error)

	mu      sync.Mutex
	next    uint64
	wake    map[uint64]func()
	running bool
	failed  atomic.Bool // epoll_wait failed for good: nothing parks any more
}

// pollWaitIdle bounds one wait, so the waiting goroutine notices when
// nothing is registered any more and exits.
const pollWaitIdle = time.Second

// errPollerFailed refuses to arm a poller whose wait failed.
var errPollerFailed = errors.New("wsgate: poller failed")

func newPoller() (*poller, error) {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	// A non-blocking descriptor is added to the runtime's netpoller; one
	// it would not take has no deadlines, and then nothing parks.
	f := os.NewFile(uintptr(fd), "wsgate-poller")
	if err := f.SetReadDeadline(time.Time{}); err != nil {
		f.Close()
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &poller{epfd: fd, file: f, rc: rc, wait: syscall.EpollWait, wake: make(map[uint64]func())}, nil
}

var (
	pollerOnce    sync.Once
	currentPoller atomic.Pointer[poller]
)

// getPoller is the process's poller; nil when parking is not possible.
func getPoller() *poller {
	pollerOnce.Do(func() {
		if p, err := newPoller(); err == nil {
			currentPoller.Store(p)
		}
	})
	return currentPoller.Load()
}

// usable reports whether sides may park with p.
func (p *poller) usable() bool { return p != nil && !p.failed.Load() }

// register makes an id for a side that will park; wake runs (on the
// poller's goroutine; it must not block) each time the armed socket
// becomes readable.
func (p *poller) register(wake func()) uint64 {
	p.mu.Lock()
	p.next++
	id := p.next
	p.wake[id] = wake
	p.mu.Unlock()
	return id
}

// arm watches fd for readability once. added says whether fd is already
// in the epoll set (so it is modified rather than added).
func (p *poller) arm(id uint64, fd int, added bool) error {
	if p.failed.Load() {
		return errPollerFailed
	}
	ev := syscall.EpollEvent{
		Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT,
		Fd:     int32(uint32(id)),
		Pad:    int32(uint32(id >> 32)),
	}
	op := syscall.EPOLL_CTL_ADD
	if added {
		op = syscall.EPOLL_CTL_MOD
	}
	if err := syscall.EpollCtl(p.epfd, op, fd, &ev); err != nil {
		return err
	}
	p.mu.Lock()
	if !p.running {
		p.running = true
		go p.loop()
	}
	p.mu.Unlock()
	return nil
}

// forget removes fd (if added) and id; a wake already on its way for id
// may still run.
func (p *poller) forget(id uint64, fd int, added bool) {
	if added && fd >= 0 {
		syscall.EpollCtl(p.epfd, syscall.EPOLL_CTL_DEL, fd, nil)
	}
	p.mu.Lock()
	delete(p.wake, id)
	p.mu.Unlock()
}

func (p *poller) loop() {
	events := make([]syscall.EpollEvent, 128)
	fns := make([]func(), 0, 128)
	for {
		n, err := p.take(events)
		fns = fns[:0]
		p.mu.Lock()
		switch {
		case err == syscall.EINTR || errors.Is(err, os.ErrDeadlineExceeded):
			n = 0
		case err != nil:
			// The wait cannot go on: every parked side is woken, to be
			// read by a goroutine again, and nothing parks any more.
			p.failed.Store(true)
			p.running = false
			for _, fn := range p.wake {
				fns = append(fns, fn)
			}
			p.mu.Unlock()
			for _, fn := range fns {
				fn()
			}
			return
		case n == 0 && len(p.wake) == 0:
			p.running = false
			p.mu.Unlock()
			return
		}
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if fn := p.wake[id]; fn != nil {
				fns = append(fns, fn)
			}
		}
		p.mu.Unlock()
		for _, fn := range fns {
			fn()
		}
	}
}

// take waits until the epoll instance has events, or pollWaitIdle has
// passed, and takes up to len(events) of them.
func (p *poller) take(events []syscall.EpollEvent) (n int, err error) {
	if err := p.file.SetReadDeadline(time.Now().Add(pollWaitIdle)); err != nil {
		return 0, err
	}
	// The runtime's epoll is edge-triggered, and Read clears the readiness
	// it saw before calling: an event added after the non-blocking wait
	// found none is seen by the netpoller and ends the wait.
	rerr := p.rc.Read(func(fd uintptr) bool {
		n, err = p.wait(int(fd), events, 0)
		return err != nil || n > 0
	})
	if rerr != nil {
		return 0, rerr
	}
	return n, err
}

// ownPongSize is the size of a client's answer to the gateway's ping: a
// 2-byte header, the mask, and the 8-byte token.
const ownPongSize = 2 + 4 + 8

// peekSocket looks at the pending bytes of socket fd without taking them.
// When token is not nil and they are exactly one final, masked pong whose
// unmasked payload is token, it takes them.
func peekSocket(fd int, token *[8]byte) int {
	var b [ownPongSize + 1]byte
	n, _, err := syscall.Recvfrom(fd, b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	if err == syscall.EAGAIN {
		return holdsNothing
	}
	if err != nil || token == nil || n != ownPongSize || b[0] != 0x8a || b[1] != 0x80|8 {
		return holdsOther
	}
	for i := range 8 {
		if b[6+i]^b[2+i%4] != token[i] {
			return holdsOther
		}
	}
	// The peek saw these bytes in the socket: the read takes them all.
	if n, _, err = syscall.Recvfrom(fd, b[:ownPongSize], syscall.MSG_DONTWAIT); err != nil || n != ownPongSize {
		return holdsOther
	}
	return holdsOwnPong
}
