package wsgate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/golang-jwt/jwt/v5"
)

func TestBackoffBoundsAndJitter(t *testing.T) {
	const minD, maxD = int64(500 * time.Millisecond), int64(20 * time.Second)
	// The cap doubles per attempt up to max; the delay is below it.
	wantCap := []int64{minD, 2 * minD, 4 * minD, 8 * minD, 16 * minD, 32 * minD, maxD, maxD, maxD}
	for n, capd := range wantCap {
		if d := backoff(n, minD, maxD, func() float64 { return 0 }); d != 0 {
			t.Errorf("attempt %d with rand 0: %v, want 0", n, time.Duration(d))
		}
		hi := backoff(n, minD, maxD, func() float64 { return math.Nextafter(1, 0) })
		if hi >= capd || hi < capd-capd/1000 {
			t.Errorf("attempt %d with rand ~1: %v, want just below %v", n, time.Duration(hi), time.Duration(capd))
		}
	}
	if d := backoff(1000, minD, maxD, func() float64 { return 0.5 }); d != maxD/2 {
		t.Errorf("attempt 1000: %v, want half of max", time.Duration(d))
	}
	// Full jitter: the first delays of 10,000 clients fill [0, min) evenly.
	// Each tenth holds 1,000 on average (σ = 30); allow 5σ.
	r := rand.New(rand.NewPCG(1, 2))
	var deciles [10]int
	var sum float64
	const n = 10000
	for range n {
		d := backoff(0, minD, maxD, r.Float64)
		if d < 0 || d >= minD {
			t.Fatalf("first delay %v outside [0, %v)", time.Duration(d), time.Duration(minD))
		}
		deciles[d*10/minD]++
		sum += float64(d)
	}
	for i, k := range deciles {
		if k < 850 || k > 1150 {
			t.Errorf("tenth %d of [0, min) holds %d of %d delays, want 1000±150: %v", i, k, n, deciles)
		}
	}
	if mean := sum / n; math.Abs(mean-float64(minD)/2) > float64(minD)*0.03 {
		t.Errorf("mean first delay %v, want about %v", time.Duration(mean), time.Duration(minD/2))
	}
}

func TestTerminalAndRetryableCloses(t *testing.T) {
	for _, tc := range []struct {
		code      int // 1006: the TCP connection drops without a close frame
		reason    string
		reconnect bool
	}{
		{1002, "protocol error", false},
		{1003, "unsupported", false},
		{1007, "invalid UTF-8 in text message", false},
		{1009, "message too big", false},
		{1010, "extension", false},
		{1008, "forbidden", false},
		{1008, "invalid token", false},
		{1008, "token expired", true},
		{1001, "server shutting down", true},
		{1006, "", true},
		{1011, "internal", true},
		{1012, "restart", true},
		{1013, "slow consumer", true},
		{1014, "bad gateway", true},
	} {
		t.Run(fmt.Sprintf("%d %s", tc.code, tc.reason), func(t *testing.T) {
			noLeaks(t)
			fs := newFakeServer(t)
			tokens := 0
			c, clk, ev := newTestClient(t, fs, Options{Token: func(context.Context) (string, error) {
				tokens++
				return fmt.Sprintf("tok-%d", tokens), nil
			}})
			if err := c.Connect(context.Background()); err != nil {
				t.Fatal(err)
			}
			fc := fs.accept()
			if fc.token != "tok-1" {
				t.Fatalf("token %q at the handshake", fc.token)
			}
			if tc.code == 1006 {
				fc.c.CloseNow()
			} else {
				fc.c.Close(websocket.StatusCode(tc.code), tc.reason)
			}
			d := ev.until(t, EventDisconnected)
			if d.Code != tc.code || d.Reason != tc.reason || d.WillReconnect != tc.reconnect {
				t.Fatalf("disconnected %+v, want code %d reason %q willReconnect %v", d, tc.code, tc.reason, tc.reconnect)
			}
			if !tc.reconnect {
				if st := c.State(); st != Closed {
					t.Fatalf("state %v after a terminal close", st)
				}
				var ce *CloseError
				if err := c.Publish(context.Background(), "a", 1); !errors.As(err, &ce) || ce.Code != tc.code {
					t.Fatalf("publish after a terminal close: %v", err)
				}
				if err := c.Connect(context.Background()); !errors.As(err, &ce) {
					t.Fatalf("connect after a terminal close: %v", err)
				}
				return
			}
			// The first reconnect waits rand·min = 250 ms on the fake clock.
			clk.waitTimer(t, clk.Now().Add(250*time.Millisecond))
			clk.Advance(250 * time.Millisecond)
			fc2 := fs.accept()
			if fc2.token != "tok-2" {
				t.Fatalf("reconnected with token %q, want a fresh one", fc2.token)
			}
			if err := c.Connect(context.Background()); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestReconnectBackoffGrows(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{MinReconnectDelay: time.Second, MaxReconnectDelay: 5 * time.Second})
	c.Connect(context.Background())
	fc := fs.accept()
	fs.srv.Config.Handler = http.NotFoundHandler() // later handshakes fail
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	// rand 0.5: the delays are half of 1, 2, 4, 5, 5 s.
	for _, d := range []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 2500 * time.Millisecond, 2500 * time.Millisecond} {
		clk.waitTimer(t, clk.Now().Add(d))
		clk.Advance(d)
		e := ev.until(t, EventDisconnected)
		if e.Err == nil || !e.WillReconnect {
			t.Fatalf("failed handshake: %+v", e)
		}
	}
}

func TestQueueLimitAndOrder(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, _, _ := newTestClient(t, fs, Options{QueueSize: 3})
	queued := func() int { c.mu.Lock(); defer c.mu.Unlock(); return len(c.queue) }
	type res struct {
		i   int
		err error
	}
	results := make(chan res, 10)
	publish := func(ctx context.Context, i int) {
		go func() { results <- res{i, c.Publish(ctx, "room", i)} }()
		eventually(t, fmt.Sprintf("publish %d queued", i), func() bool {
			c.mu.Lock()
			defer c.mu.Unlock()
			return len(c.queue) > 0 && string(c.queue[len(c.queue)-1].req.Data) == fmt.Sprint(i)
		})
	}
	publish(context.Background(), 1)
	ctx2, cancel2 := context.WithCancel(context.Background())
	publish(ctx2, 2)
	publish(context.Background(), 3)
	if err := c.Publish(context.Background(), "room", 4); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("publish beyond QueueSize: %v, want ErrQueueFull at once", err)
	}
	// A publish whose context ends leaves the queue, making room.
	cancel2()
	if r := <-results; r.i != 2 || !errors.Is(r.err, context.Canceled) {
		t.Fatalf("cancelled publish: %+v", r)
	}
	eventually(t, "the cancelled publish gone", func() bool { return queued() == 2 })
	publish(context.Background(), 5)

	if err := c.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	fc := fs.accept()
	var reqs []map[string]any
	for _, want := range []float64{1, 3, 5} {
		r := fc.expect("publish")
		if r["data"] != want || r["channel"] != "room" {
			t.Fatalf("flushed %v, want data %v (in order)", r, want)
		}
		reqs = append(reqs, r)
	}
	fc.reply(reqs[0])
	fc.replyError(reqs[1], "rate_limited")
	fc.reply(reqs[2])
	got := map[int]error{}
	for range 3 {
		r := <-results
		got[r.i] = r.err
	}
	var ge *Error
	if got[1] != nil || got[5] != nil || !errors.As(got[3], &ge) || ge.Code != "rate_limited" {
		t.Fatalf("results %v: want 1 and 5 ok, 3 rate_limited", got)
	}
	// Connected: a publish goes at once, and a lost connection fails the one in flight.
	go func() { results <- res{6, c.Publish(context.Background(), "room", 6)} }()
	fc.expect("publish")
	fc.c.CloseNow()
	if r := <-results; !errors.Is(r.err, ErrConnectionLost) {
		t.Fatalf("publish in flight when the connection dropped: %v", r.err)
	}
}

func signedToken(t *testing.T, exp time.Time, n int) string {
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{"sub": "u", "exp": exp.Unix(), "n": n}).SignedString([]byte("k"))
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func TestTokenRefreshTiming(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	clk0 := newFakeClock().Now()
	exps := []time.Time{clk0.Add(60 * time.Second), clk0.Add(40 * time.Second), clk0.Add(100 * time.Second), clk0.Add(200 * time.Second)}
	issued := make(chan string, 10)
	n := 0
	c, clk, ev := newTestClient(t, fs, Options{RefreshBefore: 30 * time.Second, Token: func(context.Context) (string, error) {
		tok := signedToken(t, exps[n], n)
		n++
		issued <- tok
		return tok, nil
	}})
	if err := c.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	fc := fs.accept()
	if fc.token != <-issued {
		t.Fatal("handshake without the token")
	}
	// exp in 60 s, refresh 30 s before it.
	clk.waitTimer(t, clk0.Add(30*time.Second))
	clk.Advance(30 * time.Second)
	r := fc.expect("refresh")
	if r["token"] != <-issued {
		t.Fatalf("refresh %v without the new token", r)
	}
	fc.reply(r)
	// The new token lives 10 s more: refreshed halfway, at 35 s, not at once.
	clk.waitTimer(t, clk0.Add(35*time.Second))
	clk.Advance(5 * time.Second)
	r = fc.expect("refresh")
	<-issued
	// A refused refresh ends the connection; the client comes back with a fresh token.
	fc.replyError(r, "forbidden")
	if e := ev.until(t, EventError); !errors.As(e.Err, new(*Error)) {
		t.Fatalf("error event %+v", e)
	}
	d := ev.until(t, EventDisconnected)
	if !d.WillReconnect || d.Code != CloseRefreshFailed || d.Reason != "token refresh failed" {
		t.Fatalf("disconnected %+v", d)
	}
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc2 := fs.accept()
	if fc2.token != <-issued {
		t.Fatal("reconnected without a fresh token")
	}
	// Nothing but that one disconnect happened.
	for len(ev.ch) > 0 {
		if e := <-ev.ch; e.Type == EventDisconnected {
			t.Fatalf("another disconnect: %+v", e)
		}
	}
}

func TestLiveness(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{LivenessInterval: 10 * time.Second, LivenessTimeout: 5 * time.Second})
	c.Connect(context.Background())
	fc := fs.accept()
	t0 := clk.Now()
	clk.waitTimer(t, t0.Add(10*time.Second))
	clk.Advance(10 * time.Second)
	p := fc.expect("ping")
	fc.reply(p)
	eventually(t, "the pong read", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.cur != nil && c.cur.lastRecv.Load() == clk.Now().UnixNano()
	})
	clk.waitTimer(t, t0.Add(15*time.Second))
	clk.Advance(5 * time.Second) // answered: no disconnect, next check 10 s after the pong
	clk.waitTimer(t, t0.Add(20*time.Second))
	clk.Advance(5 * time.Second)
	fc.expect("ping") // not answered
	clk.waitTimer(t, t0.Add(25*time.Second))
	clk.Advance(5 * time.Second)
	d := ev.until(t, EventDisconnected)
	if d.Code != CloseLivenessTimeout || d.Reason != "liveness timeout" || !d.WillReconnect {
		t.Fatalf("disconnected %+v", d)
	}
	if c.State() == Connected {
		t.Fatal("still connected")
	}
	for len(ev.ch) > 0 {
		if e := <-ev.ch; e.Type == EventDisconnected {
			t.Fatalf("two disconnects: %+v", e)
		}
	}
}

func TestSubscriptionStatesAndRecovery(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{})
	type got struct {
		kind string
		v    any
	}
	gotCh := make(chan got, 100)
	h := Handlers{
		Message:    func(d json.RawMessage, i MessageInfo) { gotCh <- got{"msg", i.Offset} },
		Subscribed: func(i SubscribedInfo) { gotCh <- got{"subscribed", i} },
		Reset:      func(p Position) { gotCh <- got{"reset", p} },
		Error:      func(err error) { gotCh <- got{"error", err} },
	}
	next := func() got {
		t.Helper()
		select {
		case g := <-gotCh:
			return g
		case <-time.After(5 * time.Second):
			t.Fatal("no callback within 5 s")
			return got{}
		}
	}
	c.Connect(context.Background())
	fc := fs.accept()
	subRes := make(chan *Subscription, 1)
	go func() {
		s, err := c.Subscribe(context.Background(), "chat:1", h, SubscribeOptions{})
		if err != nil {
			t.Error(err)
		}
		subRes <- s
	}()
	r := fc.expect("subscribe")
	if r["since"] != nil {
		t.Fatalf("first subscribe with since: %v", r)
	}
	eventually(t, "subscribing", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.subs) == 1 && c.subs[0].state == Subscribing
	})
	fc.reply(r, "epoch", "e1", "offset", 5)
	s := <-subRes
	if g := next(); g.v != (SubscribedInfo{First: true, Epoch: "e1", Offset: 5}) {
		t.Fatalf("subscribed %+v", g)
	}
	if s.State() != Subscribed {
		t.Fatalf("state %v", s.State())
	}
	fc.message("chat:1", 6, "a")
	fc.message("chat:1", 7, "b")
	for _, want := range []uint64{6, 7} {
		if g := next(); g.v != want {
			t.Fatalf("got %+v, want offset %d", g, want)
		}
	}
	// The connection drops: subscribing again, and resubscribed with since.
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	if s.State() != Subscribing {
		t.Fatalf("state %v while disconnected", s.State())
	}
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc = fs.accept()
	r = fc.expect("subscribe")
	since, _ := r["since"].(map[string]any)
	if since["epoch"] != "e1" || since["offset"] != 7.0 {
		t.Fatalf("resubscribe %v, want since e1/7", r)
	}
	fc.reply(r, "epoch", "e1", "offset", 9, "recovered", true)
	// A recovery that overlaps what came live: 7 again is dropped.
	for _, o := range []int{7, 8, 9, 10} {
		fc.message("chat:1", o, o)
	}
	if g := next(); g.v != (SubscribedInfo{Recovered: true, Epoch: "e1", Offset: 9}) {
		t.Fatalf("resubscribed %+v", g)
	}
	for _, want := range []uint64{8, 9, 10} {
		if g := next(); g.v != want {
			t.Fatalf("got %+v, want offset %d", g, want)
		}
	}
	// A reset moves the position.
	fc.send(map[string]any{"op": "reset", "channel": "chat:1", "epoch": "e2", "offset": 3})
	fc.message("chat:1", 4, "x")
	if g := next(); g.v != (Position{"e2", 3}) {
		t.Fatalf("got %+v, want reset", g)
	}
	if g := next(); g.v != uint64(4) {
		t.Fatalf("got %+v after the reset", g)
	}
	// Not recovered: the app is told, and stands at the reply's position.
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc = fs.accept()
	r = fc.expect("subscribe")
	if since, _ := r["since"].(map[string]any); since["epoch"] != "e2" || since["offset"] != 4.0 {
		t.Fatalf("resubscribe %v, want since e2/4", r)
	}
	fc.reply(r, "epoch", "e3", "offset", 50, "recovered", false)
	if g := next(); g.v != (SubscribedInfo{Epoch: "e3", Offset: 50}) {
		t.Fatalf("resubscribed %+v", g)
	}
	if p, _ := s.Position(); p != (Position{"e3", 50}) {
		t.Fatalf("position %v", p)
	}
	// Refused on a resubscribe with forbidden: the subscription ends.
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc = fs.accept()
	fc.replyError(fc.expect("subscribe"), "forbidden")
	if g := next(); g.kind != "error" {
		t.Fatalf("got %+v, want the error", g)
	}
	if s.State() != Unsubscribed {
		t.Fatalf("state %v after forbidden", s.State())
	}
	// A first subscribe refused goes to the caller and leaves nothing.
	go func() {
		r := fc.expect("subscribe")
		fc.replyError(r, "forbidden")
	}()
	if _, err := c.Subscribe(context.Background(), "chat:2", h, SubscribeOptions{}); !errors.As(err, new(*Error)) {
		t.Fatalf("refused subscribe: %v", err)
	}
	c.mu.Lock()
	n := len(c.subs)
	c.mu.Unlock()
	if n != 0 {
		t.Fatalf("%d subscriptions left", n)
	}
}

func TestResubscribeOrderAndUnsubscribe(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{})
	c.Connect(context.Background())
	fc := fs.accept()
	var subs []*Subscription
	for _, ch := range []string{"a", "b", "c"} {
		done := make(chan *Subscription)
		go func() { s, _ := c.Subscribe(context.Background(), ch, Handlers{}, SubscribeOptions{}); done <- s }()
		fc.reply(fc.expect("subscribe"))
		subs = append(subs, <-done)
	}
	if _, err := c.Subscribe(context.Background(), "b", Handlers{}, SubscribeOptions{}); !errors.Is(err, ErrAlreadySubscribed) {
		t.Fatalf("second subscription to b: %v", err)
	}
	go func() { fc.reply(fc.expect("unsubscribe")) }()
	if err := subs[1].Unsubscribe(context.Background()); err != nil {
		t.Fatal(err)
	}
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc = fs.accept()
	for _, want := range []string{"a", "c"} {
		if r := fc.expect("subscribe"); r["channel"] != want {
			t.Fatalf("resubscribed %v, want %s (in order)", r, want)
		}
	}
	// Close ends every subscription and Connect after it fails.
	c.Close()
	if subs[0].State() != Unsubscribed || c.State() != Closed {
		t.Fatalf("after Close: subscription %v, client %v", subs[0].State(), c.State())
	}
	if err := c.Connect(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("Connect after Close: %v", err)
	}
}

func TestRefreshBeforeTokenLifeHalf(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct{ life, before, want time.Duration }{
		{time.Hour, 30 * time.Second, time.Hour - 30*time.Second},
		{60 * time.Second, 30 * time.Second, 30 * time.Second},
		{10 * time.Second, 30 * time.Second, 5 * time.Second},
		{-time.Second, 30 * time.Second, -500 * time.Millisecond},
	} {
		if got := refreshAt(now, now.Add(tc.life), tc.before).Sub(now); got != tc.want {
			t.Errorf("token for %v, refresh %v before: at +%v, want +%v", tc.life, tc.before, got, tc.want)
		}
	}
	tok := signedToken(t, now.Add(time.Hour), 0)
	if exp, ok := tokenExpiry(tok); !ok || !exp.Equal(now.Add(time.Hour)) {
		t.Fatalf("exp %v %v", exp, ok)
	}
	if _, ok := tokenExpiry("not-a-jwt"); ok {
		t.Fatal("exp from an opaque token")
	}
}

func TestUndecodableReplySettlesItsCall(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{MinReconnectDelay: time.Second})
	c.Connect(context.Background())
	fc := fs.accept()
	// A call whose reply has a field of the wrong type fails at once.
	res := make(chan error, 1)
	go func() { _, err := c.PresenceCount(context.Background(), "room"); res <- err }()
	fc.reply(fc.expect("presence_count"), "count", "two")
	select {
	case err := <-res:
		if err == nil || !strings.Contains(err.Error(), "undecodable") {
			t.Fatalf("presence_count with an undecodable reply: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("presence_count still waits after its reply came")
	}
	if e := ev.until(t, EventError); e.Err == nil {
		t.Fatal("no error event")
	}
	// A first subscribe answered so goes to its caller and leaves nothing.
	go func() { fc.reply(fc.expect("subscribe"), "epoch", "e1", "offset", -1) }()
	if _, err := c.Subscribe(context.Background(), "bad", Handlers{}, SubscribeOptions{}); err == nil {
		t.Fatal("first subscribe with an undecodable reply succeeded")
	}
	// A resubscribe answered so is tried again, and then made.
	errs := make(chan error, 10)
	done := make(chan *Subscription)
	go func() {
		s, _ := c.Subscribe(context.Background(), "chat", Handlers{Error: func(err error) { errs <- err }}, SubscribeOptions{})
		done <- s
	}()
	fc.reply(fc.expect("subscribe"))
	s := <-done
	c.mu.Lock()
	n := len(c.byCh)
	c.mu.Unlock()
	if s == nil || n != 1 {
		t.Fatalf("subscription %v, %d channels", s, n)
	}
	fc.c.CloseNow()
	ev.until(t, EventDisconnected)
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc = fs.accept()
	fc.reply(fc.expect("subscribe"), "epoch", "e1", "offset", -1)
	select {
	case err := <-errs:
		if !strings.Contains(err.Error(), "undecodable") {
			t.Fatalf("Error handler got %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no Error handler call for the undecodable resubscribe reply")
	}
	if s.State() != Subscribing {
		t.Fatalf("state %v, want subscribing until the retry", s.State())
	}
	clk.waitTimerWithin(t, time.Second)
	clk.Advance(time.Second)
	fc.reply(fc.expect("subscribe"), "epoch", "e1", "offset", 3)
	eventually(t, "subscribed after the retry", func() bool { return s.State() == Subscribed })
}

func TestSubscribeReturnsWhenItsContextEnds(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, _, _ := newTestClient(t, fs, Options{})
	// Not connected: the subscription waits for a connection, then is gone.
	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() { _, err := c.Subscribe(ctx, "offline", Handlers{}, SubscribeOptions{}); res <- err }()
	eventually(t, "the subscription waiting", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return len(c.subs) == 1 })
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("Subscribe whose context ended: %v", err)
	}
	c.Connect(context.Background())
	fc := fs.accept()
	// Connected to a gateway that never answers: Subscribe returns when
	// ctx ends, and the unsubscribe follows without being waited for.
	ctx, cancel = context.WithCancel(context.Background())
	go func() { _, err := c.Subscribe(ctx, "chat", Handlers{}, SubscribeOptions{}); res <- err }()
	if r := fc.expect("subscribe"); r["channel"] != "chat" {
		t.Fatalf("sent %v, want the subscribe to chat (none to offline)", r)
	}
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Subscribe whose context ended: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Subscribe still waits after its context ended")
	}
	if r := fc.expect("unsubscribe"); r["channel"] != "chat" {
		t.Fatalf("sent %v, want the unsubscribe", r)
	}
	c.mu.Lock()
	n, m := len(c.subs), len(c.byCh)
	c.mu.Unlock()
	if n != 0 || m != 0 {
		t.Fatalf("%d subscriptions, %d channels left", n, m)
	}
}

func TestRefusedResubscribeBacksOff(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, clk, ev := newTestClient(t, fs, Options{MinReconnectDelay: time.Second, MaxReconnectDelay: 3 * time.Second})
	c.Connect(context.Background())
	fc := fs.accept()
	done := make(chan *Subscription)
	go func() { s, _ := c.Subscribe(context.Background(), "chat", Handlers{}, SubscribeOptions{}); done <- s }()
	fc.reply(fc.expect("subscribe"))
	s := <-done
	reconnect := func() {
		t.Helper()
		fc.c.CloseNow()
		ev.until(t, EventDisconnected)
		clk.waitTimerWithin(t, time.Second)
		clk.Advance(time.Second)
		fc = fs.accept()
	}
	// rand 0.5: the delays are half of 1, 2, 3, 3 s, as for reconnects.
	refuse := func(codes []string, delays []time.Duration) {
		t.Helper()
		for i, d := range delays {
			fc.replyError(fc.expect("subscribe"), codes[i%len(codes)])
			clk.waitTimer(t, clk.Now().Add(d))
			if s.State() != Subscribing {
				t.Fatalf("state %v while refused", s.State())
			}
			clk.Advance(d)
		}
	}
	reconnect()
	refuse([]string{"unavailable", "rate_limited"}, []time.Duration{500 * time.Millisecond, time.Second, 1500 * time.Millisecond, 1500 * time.Millisecond})
	fc.reply(fc.expect("subscribe"))
	eventually(t, "subscribed", func() bool { return s.State() == Subscribed })
	// An ok starts the count again.
	reconnect()
	refuse([]string{"unavailable"}, []time.Duration{500 * time.Millisecond})
	fc.reply(fc.expect("subscribe"))
	eventually(t, "subscribed", func() bool { return s.State() == Subscribed })
}

func TestPositionCountsOnlyHandledMessages(t *testing.T) {
	noLeaks(t)
	fs := newFakeServer(t)
	c, _, _ := newTestClient(t, fs, Options{})
	c.Connect(context.Background())
	fc := fs.accept()
	inHandler := make(chan uint64, 10)
	release := make(chan struct{})
	h := Handlers{Message: func(_ json.RawMessage, i MessageInfo) { inHandler <- i.Offset; <-release }}
	done := make(chan *Subscription)
	go func() { s, _ := c.Subscribe(context.Background(), "chat", h, SubscribeOptions{}); done <- s }()
	fc.reply(fc.expect("subscribe"), "epoch", "e1", "offset", 5)
	s := <-done
	eventually(t, "the reply's position", func() bool { p, ok := s.Position(); return ok && p == Position{"e1", 5} })
	for o := 6; o <= 8; o++ {
		fc.message("chat", o, o)
	}
	if o := <-inHandler; o != 6 {
		t.Fatalf("handled %d first", o)
	}
	// 7 and 8 are read but wait for the callback goroutine.
	eventually(t, "8 read", func() bool { c.mu.Lock(); defer c.mu.Unlock(); return s.pos.Offset == 8 })
	if p, _ := s.Position(); p != (Position{"e1", 6}) {
		t.Fatalf("position %v in the handler of 6", p)
	}
	unsub := make(chan error, 1)
	go func() { unsub <- s.Unsubscribe(context.Background()) }()
	fc.reply(fc.expect("unsubscribe"))
	if err := <-unsub; err != nil {
		t.Fatal(err)
	}
	close(release)
	// 7 and 8 are never handled: the position stays where the app was.
	eventually(t, "the queued callbacks run", func() bool {
		c.disp.mu.Lock()
		defer c.disp.mu.Unlock()
		return len(c.disp.q) == 0
	})
	c.Close()
	if p, _ := s.Position(); p != (Position{"e1", 6}) {
		t.Fatalf("position %v, want e1/6: 7 and 8 were never handled", p)
	}
	select {
	case o := <-inHandler:
		t.Fatalf("handled %d after Unsubscribe", o)
	default:
	}
}
