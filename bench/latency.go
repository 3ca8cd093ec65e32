package bench

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// latStats summarises the round trips of one run.
type latStats struct {
	n              int
	p50, p99, p999 time.Duration
	rate           float64 // messages sent per second (open loop)
}

type latResult struct {
	ping map[string][]latStats // by variant, one per run
	open map[string][]latStats
}

var latVariants = []string{vWsgate, vStock, vDirect}

func (e *env) runLatency(ctx context.Context, c *caddyProc) (*latResult, error) {
	res := &latResult{ping: map[string][]latStats{}, open: map[string][]latStats{}}
	for r := range e.p.runs {
		vs := make([]variant, 0, len(latVariants))
		for _, name := range order(latVariants, r) {
			vs = append(vs, e.variant(c, name))
		}
		stats, err := e.pingPongRun(ctx, vs)
		if err != nil {
			return res, fmt.Errorf("ping-pong run %d: %w", r+1, err)
		}
		for i, v := range vs {
			s := stats[i]
			e.logf("  b ping-pong %-8s run %d: p50 %v p99 %v p999 %v", v.name, r+1, s.p50, s.p99, s.p999)
			res.ping[v.name] = append(res.ping[v.name], s)
		}
	}
	for r := range e.p.runs {
		for _, name := range order(latVariants, r) {
			s, err := e.openLoopOnce(ctx, e.variant(c, name))
			if err != nil {
				return res, fmt.Errorf("open loop %s, run %d: %w", name, r+1, err)
			}
			e.logf("  b open loop %-8s run %d: %.0f msg/s, p50 %v p99 %v p999 %v", name, r+1, s.rate, s.p50, s.p99, s.p999)
			res.open[name] = append(res.open[name], s)
		}
	}
	return res, nil
}

// pingPongBlock is how many round trips one variant makes before the next
// variant's turn in a ping-pong run.
const pingPongBlock = 100

// pingPongRun sends one message at a time on one connection per variant
// and times each echo. The variants take turns in blocks of pingPongBlock
// round trips, so that all of them see the machine in the same state
// (on this kind of machine round trips are either fast or slow for seconds
// at a time, whatever the variant).
func (e *env) pingPongRun(ctx context.Context, vs []variant) ([]latStats, error) {
	type conn struct {
		cl   *client
		rtts []time.Duration
		i    int // round trips made
	}
	conns := make([]*conn, len(vs))
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.cl.conn.Close()
			}
		}
	}()
	for k, v := range vs {
		cl, err := dialClient(v, 0, 4096)
		if err != nil {
			return nil, err
		}
		cl.conn.SetDeadline(time.Now().Add(2 * time.Minute))
		conns[k] = &conn{cl: cl, rtts: make([]time.Duration, 0, e.p.pingRounds)}
	}
	msg, buf := payload(64), make([]byte, 4096)
	total := e.p.pingWarm + e.p.pingRounds
	for done := false; !done; {
		done = true
		for k, c := range conns {
			for range pingPongBlock {
				if c.i >= total {
					break
				}
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				i := c.i
				putTS(msg, int64(i))
				t := time.Now()
				if err := c.cl.write(ws.OpText, msg); err != nil {
					return nil, fmt.Errorf("%s: %w", vs[k].name, err)
				}
				if err := c.cl.bw.Flush(); err != nil {
					return nil, fmt.Errorf("%s: %w", vs[k].name, err)
				}
				got, err := c.cl.read(buf)
				if err != nil {
					return nil, fmt.Errorf("%s: %w", vs[k].name, err)
				}
				d := time.Since(t)
				if ts, ok := getTS(got); !ok || ts != int64(i) {
					return nil, fmt.Errorf("%s: echo %d came back as %q", vs[k].name, i, got)
				}
				if i >= e.p.pingWarm {
					c.rtts = append(c.rtts, d)
				}
				c.i++
			}
			done = done && c.i >= total
		}
	}
	stats := make([]latStats, len(conns))
	for k, c := range conns {
		stats[k] = summarize(c.rtts)
		c.cl.conn.Close()
	}
	conns = nil
	return stats, e.up.waitConns(ctx, 0, 30*time.Second)
}

// openLoopOnce sends on a fixed schedule, whatever the echoes do: each of
// openConns connections sends every openConns/openRate seconds, the
// connections evenly staggered. Each message carries its send time; the
// reader of each connection times the echo against it.
func (e *env) openLoopOnce(ctx context.Context, v variant) (latStats, error) {
	n := e.p.openConns
	clients := make([]*client, 0, n)
	defer func() {
		for _, cl := range clients {
			cl.conn.Close()
		}
	}()
	for i := range n {
		cl, err := dialClient(v, i, 4096)
		if err != nil {
			return latStats{}, err
		}
		clients = append(clients, cl)
	}
	period := time.Duration(float64(time.Second) * float64(n) / float64(e.p.openRate))
	total := e.p.openWarm + e.p.openDur
	base := time.Now().Add(10 * time.Millisecond)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	type conn struct {
		sent, recv atomic.Int64
		lat        []time.Duration // of messages sent after the warm-up
		sendErr    error
		readErr    error
	}
	state := make([]conn, n)
	var closing atomic.Bool
	var senders, readers sync.WaitGroup
	for i, cl := range clients {
		st := &state[i]
		senders.Add(1)
		go func() {
			defer senders.Done()
			msg := payload(64)
			t := time.NewTimer(time.Hour)
			defer t.Stop()
			for k := 0; ; k++ {
				at := time.Duration(k)*period + period*time.Duration(i)/time.Duration(n)
				if at >= total {
					return
				}
				if d := time.Until(base.Add(at)); d > 0 {
					t.Reset(d)
					select {
					case <-ctx.Done():
						return
					case <-t.C:
					}
				}
				putTS(msg, int64(time.Since(base)))
				err := cl.write(ws.OpText, msg)
				if err == nil {
					err = cl.bw.Flush()
				}
				if err != nil {
					st.sendErr = err
					cancel()
					return
				}
				st.sent.Add(1)
			}
		}()
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 4096)
			for {
				got, err := cl.read(buf)
				now := time.Since(base)
				if err != nil {
					if !closing.Load() {
						st.readErr = err
						cancel()
					}
					return
				}
				ts, ok := getTS(got)
				if !ok {
					st.readErr = fmt.Errorf("echo without a timestamp: %q", got)
					cancel()
					return
				}
				if time.Duration(ts) >= e.p.openWarm {
					st.lat = append(st.lat, now-time.Duration(ts))
				}
				st.recv.Add(1)
			}
		}()
	}
	senders.Wait()
	sent := int64(0)
	for i := range state {
		sent += state[i].sent.Load()
	}
	elapsed := time.Since(base)
	err := poll(ctx, 10*time.Second, "the last echoes", func() (bool, error) {
		recv := int64(0)
		for i := range state {
			recv += state[i].recv.Load()
		}
		return recv == sent, nil
	})
	closing.Store(true)
	for _, cl := range clients {
		cl.conn.Close()
	}
	readers.Wait()
	var lats []time.Duration
	var errs []error
	for i := range state {
		lats = append(lats, state[i].lat...)
		errs = append(errs, state[i].sendErr, state[i].readErr)
	}
	if err := errors.Join(append(errs, err)...); err != nil {
		return latStats{}, err
	}
	s := summarize(lats)
	s.rate = float64(sent) / elapsed.Seconds()
	return s, e.up.waitConns(ctx, 0, 30*time.Second)
}

func summarize(d []time.Duration) latStats {
	slices.Sort(d)
	return latStats{n: len(d), p50: percentile(d, 0.50), p99: percentile(d, 0.99), p999: percentile(d, 0.999)}
}

// percentile is the nearest-rank q-quantile of sorted d.
func percentile(sorted []time.Duration, q float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(sorted)))) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}
