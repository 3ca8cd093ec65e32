package proxy

// Clients for the tests: coder/websocket, and raw ones that write frames
// by hand and read the gateway's frames raw.

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

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

func wantAccept(key string) string {
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
	return dialRawPath(addr, "/", extra)
}

// dialRawPath is dialRawErr for a request path (with its query).
func dialRawPath(addr, path string, extra http.Header) (*rawClient, error) {
	conn, err := net.DialTimeout("tcp", addr, waitFor)
	if err != nil {
		return nil, err
	}
	return handshakeRaw(conn, addr, path, extra)
}

// dialRawTLS is dialRawErr over TLS (any certificate accepted).
func dialRawTLS(addr string) (*rawClient, error) {
	d := &tls.Dialer{NetDialer: &net.Dialer{Timeout: waitFor}, Config: &tls.Config{InsecureSkipVerify: true}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	return handshakeRaw(conn, addr, "/", nil)
}

// handshakeRaw completes a client handshake by hand on conn.
func handshakeRaw(conn net.Conn, addr, path string, extra http.Header) (*rawClient, error) {
	key := newKey()
	conn.SetDeadline(time.Now().Add(waitFor))
	if _, err := io.WriteString(conn, handshakeRequest(addr, path, key, extra)); err != nil {
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
	if got := resp.Header.Get("Sec-WebSocket-Accept"); got != wantAccept(key) {
		conn.Close()
		return nil, fmt.Errorf("handshake: Sec-WebSocket-Accept %q, want %q", got, wantAccept(key))
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
