package proxy

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestTokenExpiry: with the gateway's clock injected, a connection whose
// credentials expire is closed with 1008 "token expired" within a second
// of exp; one refreshed in band before then stays open; a bad refresh
// closes with 1008 "invalid token".
func TestTokenExpiry(t *testing.T) {
	up := startUpstream(t, nil, nil)
	clock := newFakeClock() // frozen: the time left is exp minus this clock's now
	cfg := Config{Upstreams: []string{up.url}, Now: clock.Now, PingInterval: -1, CloseTimeout: 2 * time.Second}
	if err := cfg.Prepare(); err != nil {
		t.Fatal(err)
	}
	g := New(cfg, nil, nil)
	const ttl = 400 * time.Millisecond
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.ServeHTTP(w, r, RequestInfo{
			Expiry:       clock.Now().Add(ttl),
			RefreshField: "refresh",
			Refresh: func(token string) (time.Time, error) {
				if token != "fresh-token" {
					return time.Time{}, errors.New("bad token")
				}
				return clock.Now().Add(time.Hour), nil
			},
		})
	}))
	t.Cleanup(func() { srv.Close(); g.Registry().Shutdown(waitFor) })
	tg := &testGateway{g: g, srv: srv}
	ctx := context.Background()

	expiring, _ := dialCoder(t, tg, "/", nil)
	up.next(t)
	refreshed, _ := dialCoder(t, tg, "/", nil)
	upRefreshed := up.next(t)
	badRefresh, _ := dialCoder(t, tg, "/", nil)
	dialed := time.Now()

	refreshed.Write(ctx, websocket.MessageText, []byte(`{"refresh":"fresh-token"}`))
	badRefresh.Write(ctx, websocket.MessageText, []byte(`{"refresh":"forged"}`))

	_, _, err := expiring.Read(ctx)
	closedAfter := time.Since(dialed)
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != websocket.StatusPolicyViolation || ce.Reason != "token expired" {
		t.Fatalf("expiring connection: %v, want 1008 token expired", err)
	}
	if closedAfter < ttl-50*time.Millisecond || closedAfter > ttl+time.Second {
		t.Fatalf("closed %v after the dial, want within a second after exp (%v)", closedAfter, ttl)
	}
	if _, _, err := badRefresh.Read(ctx); !errors.As(err, &ce) || ce.Code != websocket.StatusPolicyViolation || ce.Reason != "invalid token" {
		t.Fatalf("bad refresh: %v, want 1008 invalid token", err)
	}

	// Well past the first exp, the refreshed connection still works, and
	// the refresh message never reached the upstream.
	<-time.After(time.Until(dialed.Add(ttl + 500*time.Millisecond)))
	if err := refreshed.Write(ctx, websocket.MessageText, []byte("still here")); err != nil {
		t.Fatal(err)
	}
	if _, m, err := refreshed.Read(ctx); err != nil || string(m) != "still here" {
		t.Fatalf("refreshed connection: %v %q", err, m)
	}
	if m := upRefreshed.nextMsg(t); string(m.data) != "still here" {
		t.Fatalf("the upstream's first message was %q: the refresh message was forwarded", m.data)
	}
}

// TestSessionExtend: Session.Extend (the rooms protocol's refresh) moves
// the expiry to a later time and refuses one that has already passed,
// leaving the expiry where it was.
func TestSessionExtend(t *testing.T) {
	clock := newFakeClock()
	var sess atomic.Value
	results := make(chan error, 2)
	cfg := Config{Now: clock.Now, PingInterval: -1, CloseTimeout: time.Second}
	tg, sessions := startSession(t, cfg, func(msg []byte, text bool) (Verdict, []byte) {
		d, _ := time.ParseDuration(string(msg))
		results <- sess.Load().(Session).Extend(clock.Now().Add(d))
		return Drop, nil
	})
	rc := dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
	sess.Store(<-sessions)
	rc.write(cf(opText, []byte("-1s")), cf(opText, []byte("1h")))
	if err := <-results; err == nil {
		t.Fatal("Extend accepted a time that has passed")
	}
	if err := <-results; err != nil {
		t.Fatalf("Extend by an hour: %v", err)
	}
}

// TestRefreshExpiredToken: an in-band refresh whose token verifies but has
// already expired (a verifier's leeway lets such tokens through) closes
// the connection with 1008 "token expired" rather than keeping it open.
func TestRefreshExpiredToken(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.Now, c.PingInterval = clock.Now, -1 }, func() RequestInfo {
		return RequestInfo{
			Expiry:       clock.Now().Add(time.Hour),
			RefreshField: "refresh",
			Refresh: func(token string) (time.Time, error) {
				return clock.Now().Add(-time.Second), nil
			},
		}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(cf(opText, []byte(`{"refresh":"stale"}`)))
	if code, reason, _ := rc.readClose(); code != 1008 || reason != "token expired" {
		t.Fatalf("close %d %q, want 1008 token expired", code, reason)
	}
	if code, reason := uc.closeCode(t); code != websocket.StatusPolicyViolation || reason != "token expired" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
}

// TestExpiredAtStart: credentials that expired before the connection
// started (a verifier's leeway lets such tokens through, and the upstream
// dial takes time) close it at once with 1008 "token expired".
func TestExpiredAtStart(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.PingInterval = -1 }, func() RequestInfo {
		return RequestInfo{Expiry: time.Now().Add(-time.Second)}
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	if code, reason, _ := rc.readClose(); code != 1008 || reason != "token expired" {
		t.Fatalf("close %d %q, want 1008 token expired", code, reason)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusPolicyViolation {
		t.Fatalf("upstream close %d", code)
	}
}

// TestExpiryLifted: an expiry lifted by Session.Extend(zero time), with
// pings and the idle timeout off, leaves the client's reader with no
// deadline at all: after a park and a wake it reads on, rather than keep
// a deadline in the past and spin on timeouts.
func TestExpiryLifted(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	up := startUpstream(t, nil, nil)
	var sess atomic.Value
	sessions := make(chan Session, 1)
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.PingInterval, c.ParkAfter = -1, 5*time.Millisecond }, func() RequestInfo {
		return RequestInfo{
			Expiry:  time.Now().Add(time.Hour),
			OnStart: func(s Session) { sessions <- s },
			Inspect: func(msg []byte, text bool) (Verdict, []byte) {
				if string(msg) == "forever" {
					if err := sess.Load().(Session).Extend(time.Time{}); err != nil {
						t.Errorf("Extend(zero): %v", err)
					}
				}
				return Pass, nil
			},
		}
	})
	rc := dialRaw(t, tg.addr(), nil)
	sess.Store(<-sessions)
	uc := up.next(t)
	c := onlyRelay(t, tg)
	rc.write(cf(opText, []byte("forever")))
	if m := uc.nextMsg(t); string(m.data) != "forever" {
		t.Fatalf("upstream got %q", m.data)
	}
	rc.readData()
	poll(t, "the client side to park", func() bool { return c.client.pstate.Load() == sideParked })
	rc.write(cf(opText, []byte("still here")))
	if m := uc.nextMsg(t); string(m.data) != "still here" {
		t.Fatalf("upstream got %q", m.data)
	}
}
