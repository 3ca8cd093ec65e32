package proxy

// Test peers. Upstreams and well-behaved clients use github.com/coder/websocket;
// malformed input is written by hand as raw frames over a net.Conn. Nothing
// here uses gobwas/ws or the package's own frame code, so a bug in one
// cannot cancel out in the other.

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
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

// newGatewayServer serves a Gateway for cfg (Upstreams must be set) with
// net/http on 127.0.0.1. It registers no cleanup, so the fuzz target can keep
// one for the life of the process.
func newGatewayServer(cfg Config) (*Gateway, *httptest.Server, error) {
	if err := prepareTestConfig(&cfg); err != nil {
		return nil, nil, err
	}
	g := New(cfg, nil, nil)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.ServeHTTP(w, r, RequestInfo{})
	}))
	return g, srv, nil
}

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
	deadline := time.Now().Add(waitFor)
	for d := time.Millisecond; !cond(); d = min(2*d, 20*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		timer := time.NewTimer(d)
		<-timer.C
	}
}

// ---------- upstream (coder/websocket) ----------

type upMsg struct {
	typ  websocket.MessageType
	data []byte
}

// upConn is one connection accepted by an upstream.
type upConn struct {
	c      *websocket.Conn
	req    *http.Request // the handshake request (Header, Host, URL)
	msgs   chan upMsg
	pings  chan []byte
	pongs  chan []byte
	done   chan struct{} // closed when serve returns
	err    error         // the read error that ended serve; valid after done
	closed websocket.CloseError
}

// wait waits for the connection's serve function to return.
func (uc *upConn) wait(t testing.TB) {
	t.Helper()
	select {
	case <-uc.done:
	case <-time.After(waitFor):
		t.Fatal("upstream connection did not end")
	}
}

// closeCode waits for the connection to end and returns the close frame it
// got (code -1 if it ended without one).
func (uc *upConn) closeCode(t testing.TB) (websocket.StatusCode, string) {
	t.Helper()
	uc.wait(t)
	var ce websocket.CloseError
	if errors.As(uc.err, &ce) {
		return ce.Code, ce.Reason
	}
	return -1, ""
}

// nextMsg waits for the next message the upstream received.
func (uc *upConn) nextMsg(t testing.TB) upMsg {
	t.Helper()
	select {
	case m := <-uc.msgs:
		return m
	case <-time.After(waitFor):
		t.Fatal("upstream received no message")
	}
	return upMsg{}
}

// nextMsgOrEnd is nextMsg that fails at once, with the reason, when the
// connection ends before the message arrives.
func (uc *upConn) nextMsgOrEnd(t testing.TB) upMsg {
	t.Helper()
	select {
	case m := <-uc.msgs:
		return m
	case <-uc.done:
		select {
		case m := <-uc.msgs:
			return m
		default:
		}
		t.Fatalf("the upstream connection ended before the message arrived: %v", uc.err)
	case <-time.After(waitFor):
		t.Fatal("upstream received no message")
	}
	return upMsg{}
}

// upstream is a coder/websocket server. By default it echoes every message.
type upstream struct {
	srv   *httptest.Server
	url   string
	opts  websocket.AcceptOptions
	conns chan *upConn
	serve func(uc *upConn) error // returns the error that ended the connection
}

func echo(uc *upConn) error {
	ctx := context.Background()
	for {
		typ, data, err := uc.c.Read(ctx)
		if err != nil {
			return err
		}
		uc.msgs <- upMsg{typ, data}
		if err := uc.c.Write(ctx, typ, data); err != nil {
			return err
		}
	}
}

// startUpstream starts a coder/websocket upstream that runs serve (echo if
// nil) on each connection; opts may be nil.
func startUpstream(t testing.TB, opts *websocket.AcceptOptions, serve func(*upConn) error) *upstream {
	t.Helper()
	u := newUpstream(opts, serve)
	t.Cleanup(u.srv.Close)
	return u
}

func newUpstream(opts *websocket.AcceptOptions, serve func(*upConn) error) *upstream {
	return newUpstreamTLS(opts, serve, false)
}

// newUpstreamTLS is newUpstream, served over TLS (a wss:// URL, with
// httptest's certificate) when overTLS.
func newUpstreamTLS(opts *websocket.AcceptOptions, serve func(*upConn) error, overTLS bool) *upstream {
	u := &upstream{conns: make(chan *upConn, 1024), serve: serve}
	if opts != nil {
		u.opts = *opts
	}
	u.opts.InsecureSkipVerify = true
	if u.serve == nil {
		u.serve = echo
	}
	u.srv = httptest.NewUnstartedServer(http.HandlerFunc(u.handle))
	if overTLS {
		u.srv.StartTLS()
		u.url = "wss://" + u.srv.Listener.Addr().String()
	} else {
		u.srv.Start()
		u.url = "ws://" + u.srv.Listener.Addr().String()
	}
	return u
}

func (u *upstream) handle(w http.ResponseWriter, r *http.Request) {
	uc := &upConn{
		req:   r.Clone(context.Background()),
		msgs:  make(chan upMsg, 1024),
		pings: make(chan []byte, 64),
		pongs: make(chan []byte, 64),
		done:  make(chan struct{}),
	}
	opts := u.opts
	opts.OnPingReceived = func(_ context.Context, p []byte) bool {
		select {
		case uc.pings <- append([]byte(nil), p...):
		default:
		}
		return true
	}
	opts.OnPongReceived = func(_ context.Context, p []byte) {
		select {
		case uc.pongs <- append([]byte(nil), p...):
		default:
		}
	}
	c, err := websocket.Accept(w, r, &opts)
	if err != nil {
		return
	}
	c.SetReadLimit(1 << 30)
	uc.c = c
	select {
	case u.conns <- uc:
	default:
	}
	uc.err = u.serve(uc)
	errors.As(uc.err, &uc.closed)
	c.CloseNow()
	close(uc.done)
}

// next waits for the next connection the upstream accepted.
func (u *upstream) next(t testing.TB) *upConn {
	t.Helper()
	select {
	case uc := <-u.conns:
		return uc
	case <-time.After(waitFor):
		t.Fatal("upstream accepted no connection")
	}
	return nil
}

// noConn checks that the upstream has not accepted a connection.
func (u *upstream) noConn(t testing.TB) {
	t.Helper()
	select {
	case <-u.conns:
		t.Fatal("upstream accepted a connection")
	default:
	}
}

// ---------- clients ----------

// dialCoder opens a coder/websocket client connection through tg.
func dialCoder(t testing.TB, tg *testGateway, path string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitFor)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, tg.url(path), opts)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", path, err, status)
	}
	c.SetReadLimit(1 << 30)
	t.Cleanup(func() { c.CloseNow() })
	return c, resp
}

// rawClient writes frames by hand and reads the gateway's frames raw.
type rawClient struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
	resp *http.Response
}

// handshakeRequest is a client opening handshake for path on host.
func handshakeRequest(host, path, key string, extra http.Header) string {
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n", path, host)
	fmt.Fprintf(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", key)
	for k, vs := range extra {
		for _, v := range vs {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	b.WriteString("\r\n")
	return b.String()
}

func newKey() string {
	k := make([]byte, 16)
	rand.Read(k)
	return base64.StdEncoding.EncodeToString(k)
}

func acceptKey(key string) string {
	h := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(h[:])
}

// dialRaw opens a raw connection and completes the handshake by hand.
func dialRaw(t testing.TB, addr string, extra http.Header) *rawClient {
	t.Helper()
	rc, err := dialRawErr(addr, extra)
	if err != nil {
		t.Fatal(err)
	}
	rc.t = t
	t.Cleanup(func() { rc.conn.Close() })
	return rc
}

func dialRawErr(addr string, extra http.Header) (*rawClient, error) {
	conn, err := net.DialTimeout("tcp", addr, waitFor)
	if err != nil {
		return nil, err
	}
	key := newKey()
	conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := io.WriteString(conn, handshakeRequest(addr, "/", key, extra)); err != nil {
		conn.Close()
		return nil, err
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("reading handshake response: %w", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("handshake: HTTP %d", resp.StatusCode)
	}
	if got := resp.Header.Get("Sec-WebSocket-Accept"); got != acceptKey(key) {
		conn.Close()
		return nil, fmt.Errorf("handshake: Sec-WebSocket-Accept %q, want %q", got, acceptKey(key))
	}
	conn.SetDeadline(time.Time{})
	return &rawClient{conn: conn, br: br, resp: resp}, nil
}

// rawRequest sends req as is on a new connection and reads the response.
func rawRequest(t testing.TB, addr, req string) *http.Response {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, waitFor)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := io.WriteString(conn, req); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp
}

var testMask = [4]byte{0xA1, 0x5C, 0x07, 0xE3}

// appendFrame appends one frame. mask nil means unmasked. length is the
// declared payload length, which payload may fall short of.
func appendFrame(dst []byte, b0 byte, mask *[4]byte, length uint64, payload []byte) []byte {
	dst = append(dst, b0)
	var m byte
	if mask != nil {
		m = 0x80
	}
	switch {
	case length > 0xffff:
		dst = append(dst, m|127)
		dst = binary.BigEndian.AppendUint64(dst, length)
	case length > 125:
		dst = append(dst, m|126)
		dst = binary.BigEndian.AppendUint16(dst, uint16(length))
	default:
		dst = append(dst, m|byte(length))
	}
	if mask == nil {
		return append(dst, payload...)
	}
	dst = append(dst, mask[:]...)
	for i, c := range payload {
		dst = append(dst, c^mask[i%4])
	}
	return dst
}

// cf is a masked client frame with FIN.
func cf(op byte, payload []byte) []byte {
	return appendFrame(nil, 0x80|op, &testMask, uint64(len(payload)), payload)
}

// cfrag is a masked client frame without FIN.
func cfrag(op byte, payload []byte) []byte {
	return appendFrame(nil, op, &testMask, uint64(len(payload)), payload)
}

func closePayload(code uint16, reason string) []byte {
	return append(binary.BigEndian.AppendUint16(nil, code), reason...)
}

func (rc *rawClient) write(frames ...[]byte) {
	rc.t.Helper()
	var all []byte
	for _, f := range frames {
		all = append(all, f...)
	}
	rc.conn.SetWriteDeadline(time.Now().Add(waitFor))
	if _, err := rc.conn.Write(all); err != nil {
		rc.t.Fatalf("raw write: %v", err)
	}
}

type rawFrame struct {
	fin     bool
	rsv     byte
	op      byte
	masked  bool
	payload []byte
}

// readRawFrame reads one frame, unmasking it if it is masked. Payloads
// larger than maxPayload are an error (nothing is allocated for them).
func readRawFrame(br *bufio.Reader, maxPayload uint64) (rawFrame, error) {
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return rawFrame{}, err
	}
	f := rawFrame{fin: h[0]&0x80 != 0, rsv: h[0] >> 4 & 7, op: h[0] & 0x0f, masked: h[1]&0x80 != 0}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return f, err
		}
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return f, err
		}
		n = binary.BigEndian.Uint64(l[:])
	}
	var mask [4]byte
	if f.masked {
		if _, err := io.ReadFull(br, mask[:]); err != nil {
			return f, err
		}
	}
	if n > maxPayload {
		return f, fmt.Errorf("frame payload of %d bytes", n)
	}
	f.payload = make([]byte, n)
	if _, err := io.ReadFull(br, f.payload); err != nil {
		return f, err
	}
	if f.masked {
		for i := range f.payload {
			f.payload[i] ^= mask[i%4]
		}
	}
	return f, nil
}

// read reads one frame from the gateway.
func (rc *rawClient) read() (rawFrame, error) {
	rc.conn.SetReadDeadline(time.Now().Add(waitFor))
	f, err := readRawFrame(rc.br, 16<<20)
	if err == nil && f.masked {
		err = errors.New("gateway sent a masked frame to the client")
	}
	return f, err
}

// readData reads frames until a data frame and returns it; pings are skipped.
func (rc *rawClient) readData() rawFrame {
	rc.t.Helper()
	for {
		f, err := rc.read()
		if err != nil {
			rc.t.Fatalf("waiting for a data frame: %v", err)
		}
		switch f.op {
		case opPing, opPong:
			continue
		case opClose:
			code, reason := closeOf(f.payload)
			rc.t.Fatalf("got close %d %q while waiting for a data frame", code, reason)
		}
		return f
	}
}

// closeOf decodes a close payload: code (1005 if absent) and reason.
func closeOf(p []byte) (int, string) {
	if len(p) < 2 {
		return 1005, ""
	}
	return int(binary.BigEndian.Uint16(p)), string(p[2:])
}

// readClose reads frames until a close frame, answers it, and returns its
// code and reason. Data frames seen before it are returned too.
func (rc *rawClient) readClose() (code int, reason string, before []rawFrame) {
	rc.t.Helper()
	for {
		f, err := rc.read()
		if err != nil {
			rc.t.Fatalf("waiting for a close frame: %v", err)
		}
		if f.op == opClose {
			code, reason = closeOf(f.payload)
			// Answer, so the gateway finishes without waiting for CloseTimeout;
			// it may already have closed the socket.
			rc.conn.SetWriteDeadline(time.Now().Add(waitFor))
			rc.conn.Write(cf(opClose, f.payload))
			return code, reason, before
		}
		if f.op != opPing {
			before = append(before, f)
		}
	}
}

// expectEOF reads until the gateway closes the connection and returns the
// frames read on the way.
func (rc *rawClient) expectEOF() []rawFrame {
	rc.t.Helper()
	var got []rawFrame
	for {
		f, err := rc.read()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				rc.t.Fatal("the gateway did not close the connection")
			}
			return got
		}
		got = append(got, f)
	}
}

// msgReader reads whole messages from a raw client, and fails the test when
// the gateway's frames break RFC 6455 §5.4: once a data frame without FIN
// has begun a message, only control frames and that message's
// continuations may come until a continuation with FIN ends it.
type msgReader struct {
	rc   *rawClient
	open bool   // a message is in progress
	op   byte   // its opcode
	part []byte // its payload so far
}

// frame reads the next data frame (pings and pongs are skipped, a close
// frame fails the test) and returns it, with the message it completes, if
// any.
func (m *msgReader) frame(t testing.TB) (f rawFrame, msg []byte, done bool) {
	t.Helper()
	for {
		var err error
		f, err = m.rc.read()
		if err != nil {
			t.Fatalf("waiting for a data frame: %v", err)
		}
		switch f.op {
		case opPing, opPong:
			continue
		case opClose:
			code, reason := closeOf(f.payload)
			t.Fatalf("got close %d %q while waiting for a data frame", code, reason)
		}
		break
	}
	switch {
	case f.op == opCont && !m.open:
		t.Fatalf("continuation frame %q with no message in progress", f.payload)
	case f.op != opCont && m.open:
		t.Fatalf("a frame of opcode %d (FIN %v) %q landed inside the fragmented message that began %q; "+
			"only control frames may come between fragments (RFC 6455 §5.4)", f.op, f.fin, f.payload, m.part)
	case f.op != opCont:
		m.open, m.op, m.part = true, f.op, nil
	}
	m.part = append(m.part, f.payload...)
	if !f.fin {
		return f, nil, false
	}
	msg, m.open, m.part = m.part, false, nil
	return f, msg, true
}

// next reads frames until a message is complete and returns it.
func (m *msgReader) next(t testing.TB) (op byte, msg []byte) {
	t.Helper()
	for {
		if _, msg, done := m.frame(t); done {
			return m.op, msg
		}
	}
}

// ---------- raw upstream ----------

// startRawUpstream starts an upstream that completes the handshake by hand,
// hands the hijacked connection to serve, and returns its ws:// URL.
func startRawUpstream(t testing.TB, serve func(conn net.Conn, br *bufio.Reader)) string {
	t.Helper()
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Added before the hijack, while srv.Close still waits for this
		// handler, so Wait below cannot miss it.
		wg.Add(1)
		defer wg.Done()
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + acceptKey(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		brw.Writer.WriteString(resp)
		brw.Writer.Flush()
		serve(conn, brw.Reader)
	}))
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return "ws://" + srv.Listener.Addr().String()
}

// sf is an unmasked server frame with FIN.
func sf(op byte, payload []byte) []byte {
	return appendFrame(nil, 0x80|op, nil, uint64(len(payload)), payload)
}

// fakeClock is an injectable clock for rate limits.
type fakeClock struct {
	mu    sync.Mutex
	now   time.Time
	calls atomic.Int64 // how often Now was called: the limiter has seen that many frames
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_700_000_000, 0)} }

func (c *fakeClock) Now() time.Time {
	c.calls.Add(1)
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// skipBug skips a test that shows a known, reported bug; set
// WSGATE_BUG_TESTS=1 to run it.
func skipBug(t testing.TB, why string) {
	t.Helper()
	if os.Getenv("WSGATE_BUG_TESTS") == "" {
		t.Skip("bug: " + why)
	}
}

// ---------- peers that stop reading ----------

// stallWatch remembers when a flooding peer last got a write through. Once
// the gateway stops taking the flood's bytes (because its own writes to a
// peer that does not read are stuck), the flood stalls soon after, so the
// gateway's write deadline runs from about then.
type stallWatch struct {
	start time.Time
	last  atomic.Int64 // time since start of the last write that went through
}

func newStallWatch() *stallWatch { return &stallWatch{start: time.Now()} }

// progress records a write that went through.
func (w *stallWatch) progress() { w.last.Store(int64(time.Since(w.start))) }

// stalled is how long ago the last write went through.
func (w *stallWatch) stalled() time.Duration {
	return time.Since(w.start) - time.Duration(w.last.Load())
}

// until waits for cond. It fails the test if the flood has been stalled
// for longer than bound first, or if cond does not hold within waitFor.
func (w *stallWatch) until(t testing.TB, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if s := w.stalled(); s > bound {
			t.Fatalf("timed out waiting for %s: the flood stalled %v ago (allowed: %v)", what, s.Round(time.Millisecond), bound)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: still not after %v (the flood stalled %v ago)", what, waitFor, w.stalled().Round(time.Millisecond))
		}
		timer := time.NewTimer(5 * time.Millisecond)
		<-timer.C
	}
}

// flood writes batch to conn over and over from a goroutine, recording in
// w each write that goes through, until a write fails. stop closes conn
// and waits for the goroutine; it also runs when the test ends.
func flood(t testing.TB, conn net.Conn, batch []byte, w *stallWatch) (stop func()) {
	t.Helper()
	done := make(chan struct{})
	w.progress()
	go func() {
		defer close(done)
		for {
			conn.SetWriteDeadline(time.Now().Add(waitFor))
			if _, err := conn.Write(batch); err != nil {
				return
			}
			w.progress()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			conn.Close()
			<-done
		})
	}
	t.Cleanup(stop)
	return stop
}

// isDone reports whether ch is closed.
func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// openFDs counts the process's open file descriptors, leaving out
// anonymous inodes: epoll instances and the like are made once per
// process on first use (the runtime's netpoller, the gateway's poller),
// while what a connection holds is sockets. It returns -1 where /proc is
// not available.
func openFDs() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range entries {
		// The descriptor ReadDir used is listed too, and gone by now.
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && !strings.HasPrefix(target, "anon_inode:") {
			n++
		}
	}
	return n
}

// waitFDs waits until no more descriptors are open than before (-1: not
// checked).
func waitFDs(t testing.TB, before int) {
	t.Helper()
	if before < 0 {
		return
	}
	poll(t, fmt.Sprintf("open file descriptors to fall back to %d", before), func() bool { return openFDs() <= before })
}
