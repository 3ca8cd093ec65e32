package integration

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// upstream is a WebSocket app written with coder/websocket. It echoes
// messages and obeys a few commands sent as text messages:
//
//	cmd:close:<code>:<reason>   close with that code and reason
//	cmd:frag:<a>,<b>,…          answer with one message fragmented into those parts
//	cmd:send:<text>             send <text> to the client (no echo)
type upstream struct {
	URL      string
	srv      *http.Server
	protos   []string
	mu       sync.Mutex
	headers  []http.Header
	closes   chan websocket.CloseError
	received chan []byte
	conns    sync.WaitGroup
	// compression: what the app accepts of a permessage-deflate offer
	// (zero: none), and the smallest message it compresses
	compression       websocket.CompressionMode
	compressThreshold int
}

func startUpstream(t testing.TB, protos ...string) *upstream {
	t.Helper()
	return serveUpstream(t, &upstream{protos: protos})
}

// startCompressingUpstream is startUpstream with an app that accepts a
// permessage-deflate offer in mode and compresses the messages it sends
// of at least threshold bytes.
func startCompressingUpstream(t testing.TB, mode websocket.CompressionMode, threshold int) *upstream {
	t.Helper()
	return serveUpstream(t, &upstream{compression: mode, compressThreshold: threshold})
}

func serveUpstream(t testing.TB, u *upstream) *upstream {
	t.Helper()
	u.closes, u.received = make(chan websocket.CloseError, 1024), make(chan []byte, 4096)
	ln := listen(t)
	u.URL = "ws://" + ln.Addr().String()
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve)}
	go u.srv.Serve(ln)
	t.Cleanup(func() {
		u.srv.Close()
	})
	return u
}

// startTLSUpstream is startUpstream over TLS; it returns the CA PEM.
func startTLSUpstream(t testing.TB, cert tls.Certificate) *upstream {
	t.Helper()
	u := &upstream{closes: make(chan websocket.CloseError, 1024), received: make(chan []byte, 4096)}
	ln := listen(t)
	u.URL = "wss://" + ln.Addr().String()
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve)}
	tln := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{cert}})
	go u.srv.Serve(tln)
	t.Cleanup(func() { u.srv.Close() })
	return u
}

func (u *upstream) lastHeader() http.Header {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.headers) == 0 {
		return nil
	}
	return u.headers[len(u.headers)-1]
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	h := r.Header.Clone()
	h.Set("X-Test-Host", r.Host)
	h.Set("X-Test-Path", r.URL.RequestURI())
	u.headers = append(u.headers, h)
	u.mu.Unlock()
	c, err := websocket.Accept(w, r, &websocket.AcceptOptions{
		Subprotocols:         u.protos,
		InsecureSkipVerify:   true,
		CompressionMode:      u.compression,
		CompressionThreshold: u.compressThreshold,
	})
	if err != nil {
		return
	}
	c.SetReadLimit(-1)
	ctx := context.Background()
	for {
		typ, msg, err := c.Read(ctx)
		if err != nil {
			var ce websocket.CloseError
			if errors.As(err, &ce) {
				u.closes <- ce
			}
			c.CloseNow()
			return
		}
		select {
		case u.received <- msg:
		default:
		}
		if typ == websocket.MessageText && strings.HasPrefix(string(msg), "cmd:") {
			parts := strings.SplitN(string(msg), ":", 4)
			switch parts[1] {
			case "close":
				code, _ := strconv.Atoi(parts[2])
				c.Close(websocket.StatusCode(code), parts[3])
				return
			case "send":
				// cmd:send:<text> makes the app send <text> to the client
				c.Write(ctx, websocket.MessageText, []byte(strings.SplitN(string(msg), ":", 3)[2]))
				continue
			case "frag":
				wr, err := c.Writer(ctx, websocket.MessageText)
				if err != nil {
					return
				}
				for _, p := range strings.Split(parts[2], ",") {
					wr.Write([]byte(p))
				}
				wr.Close()
				continue
			}
		}
		if err := c.Write(ctx, typ, msg); err != nil {
			return
		}
	}
}

// dial opens a client connection through the gateway with a same-origin
// Origin header.
func dial(t testing.TB, g *gateway, path string, opts *websocket.DialOptions) *websocket.Conn {
	t.Helper()
	c, resp, err := dialErr(t, g, path, opts)
	if err != nil {
		status := 0
		if resp != nil {
			status = resp.StatusCode
		}
		t.Fatalf("dial %s: %v (HTTP %d)", path, err, status)
	}
	return c
}

func dialErr(t testing.TB, g *gateway, path string, opts *websocket.DialOptions) (*websocket.Conn, *http.Response, error) {
	t.Helper()
	if opts == nil {
		opts = &websocket.DialOptions{}
	}
	if opts.HTTPHeader == nil {
		opts.HTTPHeader = http.Header{}
	}
	if opts.HTTPHeader.Get("Origin") == "" {
		opts.HTTPHeader.Set("Origin", g.origin())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, resp, err := websocket.Dial(ctx, g.url(path), opts)
	if err == nil {
		c.SetReadLimit(-1)
		t.Cleanup(func() { c.CloseNow() })
	}
	return c, resp, err
}

// closeOf returns the close code and reason carried by a read error.
func closeOf(err error) (websocket.StatusCode, string) {
	var ce websocket.CloseError
	if errors.As(err, &ce) {
		return ce.Code, ce.Reason
	}
	return -1, ""
}

// rawConn is a client that writes and reads frames by hand.
type rawConn struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
}

func rawDial(t testing.TB, g *gateway, path string, extra http.Header) *rawConn {
	t.Helper()
	return rawDialBuf(t, g, path, extra, 0)
}

// rawDialBuf is rawDial with the socket's receive buffer set (before the
// connection is made, so the kernel does not grow it) when rcvbuf > 0.
func rawDialBuf(t testing.TB, g *gateway, path string, extra http.Header, rcvbuf int) *rawConn {
	t.Helper()
	d := net.Dialer{}
	if rcvbuf > 0 {
		d.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			c.Control(func(fd uintptr) { serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, rcvbuf) })
			return serr
		}
	}
	conn, err := d.Dial("tcp", g.addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	key := make([]byte, 16)
	rand.Read(key)
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n", path, g.addr())
	fmt.Fprintf(&b, "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nOrigin: %s\r\n", base64.StdEncoding.EncodeToString(key), g.origin())
	for k, vs := range extra {
		for _, v := range vs {
			fmt.Fprintf(&b, "%s: %s\r\n", k, v)
		}
	}
	b.WriteString("\r\n")
	if _, err := conn.Write([]byte(b.String())); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(conn)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("raw dial: HTTP %d", resp.StatusCode)
	}
	conn.SetReadDeadline(time.Time{})
	return &rawConn{t: t, conn: conn, br: br}
}

const (
	opCont   = 0x0
	opText   = 0x1
	opBinary = 0x2
	opClose  = 0x8
	opPing   = 0x9
	opPong   = 0xA
)

// frame encodes one masked client frame.
func frame(fin bool, op byte, payload []byte) []byte {
	return frameLen(fin, op, payload, uint64(len(payload)))
}

// frameLen encodes a masked client frame header declaring length, followed
// by payload (which may be shorter than declared).
func frameLen(fin bool, op byte, payload []byte, length uint64) []byte {
	b := []byte{op, 0}
	if fin {
		b[0] |= 0x80
	}
	switch {
	case length > 0xffff:
		b[1] = 127
		b = binary.BigEndian.AppendUint64(b, length)
	case length > 125:
		b[1] = 126
		b = binary.BigEndian.AppendUint16(b, uint16(length))
	default:
		b[1] = byte(length)
	}
	b[1] |= 0x80
	mask := [4]byte{0x12, 0x34, 0x56, 0x78}
	b = append(b, mask[:]...)
	for i, c := range payload {
		b = append(b, c^mask[i%4])
	}
	return b
}

func (r *rawConn) write(frames ...[]byte) {
	r.t.Helper()
	for _, f := range frames {
		if _, err := r.conn.Write(f); err != nil {
			r.t.Fatalf("raw write: %v", err)
		}
	}
}

type rawFrame struct {
	fin     bool
	op      byte
	payload []byte
}

// read reads one (unmasked, server) frame.
func (r *rawConn) read(within time.Duration) (rawFrame, error) {
	r.conn.SetReadDeadline(time.Now().Add(within))
	var h [2]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return rawFrame{}, err
	}
	f := rawFrame{fin: h[0]&0x80 != 0, op: h[0] & 0x0f}
	if h[1]&0x80 != 0 {
		return f, fmt.Errorf("server frame is masked")
	}
	n := uint64(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return f, err
		}
		n = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return f, err
		}
		n = binary.BigEndian.Uint64(l[:])
	}
	f.payload = make([]byte, n)
	_, err := io.ReadFull(r.br, f.payload)
	return f, err
}

// readClose reads frames until a close frame and returns its code and
// reason; it fails the test if none arrives.
func (r *rawConn) readClose(within time.Duration) (int, string) {
	r.t.Helper()
	deadline := time.Now().Add(within)
	for {
		f, err := r.read(time.Until(deadline))
		if err != nil {
			r.t.Fatalf("waiting for a close frame: %v", err)
		}
		if f.op == opClose {
			if len(f.payload) < 2 {
				return 1005, ""
			}
			return int(binary.BigEndian.Uint16(f.payload)), string(f.payload[2:])
		}
	}
}
