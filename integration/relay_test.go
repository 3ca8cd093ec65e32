package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func relaySite(upstreams string, opts string) string {
	return fmt.Sprintf("\troute {\n\twsgate /ws* {\n\t\tupstream %s\n%s\n\t}\n\trespond \"not a websocket\" 200\n\t}", upstreams, opts)
}

func TestEchoByteExact(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tmax_message 1MiB"))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 30*time.Second)
	for _, size := range []int{0, 125, 126, 64 << 10, 1 << 20} {
		for _, typ := range []websocket.MessageType{websocket.MessageText, websocket.MessageBinary} {
			msg := make([]byte, size)
			if typ == websocket.MessageBinary {
				rand.Read(msg)
			} else {
				for i := range msg {
					msg[i] = "abcdefghijklmnopqrstuvwxyz€"[i%26]
				}
			}
			if err := c.Write(ctx, typ, msg); err != nil {
				t.Fatalf("size %d: write: %v", size, err)
			}
			gotTyp, got, err := c.Read(ctx)
			if err != nil {
				t.Fatalf("size %d: read: %v", size, err)
			}
			if gotTyp != typ || !bytes.Equal(got, msg) {
				t.Fatalf("size %d %v: echo differs (got %v, %d bytes)", size, typ, gotTyp, len(got))
			}
		}
	}
}

func TestNonUpgradePassesThrough(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	resp, err := http.Get("http://" + g.addr() + "/ws")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("plain GET: %d, want 200 from the next handler", resp.StatusCode)
	}
}

func TestFragmentedMessages(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	r := rawDial(t, g, "/ws", nil)
	// client → upstream: three fragments with a ping in between
	r.write(frame(false, opText, []byte("hel")), frame(true, opPing, []byte("p1")),
		frame(false, opCont, []byte("lo ")), frame(true, opCont, []byte("world")))
	var gotPong, gotEcho bool
	for !gotPong || !gotEcho {
		f, err := r.read(5 * time.Second)
		if err != nil {
			t.Fatalf("read: %v (pong %v, echo %v)", err, gotPong, gotEcho)
		}
		switch f.op {
		case opPong:
			if string(f.payload) != "p1" {
				t.Fatalf("pong payload %q", f.payload)
			}
			gotPong = true
		case opText:
			if string(f.payload) != "hello world" || !f.fin {
				t.Fatalf("echo %q fin=%v", f.payload, f.fin)
			}
			gotEcho = true
		default:
			t.Fatalf("unexpected frame op %d", f.op)
		}
	}
	// upstream → client: fragmentation is preserved frame by frame
	r.write(frame(true, opText, []byte("cmd:frag:abc,def,ghi")))
	want := []rawFrame{{false, opText, []byte("abc")}, {false, opCont, []byte("def")}, {false, opCont, []byte("ghi")}, {true, opCont, []byte{}}}
	for i, w := range want {
		f, err := r.read(5 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if f.op != w.op || f.fin != w.fin || !bytes.Equal(f.payload, w.payload) {
			t.Fatalf("fragment %d: got op=%d fin=%v %q, want op=%d fin=%v %q", i, f.op, f.fin, f.payload, w.op, w.fin, w.payload)
		}
	}
}

func TestSubprotocolNegotiation(t *testing.T) {
	up := startUpstream(t, "chat.v2", "chat.v1")
	g := startGateway(t, relaySite(up.URL, ""))
	c := dial(t, g, "/ws", &websocket.DialOptions{Subprotocols: []string{"chat.v1", "other"}})
	if got := c.Subprotocol(); got != "chat.v1" {
		t.Fatalf("subprotocol %q, want chat.v1", got)
	}
	if got := up.lastHeader().Get("Sec-Websocket-Protocol"); got != "chat.v1, other" {
		t.Fatalf("upstream saw offer %q", got)
	}
	c2 := dial(t, g, "/ws", &websocket.DialOptions{Subprotocols: []string{"unknown"}})
	if got := c2.Subprotocol(); got != "" {
		t.Fatalf("subprotocol %q, want none", got)
	}
}

func TestForwardedHeaders(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	h := http.Header{}
	h.Set("Cookie", "session=abc")
	h.Set("X-Private", "do-not-forward")
	h.Set("X-Forwarded-For", "6.6.6.6")
	h.Set("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")
	r := rawDial(t, g, "/ws/room?x=1", h)
	r.write(frame(true, opText, []byte("hi")))
	if f, err := r.read(5 * time.Second); err != nil || string(f.payload) != "hi" {
		t.Fatalf("echo: %v %q", err, f.payload)
	}
	got := up.lastHeader()
	checks := map[string]string{
		"Cookie":                   "session=abc",
		"X-Private":                "",
		"X-Forwarded-For":          "127.0.0.1", // the peer is not a trusted proxy: its value is replaced
		"X-Real-Ip":                "127.0.0.1",
		"X-Forwarded-Proto":        "http",
		"X-Forwarded-Host":         g.addr(),
		"Origin":                   g.origin(),
		"Sec-Websocket-Extensions": "",
		"X-Test-Host":              g.addr(),
		"X-Test-Path":              "/ws/room?x=1",
	}
	for k, want := range checks {
		if v := strings.Join(got.Values(k), ","); v != want {
			t.Errorf("upstream header %s = %q, want %q", k, v, want)
		}
	}
}

func TestCloseCodesBothWays(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))

	c := dial(t, g, "/ws", nil)
	c.Close(4001, "bye from client")
	select {
	case ce := <-up.closes:
		if ce.Code != 4001 || ce.Reason != "bye from client" {
			t.Fatalf("upstream got close %d %q", ce.Code, ce.Reason)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream got no close")
	}

	c2 := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 5*time.Second)
	c2.Write(ctx, websocket.MessageText, []byte("cmd:close:4002:later"))
	_, _, err := c2.Read(ctx)
	if code, reason := closeOf(err); code != 4002 || reason != "later" {
		t.Fatalf("client got %v (code %d %q), want 4002 later", err, code, reason)
	}
}

func TestUpstreamDownIs502(t *testing.T) {
	down := "ws://127.0.0.1:" + fmt.Sprint(freePort(t))
	g := startGateway(t, relaySite(down, "\t\tdial_timeout 2s"))
	_, resp, err := dialErr(t, g, "/ws", nil)
	if err == nil {
		t.Fatal("dial succeeded with the upstream down")
	}
	if resp == nil || resp.StatusCode != http.StatusBadGateway {
		t.Fatalf("got %v, want HTTP 502", resp)
	}
}

func TestFailoverToSecondUpstream(t *testing.T) {
	down := "ws://127.0.0.1:" + fmt.Sprint(freePort(t))
	up := startUpstream(t)
	g := startGateway(t, relaySite(down+" "+up.URL, ""))
	ctx := ctxT(t, 10*time.Second)
	for i := 0; i < 6; i++ {
		c := dial(t, g, "/ws", nil)
		if err := c.Write(ctx, websocket.MessageText, []byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, m, err := c.Read(ctx); err != nil || string(m) != "x" {
			t.Fatalf("conn %d: %v", i, err)
		}
		c.Close(websocket.StatusNormalClosure, "")
	}
}

func TestMaxMessageCloses1009(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tmax_message 1KiB"))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 5*time.Second)
	c.Write(ctx, websocket.MessageBinary, make([]byte, 1024)) // at the limit: relayed
	if _, m, err := c.Read(ctx); err != nil || len(m) != 1024 {
		t.Fatalf("message at the limit: %v", err)
	}
	c.Write(ctx, websocket.MessageBinary, make([]byte, 1025))
	_, _, err := c.Read(ctx)
	if code, _ := closeOf(err); code != websocket.StatusMessageTooBig {
		t.Fatalf("got %v, want close 1009", err)
	}
}

func TestRateLimitCloses1008(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\trate_limit {\n\t\t\tmessages 5/s burst 5\n\t\t}"))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 5*time.Second)
	done := make(chan error, 1)
	go func() {
		for {
			if _, _, err := c.Read(ctx); err != nil {
				done <- err
				return
			}
		}
	}()
	for i := 0; i < 50; i++ {
		if err := c.Write(ctx, websocket.MessageText, []byte("m")); err != nil {
			break
		}
	}
	err := <-done
	if code, reason := closeOf(err); code != websocket.StatusPolicyViolation || reason != "rate limit exceeded" {
		t.Fatalf("got %v, want 1008 rate limit exceeded", err)
	}
}

func TestInvalidUTF8Closes1007(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	r := rawDial(t, g, "/ws", nil)
	r.write(frame(true, opText, []byte{'o', 'k', 0xff, 0xfe}))
	if code, _ := r.readClose(5 * time.Second); code != 1007 {
		t.Fatalf("close %d, want 1007", code)
	}
	// split across fragments: a 3-byte sequence cut in two is fine…
	r2 := rawDial(t, g, "/ws", nil)
	euro := []byte("€")
	r2.write(frame(false, opText, euro[:1]), frame(true, opCont, euro[1:]))
	if f, err := r2.read(5 * time.Second); err != nil || string(f.payload) != "€" {
		t.Fatalf("split code point: %v %q", err, f.payload)
	}
	// …but a message that ends inside one is not
	r2.write(frame(false, opText, euro[:2]), frame(true, opCont, nil))
	if code, _ := r2.readClose(5 * time.Second); code != 1007 {
		t.Fatalf("close %d, want 1007", code)
	}
}

func TestIdleTimeout(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tidle_timeout 400ms\n\t\tping_interval off"))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 10*time.Second)
	start := time.Now()
	_, _, err := c.Read(ctx)
	if code, reason := closeOf(err); code != websocket.StatusGoingAway || reason != "idle timeout" {
		t.Fatalf("got %v, want 1001 idle timeout", err)
	}
	if el := time.Since(start); el < 350*time.Millisecond {
		t.Fatalf("closed after %v, before the idle timeout", el)
	}
}

func TestPingsKeepAliveAndDropDeadClients(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tping_interval 150ms\n\t\tpong_timeout 300ms"))

	// A live client answers pings (coder/websocket does while reading).
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 10*time.Second)
	readErr := make(chan error, 1)
	msgs := make(chan []byte, 1)
	go func() {
		for {
			_, m, err := c.Read(ctx)
			if err != nil {
				readErr <- err
				return
			}
			msgs <- m
		}
	}()
	select {
	case err := <-readErr:
		t.Fatalf("silent live client dropped: %v", err)
	case <-time.After(1500 * time.Millisecond): // ten ping intervals of silence
	}
	c.Write(ctx, websocket.MessageText, []byte("still here"))
	if m := <-msgs; string(m) != "still here" {
		t.Fatalf("echo %q", m)
	}

	// A dead client never answers: it sees pings, then a close.
	r := rawDial(t, g, "/ws", nil)
	pings := 0
	for {
		f, err := r.read(5 * time.Second)
		if err != nil {
			t.Fatalf("dead client: %v after %d pings", err, pings)
		}
		if f.op == opPing {
			pings++
			continue
		}
		if f.op != opClose || len(f.payload) < 2 || f.payload[0] != 0x03 || f.payload[1] != 0xe9 {
			t.Fatalf("dead client got op %d %q, want close 1001", f.op, f.payload)
		}
		break
	}
	if pings == 0 {
		t.Fatal("no ping before the drop")
	}
}

func TestShutdownSends1001(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	const n = 5
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		c := dial(t, g, "/ws", nil)
		go func() {
			_, _, err := c.Read(ctxT(t, 20*time.Second))
			errs <- err
		}()
	}
	g.terminate(syscall.SIGTERM, 15*time.Second)
	for i := 0; i < n; i++ {
		err := <-errs
		if code, _ := closeOf(err); code != websocket.StatusGoingAway {
			t.Fatalf("client %d: %v, want close 1001", i, err)
		}
	}
	for i := 0; i < n; i++ {
		select {
		case ce := <-up.closes:
			if ce.Code != websocket.StatusGoingAway {
				t.Fatalf("upstream got close %d", ce.Code)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("upstream did not get 1001")
		}
	}
}

func TestReloadKeepsLiveConnections(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tmax_message 1KiB"))
	const n = 100
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		conns[i] = dial(t, g, "/ws", nil)
	}
	g.reload(relaySite(up.URL, "\t\tmax_message 4KiB"))

	ctx := ctxT(t, 30*time.Second)
	echoEach(t, ctx, conns, func(i int) string { return fmt.Sprintf("conn %d after reload", i) })
	// New connections get the new config (a 2 KiB message is fine now)…
	c := dial(t, g, "/ws", nil)
	c.Write(ctx, websocket.MessageBinary, make([]byte, 2048))
	if _, m, err := c.Read(ctx); err != nil || len(m) != 2048 {
		t.Fatalf("new connection with the new limit: %v", err)
	}
	// …while live ones keep the config they started with.
	conns[0].Write(ctx, websocket.MessageBinary, make([]byte, 2048))
	if _, _, err := conns[0].Read(ctx); closeStatus(err) != websocket.StatusMessageTooBig {
		t.Fatalf("old connection: %v, want 1009 from its original limit", err)
	}
}

func closeStatus(err error) websocket.StatusCode {
	c, _ := closeOf(err)
	return c
}

// echoEach sends msg(i) on every connection i at once and checks that each
// gets its own message back.
func echoEach(t *testing.T, ctx context.Context, conns []*websocket.Conn, msg func(i int) string) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(conns))
	for i, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			m := []byte(msg(i))
			if err := c.Write(ctx, websocket.MessageText, m); err != nil {
				errs <- fmt.Errorf("connection %d: %w", i, err)
				return
			}
			if _, got, err := c.Read(ctx); err != nil || !bytes.Equal(got, m) {
				errs <- fmt.Errorf("connection %d: got %q, %v", i, got, err)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
