package proxy

import (
	"runtime/debug"
	"sync"
	"time"

	"github.com/gobwas/ws"
)

// Registry tracks live connections so they can be closed properly when the
// process shuts down. It outlives configurations: a config reload creates a
// new Gateway but keeps the Registry, and live connections stay.
type Registry struct {
	mu       sync.Mutex
	conns    map[*relay]struct{}
	shutdown bool
	empty    *sync.Cond
	sweeping bool // the sweeper goroutine runs (while there are connections)
}

// NewRegistry makes an empty registry.
func NewRegistry() *Registry {
	r := &Registry{conns: make(map[*relay]struct{})}
	r.empty = sync.NewCond(&r.mu)
	return r
}

func (r *Registry) add(c *relay) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.conns[c] = struct{}{}
	if !r.sweeping && c.cfg.ParkAfter > 0 {
		r.sweeping = true
		go r.sweep(sweepPeriod(c.cfg.ParkAfter))
	}
	return !r.shutdown
}

// sweep kicks idle waits so that they park (park.go), until the registry
// is empty.
func (r *Registry) sweep(every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	var list []*relay
	parked := 0 // sides parked since memory was last returned
	var released time.Time
	for range t.C {
		r.mu.Lock()
		if len(r.conns) == 0 {
			r.sweeping = false
			r.mu.Unlock()
			return
		}
		for c := range r.conns {
			list = append(list, c)
		}
		r.mu.Unlock()
		now := mono()
		kicked := 0
		for _, c := range list {
			kicked += c.kickIdle(now)
		}
		parked += kicked
		if kicked == 0 && parked >= releaseAfter && time.Since(released) >= releaseEvery {
			debug.FreeOSMemory()
			parked, released = 0, time.Now()
		}
		clear(list)
		list = list[:0]
	}
}

func (r *Registry) remove(c *relay) {
	r.mu.Lock()
	delete(r.conns, c)
	if len(r.conns) == 0 {
		r.empty.Broadcast()
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
// ones. It waits until all have finished their closing handshake or
// timeout has passed, and reports whether all finished.
func (r *Registry) Shutdown(timeout time.Duration) bool {
	r.mu.Lock()
	r.shutdown = true
	conns := make([]*relay, 0, len(r.conns))
	for c := range r.conns {
		conns = append(conns, c)
	}
	r.mu.Unlock()

	// Close frames are written concurrently: one stuck peer must not hold
	// up the others.
	sem := make(chan struct{}, 64)
	for _, c := range conns {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem }()
			c.shutdown(ws.StatusGoingAway, "server shutting down")
		}()
	}

	done := make(chan struct{})
	go func() {
		r.mu.Lock()
		for len(r.conns) > 0 {
			r.empty.Wait()
		}
		r.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}
