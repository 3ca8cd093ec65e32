package proxy

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
)

// pumps counts the goroutines reading a side of some connection.
func pumps() int {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			return bytes.Count(buf[:n], []byte("proxy.(*relay).pump("))
		}
		buf = make([]byte, 2*len(buf))
	}
}

// onlyRelay is the one connection of tg.
func onlyRelay(t *testing.T, tg *testGateway) *relay {
	t.Helper()
	tg.waitLen(t, 1)
	r := tg.g.Registry()
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		return c
	}
	return nil
}

// startParkingGateway starts an echo upstream and a gateway in front of it
// that parks after parkAfter, with pings off unless mod sets them.
func startParkingGateway(t *testing.T, parkAfter time.Duration, mod func(*Config)) (*upstream, *testGateway) {
	t.Helper()
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	up := startUpstream(t, nil, nil)
	return up, startGateway(t, up.url, func(c *Config) {
		c.ParkAfter = parkAfter
		c.PingInterval = -1
		if mod != nil {
			mod(c)
		}
	})
}

// waitParked waits until both sides of c (or the client alone, solo) have
// parked and no pump goroutine is left.
func waitParked(t *testing.T, c *relay) {
	t.Helper()
	poll(t, "both sides to park", func() bool {
		return c.client.pstate.Load() == sideParked && (c.solo || c.upstream.pstate.Load() == sideParked) && pumps() == 0
	})
}

// TestParkedConnectionRelays: an idle connection gives up both reader
// goroutines, and data in either direction wakes the side it arrives on,
// again and again.
func TestParkedConnectionRelays(t *testing.T) {
	up, tg := startParkingGateway(t, 20*time.Millisecond, nil)
	cl, _ := dialCoder(t, tg, "/", nil)
	exerciseParked(t, cl, up.next(t), onlyRelay(t, tg))
	tg.waitLen(t, 0)
	poll(t, "pumps to end", func() bool { return pumps() == 0 })
}

// exerciseParked sends messages both ways through a connection that parks
// between them (up to 160 KB: frames larger than the read buffer and than
// a TLS record), then closes it from the client.
func exerciseParked(t *testing.T, cl *websocket.Conn, uc *upConn, c *relay) {
	t.Helper()
	ctx := context.Background()
	for i := 0; i < 5; i++ {
		waitParked(t, c)
		msg := bytes.Repeat([]byte{byte('a' + i)}, 100+i*40000)
		if err := cl.Write(ctx, websocket.MessageBinary, msg); err != nil {
			t.Fatal(err)
		}
		if _, got, err := cl.Read(ctx); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("echo %d: %d bytes, %v", i, len(got), err)
		}
		if m := uc.nextMsg(t); !bytes.Equal(m.data, msg) {
			t.Fatalf("upstream got %d bytes", len(m.data))
		}
		waitParked(t, c)
		// The upstream speaks first: its side wakes, the client's does not
		// need to.
		if err := uc.c.Write(ctx, websocket.MessageText, []byte("news")); err != nil {
			t.Fatal(err)
		}
		if _, got, err := cl.Read(ctx); err != nil || string(got) != "news" {
			t.Fatalf("news %d: %q %v", i, got, err)
		}
	}
	waitParked(t, c)
	cl.Close(websocket.StatusNormalClosure, "bye")
	if code, reason := uc.closeCode(t); code != websocket.StatusNormalClosure || reason != "bye" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
}

// TestParkedTLS: sides served over TLS (the client over HTTPS, a wss://
// upstream) park like plain ones: crypto/tls is left with no complete
// record when the wait is kicked, and the socket under it is watched.
func TestParkedTLS(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	for _, tc := range []struct {
		name                   string
		clientTLS, upstreamTLS bool
	}{
		{"client over TLS", true, false},
		{"wss upstream", false, true},
		{"both", true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			up := newUpstreamTLS(nil, nil, tc.upstreamTLS)
			t.Cleanup(up.srv.Close)
			cfg := Config{Upstreams: []string{up.url}, ParkAfter: 20 * time.Millisecond, PingInterval: -1}
			if tc.upstreamTLS {
				roots := x509.NewCertPool()
				roots.AddCert(up.srv.Certificate())
				cfg.TLS = &tls.Config{RootCAs: roots}
			}
			if err := prepareTestConfig(&cfg); err != nil {
				t.Fatal(err)
			}
			g := New(cfg, nil, nil)
			tg := serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, tc.clientTLS)
			opts := &websocket.DialOptions{}
			if tc.clientTLS {
				opts.HTTPClient = tg.srv.Client()
			}
			cl, _ := dialCoder(t, tg, "/", opts)
			uc := up.next(t)
			c := onlyRelay(t, tg)
			if _, ok := c.client.rd.conn.(*tls.Conn); ok != tc.clientTLS {
				t.Fatalf("client side over TLS: %v", ok)
			}
			if _, ok := c.upstream.rd.conn.(*tls.Conn); ok != tc.upstreamTLS {
				t.Fatalf("upstream side over TLS: %v", ok)
			}
			exerciseParked(t, cl, uc, c)
			tg.waitLen(t, 0)
		})
	}
}

// TestParkedHeartbeat: a parked client is still pinged on time and still
// dropped when it stops answering; it parks again between pings.
func TestParkedHeartbeat(t *testing.T) {
	up, tg := startParkingGateway(t, 10*time.Millisecond, func(c *Config) {
		c.PingInterval = 150 * time.Millisecond
		c.PongTimeout = 300 * time.Millisecond
		c.CloseTimeout = 300 * time.Millisecond
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	c := onlyRelay(t, tg)
	for i := 0; i < 3; i++ {
		waitParked(t, c)
		f, err := rc.read()
		if err != nil || f.op != opPing {
			t.Fatalf("frame %d: op %d (%v), want ping", i, f.op, err)
		}
		rc.write(cf(opPong, f.payload))
	}
	waitParked(t, c)
	// Now silent: one more ping, then 1001 after PongTimeout.
	start := time.Now()
	f, err := rc.read()
	if err != nil || f.op != opPing {
		t.Fatalf("op %d (%v), want ping", f.op, err)
	}
	f, err = rc.read()
	if err != nil || f.op != opClose {
		t.Fatalf("op %d (%v), want close", f.op, err)
	}
	if code, reason := closeOf(f.payload); code != 1001 || reason != "ping timeout" {
		t.Fatalf("close %d %q", code, reason)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("dropped %v after the ping, before PongTimeout", d)
	}
	if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || reason != "ping timeout" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
	rc.expectEOF()
	tg.waitLen(t, 0)
}

// TestParkedHeartbeatNoReader: a parked client's heartbeat takes no
// reader goroutine: the ping goes out from the timer, the answer is taken
// from the socket by the poller, and data afterwards still wakes a reader.
func TestParkedHeartbeatNoReader(t *testing.T) {
	up, tg := startParkingGateway(t, 5*time.Millisecond, func(c *Config) {
		c.PingInterval = 100 * time.Millisecond
		c.PongTimeout = time.Second
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	c := onlyRelay(t, tg)
	waitParked(t, c)
	// A reader started for a ping or its answer would live park_after at
	// least: look for one every millisecond until the last ping is read.
	stop, seen := make(chan struct{}), make(chan int, 1)
	go func() {
		most := 0
		tick := time.NewTicker(time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				seen <- most
				return
			case <-tick.C:
				most = max(most, pumps())
			}
		}
	}()
	var last []byte
	for i := 0; i < 5; i++ {
		f, err := rc.read()
		if err != nil || f.op != opPing {
			t.Fatalf("frame %d: op %d (%v), want ping", i, f.op, err)
		}
		if i < 4 {
			// at once: the answer may come while the ping's timer is
			// still servicing the side
			rc.write(cf(opPong, f.payload))
		}
		last = f.payload
		// Parked, or still being serviced by the timer that pinged.
		if n, st := pumps(), c.client.pstate.Load(); n != 0 || (st != sideParked && st&^(pendingReadable|pendingTimer) != sideServiced) {
			t.Fatalf("ping %d: %d reader goroutines, client state %d; want none, parked", i, n, st)
		}
	}
	close(stop)
	if n := <-seen; n != 0 {
		t.Fatalf("%d reader goroutines seen while pings were answered", n)
	}
	rc.write(cf(opPong, last))
	// A pong with a foreign payload is not the gateway's: it wakes the
	// reader and goes to the upstream, like data.
	rc.write(cf(opPong, []byte("other")))
	select {
	case p := <-uc.pongs:
		if string(p) != "other" {
			t.Fatalf("upstream got pong %q", p)
		}
	case <-time.After(waitFor):
		t.Fatal("the client's own pong did not reach the upstream")
	}
	rc.write(cf(opText, []byte("hello")))
	if m := uc.nextMsg(t); string(m.data) != "hello" {
		t.Fatalf("upstream read %q", m.data)
	}
	waitParked(t, c)
}

// TestParkedIdleTimeout: timers fire for parked connections.
func TestParkedIdleTimeout(t *testing.T) {
	up, tg := startParkingGateway(t, 10*time.Millisecond, func(c *Config) { c.IdleTimeout = 300 * time.Millisecond })
	start := time.Now()
	cl, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	c := onlyRelay(t, tg)
	waitParked(t, c)
	_, _, err := cl.Read(context.Background())
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway || ce.Reason != "idle timeout" {
		t.Fatalf("read: %v, want 1001 idle timeout", err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Fatalf("closed after %v", d)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusGoingAway {
		t.Fatalf("upstream close %d", code)
	}
	tg.waitLen(t, 0)
}

// TestParkedShutdownAndHangup: shutting down wakes parked sides for the
// closing handshake, and a client that hangs up while parked is noticed.
func TestParkedShutdownAndHangup(t *testing.T) {
	up, tg := startParkingGateway(t, 10*time.Millisecond, nil)

	// hang-up
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	waitParked(t, onlyRelay(t, tg))
	rc.conn.Close()
	if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || reason != "client went away" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
	tg.waitLen(t, 0)

	// shutdown
	cl, _ := dialCoder(t, tg, "/", nil)
	uc = up.next(t)
	waitParked(t, onlyRelay(t, tg))
	errs := make(chan error, 1)
	go func() {
		_, _, err := cl.Read(context.Background())
		errs <- err
	}()
	if !tg.g.Registry().Shutdown(waitFor) {
		t.Fatal("Shutdown timed out")
	}
	if err := <-errs; websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("client read: %v, want 1001", err)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusGoingAway {
		t.Fatalf("upstream close %d", code)
	}
	poll(t, "pumps to end", func() bool { return pumps() == 0 })
}

// startInspected starts a session gateway whose inspector passes every
// client message to got and drops it, and connects one client to it.
func startInspected(t *testing.T, cfg Config) (*testGateway, Session, *relay, *websocket.Conn, chan string) {
	t.Helper()
	got := make(chan string, 16)
	tg, sessions := startSession(t, cfg, func(msg []byte, text bool) (Verdict, []byte) {
		got <- string(msg)
		return Drop, nil
	})
	cl, _ := dialCoder(t, tg, "/", &websocket.DialOptions{Subprotocols: []string{"test.v1"}})
	s := <-sessions
	return tg, s, onlyRelay(t, tg), cl, got
}

// TestParkedSession: a session without upstream (rooms) parks its one
// reader; frames queued for it still go out, and its messages still reach
// the inspector, after each park.
func TestParkedSession(t *testing.T) {
	if getPoller() == nil {
		t.Skip("no poller on this platform")
	}
	tg, s, c, cl, got := startInspected(t, Config{ParkAfter: 10 * time.Millisecond, PingInterval: -1, CloseTimeout: time.Second})
	ctx := context.Background()
	for i := range 3 {
		waitParked(t, c)
		if !s.Enqueue(nil, NewMessage(ws.OpText, []byte("pushed"))) {
			t.Fatal("Enqueue refused")
		}
		if _, m, err := cl.Read(ctx); err != nil || string(m) != "pushed" {
			t.Fatalf("read %d: %q %v", i, m, err)
		}
		waitParked(t, c)
		msg := fmt.Sprintf("hello %d", i)
		if err := cl.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		select {
		case m := <-got:
			if m != msg {
				t.Fatalf("inspector got %q, want %q", m, msg)
			}
		case <-time.After(waitFor):
			t.Fatal("the message did not reach the inspector")
		}
	}
	waitParked(t, c)
	s.Close(4000, "done")
	_, _, err := cl.Read(ctx)
	if websocket.CloseStatus(err) != 4000 {
		t.Fatalf("read: %v, want close 4000", err)
	}
	tg.waitLen(t, 0)
}

// TestSessionParksAtOnce: a connection without upstream gives up its
// reader as soon as it has nothing to read, long before ParkAfter, and
// each message it sends wakes a reader that parks again once it is
// handled.
func TestSessionParksAtOnce(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	tg, s, c, cl, got := startInspected(t, Config{ParkAfter: time.Hour, PingInterval: -1})
	ctx := context.Background()
	for i := range 3 {
		waitParked(t, c)
		msg := fmt.Sprintf("hello %d", i)
		if err := cl.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			t.Fatal(err)
		}
		if m := <-got; m != msg {
			t.Fatalf("inspector got %q, want %q", m, msg)
		}
	}
	waitParked(t, c)
	s.Close(4000, "done")
	if _, _, err := cl.Read(ctx); websocket.CloseStatus(err) != 4000 {
		t.Fatalf("read: %v, want close 4000", err)
	}
	tg.waitLen(t, 0)
}

// TestReleaseAfterSessionsPark: with ReleaseMemory on, once more than
// releaseAfter connections without upstream have parked at once (no kick)
// and a quiet spell followed, the sweeper returns free memory, once.
func TestReleaseAfterSessionsPark(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	tg, sessions := startSession(t, Config{ParkAfter: time.Hour, PingInterval: -1}, dropAll)
	var freed atomic.Int32
	tg.g.reg.free = func() { freed.Add(1) }
	tg.g.reg.SetReleaseMemory(true)
	const n = releaseAfter + 10
	for range n {
		dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
		<-sessions
	}
	poll(t, "every connection to park", func() bool { return parkedNow(tg) == n && pumps() == 0 })
	poll(t, "the sweeper to return free memory", func() bool { return freed.Load() == 1 })
}

// parkedNow counts the connections of tg whose client side is parked.
func parkedNow(tg *testGateway) int {
	r := tg.g.Registry()
	r.mu.Lock()
	defer r.mu.Unlock()
	k := 0
	for c := range r.conns {
		if c.client.pstate.Load() == sideParked {
			k++
		}
	}
	return k
}

// TestConfigNowMonotonic: with the real clock the rate limits read the
// monotonic clock alone; it agrees with time.Now, and an injected clock
// is used as is.
func TestConfigNowMonotonic(t *testing.T) {
	var cfg Config
	if err := cfg.Prepare(); err != nil {
		t.Fatal(err)
	}
	before := time.Now()
	got := cfg.now()
	after := time.Now()
	if got.Before(before) || got.After(after) {
		t.Fatalf("now() = %v, not between %v and %v", got, before, after)
	}
	clock := newFakeClock()
	cfg = Config{Now: clock.Now}
	if err := cfg.Prepare(); err != nil {
		t.Fatal(err)
	}
	if got := cfg.now(); !got.Equal(clock.Now()) {
		t.Fatalf("now() = %v with an injected clock at %v", got, clock.Now())
	}
}

// startSession serves sessions without upstream (subprotocol test.v1) with
// cfg and inspect; each session started is sent on the channel.
func startSession(t *testing.T, cfg Config, inspect func([]byte, bool) (Verdict, []byte)) (*testGateway, chan Session) {
	t.Helper()
	if err := cfg.Prepare(); err != nil {
		t.Fatal(err)
	}
	g := New(cfg, nil, nil)
	sessions := make(chan Session, 16)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.ServeSession(w, r, RequestInfo{
			OnStart: func(s Session) { sessions <- s },
			Inspect: inspect,
		}, "test.v1")
	}))
	t.Cleanup(func() {
		srv.Close()
		if !g.Registry().Shutdown(waitFor) {
			t.Errorf("registry shutdown: %d connections still alive", g.Registry().Len())
		}
	})
	return &testGateway{g: g, srv: srv}, sessions
}
