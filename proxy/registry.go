package proxy

import (
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Registry tracks live connections so they can be closed properly when the
// process shuts down. It outlives configurations: a config reload creates a
// new Gateway but keeps the Registry, and live connections stay.
type Registry struct {
	mu       sync.Mutex
	release  bool // see SetReleaseMemory
	conns    map[*relay]struct{}
	shutdown bool
	gone     chan struct{} // closed when the registry is empty after Shutdown
	deadline time.Time     // when Shutdown stops waiting
	sweeping bool          // the sweeper goroutine runs (while there are connections)
	period   time.Duration // its period: the shortest any connection wants
	poke     chan struct{} // tells the sweeper its period got shorter
	parks    atomic.Int64  // sides parked since the sweeper last looked
	free     func()        // debug.FreeOSMemory; tests count its calls
}

// SetReleaseMemory says whether the sweeper hands the stacks of parked
// goroutines back to the system at once (debug.FreeOSMemory: a forced
// garbage collection that also returns free memory), at most every 10 s
// and only after at least 1,024 sides have parked since the last time.
// Without it the Go runtime keeps that memory until it returns it by
// itself, gradually. Off by default: it acts on the whole process.
func (r *Registry) SetReleaseMemory(on bool) {
	r.mu.Lock()
	r.release = on
	r.mu.Unlock()
}

// NewRegistry makes an empty registry.
func NewRegistry() *Registry {
	return &Registry{conns: make(map[*relay]struct{}), gone: make(chan struct{}), poke: make(chan struct{}, 1), free: debug.FreeOSMemory}
}

func (r *Registry) add(c *relay) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns[c] = struct{}{}
	if p := c.cfg.sweepPeriod(); p > 0 {
		switch {
		case !r.sweeping:
			r.sweeping, r.period = true, p
			go r.sweep()
		case p < r.period:
			r.period = p
			select {
			case r.poke <- struct{}{}:
			default:
			}
		}
	}
	return !r.shutdown
}

// sweep visits every connection, so that idle waits park (park.go) and
// writes that have lasted WriteTimeout end (writer.go), until the registry
// is empty. Its period is the shortest any live connection wants. While a
// wave of parked sides waits for its memory to be returned, it also looks
// every releaseQuiet for the end of the wave, without visiting.
func (r *Registry) sweep() {
	var list []*relay
	parked := 0 // sides parked since memory was last returned
	var released time.Time
	var due int64 // mono time of the next visit
	r.mu.Lock()
	t := time.NewTimer(r.period)
	r.mu.Unlock()
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-r.poke:
			t.Stop()
			due = 0 // a shorter period: visit now
		}
		r.mu.Lock()
		if len(r.conns) == 0 {
			r.sweeping = false
			r.mu.Unlock()
			return
		}
		now := mono()
		visit := now >= due
		if visit {
			period := time.Duration(0)
			for c := range r.conns {
				list = append(list, c)
				if p := c.cfg.sweepPeriod(); p > 0 && (period == 0 || p < period) {
					period = p
				}
			}
			if period == 0 {
				period = sweepEvery
			}
			r.period = period
			due = now + int64(period)
		}
		release := r.release
		r.mu.Unlock()
		kicked := 0
		for _, c := range list {
			kicked += c.sweep(now)
		}
		clear(list)
		list = list[:0]
		// Sides park when kicked, and rooms clients as soon as they are
		// idle: memory is returned once a wave of them has parked.
		n := r.parks.Swap(0)
		parked += int(n)
		if release && kicked == 0 && n == 0 && parked >= releaseAfter && time.Since(released) >= releaseEvery {
			r.free()
			parked, released = 0, time.Now()
		}
		wait := time.Duration(due - mono())
		if release && parked >= releaseAfter {
			wait = min(wait, releaseQuiet)
		}
		t.Reset(max(wait, 0))
	}
}

func (r *Registry) remove(c *relay) {
	r.mu.Lock()
	delete(r.conns, c)
	if len(r.conns) == 0 && r.shutdown {
		select {
		case <-r.gone:
		default:
			close(r.gone)
		}
	}
	r.mu.Unlock()
}

func (r *Registry) closed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.shutdown
}

// Len is the number of live connections.
func (r *Registry) Len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}

// Shutdown closes every connection with 1001 (going away) and refuses new
// ones. It waits until all have finished their closing handshake, which
// each bounds by its CloseTimeout, but never longer than limit, and
// reports whether all finished. Later calls start nothing new: they wait
// for the same connections until the same moment as the first.
func (r *Registry) Shutdown(limit time.Duration) bool {
	r.mu.Lock()
	if !r.shutdown {
		r.shutdown = true
		longest := time.Duration(0)
		conns := make([]*relay, 0, len(r.conns))
		for c := range r.conns {
			conns = append(conns, c)
			longest = max(longest, c.cfg.CloseTimeout)
		}
		// Reads end by the closing deadline, writes shortly after; the
		// last close frames may take closeGrace once more.
		r.deadline = time.Now().Add(min(limit, longest+2*closeGrace+250*time.Millisecond))
		if len(r.conns) == 0 {
			close(r.gone)
		}
		r.mu.Unlock()
		for _, c := range conns {
			// Bounding every connection's closing first (which never
			// blocks) means one stuck peer cannot hold up the others.
			c.beginClosing()
		}
		for _, c := range conns {
			go c.shutdown(ws.StatusGoingAway, "server shutting down")
		}
		r.mu.Lock()
	}
	deadline := r.deadline
	r.mu.Unlock()
	select {
	case <-r.gone:
		return true
	default:
	}
	t := time.NewTimer(time.Until(deadline))
	defer t.Stop()
	select {
	case <-r.gone:
		return true
	case <-t.C:
		return false
	}
}
