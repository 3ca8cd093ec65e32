package proxy

import (
	"bytes"
	"net/http"
	"runtime"
	"strings"
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

// TestRegistryListsAndDisconnects: each connection is listed with what the
// caller described and an unguessable id; Disconnect closes the matching
// ones with the given code and reason, both sides, and no other.
func TestRegistryListsAndDisconnects(t *testing.T) {
	up := startUpstream(t, nil, nil)
	subject := make(chan string, 2)
	tg := startGatewayInfo(t, up.url, nil, func() RequestInfo {
		return RequestInfo{Meta: ConnInfo{Subject: <-subject, Handler: "chat", Mode: "relay"}}
	})
	reg := tg.g.Registry()
	subject <- "u-1"
	gone := dialRaw(t, tg.addr(), nil)
	upGone := up.next(t)
	subject <- "u-2"
	stays := dialRaw(t, tg.addr(), nil)
	up.next(t)
	tg.waitLen(t, 2)

	byID := map[string]*ConnInfo{}
	var target string
	for _, m := range reg.Conns() {
		byID[m.ID] = m
		if m.Subject == "u-1" {
			target = m.ID
		}
		if len(m.ID) != 32 || strings.Trim(m.ID, "0123456789abcdef") != "" {
			t.Errorf("id %q: want 32 hex digits", m.ID)
		}
		if m.Handler != "chat" || m.Mode != "relay" || m.Remote != "127.0.0.1" || time.Since(m.Started) > waitFor || m.Started.After(time.Now()) {
			t.Errorf("listed %+v", *m)
		}
	}
	if len(byID) != 2 || target == "" {
		t.Fatalf("listed %d distinct ids (target %q), want 2 (u-1 among them)", len(byID), target)
	}

	n := reg.Disconnect(func(m *ConnInfo) bool { return m.ID == target }, 4001, "account disabled")
	if n != 1 {
		t.Fatalf("Disconnect closed %d, want 1", n)
	}
	if code, reason, _ := gone.readClose(); code != 4001 || reason != "account disabled" {
		t.Fatalf("client got close %d %q, want 4001 \"account disabled\"", code, reason)
	}
	if code, reason := upGone.closeCode(t); code != 4001 || reason != "account disabled" {
		t.Fatalf("upstream got close %d %q, want 4001 \"account disabled\"", code, reason)
	}
	tg.waitLen(t, 1)
	if n := reg.Disconnect(func(m *ConnInfo) bool { return m.ID == target }, 4001, ""); n != 0 {
		t.Fatalf("a second Disconnect of the same id closed %d, want 0", n)
	}
	stays.write(cf(opText, []byte("still here")))
	if f := stays.readData(); string(f.payload) != "still here" {
		t.Fatalf("the other connection echoed %q", f.payload)
	}
}
