package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// hsSample is one burst of handshake loops.
type hsSample struct {
	rate     float64 // completed per second
	cpuPerK  float64 // Caddy CPU-milliseconds per 1,000
	attempts int64
	failures int64
}

type hsResult struct {
	samples map[string][]hsSample // by variant, one per run
}

var hsVariants = []string{vWsgate, vWsgateHS, vStock, vDirect, vRejectOrigin, vRejectToken}

func (e *env) runHandshakes(ctx context.Context, c *caddyProc) (*hsResult, error) {
	res := &hsResult{samples: map[string][]hsSample{}}
	for r := range e.p.runs {
		for _, name := range order(hsVariants, r) {
			s, err := e.handshakeOnce(ctx, c, e.variant(c, name), nil)
			if err != nil {
				return res, fmt.Errorf("%s, run %d: %w", name, r+1, err)
			}
			e.logf("  e %-18s run %d: %.0f/s, caddy %.2f CPU-ms each", name, r+1, s.rate, s.cpuPerK/1000)
			res.samples[name] = append(res.samples[name], s)
		}
	}
	return res, nil
}

// handshakeOnce runs hsLoops loops of upgrade + close (or of refused
// upgrade, for the refusal variants) for hsDur. during, if set, runs
// concurrently with the loops.
func (e *env) handshakeOnce(ctx context.Context, c *caddyProc, v variant, during func(context.Context) error) (hsSample, error) {
	var s hsSample
	dialers := make([]ws.Dialer, len(v.dialers))
	for i, d := range v.dialers {
		d.NetDial = lingerDial
		dialers[i] = d
	}
	closeFrame := clientFrame(ws.OpClose, ws.NewCloseFrameBody(ws.StatusNormalClosure, ""))
	var ok, failed, next atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var cpu0, cpu1 time.Duration
	var err error
	if v.gateway {
		if cpu0, err = procCPU(c.pid()); err != nil {
			return s, err
		}
	}
	t0 := time.Now()
	deadline := t0.Add(e.p.hsDur)
	hook := make(chan error, 1)
	if during != nil {
		go func() { hook <- during(ctx) }()
	} else {
		hook <- nil
	}
	var wg sync.WaitGroup
	for range e.p.hsLoops {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rd := bufio.NewReaderSize(nil, 512)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				d := dialers[int(next.Add(1))%len(dialers)]
				if err := handshake(d, v.url, v.want, closeFrame, rd); err != nil {
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
					continue
				}
				ok.Add(1)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(t0)
	if v.gateway {
		if cpu1, err = procCPU(c.pid()); err != nil {
			return s, err
		}
	}
	if err := errors.Join(ctx.Err(), <-hook); err != nil {
		return s, err
	}
	s.attempts = ok.Load() + failed.Load()
	s.failures = failed.Load()
	s.rate = float64(ok.Load()) / elapsed.Seconds()
	if v.gateway && ok.Load() > 0 {
		s.cpuPerK = (cpu1 - cpu0).Seconds() * 1000 / float64(ok.Load()) * 1000
	}
	// A benchmark of handshakes that mostly fail measures the failures.
	if s.failures*100 > s.attempts {
		return s, fmt.Errorf("%d of %d handshakes failed; the first: %w", s.failures, s.attempts, firstErr)
	}
	return s, e.up.waitConns(ctx, 0, 30*time.Second)
}

// handshake upgrades (and expects want) then, for an upgrade, closes: sends
// a close frame and waits for the server's.
func handshake(d ws.Dialer, url string, want int, closeFrame []byte, rd *bufio.Reader) error {
	conn, br, _, err := d.Dial(context.Background(), url)
	if want != http.StatusSwitchingProtocols {
		// Dial has read the status line and closed the connection.
		var se ws.StatusError
		if errors.As(err, &se) && int(se) == want {
			return nil
		}
		if err == nil {
			conn.Close()
			return fmt.Errorf("upgraded, want HTTP %d", want)
		}
		return err
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := conn.Write(closeFrame); err != nil {
		return err
	}
	r := rd
	if br != nil {
		r = br
		defer ws.PutReader(br)
	} else {
		rd.Reset(conn)
		defer rd.Reset(nil)
	}
	for {
		h, err := ws.ReadHeader(r)
		if err != nil {
			return fmt.Errorf("waiting for the close frame: %w", err)
		}
		if _, err := r.Discard(int(h.Length)); err != nil {
			return err
		}
		if h.OpCode == ws.OpClose {
			return nil
		}
	}
}

var plainDialer net.Dialer

// lingerDial connects with SO_LINGER 0, so that closing sends a reset and
// leaves no TIME_WAIT here: tens of thousands of short connections to one
// address would otherwise run through the ephemeral ports.
func lingerDial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := plainDialer.DialContext(ctx, network, addr)
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	return c, err
}
