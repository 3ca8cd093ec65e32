package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// switchable is an upstream that can be taken down (it answers 503) and
// brought back, and that counts the requests it sees: handshakes on any
// path but /health, which answers the health probes.
type switchable struct {
	*upstream
	down      atomic.Bool
	dials     atomic.Int64  // handshake requests seen
	probes    atomic.Int64  // health requests seen
	hold      chan struct{} // if set, handshakes wait for it to close
	healthBad atomic.Bool   // /health answers 500
}

func startSwitchable(t testing.TB) *switchable {
	t.Helper()
	s := &switchable{upstream: newUpstream(nil, nil)}
	inner := s.upstream.srv.Config.Handler
	s.upstream.srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			s.probes.Add(1)
			if s.down.Load() || s.healthBad.Load() {
				w.WriteHeader(http.StatusInternalServerError)
			}
			return
		}
		s.dials.Add(1)
		if s.hold != nil {
			<-s.hold
		}
		if s.down.Load() {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		inner.ServeHTTP(w, r)
	})
	t.Cleanup(s.upstream.srv.Close)
	return s
}

// startLBGateway serves a gateway in front of ups, with mod adjusting its
// config.
func startLBGateway(t testing.TB, ups []string, mod func(*Config)) *testGateway {
	t.Helper()
	cfg := Config{Upstreams: ups}
	if mod != nil {
		mod(&cfg)
	}
	if err := prepareTestConfig(&cfg); err != nil {
		t.Fatal(err)
	}
	g := New(cfg, nil, nil)
	t.Cleanup(g.Close)
	return serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, false)
}

// upgradeStatus sends one upgrade request and returns the status and the
// Retry-After of the answer (the connection, if upgraded, is closed).
func upgradeStatus(t testing.TB, tg *testGateway) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+tg.addr()+"/ws", nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", newKey())
	resp, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode, resp.Header.Get("Retry-After")
}

// TestCircuitOpen: once every upstream is set aside, clients are refused
// with 502 and Retry-After without a dial; after fail_duration one dial at
// a time tries an upstream, and its success lets everyone through again.
func TestCircuitOpen(t *testing.T) {
	clock := newFakeClock()
	a, b := startSwitchable(t), startSwitchable(t)
	a.down.Store(true)
	b.down.Store(true)
	tg := startLBGateway(t, []string{a.url, b.url}, func(c *Config) {
		c.Health = Health{FailDuration: time.Minute, Now: clock.Now}
	})
	if status, retry := upgradeStatus(t, tg); status != http.StatusBadGateway || retry != "60" {
		t.Fatalf("first refusal: %d, Retry-After %q; want 502, 60 after dialling both", status, retry)
	}
	if a.dials.Load() != 1 || b.dials.Load() != 1 {
		t.Fatalf("dials: %d and %d, want 1 each", a.dials.Load(), b.dials.Load())
	}
	for i := range 20 {
		if status, retry := upgradeStatus(t, tg); status != http.StatusBadGateway || retry != "60" {
			t.Fatalf("refusal %d: %d, Retry-After %q; want 502, 60", i, status, retry)
		}
	}
	if a.dials.Load() != 1 || b.dials.Load() != 1 {
		t.Fatalf("dials while both are set aside: %d and %d", a.dials.Load(), b.dials.Load())
	}
	clock.Advance(30 * time.Second)
	if _, retry := upgradeStatus(t, tg); retry != "30" {
		t.Fatalf("Retry-After %q half-way, want 30", retry)
	}

	// Both come back; the trial dials are held so that others arrive
	// meanwhile: they are refused at once, and no upstream sees them.
	a.down.Store(false)
	b.down.Store(false)
	release := make(chan struct{})
	a.hold, b.hold = release, release
	clock.Advance(30 * time.Second)
	var wg sync.WaitGroup
	trials := make(chan int, 2)
	for range 2 {
		wg.Go(func() {
			status, _ := upgradeStatus(t, tg)
			trials <- status
		})
	}
	poll(t, "both trial dials", func() bool { return a.dials.Load() == 2 && b.dials.Load() == 2 })
	for i := range 10 {
		if status, retry := upgradeStatus(t, tg); status != http.StatusBadGateway || retry != "1" {
			t.Fatalf("during the trials, request %d: %d, Retry-After %q; want 502, 1", i, status, retry)
		}
	}
	if a.dials.Load() != 2 || b.dials.Load() != 2 {
		t.Fatalf("dials during the trials: %d and %d, want 2 each", a.dials.Load(), b.dials.Load())
	}
	close(release)
	wg.Wait()
	for range 2 {
		if s := <-trials; s != http.StatusSwitchingProtocols {
			t.Fatalf("trial: %d, want 101", s)
		}
	}
	for range 4 {
		if status, _ := upgradeStatus(t, tg); status != http.StatusSwitchingProtocols {
			t.Fatalf("after the trials: %d", status)
		}
	}
}

// fakeTicker is a Ticker a test drives.
type fakeTicker struct {
	c chan time.Time
}

func (f *fakeTicker) C() <-chan time.Time { return f.c }
func (f *fakeTicker) Stop()               {}

// tickers collects the tickers a gateway makes, one per upstream checked.
type tickers struct {
	mu   sync.Mutex
	list []*fakeTicker
}

func (ts *tickers) new(time.Duration) Ticker {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	f := &fakeTicker{c: make(chan time.Time)}
	ts.list = append(ts.list, f)
	return f
}

// tick makes every checker probe once more (each takes the tick once it
// has finished its probe).
func (ts *tickers) tick() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for _, f := range ts.list {
		f.c <- time.Now()
	}
}

func TestActiveHealthChecks(t *testing.T) {
	for _, websocket := range []bool{false, true} {
		name := "http"
		if websocket {
			name = "websocket"
		}
		t.Run(name, func(t *testing.T) {
			a, b := startSwitchable(t), startSwitchable(t)
			ts := &tickers{}
			active := &ActiveHealth{URI: "/health", Interval: 7 * time.Second, NewTicker: ts.new}
			if websocket {
				active = &ActiveHealth{WebSocket: true, WebSocketURI: "/probe", Interval: 7 * time.Second, NewTicker: ts.new}
			}
			tg := startLBGateway(t, []string{a.url, b.url}, func(c *Config) {
				c.Health = Health{Active: active}
				c.LB = LBPolicy{Policy: First}
			})
			probes := func(s *switchable) int64 {
				if websocket {
					return s.dials.Load()
				}
				return s.probes.Load()
			}
			poll(t, "the first probes", func() bool { return probes(a) == 1 && probes(b) == 1 })
			status := func() UpstreamStatus { return tg.g.pool.Status(time.Now())[0] }
			if a.url > b.url {
				status = func() UpstreamStatus { return tg.g.pool.Status(time.Now())[1] }
			}

			c1, _ := dialCoder(t, tg, "/ws", nil)
			for uc := a.next(t); uc.req.URL.Path != "/ws"; uc = a.next(t) {
				// a WebSocket probe's connection
			}
			a.down.Store(true)
			ts.tick()
			poll(t, "a to be set aside", func() bool { return !status().Healthy && status().ActiveDown })
			dialsBefore := a.dials.Load()
			if s, _ := upgradeStatus(t, tg); s != http.StatusSwitchingProtocols {
				t.Fatalf("with b up: %d", s)
			}
			if a.dials.Load() != dialsBefore {
				t.Fatal("a client was dialled to the upstream set aside")
			}
			b.down.Store(true)
			ts.tick()
			poll(t, "both set aside", func() bool {
				for _, s := range tg.g.pool.Status(time.Now()) {
					if s.Healthy {
						return false
					}
				}
				return true
			})
			if s, retry := upgradeStatus(t, tg); s != http.StatusBadGateway || retry != "7" {
				t.Fatalf("both down: %d, Retry-After %q; want 502, 7 (the interval)", s, retry)
			}
			a.down.Store(false)
			ts.tick()
			poll(t, "a back", func() bool { return status().Healthy })
			if s, _ := upgradeStatus(t, tg); s != http.StatusSwitchingProtocols {
				t.Fatalf("a back: %d", s)
			}
			if st := status(); st.Live != 1 && st.Live != 2 {
				t.Fatalf("live on a: %d", st.Live)
			}
			c1.CloseNow()
		})
	}
}

// fakeTimers runs the functions given to AfterFunc when a fake clock
// passes their time.
type fakeTimers struct {
	clock *fakeClock
	mu    sync.Mutex
	next  int
	due   map[int]fakeTimer
}

type fakeTimer struct {
	at time.Time
	f  func()
}

func newFakeTimers(clock *fakeClock) *fakeTimers {
	return &fakeTimers{clock: clock, due: map[int]fakeTimer{}}
}

func (ft *fakeTimers) AfterFunc(d time.Duration, f func()) func() bool {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	id := ft.next
	ft.next++
	ft.due[id] = fakeTimer{ft.clock.Now().Add(d), f}
	return func() bool {
		ft.mu.Lock()
		defer ft.mu.Unlock()
		_, pending := ft.due[id]
		delete(ft.due, id)
		return pending
	}
}

// advance moves the clock and runs what is due.
func (ft *fakeTimers) advance(d time.Duration) {
	ft.clock.Advance(d)
	now := ft.clock.Now()
	ft.mu.Lock()
	var run []func()
	for id, t := range ft.due {
		if !now.Before(t.at) {
			run = append(run, t.f)
			delete(ft.due, id)
		}
	}
	ft.mu.Unlock()
	for _, f := range run {
		f()
	}
}

// TestDrainRemovedUpstream: the connections of an upstream no
// configuration holds any more close with 1001 "upstream removed"
// DrainTimeout after the reload, the DrainTimeout of the configuration
// that removed it; those of an upstream still held stay.
func TestDrainRemovedUpstream(t *testing.T) {
	a, b := startSwitchable(t), startSwitchable(t)
	pool := NewPool()
	reg := NewRegistry()
	timers := newFakeTimers(newFakeClock())
	mk := func(drain time.Duration, ups ...string) *Gateway {
		cfg := Config{Upstreams: ups, Pool: pool, DrainTimeout: drain, AfterFunc: timers.AfterFunc, LB: LBPolicy{Policy: First}}
		if err := prepareTestConfig(&cfg); err != nil {
			t.Fatal(err)
		}
		return New(cfg, reg, nil)
	}
	// the first config has no drain_timeout; the next one sets it
	g1 := mk(0, a.url, b.url)
	tg := serveGateway(t, g1, func(w http.ResponseWriter, r *http.Request) { g1.ServeHTTP(w, r, RequestInfo{}) }, false)
	onA := dialRaw(t, tg.addr(), nil)
	a.next(t)
	// the next config keeps b only
	g2 := mk(time.Minute, b.url)
	defer g2.Close()
	tg2 := serveGateway(t, g2, func(w http.ResponseWriter, r *http.Request) { g2.ServeHTTP(w, r, RequestInfo{}) }, false)
	onB := dialRaw(t, tg2.addr(), nil)
	b.next(t)
	g1.Close()
	if st := pool.Status(time.Now()); len(st) != 2 || !st[indexOf(st, a.url)].Removed || st[indexOf(st, b.url)].Removed {
		t.Fatalf("status after the reload: %+v", st)
	}
	timers.advance(time.Minute - time.Millisecond)
	onA.write(cf(opText, []byte("not yet")))
	if f := onA.readData(); string(f.payload) != "not yet" {
		t.Fatalf("a's connection just before the drain: %q", f.payload)
	}
	timers.advance(time.Millisecond)
	code, reason, _ := onA.readClose()
	if code != 1001 || reason != UpstreamReason {
		t.Fatalf("connection to the removed upstream: %d %q", code, reason)
	}
	poll(t, "a to be forgotten", func() bool { return len(pool.Status(time.Now())) == 1 })
	onB.write(cf(opText, []byte("still here")))
	if f := onB.readData(); string(f.payload) != "still here" {
		t.Fatalf("b's connection: %q", f.payload)
	}
}

func indexOf(st []UpstreamStatus, url string) int {
	for i, s := range st {
		if s.URL == url {
			return i
		}
	}
	return -1
}

// TestCookieSetIn101: a client without the cookie gets one in the 101;
// with it, it reaches the same upstream and gets none.
func TestCookieSetIn101(t *testing.T) {
	ups := []*switchable{startSwitchable(t), startSwitchable(t), startSwitchable(t)}
	tg := startLBGateway(t, []string{ups[0].url, ups[1].url, ups[2].url}, func(c *Config) {
		c.LB = LBPolicy{Policy: CookieHash, Field: "sticky"}
	})
	rc := dialRaw(t, tg.addr(), nil)
	var cookie *http.Cookie
	for _, ck := range rc.resp.Cookies() {
		if ck.Name == "sticky" {
			cookie = ck
		}
	}
	if cookie == nil {
		t.Fatalf("no cookie in the 101: %v", rc.resp.Header)
	}
	first := -1
	for i, u := range ups {
		if u.dials.Load() == 1 {
			first = i
		}
	}
	for range 5 {
		rc := dialRaw(t, tg.addr(), http.Header{"Cookie": {"sticky=" + cookie.Value}})
		if len(rc.resp.Cookies()) != 0 {
			t.Fatalf("a cookie set again: %v", rc.resp.Header["Set-Cookie"])
		}
	}
	if n := ups[first].dials.Load(); n != 6 {
		t.Fatalf("the pinned upstream saw %d dials, want 6", n)
	}
	if !strings.Contains(rc.resp.Header.Get("Set-Cookie"), "HttpOnly") {
		t.Fatalf("cookie %q", rc.resp.Header.Get("Set-Cookie"))
	}
}

// TestSharedPoolHealthPerGateway: gateways sharing a Pool (handlers of one
// name, or successive configurations) heed only the health checks they
// have, and those with the same active checks share one prober.
func TestSharedPoolHealthPerGateway(t *testing.T) {
	clock := newFakeClock()
	a := startSwitchable(t)
	pool := NewPool()
	ts := &tickers{}
	serve := func(h Health) (*Gateway, *testGateway) {
		cfg := Config{Upstreams: []string{a.url}, Pool: pool, Health: h}
		if err := prepareTestConfig(&cfg); err != nil {
			t.Fatal(err)
		}
		g := New(cfg, nil, nil)
		return g, serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, false)
	}
	checked := func() Health {
		return Health{FailDuration: time.Minute, Now: clock.Now,
			Active: &ActiveHealth{URI: "/health", Interval: 7 * time.Second, NewTicker: ts.new}}
	}
	g1, tg1 := serve(checked())
	g1b, _ := serve(checked()) // the same checks: a reload, or a second handler
	g2, tg2 := serve(Health{Now: clock.Now})
	defer g2.Close()
	if len(ts.list) != 1 {
		t.Fatalf("%d probers for one upstream with the same checks, want 1", len(ts.list))
	}
	poll(t, "the first probe", func() bool { return a.probes.Load() == 1 })
	status := func() UpstreamStatus { return pool.Status(clock.Now())[0] }
	upgrade := func(tg *testGateway, want int) {
		t.Helper()
		before := a.dials.Load()
		if s, _ := upgradeStatus(t, tg); s != want {
			t.Fatalf("status %d, want %d", s, want)
		}
		if a.dials.Load() != before+1 {
			t.Fatal("the upstream was not dialled")
		}
	}

	// a failure seen by the gateway without checks counts for no one
	a.down.Store(true)
	upgrade(tg2, http.StatusBadGateway)
	if st := status(); !st.Healthy {
		t.Fatalf("set aside by a gateway without health checks: %+v", st)
	}
	// one seen by the gateway with passive checks sets it aside for that
	// gateway only
	upgrade(tg1, http.StatusBadGateway)
	if st := status(); !st.PassiveDown {
		t.Fatalf("not set aside after a passive failure: %+v", st)
	}
	a.down.Store(false)
	if s, retry := upgradeStatus(t, tg1); s != http.StatusBadGateway || retry != "60" {
		t.Fatalf("gateway with checks, upstream set aside: %d, Retry-After %q; want 502, 60", s, retry)
	}
	upgrade(tg2, http.StatusSwitchingProtocols)

	// so do the active checks
	a.healthBad.Store(true)
	ts.tick()
	poll(t, "the probe to set it aside", func() bool { return status().ActiveDown })
	upgrade(tg2, http.StatusSwitchingProtocols)
	a.healthBad.Store(false)
	ts.tick()
	poll(t, "the probe to bring it back", func() bool { return status().Healthy })
	upgrade(tg1, http.StatusSwitchingProtocols)

	// the prober stops with the last gateway that has its checks
	g1.Close()
	u := g2.ups[0]
	u.mu.Lock()
	n := len(u.probers)
	u.mu.Unlock()
	if n != 1 {
		t.Fatalf("%d probers after one of two gateways with checks closed, want 1", n)
	}
	ts.tick()
	poll(t, "the prober to go on", func() bool { return a.probes.Load() == 4 })
	g1b.Close()
	u.mu.Lock()
	n = len(u.probers)
	u.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d probers after both gateways with checks closed", n)
	}
}

// TestClosedGatewayRefuses: a request that reaches a Gateway after Close
// (a reload replaced it meanwhile) gets 502 and dials nothing: its
// connection would escape the metrics, the admin API and the drain.
func TestClosedGatewayRefuses(t *testing.T) {
	a := startSwitchable(t)
	pool := NewPool()
	tg := startLBGateway(t, []string{a.url}, func(c *Config) { c.Pool = pool })
	if s, _ := upgradeStatus(t, tg); s != http.StatusSwitchingProtocols {
		t.Fatalf("before Close: %d", s)
	}
	tg.g.Close()
	if s, _ := upgradeStatus(t, tg); s != http.StatusBadGateway {
		t.Fatalf("after Close: %d, want 502", s)
	}
	if n := a.dials.Load(); n != 1 {
		t.Fatalf("the upstream saw %d dials, want 1 (before Close)", n)
	}
	// and an Upstream no Gateway holds is never acquired
	u := testUpstreams(0)[0]
	u.refs = 0
	if _, ok := u.acquire(time.Now(), &Health{}, nil); ok {
		t.Fatal("acquired an upstream no configuration holds")
	}
}

// TestLiveCountsOnFailedPaths: a dial that does not become a relayed
// connection (the client's upgrade fails after the upstream accepted, or
// the client goes away during the dial) no longer counts for least_conn.
func TestLiveCountsOnFailedPaths(t *testing.T) {
	a, b := startSwitchable(t), startSwitchable(t)
	cfg := Config{Upstreams: []string{a.url, b.url}, LB: LBPolicy{Policy: LeastConn}}
	if err := prepareTestConfig(&cfg); err != nil {
		t.Fatal(err)
	}
	g := New(cfg, nil, nil)
	defer g.Close()
	upgradeReq := func(ctx context.Context) *http.Request {
		r := httptest.NewRequest(http.MethodGet, "http://gw/ws", nil).WithContext(ctx)
		r.Header.Set("Connection", "Upgrade")
		r.Header.Set("Upgrade", "websocket")
		r.Header.Set("Sec-WebSocket-Version", "13")
		r.Header.Set("Sec-WebSocket-Key", newKey())
		return r
	}
	live := func() (n int64) {
		for _, u := range g.ups {
			n += u.Live()
		}
		return n
	}

	t.Run("client upgrade fails", func(t *testing.T) {
		// a ResponseRecorder cannot be hijacked: the upgrade fails after
		// the upstream accepted
		if o := g.ServeHTTP(httptest.NewRecorder(), upgradeReq(context.Background()), RequestInfo{}); o != BadHandshake {
			t.Fatalf("outcome %q, want %q", o, BadHandshake)
		}
		if a.dials.Load()+b.dials.Load() != 1 {
			t.Fatal("no upstream was dialled")
		}
		if n := live(); n != 0 {
			t.Fatalf("%d live after a failed upgrade, want 0", n)
		}
	})
	t.Run("client goes away during the dial", func(t *testing.T) {
		release := make(chan struct{})
		a.hold, b.hold = release, release
		defer close(release)
		before := a.dials.Load() + b.dials.Load()
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan Outcome, 1)
		go func() { done <- g.ServeHTTP(httptest.NewRecorder(), upgradeReq(ctx), RequestInfo{}) }()
		poll(t, "the dial to reach the upstream", func() bool { return a.dials.Load()+b.dials.Load() == before+1 })
		if n := live(); n != 1 {
			t.Fatalf("%d live during the dial, want 1", n)
		}
		cancel()
		if o := <-done; o != UpstreamFailed {
			t.Fatalf("outcome %q, want %q", o, UpstreamFailed)
		}
		if n := live(); n != 0 {
			t.Fatalf("%d live after an abandoned dial, want 0", n)
		}
		if a.dials.Load()+b.dials.Load() != before+1 {
			t.Fatal("the abandoned dial was retried on the other upstream")
		}
	})
}
