package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

func TestBadHandshakes(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	host := tg.addr()
	key := newKey()
	req := func(lines ...string) string {
		return strings.Join(lines, "\r\n") + "\r\n\r\n"
	}
	cases := []struct {
		name   string
		req    string
		status int
		header string // a response header that must be set, "Name: value"
	}{
		{"POST", req("POST / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key, "Sec-WebSocket-Version: 13", "Content-Length: 0"), 405, "Allow: GET"},
		{"HTTP/1.0", req("GET / HTTP/1.0", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key, "Sec-WebSocket-Version: 13"), 400, ""},
		{"no version", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key), 426, "Sec-WebSocket-Version: 13"},
		{"version 8", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key, "Sec-WebSocket-Version: 8"), 426, "Sec-WebSocket-Version: 13"},
		{"no key", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Version: 13"), 400, ""},
		{"short key", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: c2hvcnQ=", "Sec-WebSocket-Version: 13"), 400, ""},
		{"key not base64", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!==", "Sec-WebSocket-Version: 13"), 400, ""},
		{"two keys", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key, "Sec-WebSocket-Key: "+newKey(), "Sec-WebSocket-Version: 13"), 400, ""},
		{"bad subprotocol", req("GET / HTTP/1.1", "Host: "+host, "Upgrade: websocket", "Connection: Upgrade",
			"Sec-WebSocket-Key: "+key, "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: chat, a/b"), 400, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			resp := rawRequest(t, host, c.req)
			if resp.StatusCode != c.status {
				t.Fatalf("HTTP %d, want %d", resp.StatusCode, c.status)
			}
			if ct := resp.Header.Get("Content-Type"); ct != "application/json" {
				t.Fatalf("Content-Type %q", ct)
			}
			if c.header != "" {
				name, value, _ := strings.Cut(c.header, ": ")
				if got := resp.Header.Get(name); got != value {
					t.Fatalf("%s: %q, want %q", name, got, value)
				}
			}
			up.noConn(t)
		})
	}
	if n := tg.g.Registry().Len(); n != 0 {
		t.Fatalf("%d connections registered", n)
	}
}

// TestConnectionHeaderLists: "Connection: keep-alive, Upgrade" is a valid
// upgrade, in one header line or two.
func TestConnectionHeaderLists(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	t.Run("one line", func(t *testing.T) {
		rc, err := dialRawHandshake(tg.addr(), "GET / HTTP/1.1\r\nHost: "+tg.addr()+"\r\nUpgrade: websocket\r\n"+
			"Connection: keep-alive, Upgrade\r\n")
		if err != nil {
			t.Fatal(err)
		}
		defer rc.conn.Close()
		up.next(t)
	})
	t.Run("two lines", func(t *testing.T) {
		rc, err := dialRawHandshake(tg.addr(), "GET / HTTP/1.1\r\nHost: "+tg.addr()+"\r\nUpgrade: websocket\r\n"+
			"Connection: keep-alive\r\nConnection: Upgrade\r\n")
		if err != nil {
			t.Fatal(err)
		}
		defer rc.conn.Close()
		up.next(t)
	})
}

// dialRawHandshake sends head (request line and headers, without the key,
// version and final blank line) and expects a 101.
func dialRawHandshake(addr, head string) (*rawClient, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	key := newKey()
	if _, err := conn.Write([]byte(head + "Sec-WebSocket-Key: " + key + "\r\nSec-WebSocket-Version: 13\r\n\r\n")); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != 101 || resp.Header.Get("Sec-WebSocket-Accept") != wantAccept(key) {
		conn.Close()
		return nil, &HandshakeError{Status: resp.StatusCode, Message: "handshake refused"}
	}
	return &rawClient{conn: conn, br: br, resp: resp}, nil
}

func closedAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestUpstreamUnavailable(t *testing.T) {
	refusing := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "no", http.StatusForbidden)
	}))
	t.Cleanup(refusing.Close)
	for _, c := range []struct{ name, url string }{
		{"down", "ws://" + closedAddr(t)},
		{"refuses", "ws://" + refusing.Listener.Addr().String()},
	} {
		t.Run(c.name, func(t *testing.T) {
			tg := startGateway(t, c.url, nil)
			ctx := context.Background()
			_, resp, err := websocket.Dial(ctx, tg.url("/"), nil)
			if err == nil {
				t.Fatal("dial succeeded")
			}
			if resp == nil || resp.StatusCode != http.StatusBadGateway {
				t.Fatalf("response %v, want HTTP 502", resp)
			}
			if tg.g.Registry().Len() != 0 {
				t.Fatal("a connection was registered")
			}
		})
	}
	t.Run("failover", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, "ws://"+closedAddr(t), func(c *Config) {
			c.Upstreams = append(c.Upstreams, up.url)
		})
		for i := 0; i < 3; i++ { // round robin starts at each upstream in turn
			c, _ := dialCoder(t, tg, "/", nil)
			up.next(t)
			c.CloseNow()
		}
	})
}

func TestSubprotocol(t *testing.T) {
	t.Run("upstream picks one", func(t *testing.T) {
		up := startUpstream(t, &websocket.AcceptOptions{Subprotocols: []string{"chat.v2"}}, nil)
		tg := startGateway(t, up.url, nil)
		c, resp := dialCoder(t, tg, "/", &websocket.DialOptions{Subprotocols: []string{"chat.v1", "chat.v2"}})
		if c.Subprotocol() != "chat.v2" || resp.Header.Get("Sec-WebSocket-Protocol") != "chat.v2" {
			t.Fatalf("subprotocol %q, header %q", c.Subprotocol(), resp.Header.Get("Sec-WebSocket-Protocol"))
		}
		uc := up.next(t)
		if got := uc.req.Header.Values("Sec-WebSocket-Protocol"); strings.Join(got, ",") != "chat.v1,chat.v2" &&
			strings.Join(got, ",") != "chat.v1, chat.v2" {
			t.Fatalf("upstream was offered %q", got)
		}
	})
	t.Run("upstream picks none", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		c, resp := dialCoder(t, tg, "/", &websocket.DialOptions{Subprotocols: []string{"chat.v1"}})
		if c.Subprotocol() != "" || len(resp.Header.Values("Sec-WebSocket-Protocol")) != 0 {
			t.Fatalf("subprotocol %q, header %q", c.Subprotocol(), resp.Header.Values("Sec-WebSocket-Protocol"))
		}
	})
}

// TestForwardedHeaders: the upstream handshake carries X-Forwarded-* and
// X-Real-IP (the client's spoofed ones replaced), the forwarded client
// headers, the path and query; compression is never negotiated.
func TestForwardedHeaders(t *testing.T) {
	up := startUpstream(t, &websocket.AcceptOptions{CompressionMode: websocket.CompressionContextTakeover}, nil)
	tg := startGateway(t, up.url, nil)
	hdr := http.Header{}
	hdr.Set("Cookie", "session=abc; theme=dark")
	hdr.Set("Authorization", "Bearer t0k")
	hdr.Set("Origin", "http://app.example")
	hdr.Set("User-Agent", "wsgate-test")
	hdr.Set("X-Forwarded-For", "6.6.6.6")
	hdr.Set("X-Forwarded-Host", "evil.example")
	hdr.Set("X-Real-IP", "6.6.6.6")
	hdr.Set("X-Not-Forwarded", "1")
	c, resp := dialCoder(t, tg, "/chat/room?id=7&x=%20y", &websocket.DialOptions{
		HTTPHeader:      hdr,
		CompressionMode: websocket.CompressionContextTakeover,
	})
	if ext := resp.Header.Values("Sec-WebSocket-Extensions"); len(ext) != 0 {
		t.Fatalf("the client was answered Sec-WebSocket-Extensions %q", ext)
	}
	uc := up.next(t)
	h := uc.req.Header
	want := map[string]string{
		"Cookie":            "session=abc; theme=dark",
		"Authorization":     "Bearer t0k",
		"Origin":            "http://app.example",
		"User-Agent":        "wsgate-test",
		"X-Forwarded-For":   "127.0.0.1",
		"X-Forwarded-Proto": "http",
		"X-Forwarded-Host":  tg.addr(),
		"X-Real-Ip":         "127.0.0.1",
	}
	for k, v := range want {
		if got := h.Values(k); len(got) != 1 || got[0] != v {
			t.Errorf("upstream %s: %q, want %q", k, got, v)
		}
	}
	for _, k := range []string{"X-Not-Forwarded", "Sec-WebSocket-Extensions"} {
		if got := h.Values(k); len(got) != 0 {
			t.Errorf("upstream got %s: %q", k, got)
		}
	}
	if uc.req.Host != tg.addr() {
		t.Errorf("upstream Host %q, want %q", uc.req.Host, tg.addr())
	}
	if got := uc.req.URL.RequestURI(); got != "/chat/room?id=7&x=%20y" {
		t.Errorf("upstream request URI %q", got)
	}
	// With compression offered on both sides but not negotiated, messages
	// go through plain.
	ctx := context.Background()
	if err := c.Write(ctx, websocket.MessageText, []byte(strings.Repeat("compressible ", 100))); err != nil {
		t.Fatal(err)
	}
	if _, got, err := c.Read(ctx); err != nil || len(got) != 1300 {
		t.Fatalf("echo: %d bytes, %v", len(got), err)
	}
}

// TestUpstreamHeader checks the X-Forwarded-* rules for trusted and
// untrusted peers.
func TestUpstreamHeader(t *testing.T) {
	cfg := Config{Upstreams: []string{"ws://127.0.0.1:1"}, ForwardHeaders: []string{"cookie"}}
	if err := cfg.Prepare(); err != nil {
		t.Fatal(err)
	}
	g := New(cfg, nil, nil)
	r := httptest.NewRequest("GET", "http://gw.example/x", nil)
	r.RemoteAddr = "10.0.0.5:4444"
	r.Header.Set("Cookie", "a=b")
	r.Header.Add("X-Forwarded-For", "1.1.1.1")
	r.Header.Add("X-Forwarded-For", "2.2.2.2")
	r.Header.Set("X-Forwarded-Proto", "https")
	r.Header.Set("X-Forwarded-Host", "public.example")
	cases := []struct {
		name string
		info RequestInfo
		tls  bool
		want map[string]string
	}{
		{"untrusted", RequestInfo{}, false, map[string]string{
			"X-Forwarded-For": "10.0.0.5", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "gw.example",
			"X-Real-Ip": "10.0.0.5", "Cookie": "a=b"}},
		{"untrusted over TLS", RequestInfo{}, true, map[string]string{"X-Forwarded-Proto": "https"}},
		{"trusted", RequestInfo{ClientIP: "2.2.2.2", TrustedProxy: true}, false, map[string]string{
			"X-Forwarded-For": "1.1.1.1, 2.2.2.2, 10.0.0.5", "X-Forwarded-Proto": "https",
			"X-Forwarded-Host": "public.example", "X-Real-Ip": "2.2.2.2"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := r.Clone(context.Background())
			if c.tls {
				r.TLS = &tls.ConnectionState{}
			}
			h := g.upstreamHeader(r, &c.info)
			for k, v := range c.want {
				if got := h.Values(k); len(got) != 1 || got[0] != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
		})
	}
}

func TestPrepareRejectsManagedHeaders(t *testing.T) {
	for _, h := range []string{"Host", "connection", "Sec-WebSocket-Extensions", "X-Forwarded-For", "x-real-ip"} {
		cfg := Config{Upstreams: []string{"ws://127.0.0.1:1"}, ForwardHeaders: []string{h}}
		if err := cfg.Prepare(); err == nil {
			t.Errorf("ForwardHeaders %q accepted", h)
		}
	}
}

// TestPrepareRejectsNegative checks that settings without an "off" are
// refused when negative, rather than taken as their default.
func TestPrepareRejectsNegative(t *testing.T) {
	tests := []struct {
		name string
		set  func(*Config)
		want string
	}{
		{"dial timeout", func(c *Config) { c.DialTimeout = -time.Second }, "dial timeout must not be negative"},
		{"idle timeout", func(c *Config) { c.IdleTimeout = -1 }, "idle timeout must not be negative"},
		{"pong timeout", func(c *Config) { c.PongTimeout = -1 }, "pong timeout must not be negative"},
		{"close timeout", func(c *Config) { c.CloseTimeout = -time.Second }, "close timeout must not be negative"},
		{"send queue", func(c *Config) { c.SendQueue = -1 }, "send queue must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := Config{Upstreams: []string{"ws://127.0.0.1:1"}}
			tt.set(&cfg)
			if err := cfg.Prepare(); err == nil || err.Error() != tt.want {
				t.Errorf("Prepare error = %v, want %q", err, tt.want)
			}
		})
	}
}

func TestParseUpstream(t *testing.T) {
	tests := []struct {
		in, want string // want "" for success
	}{
		{"ws://a:1", ""},
		{"wss://a/socket?x=1", ""},
		{"http://a:1", `upstream "http://a:1": scheme must be ws or wss`},
		{"ws:///path", `upstream "ws:///path": missing host`},
		{"ws://a b", `upstream "ws://a b": parse`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			u, err := ParseUpstream(tt.in)
			switch {
			case tt.want == "" && (err != nil || u.String() != tt.in):
				t.Errorf("ParseUpstream = %v, %v; want %s", u, err, tt.in)
			case tt.want != "" && (err == nil || !strings.HasPrefix(err.Error(), tt.want)):
				t.Errorf("ParseUpstream error = %v, want one starting %q", err, tt.want)
			}
		})
	}
}

func TestIsUpgrade(t *testing.T) {
	cases := []struct {
		conn, upgrade []string
		want          bool
	}{
		{[]string{"Upgrade"}, []string{"websocket"}, true},
		{[]string{"keep-alive, upgrade"}, []string{"WebSocket"}, true},
		{[]string{"keep-alive", "Upgrade"}, []string{"websocket"}, true},
		{[]string{"keep-alive"}, []string{"websocket"}, false},
		{[]string{"Upgrade"}, []string{"h2c"}, false},
		{nil, nil, false},
	}
	for _, c := range cases {
		r := httptest.NewRequest("GET", "/", nil)
		r.Header["Connection"] = c.conn
		r.Header["Upgrade"] = c.upgrade
		if got := IsUpgrade(r); got != c.want {
			t.Errorf("Connection %q Upgrade %q: %v, want %v", c.conn, c.upgrade, got, c.want)
		}
	}
}

// TestUpstreamFirstFrameWithHandshake: an upstream that sends its first
// frame in the same write as its 101 response; the frame is not lost in
// the dialer's read-ahead buffer.
func TestUpstreamFirstFrameWithHandshake(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + wantAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		msg := append([]byte(resp), sf(opText, []byte("welcome"))...)
		msg = append(msg, sf(opBinary, []byte{1, 2, 3})...)
		conn.Write(msg)
		// wait for the gateway's close (or EOF)
		for {
			f, err := readRawFrame(brw.Reader, 1<<20)
			if err != nil {
				return
			}
			if f.op == opClose {
				conn.Write(sf(opClose, f.payload))
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	tg := startGateway(t, "ws://"+srv.Listener.Addr().String(), nil)
	rc := dialRaw(t, tg.addr(), nil)
	if f := rc.readData(); f.op != opText || string(f.payload) != "welcome" {
		t.Fatalf("first frame op %d %q", f.op, f.payload)
	}
	if f := rc.readData(); f.op != opBinary || string(f.payload) != "\x01\x02\x03" {
		t.Fatalf("second frame op %d %q", f.op, f.payload)
	}
	rc.write(cf(opClose, closePayload(1000, "")))
	if code, _, _ := rc.readClose(); code != 1000 {
		t.Fatalf("close %d", code)
	}
}

// TestOnCloseOnce: RequestInfo.OnClose runs exactly once per request:
// after a relayed connection ends, and for requests refused before the
// upgrade.
func TestOnCloseOnce(t *testing.T) {
	up := startUpstream(t, nil, nil)
	for _, c := range []struct {
		name     string
		upstream string
		run      func(t *testing.T, addr string)
	}{
		{"relayed", up.url, func(t *testing.T, addr string) {
			rc := dialRaw(t, addr, nil)
			rc.write(cf(opClose, closePayload(1000, "")))
			rc.expectEOF()
		}},
		{"bad handshake", up.url, func(t *testing.T, addr string) {
			if resp := rawRequest(t, addr, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"); resp.StatusCode != 405 {
				t.Fatalf("HTTP %d", resp.StatusCode)
			}
		}},
		{"upstream down", "ws://" + closedAddr(t), func(t *testing.T, addr string) {
			if _, err := dialRawErr(addr, nil); err == nil {
				t.Fatal("dial succeeded")
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := Config{Upstreams: []string{c.upstream}, CloseTimeout: time.Second}
			if err := cfg.Prepare(); err != nil {
				t.Fatal(err)
			}
			g := New(cfg, nil, nil)
			calls := make(chan struct{}, 4)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				g.ServeHTTP(w, r, RequestInfo{OnClose: func() { calls <- struct{}{} }})
			}))
			defer srv.Close()
			c.run(t, srv.Listener.Addr().String())
			select {
			case <-calls:
			case <-time.After(waitFor):
				t.Fatal("OnClose was not called")
			}
			poll(t, "the registry to empty", func() bool { return g.Registry().Len() == 0 })
			if len(calls) != 0 {
				t.Fatalf("OnClose called %d more times", len(calls))
			}
		})
	}
}
