package proxy

import (
	"bufio"
	"bytes"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
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

// The words, names and shape of a chat message (the same as the
// benchmark's, bench/compression.go).
var chatWords = strings.Fields(`the a to and of I you it is that in we for on this be
have with not are was but just so what can do if my me at all get about like will
your up no out one know one think there time when some they now how would going
good then see need more been yes today here great sure thanks meeting call week
tomorrow project update deploy release review please check send file team client
issue fix build test merge branch looks works done later morning afternoon lunch
ok cool nice agreed question answer data report numbers slides draft final doc
link share update status ping sync standup sprint ticket bug feature design spec`)

var chatNames = []string{"Priya Raman", "Tomás Herrera", "Aiko Tanaka", "Oluwaseun Adeyemi", "Marta Kowalska",
	"Liam O'Connor", "Sofia Rossi", "Chen Wei", "Fatima Zahra", "Jonas Becker"}

// chatMessage is a chat-like JSON message of exactly size bytes (for size
// ≥ 400): a "say" on the channel the relay policy allows, with an id,
// time, author, mentions, a reply reference, reactions, client details and
// text of common words, all drawn from seed.
func chatWordsMessage(seed uint64, size int) []byte {
	r := mrand.New(mrand.NewPCG(seed, 0x5eed))
	user := r.IntN(5000)
	var b strings.Builder
	fmt.Fprintf(&b, `{"type":"say","room":"org:acme:1","id":"msg-%08d","ts":%d,"user":{"id":"u-%d","name":%q,"avatar":"https://cdn.acme.example/avatars/u-%d.png","role":"member"},`,
		seed, 1764633600000+int64(seed)*1733+int64(r.IntN(1000)), user, chatNames[r.IntN(len(chatNames))], user)
	fmt.Fprintf(&b, `"mentions":["u-%d"],"reply_to":"msg-%08d","reactions":{"+1":%d,"eyes":%d},"client":{"app":"web","version":"4.%d.%d","locale":"en-GB"},"text":"`,
		r.IntN(5000), seed-uint64(r.IntN(20)), r.IntN(9), r.IntN(4), r.IntN(20), r.IntN(10))
	end := `"}`
	for b.Len() < size-len(end) {
		w := chatWords[r.IntN(len(chatWords))]
		if r.IntN(9) == 0 {
			w += ","
		}
		if room := size - len(end) - b.Len(); len(w)+1 > room {
			w = strings.Repeat(".", room-1)
		}
		b.WriteString(w)
		if b.Len() < size-len(end) {
			b.WriteByte(' ')
		}
	}
	b.WriteString(end)
	return []byte(b.String())
}

// TestCompressChatMessages: every 1 KiB chat message, and the rooms
// envelope around it, comes out of compress smaller than it went in, and
// compress/flate inflates it back. The fastest level alone stored one in
// six of them whole (a few bytes larger than the message).
func TestCompressChatMessages(t *testing.T) {
	total, in := 0, 0
	for i := 1; i <= 64; i++ {
		m := chatWordsMessage(uint64(i), 1024)
		env := []byte(`{"op":"message","channel":"bench:z:deflate","data":` + string(m) + `}`)
		for _, msg := range [][]byte{m, env} {
			z := compress(nil, msg, false)
			if len(z) >= len(msg)*3/4 {
				t.Errorf("message %d: %d bytes compressed to %d", i, len(msg), len(z))
			}
			if got := inflateMessage(t, z); !bytes.Equal(got, msg) {
				t.Fatalf("message %d: inflates to %d different bytes", i, len(got))
			}
			total, in = total+len(z), in+len(msg)
		}
	}
	t.Logf("%d bytes compressed to %d (%.0f %%)", in, total, 100*float64(total)/float64(in))
}

// TestInflateForgetsPreviousMessages: what a message inflates to depends
// on its own bytes and its connection's window only, not on the message
// the pooled inflater handled before. After the first message below
// (corrupt, 1007), klauspost/compress's inflater took the second one
// (corrupt too: compress/flate stops at its 53rd byte) for a valid
// 620-byte message, decoding it with the first one's Huffman table: the
// second declares an empty one, and klauspost's inflater does not clear
// the table it had (found by FuzzInflate).
func TestInflateForgetsPreviousMessages(t *testing.T) {
	first := []byte("\xec\xcc=\x12\x820\x10G\xf1\xab\xec\xfc\xebX8Xm\xe7QbX0bXȇ\"0ww\xb8\x05E\xea\xf7aA17AAAAA271717 A%Z1")
	second := []byte("\xec\xcc=\x12\x820\x10G\xf1\xab\xec\xfc\xebX\xe0Xm\xe7QbX!JXȇ\x82\fww\xb8\x05E\xea\x06!%\xdb\t\f\xa2j\x00\xc3\xf56\xb3A\xf8v\x85A\x92\x19\xdc\x18\x94$\x11\xbc\xc1\xb7`\x94\x03\x83\xd1ݛ\x1eQ\xbf#=u\xa1W\tS\"\xfdH\xa4#\x0f\xf6\xb7R\xab\x1dU[m\xb5\xe7\xb4\xd8\xff\x00")
	var u utf8State
	if _, _, err := (&deflate{}).inflate(first, 1060, true, &u); closeCode(err) != 1007 {
		t.Fatalf("first message: %v", err)
	}
	u.reset()
	d := &deflate{inBits: 13, window: []byte("\xec\xcc=\x12\x82")}
	buf, _, err := d.inflate(second, 1<<20, false, &u)
	if closeCode(err) != 1007 {
		t.Fatalf("second message: inflated to %d bytes, error %v; want 1007", len(buf), err)
	}
	if ref, err := refInflate(second, d.window, 1<<20); err == nil {
		t.Fatalf("compress/flate inflates the second message (%d bytes)", len(ref))
	}
}
