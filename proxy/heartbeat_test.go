package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestClientPingForwarded: a client's ping goes to the upstream and the
// upstream's pong comes back to the client.
func TestClientPingForwarded(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	c.CloseRead(context.Background()) // reads (and so gets pongs) in the background
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	if err := c.Ping(ctx); err != nil {
		t.Fatalf("ping: %v", err)
	}
	select {
	case p := <-uc.pings:
		if string(p) != "1" { // coder/websocket numbers its pings
			t.Fatalf("upstream got ping %q", p)
		}
	default:
		t.Fatal("the upstream got no ping")
	}
}

// countConn counts the bytes read from a connection.
type countConn struct {
	net.Conn
	n *atomic.Int64
}

func (c countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// TestGatewayPingsKeepReaderAlive: a client that reads (and so answers the
// gateway's pings) stays connected across many ping intervals; the pongs
// are not forwarded to the upstream.
func TestGatewayPingsKeepReaderAlive(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.PingInterval = 50 * time.Millisecond
		c.PongTimeout = 100 * time.Millisecond
	})
	var read atomic.Int64
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return countConn{conn, &read}, nil
		},
	}}
	c, _ := dialCoder(t, tg, "/", &websocket.DialOptions{HTTPClient: client})
	uc := up.next(t)
	afterHandshake := read.Load()

	msgs := make(chan []byte, 1)
	errc := make(chan error, 1)
	go func() {
		for {
			_, m, err := c.Read(context.Background())
			if err != nil {
				errc <- err
				return
			}
			msgs <- m
		}
	}()
	// Eight intervals of silence: the gateway pings, the reader answers.
	select {
	case err := <-errc:
		t.Fatalf("connection ended while idle: %v", err)
	case <-time.After(400 * time.Millisecond):
	}
	// Each ping is a 10-byte frame (8-byte token).
	if n := read.Load() - afterHandshake; n < 3*10 {
		t.Fatalf("client read %d bytes while idle: the gateway did not ping", n)
	}
	if err := c.Write(context.Background(), websocket.MessageText, []byte("still here")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-msgs:
		if string(m) != "still here" {
			t.Fatalf("echo %q", m)
		}
	case err := <-errc:
		t.Fatalf("read: %v", err)
	case <-time.After(waitFor):
		t.Fatal("no echo")
	}
	select {
	case p := <-uc.pongs:
		t.Fatalf("the gateway forwarded its own pong %x to the upstream", p)
	default:
	}
}

// TestGatewayPingTimeout: a raw client that never answers is pinged, then
// closed with 1001, and the socket is closed within CloseTimeout.
func TestGatewayPingTimeout(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.PingInterval = 50 * time.Millisecond
		c.PongTimeout = 100 * time.Millisecond
		c.CloseTimeout = 200 * time.Millisecond
		c.Rand = func(int) int { return 0 } // the whole interval
	})
	start := time.Now()
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	f, err := rc.read()
	if err != nil || f.op != opPing || len(f.payload) != 8 {
		t.Fatalf("first frame: op %d payload %x (%v), want an 8-byte ping", f.op, f.payload, err)
	}
	f, err = rc.read()
	if err != nil || f.op != opClose {
		t.Fatalf("second frame: op %d (%v), want close", f.op, err)
	}
	if code, reason := closeOf(f.payload); code != 1001 || reason != "ping timeout" {
		t.Fatalf("close %d %q, want 1001 \"ping timeout\"", code, reason)
	}
	// PingInterval of silence, then PongTimeout without an answer.
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("closed %v after connecting, before PingInterval+PongTimeout", d)
	}
	// Not answering the close either: the gateway drops the socket.
	rc.expectEOF()
	if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || reason != "ping timeout" {
		t.Fatalf("upstream close %d %q", code, reason)
	}
	tg.waitLen(t, 0)
}

// TestPongAnswersPing: a raw client that answers the gateway's pings
// stays; one that answers with a wrong payload is still alive (any frame
// counts as life), and the wrong pong goes to the upstream.
func TestPongAnswersPing(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.PingInterval = 30 * time.Millisecond
		c.PongTimeout = 200 * time.Millisecond
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	for i := 0; i < 5; i++ {
		f, err := rc.read()
		if err != nil || f.op != opPing {
			t.Fatalf("frame %d: op %d (%v), want ping", i, f.op, err)
		}
		// the pong's header and payload in separate writes
		p := cf(opPong, f.payload)
		rc.write(p[:6])
		rc.write(p[6:])
	}
	rc.write(cf(opPong, []byte("12345678")))
	select {
	case p := <-uc.pongs:
		if string(p) != "12345678" {
			t.Fatalf("upstream got pong %q", p)
		}
	case <-time.After(waitFor):
		t.Fatal("an unsolicited pong was not forwarded")
	}
	select {
	case p := <-uc.pongs:
		t.Fatalf("upstream got a second pong %x", p)
	default:
	}
}

// TestIdleTimeout closes a connection with no data messages, pings or
// not, and both sides get 1001 "idle timeout".
func TestIdleTimeout(t *testing.T) {
	for _, ping := range []time.Duration{-1, 20 * time.Millisecond} {
		t.Run("ping "+ping.String(), func(t *testing.T) {
			up := startUpstream(t, nil, nil)
			tg := startGateway(t, up.url, func(c *Config) {
				c.IdleTimeout = 200 * time.Millisecond
				c.PingInterval = ping
				c.PongTimeout = time.Second
			})
			c, _ := dialCoder(t, tg, "/", nil)
			uc := up.next(t)
			start := time.Now()
			ctx := context.Background()
			// Data keeps it open for a while.
			for i := 0; i < 3; i++ {
				c.Write(ctx, websocket.MessageText, []byte("tick"))
				if _, _, err := c.Read(ctx); err != nil {
					t.Fatalf("read %d: %v", i, err)
				}
			}
			_, _, err := c.Read(ctx)
			var ce websocket.CloseError
			if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway || ce.Reason != "idle timeout" {
				t.Fatalf("read: %v, want close 1001 \"idle timeout\"", err)
			}
			if d := time.Since(start); d < 200*time.Millisecond {
				t.Fatalf("closed after %v", d)
			}
			if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || reason != "idle timeout" {
				t.Fatalf("upstream close %d %q", code, reason)
			}
			tg.waitLen(t, 0)
		})
	}
}

// TestIdleTimeoutUpstreamData: data from the upstream counts as activity.
func TestIdleTimeoutUpstreamData(t *testing.T) {
	up := startUpstream(t, nil, func(uc *upConn) error {
		ctx := context.Background()
		for i := 0; i < 6; i++ {
			if err := uc.c.Write(ctx, websocket.MessageText, []byte("news")); err != nil {
				return err
			}
			<-time.After(50 * time.Millisecond)
		}
		_, _, err := uc.c.Read(ctx)
		return err
	})
	tg := startGateway(t, up.url, func(c *Config) {
		c.IdleTimeout = 150 * time.Millisecond
		c.PingInterval = -1
	})
	c, _ := dialCoder(t, tg, "/", nil)
	for i := 0; i < 6; i++ {
		if _, m, err := c.Read(context.Background()); err != nil || string(m) != "news" {
			t.Fatalf("message %d: %q %v", i, m, err)
		}
	}
	_, _, err := c.Read(context.Background())
	if websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Fatalf("read: %v, want 1001", err)
	}
}

// TestRegistryShutdown: Shutdown sends 1001 to both sides of every
// connection and waits for them; later connections are closed at once.
func TestRegistryShutdown(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	const n = 3
	var clients []*websocket.Conn
	var ups []*upConn
	for i := 0; i < n; i++ {
		c, _ := dialCoder(t, tg, "/", nil)
		clients = append(clients, c)
		ups = append(ups, up.next(t))
	}
	errs := make(chan error, n)
	for _, c := range clients {
		go func() {
			_, _, err := c.Read(context.Background())
			errs <- err
		}()
	}
	tg.waitLen(t, n)
	if !tg.g.Registry().Shutdown(waitFor) {
		t.Fatal("Shutdown timed out")
	}
	if l := tg.g.Registry().Len(); l != 0 {
		t.Fatalf("%d connections after Shutdown", l)
	}
	for i := 0; i < n; i++ {
		err := <-errs
		var ce websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != websocket.StatusGoingAway {
			t.Fatalf("client read: %v, want close 1001", err)
		}
	}
	for _, uc := range ups {
		if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway {
			t.Fatalf("upstream close %d %q, want 1001", code, reason)
		}
	}

	// After shutdown a new handshake is refused with 503 before the upgrade,
	// and no upstream is dialled.
	if _, err := dialRawErr(tg.addr(), nil); err == nil || !strings.Contains(err.Error(), "HTTP 503") {
		t.Fatalf("handshake after shutdown: %v, want HTTP 503", err)
	}
	up.noConn(t)
	tg.waitLen(t, 0)
}

// TestShutdownUnresponsivePeers: a client that never answers the close
// is dropped after CloseTimeout, and Shutdown reports success.
func TestShutdownUnresponsivePeers(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 150 * time.Millisecond })
	rc := dialRaw(t, tg.addr(), nil)
	up.next(t)
	tg.waitLen(t, 1)
	start := time.Now()
	if !tg.g.Registry().Shutdown(waitFor) {
		t.Fatal("Shutdown timed out")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("Shutdown took %v", d)
	}
	frames := rc.expectEOF()
	if len(frames) == 0 || frames[len(frames)-1].op != opClose {
		t.Fatal("no close frame before EOF")
	}
	if code, _ := closeOf(frames[len(frames)-1].payload); code != 1001 {
		t.Fatalf("close %d, want 1001", code)
	}
}

// TestAnsweredPingSpacing: a client that answers every ping at once is
// pinged again only after a further PingInterval of silence (never every
// PongTimeout), whether its side parks between pings or not.
func TestAnsweredPingSpacing(t *testing.T) {
	for _, parkAfter := range []time.Duration{-1, testParkAfter} {
		t.Run(fmt.Sprintf("park_after=%v", parkAfter), func(t *testing.T) {
			const interval, pong = 150 * time.Millisecond, 20 * time.Millisecond
			up := startUpstream(t, nil, nil)
			tg := startGateway(t, up.url, func(c *Config) {
				c.PingInterval, c.PongTimeout, c.ParkAfter = interval, pong, parkAfter
			})
			rc := dialRaw(t, tg.addr(), nil)
			up.next(t)
			var last time.Time
			for i := 0; i < 5; i++ {
				f, err := rc.read()
				if err != nil || f.op != opPing {
					t.Fatalf("frame %d: op %d (%v), want ping", i, f.op, err)
				}
				now := time.Now()
				rc.write(cf(opPong, f.payload))
				// The earliest a ping may come is the jittered share of
				// the interval after the answer to the previous one.
				if i > 0 && now.Sub(last) < interval*3/4 {
					t.Fatalf("ping %d came %v after the answer to the previous one; PingInterval is %v", i, now.Sub(last), interval)
				}
				last = time.Now()
			}
		})
	}
}

// TestPingAfterSpread: a connection's silence before a ping is drawn
// between 3/4 of PingInterval and all of it.
func TestPingAfterSpread(t *testing.T) {
	const interval = 40 * time.Second
	for _, c := range []struct {
		draw     int
		min, max time.Duration
	}{
		{0, interval, interval},
		{512, interval * 7 / 8, interval * 7 / 8},
		{1023, interval * 3 / 4, interval*3/4 + interval/4/1024},
	} {
		var asked int
		got := time.Duration(pingAfter(interval, func(n int) int { asked = n; return c.draw }))
		if got < c.min || got > c.max || asked != 1024 {
			t.Errorf("draw %d of %d: %v, want %v to %v", c.draw, asked, got, c.min, c.max)
		}
	}
}
