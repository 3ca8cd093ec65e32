package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"
)

// idleSample is the gateway's cost per idle connection in one run.
type idleSample struct {
	rss        float64 // bytes of VmRSS
	heap       float64 // bytes of live heap
	stack      float64 // bytes of goroutine stacks
	goroutines float64
	fds        float64
}

type idleResult struct {
	conns   int
	hold    time.Duration
	samples map[string][]idleSample // by variant, one per run
}

// idleVariants are measured; for direct the gateway's cost is zero by
// definition (there is none), and the upstream's own is not the question.
// The rooms connections (scenario a') have no upstream: each subscribes to
// a room of its own and stays idle. The TLS variants have a Caddy
// configuration of their own (tlsCaddy).
var idleVariants = []string{vWsgate, vStock, vRooms, vWsgateTLS, vStockTLS, vWsgateWSS}

// runIdle measures each variant in a fresh Caddy: a process that has
// already held thousands of connections keeps their memory, which would
// make whichever variant comes second look free.
func (e *env) runIdle(ctx context.Context) (*idleResult, error) {
	res := &idleResult{conns: e.p.idleConns, hold: e.p.idleHold, samples: map[string][]idleSample{}}
	for r := range e.p.runs {
		for _, name := range order(idleVariants, r) {
			s, err := e.idleOnce(ctx, name)
			if err != nil {
				return res, fmt.Errorf("%s, run %d: %w", name, r+1, err)
			}
			e.logf("  a %-19s run %d: %.1f KiB RSS, %.1f KiB heap, %.1f KiB stacks, %.2f goroutines, %.2f fds per connection",
				name, r+1, s.rss/1024, s.heap/1024, s.stack/1024, s.goroutines, s.fds)
			res.samples[name] = append(res.samples[name], s)
		}
	}
	return res, nil
}

func (e *env) idleOnce(ctx context.Context, name string) (idleSample, error) {
	var s idleSample
	c, err := e.startCaddyKind(ctx, caddyKindFor(name))
	if err != nil {
		return s, err
	}
	defer c.stop()
	v := e.variant(c, name)

	g0, err := c.goroutines(ctx)
	if err != nil {
		return s, err
	}
	// Warm up: the first connections pay for lazily built state (pools,
	// parsed keys, the HTTP server's own structures), not per connection.
	warm, err := e.openIdle(ctx, v, 64)
	closeAll(warm)
	if err != nil {
		return s, err
	}
	if err := e.up.waitConns(ctx, 0, 30*time.Second); err != nil {
		return s, err
	}
	// The gateway's side of the warm-up connections ends a moment after
	// the upstream's: wait for its goroutines to be back where they were,
	// or (if the warm-up left some for good) to hold still for 200 ms.
	last, still := -1, 0
	if err := poll(ctx, 10*time.Second, "caddy to settle after the warm-up", func() (bool, error) {
		g, err := c.goroutines(ctx)
		if g == last {
			still++
		} else {
			last, still = g, 0
		}
		return g <= g0 || still >= 20, err
	}); err != nil {
		return s, err
	}

	before, err := c.snapshot(ctx)
	if err != nil {
		return s, err
	}
	conns, err := e.openIdle(ctx, v, e.p.idleConns)
	defer closeAll(conns)
	if err != nil {
		return s, err
	}
	if !v.rooms {
		// A rooms connection is complete once its subscription is
		// confirmed, which dialClient waited for.
		if err := e.up.waitConns(ctx, int64(len(conns)), 30*time.Second); err != nil {
			return s, err
		}
	}
	if err := pause(ctx, e.p.idleHold); err != nil {
		return s, err
	}
	after, err := c.snapshot(ctx)
	if err != nil {
		return s, err
	}
	n := float64(len(conns))
	s = idleSample{
		rss:        float64(after.rss-before.rss) / n,
		heap:       float64(after.heap-before.heap) / n,
		stack:      float64(after.stack-before.stack) / n,
		goroutines: float64(after.goroutines-before.goroutines) / n,
		fds:        float64(after.fds-before.fds) / n,
	}
	closeAll(conns)
	return s, e.up.waitConns(ctx, 0, 60*time.Second)
}

// openIdle opens n connections through v, each checked with one echo (or,
// for rooms, subscribed to its room and the subscription confirmed), and
// leaves them idle: no goroutine or buffer of this process stays with
// them.
func (e *env) openIdle(ctx context.Context, v variant, n int) ([]net.Conn, error) {
	const workers = 32
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				c, err := dialClient(v, i, 512)
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					next.Store(int64(n)) // stop the others
					return
				}
				conns[i] = c.conn
			}
		}()
	}
	wg.Wait()
	var out []net.Conn
	for _, c := range conns {
		if c != nil {
			out = append(out, c)
		}
	}
	if err := errors.Join(append(errs, ctx.Err())...); err != nil {
		return out, err
	}
	return out, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		c.Close()
	}
}
