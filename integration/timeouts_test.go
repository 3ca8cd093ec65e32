package integration

import (
	"bufio"
	"context"
	"crypto/sha1"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/coder/websocket"
)

// TestWriteTimeoutClientNotReading: a client that completes the handshake
// and then never reads, while the upstream floods it with 64 KiB messages,
// is dropped once a write to it has waited write_timeout. The upstream gets
// 1001 "client not reading" within write_timeout + 1 s of the moment the
// buffers toward the client are full, and the gateway's goroutines and open
// files go back to what they were before the connection.
func TestWriteTimeoutClientNotReading(t *testing.T) {
	const writeTimeout = time.Second
	up := startRawUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\twrite_timeout 1s\n\t\tping_interval off"))
	baseG, baseF := quietBaseline(t, g)
	for len(up.closes) > 0 {
		<-up.closes // the warm-up connection's
	}

	start := time.Now()
	// A small receive buffer, so that the kernel does not absorb the flood.
	client := rawDialBuf(t, g, "/ws/flood", nil, 4096)
	stall, queued := waitStall(t, client.conn, 10*time.Second)
	t.Logf("client's receive buffer full (%d bytes) %v after the handshake", queued, stall.Sub(start).Round(time.Millisecond))

	ce := waitCloseEvent(t, up.closes, stall, writeTimeout+5*time.Second,
		"upstream got no close frame: the client that stopped reading was never dropped")
	after := ce.at.Sub(stall)
	t.Logf("upstream got close %d %q %v after the stall", ce.code, ce.reason, after.Round(time.Millisecond))
	if ce.code != 1001 || ce.reason != "client not reading" {
		t.Errorf("upstream got close %d %q, want 1001 \"client not reading\"", ce.code, ce.reason)
	}
	if after > writeTimeout+time.Second {
		t.Errorf("upstream got its close %v after the stall, want within write_timeout + 1s (%v)", after, writeTimeout+time.Second)
	}
	waitBaseline(t, g, baseG, baseF, 15*time.Second)
}

// TestWriteTimeoutUpstreamNotReading: an upstream that accepts and never
// reads, while the client floods it with 64 KiB messages, is dropped once a
// write to it has waited write_timeout. The client gets 1011 "upstream not
// reading" within write_timeout + 1 s of the moment the buffers toward the
// upstream are full, and the gateway's goroutines and open files go back to
// what they were before the connection.
func TestWriteTimeoutUpstreamNotReading(t *testing.T) {
	const writeTimeout = time.Second
	up := startSinkUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\twrite_timeout 1s\n\t\tping_interval off"))
	baseG, baseF := quietBaseline(t, g)

	start := time.Now()
	client := rawDial(t, g, "/ws/sink", nil)
	var sink net.Conn
	select {
	case sink = <-up.accepted:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream accepted no connection")
	}

	// The client reads all the time, so the gateway's close frame reaches it
	// however stuck the flood is.
	closes := make(chan closeEvent, 1)
	go func() {
		code, reason := client.readCloseNoFail(30 * time.Second)
		closes <- closeEvent{code: code, reason: reason, at: time.Now()}
	}()
	flooding := make(chan struct{})
	go func() {
		defer close(flooding)
		msg := frame(true, opBinary, make([]byte, 64<<10))
		for {
			if _, err := client.conn.Write(msg); err != nil {
				return
			}
		}
	}()
	t.Cleanup(func() {
		client.conn.Close()
		<-flooding
	})

	stall, queued := waitStall(t, sink, 10*time.Second)
	t.Logf("upstream's receive buffer full (%d bytes) %v after the handshake", queued, stall.Sub(start).Round(time.Millisecond))

	ce := waitCloseEvent(t, closes, stall, writeTimeout+5*time.Second,
		"client got no close frame: the upstream that stopped reading was never dropped")
	if ce.code < 0 {
		t.Fatalf("client got no close frame: %s", ce.reason)
	}
	after := ce.at.Sub(stall)
	t.Logf("client got close %d %q %v after the stall", ce.code, ce.reason, after.Round(time.Millisecond))
	if ce.code != 1011 || ce.reason != "upstream not reading" {
		t.Errorf("client got close %d %q, want 1011 \"upstream not reading\"", ce.code, ce.reason)
	}
	if after > writeTimeout+time.Second {
		t.Errorf("client got its close %v after the stall, want within write_timeout + 1s (%v)", after, writeTimeout+time.Second)
	}
	// The client has what it waited for; it hangs up, as the sink does
	// not.
	client.conn.Close()
	<-flooding
	waitBaseline(t, g, baseG, baseF, 15*time.Second)
}

// TestShutdownWithTwoHandlers: Caddy with two wsgate handlers, each with
// close_timeout 2s, and 1,000 idle connections spread over both exits on
// SIGTERM within one close_timeout + 1 s, and every client gets close 1001
// first. Among the clients, ten (five per handler) never answer the close
// frame, so each handler's closing handshakes run to close_timeout: the
// exit must still not wait for them once per handler.
func TestShutdownWithTwoHandlers(t *testing.T) {
	const (
		closeTimeout = 2 * time.Second
		n            = 1000
	)
	up := startRawUpstream(t)
	handler := func(path string) string {
		return fmt.Sprintf("\twsgate %s {\n\t\tupstream %s\n\t\tclose_timeout 2s\n\t}\n", path, up.URL)
	}
	g := startGateway(t, handler("/a/*")+handler("/b/*"))

	silent := func(i int) bool { return i%200 < 2 } // i even: /a, odd: /b
	conns := make([]*rawConn, n)
	for i := range conns {
		path := "/a/ws"
		if i%2 == 1 {
			path = "/b/ws"
		}
		conns[i] = rawDial(t, g, path, nil)
	}

	// Idle connections give up their reader goroutines (park_after 2s):
	// exit must close parked connections, as idle ones are in production.
	eventually(t, 20*time.Second, "most idle connections to park (park_after 2s)", func() bool { return g.goroutines() < n/2 })

	type result struct {
		i      int
		code   int
		reason string
		err    error
	}
	results := make(chan result, n)
	for i, c := range conns {
		go func() {
			code, reason, err := awaitClose(c, 30*time.Second, !silent(i))
			results <- result{i, code, reason, err}
		}()
	}

	start := time.Now()
	if err := g.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var exit time.Duration
	select {
	case <-g.exited:
		exit = time.Since(start)
	case <-time.After(20 * time.Second):
		g.cmd.Process.Kill()
		t.Fatalf("caddy had not exited 20s after SIGTERM (close_timeout %v)", closeTimeout)
	}
	t.Logf("caddy exited %v after SIGTERM", exit.Round(time.Millisecond))

	var wrong []string
	for range n {
		r := <-results // each reader gives up after its own deadline
		if r.code != 1001 {
			wrong = append(wrong, fmt.Sprintf("client %d (silent %v): close %d %q, %v", r.i, silent(r.i), r.code, r.reason, r.err))
		}
	}
	t.Logf("upstream got %d close frames", len(up.closes))
	if len(wrong) > 0 {
		t.Errorf("%d of %d clients did not get close 1001, e.g.:\n%s", len(wrong), n, strings.Join(wrong[:min(len(wrong), 10)], "\n"))
	}
	if exit > closeTimeout+time.Second {
		t.Errorf("caddy exited %v after SIGTERM, want within close_timeout + 1s (%v): with two handlers, exit must wait for the closing handshakes once, not once per handler", exit, closeTimeout+time.Second)
	}
}

// awaitClose reads frames until a close frame and returns its code and
// reason; a client that answers sends the same code back, as a
// well-behaved client does, and then reads until the gateway hangs up.
func awaitClose(r *rawConn, within time.Duration, answer bool) (int, string, error) {
	deadline := time.Now().Add(within)
	for {
		f, err := r.read(time.Until(deadline))
		if err != nil {
			return -1, "", err
		}
		if f.op != opClose {
			continue
		}
		if len(f.payload) < 2 {
			return 1005, "", nil
		}
		code, reason := int(binary.BigEndian.Uint16(f.payload)), string(f.payload[2:])
		if answer {
			if _, err := r.conn.Write(frame(true, opClose, f.payload[:2])); err != nil {
				return code, reason, fmt.Errorf("answering the close frame: %w", err)
			}
			r.conn.SetReadDeadline(deadline)
			io.Copy(io.Discard, r.br)
		}
		return code, reason, nil
	}
}

// closeEvent is a close frame a peer got, and when.
type closeEvent struct {
	code   int
	reason string
	at     time.Time
}

// waitCloseEvent waits for a close event until within has passed since
// from (the stall); if none comes, the test fails saying what.
func waitCloseEvent(t *testing.T, events <-chan closeEvent, from time.Time, within time.Duration, what string) closeEvent {
	t.Helper()
	select {
	case ce := <-events:
		return ce
	case <-time.After(time.Until(from.Add(within))):
		t.Fatalf("%v after the stall, %s", within, what)
		return closeEvent{}
	}
}

// quietBaseline opens and closes one connection, so that what the gateway
// starts on its first connection exists, and returns the gateway's
// goroutines and open files once they have stopped changing.
func quietBaseline(t *testing.T, g *gateway) (goroutines, files int) {
	t.Helper()
	r := rawDial(t, g, "/ws/warm-up", nil)
	r.write(frame(true, opClose, []byte{0x03, 0xe8}))
	if code, _ := r.readClose(5 * time.Second); code != 1000 {
		t.Fatalf("warm-up connection: close %d, want 1000", code)
	}
	r.conn.Close()
	deadline := time.Now().Add(15 * time.Second)
	lastG, lastF, same := -1, -1, 0
	for same < 20 { // unchanged for 20 polls in a row
		if time.Now().After(deadline) {
			t.Fatalf("gateway did not settle after the warm-up connection: %d goroutines, %d files", lastG, lastF)
		}
		pollPause()
		gs, fs := g.goroutines(), g.openFiles()
		if gs == lastG && fs == lastF {
			same++
		} else {
			lastG, lastF, same = gs, fs, 0
		}
	}
	return lastG, lastF
}

// waitBaseline waits until the gateway's goroutines and open files are
// back to the baseline.
func waitBaseline(t *testing.T, g *gateway, baseG, baseF int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		gs, fs := g.goroutines(), g.openFiles()
		if gs <= baseG && fs <= baseF {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v, the gateway has %d goroutines and %d open files, baseline %d and %d", within, gs, fs, baseG, baseF)
		}
		pollPause()
	}
}

// waitStall waits until the receive queue of conn, a peer that does not
// read, holds bytes and has stopped growing, and returns when it first held
// what it then kept holding. The gateway's send buffer toward the peer fills
// within milliseconds of that, and its writes stop making progress.
func waitStall(t *testing.T, conn net.Conn, within time.Duration) (time.Time, int) {
	t.Helper()
	deadline := time.Now().Add(within)
	last, since, same := -1, time.Time{}, 0
	for same < 10 { // unchanged for 10 polls in a row
		if time.Now().After(deadline) {
			t.Fatalf("the receive queue of %v never stopped changing (last %d bytes)", conn.LocalAddr(), last)
		}
		q, err := receiveQueue(conn)
		if err != nil {
			t.Fatalf("receive queue of %v: %v", conn.LocalAddr(), err)
		}
		switch {
		case q == 0:
			last, same = 0, 0
		case q == last:
			same++
		default:
			last, since, same = q, time.Now(), 0
		}
		pollPause()
	}
	return since, last
}

// receiveQueue is how many bytes wait in conn's socket to be read
// (ioctl SIOCINQ, Linux).
func receiveQueue(conn net.Conn) (int, error) {
	const siocinq = 0x541b // FIONREAD
	sc, err := conn.(syscall.Conn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int32
	var errno syscall.Errno
	err = sc.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, siocinq, uintptr(unsafe.Pointer(&n)))
	})
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// rawUpstream is a WebSocket app written by hand on net.Conn, with one
// goroutine and a small buffer per connection, so that a test can hold a
// thousand of them. A connection whose path ends in /flood is sent 64 KiB
// binary messages as fast as the gateway takes them; at a close frame it
// hangs up. Any other connection discards what it reads and answers a close
// frame with the same code before hanging up. Close frames it gets are
// reported on closes.
type rawUpstream struct {
	URL    string
	ln     net.Listener
	closes chan closeEvent
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func startRawUpstream(t testing.TB) *rawUpstream {
	t.Helper()
	u := &rawUpstream{ln: listen(t), closes: make(chan closeEvent, 2048), conns: map[net.Conn]struct{}{}}
	u.URL = "ws://" + u.ln.Addr().String()
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := u.ln.Accept()
			if err != nil {
				return
			}
			u.mu.Lock()
			u.conns[c] = struct{}{}
			u.mu.Unlock()
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				u.serve(c)
				c.Close()
				u.mu.Lock()
				delete(u.conns, c)
				u.mu.Unlock()
			}()
		}
	}()
	t.Cleanup(func() {
		u.ln.Close()
		u.mu.Lock()
		for c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

func (u *rawUpstream) serve(c net.Conn) {
	br := bufio.NewReaderSize(c, 1024)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	req, err := http.ReadRequest(br)
	if err != nil {
		return
	}
	c.SetReadDeadline(time.Time{})
	sum := sha1.Sum([]byte(req.Header.Get("Sec-WebSocket-Key") + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if _, err := io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"+
		"Sec-WebSocket-Accept: "+base64.StdEncoding.EncodeToString(sum[:])+"\r\n\r\n"); err != nil {
		return
	}
	flood := strings.HasSuffix(req.URL.Path, "/flood")
	if flood {
		u.wg.Add(1)
		go func() {
			defer u.wg.Done()
			msg := serverFrame(opBinary, make([]byte, 64<<10))
			for {
				if _, err := c.Write(msg); err != nil {
					return // the connection was closed
				}
			}
		}()
	}
	for {
		op, payload, err := readClientFrame(br)
		if err != nil {
			return
		}
		if op != opClose {
			continue
		}
		ce := closeEvent{code: 1005, at: time.Now()}
		if len(payload) >= 2 {
			ce.code, ce.reason = int(binary.BigEndian.Uint16(payload)), string(payload[2:])
		}
		select {
		case u.closes <- ce:
		default:
		}
		if !flood {
			c.Write(serverFrame(opClose, payload[:min(len(payload), 2)]))
		}
		return
	}
}

// readClientFrame reads one masked frame and unmasks its payload.
func readClientFrame(br *bufio.Reader) (byte, []byte, error) {
	head, p, err := readFrame(br, true)
	return head & 0x0f, p, err
}

// readFrame reads one frame, masked (a client's) or not, and returns its
// first byte (FIN, RSV bits, opcode) and its payload, unmasked.
func readFrame(br *bufio.Reader, masked bool) (byte, []byte, error) {
	var h [2]byte
	if _, err := io.ReadFull(br, h[:]); err != nil {
		return 0, nil, err
	}
	if (h[1]&0x80 != 0) != masked {
		return 0, nil, fmt.Errorf("frame masked: %v, want %v", h[1]&0x80 != 0, masked)
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return 0, nil, err
		}
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(br, l[:]); err != nil {
			return 0, nil, err
		}
		n = binary.BigEndian.Uint64(l[:])
	}
	if n > 1<<20 {
		return 0, nil, fmt.Errorf("frame of %d bytes", n)
	}
	var mask [4]byte
	if masked {
		if _, err := io.ReadFull(br, mask[:]); err != nil {
			return 0, nil, err
		}
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(br, p); err != nil {
		return 0, nil, err
	}
	if masked {
		for i := range p {
			p[i] ^= mask[i%4]
		}
	}
	return h[0], p, nil
}

// serverFrame encodes one unmasked, final frame.
func serverFrame(op byte, payload []byte) []byte {
	b := []byte{0x80 | op, 0}
	switch n := len(payload); {
	case n > 0xffff:
		b[1] = 127
		b = binary.BigEndian.AppendUint64(b, uint64(n))
	case n > 125:
		b[1] = 126
		b = binary.BigEndian.AppendUint16(b, uint16(n))
	default:
		b[1] = byte(n)
	}
	return append(b, payload...)
}

// connKey keys the accepted socket in a request's context.
type connKey struct{}

// sinkUpstream is a WebSocket app written with coder/websocket. On a path
// ending in /sink it accepts the connection and never reads from it; on
// any other path it echoes. Connections are closed when the test ends.
type sinkUpstream struct {
	URL      string
	accepted chan net.Conn // the socket of a sink connection
	mu       sync.Mutex
	done     bool
	held     sync.WaitGroup
}

func startSinkUpstream(t testing.TB) *sinkUpstream {
	t.Helper()
	ln := listen(t)
	u := &sinkUpstream{URL: "ws://" + ln.Addr().String(), accepted: make(chan net.Conn, 16)}
	ctx, cancel := context.WithCancel(context.Background())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
		if err != nil {
			return
		}
		defer c.CloseNow()
		u.mu.Lock()
		if u.done {
			u.mu.Unlock()
			return
		}
		u.held.Add(1)
		u.mu.Unlock()
		defer u.held.Done()
		if strings.HasSuffix(r.URL.Path, "/sink") {
			u.accepted <- r.Context().Value(connKey{}).(net.Conn)
			<-ctx.Done()
			return
		}
		for {
			typ, msg, err := c.Read(ctx)
			if err != nil {
				return
			}
			if err := c.Write(ctx, typ, msg); err != nil {
				return
			}
		}
	})}
	srv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		return context.WithValue(ctx, connKey{}, c)
	}
	go srv.Serve(ln)
	t.Cleanup(func() {
		u.mu.Lock()
		u.done = true
		u.mu.Unlock()
		cancel()
		srv.Close()
		u.held.Wait()
	})
	return u
}
