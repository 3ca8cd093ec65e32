package bench

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
)

// tputSample is one run of pipelined echo at one message size.
type tputSample struct {
	rate     float64 // echoed messages per second
	cpuPerM  float64 // Caddy CPU-seconds per million echoed messages
	cores    float64 // Caddy's CPU use in cores
	genCores float64 // this process's (clients and upstream) CPU use in cores
}

type tputResult struct {
	samples map[int]map[string][]tputSample // by size, variant; one per run
}

var tputVariants = []string{vWsgate, vStock, vDirect}

func (e *env) runThroughput(ctx context.Context, c *caddyProc) (*tputResult, error) {
	res := &tputResult{samples: map[int]map[string][]tputSample{}}
	for _, size := range e.p.tputSizes {
		res.samples[size] = map[string][]tputSample{}
		for r := range e.p.runs {
			for _, name := range order(tputVariants, r) {
				s, err := e.tputOnce(ctx, c, e.variant(c, name), size, nil)
				if err != nil {
					return res, fmt.Errorf("%s %d B, run %d: %w", name, size, r+1, err)
				}
				e.logf("  c %5d B %-8s run %d: %.0f msg/s, caddy %.2f cores, %.2f CPU-s per 1M, load generator %.2f cores",
					size, name, r+1, s.rate, s.cores, s.cpuPerM, s.genCores)
				res.samples[size][name] = append(res.samples[size][name], s)
			}
		}
	}
	return res, nil
}

// tputOnce keeps tputWindow messages in flight on each of tputConns
// connections: a writer sends while the window has room (flushing only
// when it has to wait, so writes batch as load grows), a reader counts
// echoes and reopens the window. Messages are counted in a window after
// the warm-up. during, if set, runs concurrently with that window.
func (e *env) tputOnce(ctx context.Context, c *caddyProc, v variant, size int, during func(context.Context) error) (tputSample, error) {
	var s tputSample
	n, window := e.p.tputConns, e.p.tputWindow
	clients := make([]*client, 0, n)
	defer func() {
		for _, cl := range clients {
			cl.conn.Close()
		}
	}()
	for i := range n {
		cl, err := dialClient(v, i, 64<<10)
		if err != nil {
			return s, err
		}
		clients = append(clients, cl)
	}
	state := make([]*echoConn, n)
	var recv atomic.Int64
	var closing atomic.Bool
	stop := make(chan struct{})
	failed := make(chan struct{})
	var failOnce sync.Once
	fail := func() { failOnce.Do(func() { close(failed) }) }
	want := int64(len(payload(size)))
	var writers, readers sync.WaitGroup
	for i, cl := range clients {
		st := &echoConn{tokens: make(chan struct{}, window)}
		frame := clientFrame(ws.OpText, payload(size))
		for range window {
			st.tokens <- struct{}{}
		}
		state[i] = st
		writers.Add(1)
		go func() {
			defer writers.Done()
			for {
				select {
				case <-stop:
					st.writeErr = cl.bw.Flush()
					return
				case <-st.tokens:
				default:
					if err := cl.bw.Flush(); err != nil {
						st.writeErr = err
						fail()
						return
					}
					select {
					case <-stop:
						return
					case <-st.tokens:
					}
				}
				if _, err := cl.bw.Write(frame); err != nil {
					st.writeErr = err
					fail()
					return
				}
				st.sent++
			}
		}()
		readers.Add(1)
		go func() {
			defer readers.Done()
			for {
				got, err := cl.skip()
				if err == nil && got != want {
					err = fmt.Errorf("echo of %d bytes for a %d-byte message", got, want)
				}
				if err != nil {
					if !closing.Load() {
						st.rdErr = err
						fail()
					}
					return
				}
				st.recvd.Add(1)
				recv.Add(1)
				st.tokens <- struct{}{}
			}
		}()
	}

	measure := func() (err error) {
		if err := pauseOrFail(ctx, failed, e.p.tputWarm); err != nil {
			return err
		}
		var cpu0, cpu1 time.Duration
		if v.gateway {
			if cpu0, err = procCPU(c.pid()); err != nil {
				return err
			}
		}
		gen0 := selfCPU()
		r0, t0 := recv.Load(), time.Now()
		hook := make(chan error, 1)
		if during != nil {
			go func() { hook <- during(ctx) }()
		} else {
			hook <- nil
		}
		if err := pauseOrFail(ctx, failed, e.p.tputDur); err != nil {
			return err
		}
		r1, t1 := recv.Load(), time.Now()
		gen1 := selfCPU()
		if v.gateway {
			if cpu1, err = procCPU(c.pid()); err != nil {
				return err
			}
		}
		window := t1.Sub(t0).Seconds()
		msgs := float64(r1 - r0)
		s.rate = msgs / window
		s.genCores = (gen1 - gen0).Seconds() / window
		if v.gateway && msgs > 0 {
			s.cores = (cpu1 - cpu0).Seconds() / window
			s.cpuPerM = (cpu1 - cpu0).Seconds() / msgs * 1e6
		}
		return <-hook
	}
	err := measure()
	if err := endEcho(ctx, err, stop, failed, &closing, &writers, &readers, state, clients); err != nil {
		return s, err
	}
	return s, e.up.waitConns(ctx, 0, 30*time.Second)
}

// pauseOrFail waits d, or returns early if a connection failed.
func pauseOrFail(ctx context.Context, failed <-chan struct{}, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-failed:
		return errors.New("a connection failed")
	case <-t.C:
		return nil
	}
}

// selfCPU is the CPU time this process (load generator and upstream) has
// used so far.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if syscall.Getrusage(syscall.RUSAGE_SELF, &ru) != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// echoConn is one connection of a pipelined echo run (scenarios c and z):
// its writer sends while it holds tokens, its reader gives one back per
// echo.
type echoConn struct {
	sent            int64 // owned by the writer until it returns
	writeErr, rdErr error
	tokens          chan struct{}
	recvd           atomic.Int64
}

// endEcho ends a pipelined echo run whose measurement returned err: it
// stops the writers, waits for the echoes still in flight (unless
// something failed), closes the clients, waits for the readers, and
// returns every error met.
func endEcho(ctx context.Context, err error, stop chan struct{}, failed <-chan struct{}, closing *atomic.Bool,
	writers, readers *sync.WaitGroup, state []*echoConn, clients []*client) error {
	close(stop)
	writers.Wait()
	if err == nil {
		err = poll(ctx, 10*time.Second, "the last echoes", func() (bool, error) {
			for _, st := range state {
				if st.recvd.Load() != st.sent {
					select {
					case <-failed:
						return false, errors.New("a connection failed")
					default:
						return false, nil
					}
				}
			}
			return true, nil
		})
	}
	closing.Store(true)
	for _, cl := range clients {
		cl.conn.Close()
	}
	readers.Wait()
	errs := []error{err}
	for _, st := range state {
		errs = append(errs, st.writeErr, st.rdErr)
	}
	return errors.Join(errs...)
}
