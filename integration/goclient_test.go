package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"net"
	"net/http"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	wsgate "github.com/wsgate/wsgate/clients/go"
)

// The Go client (clients/go) against real gateways: a gateway killed and
// restarted mid-stream, a path that goes silent, a token refreshed in band,
// and 2,000 clients coming back after a restart.

// tcpProxy forwards TCP connections to target. It records when it accepted
// each, and can freeze the connections it holds: they stay open and
// forward nothing, as a dead network path does. Tapped (tap), it keeps
// the bytes it forwards.
type tcpProxy struct {
	ln     net.Listener
	target string
	done   chan struct{}
	wg     sync.WaitGroup

	mu      sync.Mutex
	accepts []time.Time
	pairs   []*proxyPair
	tapped  *proxyTap
}

type proxyPair struct {
	a, b net.Conn
	gate atomic.Pointer[chan struct{}] // non-nil: frozen until closed
	tap  *proxyTap
}

// proxyTap holds the bytes a tapped proxy forwarded, each way, of all its
// connections.
type proxyTap struct {
	toTarget, fromTarget syncBuffer
}

func startProxy(t testing.TB, target string) *tcpProxy {
	t.Helper()
	p := &tcpProxy{ln: listen(t), target: target, done: make(chan struct{})}
	p.wg.Add(1)
	go p.acceptLoop()
	t.Cleanup(p.close)
	return p
}

// lagProbe measures how long this process's goroutines wait to run: a
// goroutine woken every millisecond records the longest gap beyond that.
type lagProbe struct {
	done  chan struct{}
	stall chan time.Duration
}

func startLagProbe() *lagProbe {
	const period = time.Millisecond
	l := &lagProbe{done: make(chan struct{}), stall: make(chan time.Duration, 1)}
	go func() {
		tick := time.NewTicker(period)
		defer tick.Stop()
		var worst time.Duration
		last := time.Now()
		for {
			select {
			case <-l.done:
				l.stall <- worst
				return
			case <-tick.C:
				now := time.Now()
				worst = max(worst, now.Sub(last)-period)
				last = now
			}
		}
	}()
	return l
}

// stop ends the probe and returns the longest stall it saw.
func (l *lagProbe) stop() time.Duration {
	close(l.done)
	return <-l.stall
}

// arrived is when the kernel received the connection's latest segment,
// which for a connection just accepted is its handshake or the request
// that follows at once: the time the client connected, whatever this
// process's accept loop was doing then.
func arrived(c net.Conn) time.Time {
	now := time.Now()
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return now
	}
	var ago time.Duration
	rc.Control(func(fd uintptr) {
		if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			ago = time.Duration(min(ti.Last_data_recv, ti.Last_ack_recv)) * time.Millisecond
		}
	})
	return now.Add(-ago)
}

func (p *tcpProxy) addr() string { return p.ln.Addr().String() }

func (p *tcpProxy) acceptLoop() {
	defer p.wg.Done()
	for {
		a, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		p.accepts = append(p.accepts, arrived(a))
		p.mu.Unlock()
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			b, err := net.DialTimeout("tcp", p.target, 5*time.Second)
			if err != nil {
				a.Close() // the gateway is down: the client sees a failed handshake
				return
			}
			pair := &proxyPair{a: a, b: b}
			p.mu.Lock()
			pair.tap = p.tapped
			p.pairs = append(p.pairs, pair)
			p.mu.Unlock()
			p.wg.Add(1)
			go func() { defer p.wg.Done(); p.pump(pair, a, b) }()
			p.pump(pair, b, a)
		}()
	}
}

func (p *tcpProxy) pump(pair *proxyPair, from, to net.Conn) {
	defer func() { pair.a.Close(); pair.b.Close() }()
	buf := make([]byte, 32<<10)
	for {
		n, err := from.Read(buf)
		if n > 0 {
			if g := pair.gate.Load(); g != nil {
				select {
				case <-*g:
				case <-p.done:
					return
				}
			}
			if t := pair.tap; t != nil {
				if from == pair.a {
					t.toTarget.Write(buf[:n])
				} else {
					t.fromTarget.Write(buf[:n])
				}
			}
			if _, werr := to.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// freeze stops forwarding on every connection open now; later ones flow.
func (p *tcpProxy) freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, pair := range p.pairs {
		g := make(chan struct{})
		pair.gate.Store(&g)
	}
}

// tap keeps the bytes of the connections accepted from now on.
func (p *tcpProxy) tap() *proxyTap {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tapped == nil {
		p.tapped = new(proxyTap)
	}
	return p.tapped
}

// acceptTimes is when each connection arrived.
func (p *tcpProxy) acceptTimes() []time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]time.Time(nil), p.accepts...)
}

func (p *tcpProxy) close() {
	select {
	case <-p.done:
		return
	default:
	}
	close(p.done)
	p.ln.Close()
	p.mu.Lock()
	for _, pair := range p.pairs {
		pair.a.Close()
		pair.b.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// eventLog records a client's events with their times.
type eventLog struct {
	mu     sync.Mutex
	events []timedEvent
	wake   chan struct{}
}

type timedEvent struct {
	at time.Time
	wsgate.Event
}

func newEventLog() *eventLog { return &eventLog{wake: make(chan struct{}, 1)} }

func (l *eventLog) add(e wsgate.Event) {
	l.mu.Lock()
	l.events = append(l.events, timedEvent{time.Now(), e})
	l.mu.Unlock()
	select {
	case l.wake <- struct{}{}:
	default:
	}
}

func (l *eventLog) of(typ wsgate.EventType) []timedEvent {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []timedEvent
	for _, e := range l.events {
		if e.Type == typ {
			out = append(out, e)
		}
	}
	return out
}

// waitFor waits until the log holds n events of typ.
func (l *eventLog) waitFor(t testing.TB, typ wsgate.EventType, n int, within time.Duration) timedEvent {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		if evs := l.of(typ); len(evs) >= n {
			return evs[n-1]
		}
		select {
		case <-l.wake:
		case <-deadline.C:
			t.Fatalf("no %d %v events within %v: %+v", n, typ, within, l.events)
		}
	}
}

// seqStream is what a subscriber got of a numbered stream.
type seqStream struct {
	mu       sync.Mutex
	seqs     []int
	offsets  []uint64
	subs     []wsgate.SubscribedInfo
	resets   int
	received chan struct{}
}

func newSeqStream() *seqStream { return &seqStream{received: make(chan struct{}, 1)} }

func (s *seqStream) handlers() wsgate.Handlers {
	return wsgate.Handlers{
		Message: func(data json.RawMessage, info wsgate.MessageInfo) {
			var d struct{ Seq int }
			json.Unmarshal(data, &d)
			s.mu.Lock()
			s.seqs = append(s.seqs, d.Seq)
			s.offsets = append(s.offsets, info.Offset)
			s.mu.Unlock()
			select {
			case s.received <- struct{}{}:
			default:
			}
		},
		Subscribed: func(i wsgate.SubscribedInfo) { s.mu.Lock(); s.subs = append(s.subs, i); s.mu.Unlock() },
		Reset:      func(wsgate.Position) { s.mu.Lock(); s.resets++; s.mu.Unlock() },
	}
}

func (s *seqStream) count() int { s.mu.Lock(); defer s.mu.Unlock(); return len(s.seqs) }

// waitCount waits until n messages arrived.
func (s *seqStream) waitCount(t testing.TB, n int, within time.Duration) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for s.count() < n {
		select {
		case <-s.received:
		case <-deadline.C:
			t.Fatalf("%d messages within %v, want %d", s.count(), within, n)
		}
	}
}

// TestGoClientGatewayKilled: two gateways share one Redis; the Go client
// is on B, a numbered stream is published through POST /publish on A.
// B is killed with -9 mid-stream and started again on the same port; the
// client comes back to it, resubscribes with since, and ends with every
// message exactly once and in order, its recovery complete.
func TestGoClientGatewayKilled(t *testing.T) {
	rs := startRedis(t)
	global := historyGlobal("\t\tbroker redis " + rs.url())
	a := startGatewayWith(t, global, nil, roomsSite(""))
	b := startGatewayWith(t, global, nil, roomsSite(""))
	const total, channel = 1500, "chaos:goclient"

	ev := newEventLog()
	c := wsgate.New(b.url("/ws"), wsgate.Options{Header: http.Header{"Origin": {b.origin()}},
		MinReconnectDelay: 200 * time.Millisecond, MaxReconnectDelay: time.Second, OnEvent: ev.add})
	defer c.Close()
	if err := c.Connect(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := newSeqStream()
	if _, err := c.Subscribe(ctxT(t, 10*time.Second), channel, st.handlers(), wsgate.SubscribeOptions{}); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	pubDone := make(chan error, 1)
	go func() {
		tick := time.NewTicker(4 * time.Millisecond)
		defer tick.Stop()
		for seq := 1; seq <= total; seq++ {
			select {
			case <-ctx.Done():
				pubDone <- ctx.Err()
				return
			case <-tick.C:
			}
			body := fmt.Sprintf(`{"channel":%q,"data":{"seq":%d},"idempotency_key":"go-%d"}`, channel, seq, seq)
			if status, resp, err := httpPost(a, body); err != nil || status != http.StatusOK {
				pubDone <- fmt.Errorf("publish %d: %d %s %v", seq, status, resp, err)
				return
			}
		}
		pubDone <- nil
	}()

	st.waitCount(t, 300, 30*time.Second)
	killedAt := st.count()
	b.terminate(syscall.SIGKILL, 10*time.Second)
	killed := time.Now()
	ev.waitFor(t, wsgate.EventDisconnected, 1, 10*time.Second)
	startGatewayFull(t, b.port, global, nil, roomsSite(""))
	b2Ready := time.Now()
	back := ev.waitFor(t, wsgate.EventConnected, 2, 30*time.Second)
	t.Logf("killed B after %d messages; B ready again %v after the kill; the client reconnected %v after the kill",
		killedAt, b2Ready.Sub(killed).Round(time.Millisecond), back.at.Sub(killed).Round(time.Millisecond))
	if err := <-pubDone; err != nil {
		t.Fatal(err)
	}
	st.waitCount(t, total, 30*time.Second)

	st.mu.Lock()
	defer st.mu.Unlock()
	for i, seq := range st.seqs {
		if seq != i+1 {
			t.Fatalf("message %d is seq %d (want every one once, in order); around it: %v", i, seq, st.seqs[max(0, i-3):min(len(st.seqs), i+4)])
		}
		if i > 0 && st.offsets[i] != st.offsets[i-1]+1 {
			t.Fatalf("offset %d after %d", st.offsets[i], st.offsets[i-1])
		}
	}
	if len(st.seqs) != total {
		t.Fatalf("%d messages, want %d", len(st.seqs), total)
	}
	if len(st.subs) < 2 || !st.subs[0].First {
		t.Fatalf("subscribed events %+v, want the first and a resubscribe", st.subs)
	}
	for _, s := range st.subs[1:] {
		if !s.Recovered {
			t.Fatalf("resubscribe %+v not recovered", s)
		}
	}
	if st.resets != 0 {
		t.Fatalf("%d resets", st.resets)
	}
	t.Logf("%d messages once and in order across the kill; %d resubscribes, all recovered: true; %d reconnects",
		len(st.seqs), len(st.subs)-1, len(ev.of(wsgate.EventConnected))-1)
}

// TestGoClientLivenessFrozenPath: the path between client and gateway goes
// silent (a proxy stops forwarding without closing anything); the client
// notices within livenessInterval + livenessTimeout, and comes back on a
// new connection.
func TestGoClientLivenessFrozenPath(t *testing.T) {
	g := startGateway(t, roomsSite(""))
	px := startProxy(t, g.addr())
	const interval, timeout = time.Second, 500 * time.Millisecond
	ev := newEventLog()
	c := wsgate.New("ws://"+px.addr()+"/ws", wsgate.Options{Header: http.Header{"Origin": {"http://" + px.addr()}},
		LivenessInterval: interval, LivenessTimeout: timeout, MinReconnectDelay: 100 * time.Millisecond, OnEvent: ev.add})
	defer c.Close()
	if err := c.Connect(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := newSeqStream()
	if _, err := c.Subscribe(ctxT(t, 10*time.Second), "room:live", st.handlers(), wsgate.SubscribeOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(ctxT(t, 10*time.Second), "room:live", map[string]int{"seq": 1}); err != nil {
		t.Fatal(err)
	}
	st.waitCount(t, 1, 10*time.Second)

	px.freeze()
	frozen := time.Now()
	d := ev.waitFor(t, wsgate.EventDisconnected, 1, 10*time.Second)
	took := d.at.Sub(frozen)
	t.Logf("frozen path noticed after %v (livenessInterval %v + livenessTimeout %v); close %d %q", took.Round(time.Millisecond), interval, timeout, d.Code, d.Reason)
	if d.Code != wsgate.CloseLivenessTimeout || d.Reason != "liveness timeout" || !d.WillReconnect {
		t.Fatalf("disconnected %+v, want 4000 liveness timeout", d.Event)
	}
	if slack := 300 * time.Millisecond; took > interval+timeout+slack {
		t.Fatalf("noticed after %v, want within %v", took, interval+timeout+slack)
	}
	ev.waitFor(t, wsgate.EventConnected, 2, 10*time.Second)
	if err := c.Publish(ctxT(t, 10*time.Second), "room:live", map[string]int{"seq": 2}); err != nil {
		t.Fatal(err)
	}
	st.waitCount(t, 2, 10*time.Second)
}

// TestGoClientTokenRefresh: the client's token expires 4 s after it is
// issued; with refreshBefore 2 s the client sends a new one in band, and
// the connection outlives the first token without a disconnect.
func TestGoClientTokenRefresh(t *testing.T) {
	k := newKeys(t)
	g := startGateway(t, roomsSite(fmt.Sprintf("\t\t\tjwt {\n\t\t\t\tsecret %s\n\t\t\t\tfrom protocol bearer\n\t\t\t}", k.hmac)))
	var mu sync.Mutex
	var exps []time.Time
	issued := make(chan time.Time, 64)
	token := func(context.Context) (string, error) {
		now := time.Now()
		exp := now.Add(4 * time.Second).Truncate(time.Second)
		mu.Lock()
		exps = append(exps, exp)
		mu.Unlock()
		select {
		case issued <- now:
		default:
		}
		return k.sign(t, "HS256", "", claims("", "u1", "exp", exp.Unix())), nil
	}
	ev := newEventLog()
	c := wsgate.New(g.url("/ws"), wsgate.Options{Header: http.Header{"Origin": {g.origin()}}, Token: token,
		RefreshBefore: 2 * time.Second, OnEvent: ev.add})
	defer c.Close()
	if err := c.Connect(ctxT(t, 10*time.Second)); err != nil {
		t.Fatal(err)
	}
	st := newSeqStream()
	if _, err := c.Subscribe(ctxT(t, 10*time.Second), "room:tok", st.handlers(), wsgate.SubscribeOptions{}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	first := exps[0]
	mu.Unlock()
	// The gateway closes an expired connection within a second of exp: wait
	// for a refresh made 1.5 s past the first token's exp (tokens are
	// refreshed every 2 s or so), then use the connection.
	deadline := time.After(15 * time.Second)
	for past := false; !past; {
		select {
		case at := <-issued:
			past = at.After(first.Add(1500 * time.Millisecond))
		case <-deadline:
			t.Fatalf("no token asked for 1.5 s past the first one's exp (%s)", first.Format("15:04:05.000"))
		}
	}
	if err := c.Publish(ctxT(t, 10*time.Second), "room:tok", map[string]int{"seq": 1}); err != nil {
		t.Fatal(err)
	}
	st.waitCount(t, 1, 10*time.Second)
	mu.Lock()
	n := len(exps)
	mu.Unlock()
	if d := ev.of(wsgate.EventDisconnected); len(d) > 0 {
		t.Fatalf("disconnected: %+v", d[0].Event)
	}
	if len(ev.of(wsgate.EventConnected)) != 1 || c.State() != wsgate.Connected {
		t.Fatalf("connected %d times, state %v", len(ev.of(wsgate.EventConnected)), c.State())
	}
	if n < 2 {
		t.Fatalf("token asked %d times, want a refresh", n)
	}
	t.Logf("first token expired at %s; %d tokens issued; one connection throughout, alive %v after the first exp",
		first.Format("15:04:05"), n, time.Since(first).Round(time.Millisecond))
}

// TestGoClientReconnectStorm: 2,000 clients on one gateway, each subscribed
// to one of 50 channels; the gateway is stopped (SIGTERM: 1001 to all) and
// started again on the same port. All are back and resubscribed within
// 2·minReconnectDelay of the gateway being ready again, and the rate of
// connection attempts stays within what full jitter promises.
func TestGoClientReconnectStorm(t *testing.T) {
	if testing.Short() {
		t.Skip("2,000 clients")
	}
	const n = 2000
	const minDelay = 2 * time.Second
	site := roomsSite("")
	g := startGateway(t, site)
	// The proxy stands for the gateway's listening socket: it stays up while
	// the gateway restarts, so it counts every attempt, those that find the
	// gateway down included.
	px := startProxy(t, g.addr())
	goroutines := runtime.NumGoroutine()

	var resubscribed atomic.Int64
	var storming atomic.Bool
	tries := make([]atomic.Int32, n) // connection attempts after the stop, per client
	clients := make([]*wsgate.Client, n)
	resubs := make([]atomic.Bool, n)
	var wg sync.WaitGroup
	sem := make(chan struct{}, 50)
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c := wsgate.New("ws://"+px.addr()+"/ws", wsgate.Options{Header: http.Header{"Origin": {"http://" + px.addr()}},
				MinReconnectDelay: minDelay, MaxReconnectDelay: 20 * time.Second, LivenessInterval: 30 * time.Second,
				OnEvent: func(e wsgate.Event) {
					if e.Type == wsgate.EventConnecting && storming.Load() {
						tries[i].Add(1)
					}
				}})
			clients[i] = c
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			if err := c.Connect(ctx); err != nil {
				errs <- err
				return
			}
			_, err := c.Subscribe(ctx, fmt.Sprintf("storm:%d", i%50), wsgate.Handlers{Subscribed: func(si wsgate.SubscribedInfo) {
				if !si.First && !resubs[i].Swap(true) {
					resubscribed.Add(1)
				}
			}}, wsgate.SubscribeOptions{})
			if err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, c := range clients {
			if c != nil {
				c.Close()
			}
		}
	}()
	close(errs)
	for err := range errs {
		t.Fatalf("connecting the clients: %v", err)
	}
	before := len(px.acceptTimes())
	t.Logf("%d clients connected and subscribed; gateway open files %d", n, g.openFiles())

	storming.Store(true)
	lag := startLagProbe()
	stopped := time.Now()
	g.terminate(syscall.SIGTERM, 30*time.Second)
	t.Logf("the gateway exited %v after SIGTERM", time.Since(stopped).Round(time.Millisecond))
	g2 := startGatewayFull(t, g.port, "", nil, site)
	ready := time.Now()
	down := ready.Sub(stopped)
	// The k-th attempt after the disconnect comes within (2^k − 1)·min; a
	// client needs a 4th only if its first three all fell in the outage,
	// which for an outage D < min/2 has odds below (D/min)³/(3!·2³) ≈ 3·10⁻⁴
	// each. So all are back within 15·min (the README's promise), plus
	// the time to handshake and resubscribe.
	deadline := stopped.Add(15*minDelay + 3*time.Second)
	for resubscribed.Load() < n {
		if time.Now().After(deadline) {
			states := map[string]int{}
			for i, c := range clients {
				if !resubs[i].Load() {
					states[c.State().String()]++
				}
			}
			t.Fatalf("%d of %d clients resubscribed by %v after the gateway was ready (%v after the stop); the others: %v", resubscribed.Load(), n, time.Since(ready).Round(time.Millisecond), down.Round(time.Millisecond), states)
		}
		pollPause()
	}
	allBack := time.Since(ready)
	stall := lag.stop()
	var perTries [8]int
	for i := range tries {
		perTries[min(int(tries[i].Load()), 7)]++
	}

	attempts := px.acceptTimes()[before:]
	const bucket = 100 * time.Millisecond
	var hist []int
	for _, at := range attempts {
		i := int(at.Sub(stopped) / bucket)
		for len(hist) <= i {
			hist = append(hist, 0)
		}
		hist[i]++
	}
	peak := 0
	var b strings.Builder
	for i, k := range hist {
		peak = max(peak, k)
		fmt.Fprintf(&b, "\n  %5.1fs %4d %s", float64(i)*bucket.Seconds(), k, strings.Repeat("#", k/4))
	}
	// The bound: first attempts are uniform over [0, min), N/min per second,
	// so N·0.1s/min per bucket. Those that found the gateway down (the first
	// D/min of them) try again uniformly over the next 2·min, adding at most
	// (N·D/min)/(2·min) per second. Per bucket the count is binomial with
	// p = mean/N; allow mean + 5σ (over ~50 buckets, a false alarm has
	// odds of about 1 in 10⁵). The attempts are stamped by the kernel, but
	// the clients' timers run in this process, on the same cores as 2,000
	// clients handling their closes: while it is stalled, due timers wait
	// and then fire together, so a bucket can hold the attempts due in
	// 100 ms plus the longest stall, which the probe measures.
	rate := float64(n) / minDelay.Seconds() * (1 + down.Seconds()/(2*minDelay.Seconds()))
	mean := rate * (bucket + stall).Seconds()
	p := mean / n
	limit := mean + 5*math.Sqrt(n*p*(1-p))
	t.Logf("gateway down %v; %d connection attempts after the stop, per 100 ms:%s", down.Round(time.Millisecond), len(attempts), b.String())
	t.Logf("peak %d per 100 ms; bound %.0f (mean %.1f over 100 ms + the longest stall of this process, %v, + 5σ); all %d resubscribed %v after the gateway was ready; clients by attempts needed (0..7): %v",
		peak, limit, mean, stall.Round(time.Millisecond), n, allBack.Round(time.Millisecond), perTries)
	if float64(peak) > limit {
		t.Fatalf("peak of %d attempts in 100 ms, over the bound %.0f", peak, limit)
	}
	if len(attempts) < n {
		t.Fatalf("%d attempts, fewer than the %d clients", len(attempts), n)
	}
	_ = g2

	// Every goroutine of the clients ends with Close.
	var cwg sync.WaitGroup
	for _, c := range clients {
		cwg.Go(func() { c.Close() })
	}
	cwg.Wait()
	px.close()
	// A few goroutines of the test's own come and go (the restarted
	// gateway's process watchers); 2,000 clients leaking would be thousands.
	eventually(t, 10*time.Second, "the clients' goroutines gone", func() bool { return runtime.NumGoroutine() <= goroutines+10 })
	t.Logf("goroutines: %d before the clients, %d after Close", goroutines, runtime.NumGoroutine())
}
