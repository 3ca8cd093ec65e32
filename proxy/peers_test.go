package proxy

// Upstreams for the tests: coder/websocket servers, and raw ones that
// write frames by hand.

import (
	"bufio"
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

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
			"Sec-WebSocket-Accept: " + wantAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
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
