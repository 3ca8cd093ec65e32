package proxy

import (
	"bytes"
	"net/http"
	"runtime"
	"testing"
	"time"
)

// TestSweepFollowsShortestParkAfter: the sweeper's period is the shortest
// any live connection wants, whichever connection came first.
func TestSweepFollowsShortestParkAfter(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	up := startUpstream(t, nil, nil)
	reg := NewRegistry()
	gateway := func(parkAfter time.Duration) *testGateway {
		cfg := Config{Upstreams: []string{up.url}, ParkAfter: parkAfter, PingInterval: -1}
		if err := prepareTestConfig(&cfg); err != nil {
			t.Fatal(err)
		}
		g := New(cfg, reg, nil)
		return serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, false)
	}
	slow, fast := gateway(time.Minute), gateway(20*time.Millisecond)
	dialRaw(t, slow.addr(), nil)
	up.next(t)
	poll(t, "the first connection", func() bool { return reg.Len() == 1 })
	reg.mu.Lock()
	period := reg.period
	reg.mu.Unlock()
	if period != sweepEvery {
		t.Fatalf("sweep period %v with one connection parking after a minute, want %v", period, sweepEvery)
	}
	dialRaw(t, fast.addr(), nil)
	up.next(t)
	var c *relay
	poll(t, "the second connection", func() bool {
		reg.mu.Lock()
		defer reg.mu.Unlock()
		for r := range reg.conns {
			if r.g == fast.g {
				c = r
			}
		}
		return c != nil
	})
	reg.mu.Lock()
	period = reg.period
	reg.mu.Unlock()
	if want := 10 * time.Millisecond; period != want {
		t.Fatalf("sweep period %v after a connection parking after 20ms, want %v", period, want)
	}
	poll(t, "the second connection to park", func() bool {
		return c.client.pstate.Load() == sideParked && c.upstream.pstate.Load() == sideParked
	})
}

// TestShutdownOnce: every caller of Shutdown (one per Caddy handler) waits
// for the same connections until the same moment, so exit takes one
// closing timeout however many handlers there are; and the wait leaves no
// goroutine behind when it gives up.
func TestShutdownOnce(t *testing.T) {
	up := startUpstream(t, nil, nil)
	const closeTimeout = 300 * time.Millisecond
	tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = closeTimeout })
	for range 3 {
		dialRaw(t, tg.addr(), nil) // never answers the close frame
		up.next(t)
	}
	tg.waitLen(t, 3)
	reg := tg.g.Registry()

	start := time.Now()
	if reg.Shutdown(10 * time.Millisecond) {
		t.Fatal("Shutdown reported all closed before any client could answer")
	}
	if stacks := allStacks(); bytes.Contains(stacks, []byte("proxy.(*Registry).Shutdown")) {
		t.Fatalf("a goroutine is still waiting in Shutdown after it returned:\n%s", stacks)
	}
	done := make(chan bool, 2)
	for range 2 {
		go func() { done <- reg.Shutdown(time.Minute) }()
	}
	for range 2 {
		if ok := <-done; ok {
			t.Fatal("a later Shutdown waited past the first one's limit")
		}
	}
	if d := time.Since(start); d > 200*time.Millisecond {
		t.Fatalf("three Shutdown calls took %v, the first one's limit being 10ms", d)
	}
	// The connections themselves end within their closing timeout.
	poll(t, "the connections to end", func() bool { return reg.Len() == 0 })
	if d := time.Since(start); d > closeTimeout+time.Second {
		t.Fatalf("the connections ended %v after Shutdown (close timeout %v)", d, closeTimeout)
	}
	if !reg.Shutdown(time.Minute) {
		t.Fatal("Shutdown after every connection ended reports some alive")
	}
}

// allStacks is every goroutine's stack.
func allStacks() []byte {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return buf[:n]
		}
		buf = make([]byte, 2*len(buf))
	}
}
