package proxy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestRateLimitClose(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Client.Rate = &RateLimit{Messages: 1, MessageBurst: 2}
	})
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	ctx := context.Background()
	// The burst of 2 passes; each echo is awaited so that nothing is in
	// flight when the third message closes the connection.
	for i := 0; i < 2; i++ {
		c.Write(ctx, websocket.MessageText, []byte("ok"))
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
	}
	c.Write(ctx, websocket.MessageText, []byte("one too many"))
	_, _, err := c.Read(ctx)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusPolicyViolation || ce.Reason != "rate limit exceeded" {
		t.Fatalf("read: %v, want close 1008 \"rate limit exceeded\"", err)
	}
	if code, reason := uc.closeCode(t); code != websocket.StatusPolicyViolation || reason != "rate limit exceeded" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
	for i := 0; i < 2; i++ {
		uc.nextMsg(t)
	}
	if len(uc.msgs) != 0 {
		t.Fatal("the message over the limit reached the upstream")
	}
}

func TestRateLimitBytesClose(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Client.Rate = &RateLimit{Bytes: 100}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(cf(opBinary, make([]byte, 60)))
	if got := uc.nextMsg(t); len(got.data) != 60 {
		t.Fatalf("upstream got %d bytes", len(got.data))
	}
	clock.Advance(200 * time.Millisecond) // 20 bytes back: 60 in the bucket
	rc.write(cf(opBinary, make([]byte, 60)))
	if got := uc.nextMsg(t); len(got.data) != 60 {
		t.Fatalf("upstream got %d bytes", len(got.data))
	}
	rc.write(cf(opBinary, make([]byte, 1)))
	if code, reason, _ := rc.readClose(); code != 1008 || reason != "rate limit exceeded" {
		t.Fatalf("close %d %q", code, reason)
	}
}

// TestRateLimitDrop: a message over the limit never reaches the upstream
// (none of its fragments), while later ones do; control frames count too.
func TestRateLimitDrop(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	stats := NewStats()
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Stats = stats
		c.Client.Rate = &RateLimit{Messages: 1, OnExceed: ExceedDrop}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	for i := 0; i < 3; i++ {
		m := fmt.Sprintf("m%d", i)
		rc.write(cf(opText, []byte(m)), cf(opText, []byte("dropped")))
		// A fragmented message over the limit, bad UTF-8 and all: its
		// frames are skipped unread.
		rc.write(cfrag(opText, []byte("drop")), cfrag(opCont, []byte("\xff")), cf(opCont, []byte("ped")))
		rc.write(cf(opPing, []byte("dropped ping")))
		if got := uc.nextMsg(t); string(got.data) != m {
			t.Fatalf("upstream got %q, want %q", got.data, m)
		}
		if f := rc.readData(); string(f.payload) != m {
			t.Fatalf("client got %q back, want %q", f.payload, m)
		}
		// Wait until the three after it have been dropped before time
		// moves on.
		want := uint64(3 * (i + 1))
		poll(t, "the limiter to drop three", func() bool { return stats.Snapshot().RateLimited[0][ExceedDrop] >= want })
		clock.Advance(time.Second)
	}
	rc.write(cf(opText, []byte("last")))
	if got := uc.nextMsg(t); string(got.data) != "last" {
		t.Fatalf("upstream got %q, want \"last\"", got.data)
	}
	select {
	case p := <-uc.pings:
		t.Fatalf("upstream got ping %q", p)
	default:
	}
}

// TestRateLimitDropBytes: with a byte rate, frames over the bucket are
// dropped whole; an empty ping costs nothing and marks where the dropped
// frames end.
func TestRateLimitDropBytes(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Client.Rate = &RateLimit{Bytes: 10, OnExceed: ExceedDrop}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	for i := 0; i < 3; i++ {
		m := fmt.Sprintf("message %d", i) // 9 bytes
		rc.write(cf(opText, []byte(m)), cf(opText, []byte("dropped")),
			cfrag(opText, []byte("dro")), cf(opCont, []byte("pped")), cf(opPing, nil))
		if got := uc.nextMsg(t); string(got.data) != m {
			t.Fatalf("upstream got %q, want %q", got.data, m)
		}
		select {
		case <-uc.pings:
		case <-time.After(waitFor):
			t.Fatal("the empty ping did not reach the upstream")
		}
		clock.Advance(time.Second)
	}
	if len(uc.msgs) != 0 {
		t.Fatalf("upstream got %d messages over the limit", len(uc.msgs))
	}
}

// TestRateLimitThrottle: messages over the limit are delayed, not lost.
// It uses the real clock and a short rate.
func TestRateLimitThrottle(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Client.Rate = &RateLimit{Messages: 20, MessageBurst: 1, OnExceed: ExceedThrottle}
	})
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	ctx := context.Background()
	start := time.Now()
	const n = 5
	for i := 0; i < n; i++ {
		if err := c.Write(ctx, websocket.MessageText, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < n; i++ {
		if got := uc.nextMsg(t); string(got.data) != fmt.Sprint(i) {
			t.Fatalf("message %d: %q", i, got.data)
		}
	}
	// 4 messages beyond the burst at 20/s: at least 200ms (some slack).
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("5 messages passed in %v: not throttled", d)
	}
	for i := 0; i < n; i++ {
		if _, _, err := c.Read(ctx); err != nil {
			t.Fatal(err)
		}
	}
}

// TestRateLimitThrottleShutdown: a reader held back by a throttle (here
// for 100 s) lets go as soon as the connection starts closing.
func TestRateLimitThrottleShutdown(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Client.Rate = &RateLimit{Messages: 0.01, MessageBurst: 1, OnExceed: ExceedThrottle}
		c.CloseTimeout = 500 * time.Millisecond
	})
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	ctx := context.Background()
	for i := range 2 {
		if err := c.Write(ctx, websocket.MessageText, []byte(fmt.Sprint(i))); err != nil {
			t.Fatal(err)
		}
	}
	if got := uc.nextMsg(t); string(got.data) != "0" {
		t.Fatalf("first message: %q", got.data)
	}
	// The second one waits for its token; shut down meanwhile.
	start := time.Now()
	if !tg.g.Registry().Shutdown(waitFor) {
		t.Fatal("Shutdown timed out")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Shutdown took %v: the throttled reader did not let go", d)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusGoingAway {
		t.Fatalf("upstream close %d, want 1001", code)
	}
}

// TestRateLimitUpstream: the upstream's limits apply to the upstream; a
// breach closes the upstream with 1008 and the client with 1011.
func TestRateLimitUpstream(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, func(uc *upConn) error {
		ctx := context.Background()
		for i := 0; i < 2; i++ {
			uc.c.Write(ctx, websocket.MessageText, []byte("news"))
		}
		_, _, err := uc.c.Read(ctx)
		return err
	})
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Upstream.Rate = &RateLimit{Messages: 1}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	code, reason, data := rc.readClose()
	if code != 1011 || len(data) != 1 {
		t.Fatalf("client close %d %q after %d messages, want 1011 after 1", code, reason, len(data))
	}
	if code, reason := uc.closeCode(t); code != websocket.StatusPolicyViolation {
		t.Fatalf("upstream close %d %q, want 1008", code, reason)
	}
}

// TestOwnPongNotCounted: the client's answer to the gateway's own ping is
// the gateway's business, not a message of the client's: it does not use
// the client's message budget.
func TestOwnPongNotCounted(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Client.Rate = &RateLimit{Messages: 1, MessageBurst: 1}
		c.PingInterval = 50 * time.Millisecond
		c.PongTimeout = time.Second
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	f, err := rc.read()
	if err != nil || f.op != opPing {
		t.Fatalf("op %d (%v), want the gateway's ping", f.op, err)
	}
	rc.write(cf(opPong, f.payload), cf(opText, []byte("the one message")))
	if got := uc.nextMsg(t); string(got.data) != "the one message" {
		t.Fatalf("upstream got %q", got.data)
	}
	select {
	case p := <-uc.pongs:
		t.Fatalf("the gateway forwarded its own pong %x", p)
	default:
	}
}

// TestRefreshIsLimited: an in-band refresh is a client message like any
// other: it counts against the rate limit and max_message, so a client
// cannot have the gateway check signatures without bound.
func TestRefreshIsLimited(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	var checks atomic.Int64
	cfg := Config{Upstreams: []string{up.url}, Now: clock.Now, PingInterval: -1,
		Client: Limits{MaxMessage: 100, Rate: &RateLimit{Messages: 1, MessageBurst: 1}}}
	tg := startGatewayInfo(t, up.url, func(c *Config) { *c = cfg }, func() RequestInfo {
		return RequestInfo{
			Expiry:       clock.Now().Add(time.Hour),
			RefreshField: "refresh",
			Refresh: func(token string) (time.Time, error) {
				checks.Add(1)
				return clock.Now().Add(2 * time.Hour), nil
			},
		}
	})
	t.Run("rate", func(t *testing.T) {
		checks.Store(0)
		rc := dialRaw(t, tg.addr(), nil)
		up.next(t)
		rc.write(cf(opText, []byte(`{"refresh":"t1"}`)), cf(opText, []byte(`{"refresh":"t2"}`)))
		if code, reason, _ := rc.readClose(); code != 1008 || reason != "rate limit exceeded" {
			t.Fatalf("close %d %q, want 1008 rate limit exceeded", code, reason)
		}
		if n := checks.Load(); n != 1 {
			t.Fatalf("%d refresh tokens checked, want 1", n)
		}
	})
	t.Run("size", func(t *testing.T) {
		checks.Store(0)
		clock.Advance(time.Second)
		rc := dialRaw(t, tg.addr(), nil)
		up.next(t)
		rc.write(cf(opText, []byte(`{"refresh":"`+strings.Repeat("x", 100)+`"}`)))
		if code, reason, _ := rc.readClose(); code != 1009 {
			t.Fatalf("close %d %q, want 1009", code, reason)
		}
		if n := checks.Load(); n != 0 {
			t.Fatalf("%d refresh tokens checked, want 0", n)
		}
	})
}
