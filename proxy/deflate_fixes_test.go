package proxy

import (
	"bufio"
	"net"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
)

// startDeflateUpstream is a raw upstream that agrees to permessage-deflate
// without context takeover, writes frames (compressed or not, as given) to
// the gateway, and sends what it gets back as a close frame's code on
// closes.
func startDeflateUpstream(t *testing.T, frames []byte, closes chan<- int) string {
	t.Helper()
	var wg sync.WaitGroup
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		wg.Add(1)
		defer wg.Done()
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.Writer.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + wantAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n" +
			"Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n\r\n")
		brw.Writer.Flush()
		serveDeflateUpstream(conn, brw.Reader, frames, closes)
	}))
	t.Cleanup(func() {
		srv.Close()
		wg.Wait()
	})
	return "ws://" + srv.Listener.Addr().String()
}

func serveDeflateUpstream(conn net.Conn, br *bufio.Reader, frames []byte, closes chan<- int) {
	if frames != nil {
		conn.Write(frames)
	}
	for {
		f, err := readRawFrame(br, 1<<20)
		if err != nil {
			closes <- 0
			return
		}
		if f.op == opClose {
			code, _ := closeOf(f.payload)
			closes <- code
			return
		}
	}
}

// TestInflateErrorBlamesItsSide: compressed data that does not inflate is
// the fault of the side that sent it, whichever side failed before it on
// another connection. From a client: the client gets 1007. From an
// upstream: the upstream gets 1007 and the client 1011.
func TestInflateErrorBlamesItsSide(t *testing.T) {
	corrupt := []byte{0xff, 0xff, 0xff, 0xff}
	fromClient := func() {
		t.Helper()
		closes := make(chan int, 1)
		tg := startGateway(t, startDeflateUpstream(t, nil, closes), func(c *Config) { c.Compression = &Compression{} })
		rc := dialRaw(t, tg.addr(), deflateOffer)
		rc.write(mf(0x80|0x40|opBinary, corrupt))
		expectClose(t, rc, 1007)
		if code := <-closes; code != 1007 && code != 0 {
			// The upstream is told what the client was told, or nothing.
			t.Errorf("client's corrupt data: the upstream got close %d", code)
		}
	}
	fromUpstream := func() {
		t.Helper()
		closes := make(chan int, 1)
		tg := startGateway(t, startDeflateUpstream(t, sf(0x40|opBinary, corrupt), closes), func(c *Config) { c.Compression = &Compression{} })
		rc := dialRaw(t, tg.addr(), nil)
		expectClose(t, rc, 1011)
		if code := <-closes; code != 1007 {
			t.Errorf("upstream's corrupt data: the upstream got close %d, want 1007", code)
		}
	}
	fromClient()
	fromUpstream()
	fromClient()
}

// TestCompressedMessageBoundWithoutMaxMessage: with max_message unlimited,
// a compressed message still may not grow past what it could inflate to
// (assembleCap): its frames are collected before it is inflated, and
// without a bound a peer could make the gateway hold any amount of them.
func TestCompressedMessageBoundWithoutMaxMessage(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.Compression = &Compression{}
		c.Client.MaxMessage = -1
	})
	rc := dialRaw(t, tg.addr(), deflateOffer)
	up.next(t)
	piece := make([]byte, 1<<20)
	frames := [][]byte{mf(0x40|opBinary, nil)}
	for range assembleCap/len(piece) + 2 {
		frames = append(frames, mf(opCont, piece))
	}
	go func() {
		// Never the last frame: the gateway must stop the message on its
		// size alone. Writes fail once it has closed the connection.
		for _, f := range frames {
			if _, err := rc.conn.Write(f); err != nil {
				return
			}
		}
	}()
	expectClose(t, rc, 1009)
}
