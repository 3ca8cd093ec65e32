package proxy

// Test peers. Upstreams and well-behaved clients use github.com/coder/websocket;
// malformed input is written by hand as raw frames over a net.Conn. Nothing
// here uses gobwas/ws or the package's own frame code, so a bug in one
// cannot cancel out in the other.

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	pollpkg "github.com/wsgate/wsgate/internal/poll"
)

// Opcodes, written out here rather than taken from gobwas/ws.
const (
	opCont   = 0x0
	opText   = 0x1
	opBinary = 0x2
	opClose  = 0x8
	opPing   = 0x9
	opPong   = 0xA
)

// testParkAfter is the ParkAfter of test gateways that set none: short, so
// that every test also runs through parking and waking.
const testParkAfter = 2 * time.Millisecond

// waitFor is the bound for anything a test waits on.
const waitFor = 10 * time.Second

var bgCtx = context.Background()

// ---------- gateway ----------

// prepareTestConfig applies the test defaults (a short CloseTimeout and
// ParkAfter) where cfg sets none, then Prepare.
func prepareTestConfig(cfg *Config) error {
	if cfg.CloseTimeout == 0 {
		cfg.CloseTimeout = 2 * time.Second
	}
	if cfg.ParkAfter == 0 {
		cfg.ParkAfter = testParkAfter
	}
	return cfg.Prepare()
}

// testGateway is a Gateway served over HTTP for one test.
type testGateway struct {
	g   *Gateway
	srv *httptest.Server
	log *logBuffer // the gateway's log, when the test captures it
}

func (tg *testGateway) addr() string { return tg.srv.Listener.Addr().String() }

func (tg *testGateway) url(path string) string {
	if tg.srv.TLS != nil {
		return "wss://" + tg.addr() + path
	}
	return "ws://" + tg.addr() + path
}

// startGateway starts a gateway in front of upstreamURL; mod, if not nil,
// adjusts the config before Prepare. The registry is shut down when the
// test ends, and the test fails if a connection is then still alive.
func startGateway(t testing.TB, upstreamURL string, mod func(*Config)) *testGateway {
	t.Helper()
	cfg := Config{Upstreams: []string{upstreamURL}}
	if mod != nil {
		mod(&cfg)
	}
	if err := prepareTestConfig(&cfg); err != nil {
		t.Fatalf("gateway config: %v", err)
	}
	g := New(cfg, nil, nil)
	return serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, false)
}

// startGatewayInfo is startGateway with each request's RequestInfo made by
// info, so that a test can set the hooks of relayed connections (Inspect,
// OnStart). The gateway logs at debug level into tg.log.
func startGatewayInfo(t testing.TB, upstreamURL string, mod func(*Config), info func() RequestInfo) *testGateway {
	t.Helper()
	cfg := Config{Upstreams: []string{upstreamURL}}
	if mod != nil {
		mod(&cfg)
	}
	if err := prepareTestConfig(&cfg); err != nil {
		t.Fatalf("gateway config: %v", err)
	}
	logs, logger := newLogBuffer()
	g := New(cfg, nil, logger)
	tg := serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, info()) }, false)
	tg.log = logs
	return tg
}

// serveGateway serves g with net/http on 127.0.0.1 for one test (over TLS
// with httptest's certificate when overTLS), handing each request to
// serve. The registry is shut down when the test ends, and the test fails
// if a connection is then still alive.
func serveGateway(t testing.TB, g *Gateway, serve http.HandlerFunc, overTLS bool) *testGateway {
	t.Helper()
	srv := httptest.NewUnstartedServer(serve)
	if overTLS {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(func() {
		srv.Close()
		if !g.Registry().Shutdown(waitFor) {
			t.Errorf("registry shutdown: %d connections still alive", g.Registry().Len())
		}
	})
	return &testGateway{g: g, srv: srv}
}

// logBuffer collects a gateway's log output; the gateway writes to it from
// its connections' goroutines.
type logBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

// newLogBuffer makes a logBuffer and a debug-level logger writing to it.
func newLogBuffer() (*logBuffer, *slog.Logger) {
	l := &logBuffer{}
	return l, slog.New(slog.NewTextHandler(l, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

// linesWith returns the log lines that contain s.
func (l *logBuffer) linesWith(s string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, line := range strings.Split(l.b.String(), "\n") {
		if strings.Contains(line, s) {
			out = append(out, line)
		}
	}
	return out
}

// waitLen waits until the gateway tracks n connections.
func (tg *testGateway) waitLen(t testing.TB, n int) {
	t.Helper()
	poll(t, fmt.Sprintf("registry to hold %d connections", n), func() bool { return tg.g.Registry().Len() == n })
}

// poll waits, with a deadline, until cond holds.
func poll(t testing.TB, what string, cond func() bool) {
	t.Helper()
	pollpkg.Until(t, waitFor, what, cond)
}

// fakeClock is an injectable clock for rate limits.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}
