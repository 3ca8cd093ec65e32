package proxy

import (
	"bytes"
	"compress/flate"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strings"
	"testing"

	"github.com/coder/websocket"
	"github.com/gobwas/httphead"
)

// The peers in these tests compress and inflate with compress/flate and
// coder/websocket, not with the gateway's own deflate code.

// deflateMessage compresses msg as one permessage-deflate message (the
// trailing 00 00 ff ff removed), from a fresh compressor.
func deflateMessage(t testing.TB, msg []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	fw, err := flate.NewWriter(&b, flate.BestCompression)
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(msg)
	fw.Flush()
	return bytes.TrimSuffix(b.Bytes(), []byte{0, 0, 0xff, 0xff})
}

// inflateMessage inflates one permessage-deflate message.
func inflateMessage(t testing.TB, p []byte) []byte {
	t.Helper()
	r := flate.NewReader(io.MultiReader(bytes.NewReader(p), bytes.NewReader([]byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff})))
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("inflating the gateway's message: %v", err)
	}
	return b
}

// chatJSON is a chat-like JSON message of about n bytes.
func chatJSON(i, n int) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, `{"type":"message","room":"chat:acme:42","seq":%d,"user":{"id":"u-%d","name":"Alice"},"text":"`, i, i%7)
	for b.Len() < n-3 {
		b.WriteString("the quick brown fox jumps over the lazy dog ")
	}
	b.WriteString(`"}`)
	return []byte(b.String())
}

// mf is a masked client frame with first byte b0.
func mf(b0 byte, payload []byte) []byte {
	return appendFrame(nil, b0, &testMask, uint64(len(payload)), payload)
}

var deflateOffer = http.Header{"Sec-Websocket-Extensions": {"permessage-deflate; client_max_window_bits"}}

func TestCompressionNegotiation(t *testing.T) {
	for _, c := range []struct {
		name     string
		cfg      Compression
		offer    []string
		want     string // the response; "" declines
		huffman  bool
		takeover uint8
	}{
		{"none offered", Compression{}, nil, "", false, 0},
		{"plain offer", Compression{}, []string{"permessage-deflate"},
			"permessage-deflate; server_no_context_takeover; client_no_context_takeover", false, 0},
		{"browser offer", Compression{}, []string{"permessage-deflate; client_max_window_bits"},
			"permessage-deflate; server_no_context_takeover; client_no_context_takeover", false, 0},
		{"small server window", Compression{}, []string{"permessage-deflate; server_max_window_bits=10"},
			"permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_no_context_takeover", true, 0},
		{"unknown parameter declined, next offer taken", Compression{},
			[]string{"permessage-deflate; foo=1, permessage-deflate; server_no_context_takeover"},
			"permessage-deflate; server_no_context_takeover; client_no_context_takeover", false, 0},
		{"repeated parameter declined", Compression{}, []string{"permessage-deflate; server_no_context_takeover; server_no_context_takeover"}, "", false, 0},
		{"bad window declined", Compression{}, []string{"permessage-deflate; server_max_window_bits=16"}, "", false, 0},
		{"other extension ignored", Compression{}, []string{"x-webkit-deflate-frame", "permessage-deflate"},
			"permessage-deflate; server_no_context_takeover; client_no_context_takeover", false, 0},
		{"context takeover", Compression{ContextTakeover: true}, []string{"permessage-deflate"},
			"permessage-deflate; server_no_context_takeover", false, 15},
		{"context takeover, window asked", Compression{ContextTakeover: true, WindowBits: 10}, []string{"permessage-deflate; client_max_window_bits"},
			"permessage-deflate; server_no_context_takeover; client_max_window_bits=10", false, 10},
		{"context takeover, client's own window", Compression{ContextTakeover: true, WindowBits: 12}, []string{"permessage-deflate; client_max_window_bits=9"},
			"permessage-deflate; server_no_context_takeover", false, 9},
		{"context takeover, window not offered", Compression{ContextTakeover: true, WindowBits: 10}, []string{"permessage-deflate"},
			"permessage-deflate; server_no_context_takeover", false, 15},
	} {
		t.Run(c.name, func(t *testing.T) {
			z := c.cfg
			if err := z.prepare(); err != nil {
				t.Fatal(err)
			}
			r := &http.Request{Header: http.Header{"Sec-Websocket-Extensions": c.offer}}
			got, d := z.accept(r)
			if got != c.want {
				t.Fatalf("response %q, want %q", got, c.want)
			}
			if (d != nil) != (c.want != "") {
				t.Fatalf("state %v with response %q", d, got)
			}
			if d != nil && (d.huffman != c.huffman || d.inBits != c.takeover) {
				t.Errorf("huffman %v, window %d; want %v, %d", d.huffman, d.inBits, c.huffman, c.takeover)
			}
		})
	}
	if got, _ := (*Compression)(nil).accept(&http.Request{Header: deflateOffer}); got != "" {
		t.Errorf("no compression configured: response %q", got)
	}
	offers := func(z *Compression) string {
		if err := z.prepare(); err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		httphead.WriteOptions(&b, z.offer()) // as the dialer writes them
		return b.String()
	}
	for _, c := range []struct {
		z    Compression
		want string
	}{
		{Compression{}, "permessage-deflate;server_no_context_takeover;client_no_context_takeover"},
		{Compression{ContextTakeover: true}, "permessage-deflate;client_no_context_takeover"},
		{Compression{ContextTakeover: true, WindowBits: 10},
			"permessage-deflate;client_no_context_takeover;server_max_window_bits=10,permessage-deflate;client_no_context_takeover"},
		{Compression{NoUpstream: true}, ""},
	} {
		if got := offers(&c.z); got != c.want {
			t.Errorf("%+v: offer %q, want %q", c.z, got, c.want)
		}
	}
	for _, bits := range []int{7, 16} {
		if err := (&Compression{WindowBits: bits}).prepare(); err == nil {
			t.Errorf("window bits %d accepted", bits)
		}
	}
}

// TestCompressionPeers relays through a compressing gateway between
// coder/websocket clients and upstreams with every mix of compression
// settings: every message arrives whole, both ways.
func TestCompressionPeers(t *testing.T) {
	modes := []struct {
		name string
		mode websocket.CompressionMode
	}{
		{"plain", websocket.CompressionDisabled},
		{"no-takeover", websocket.CompressionNoContextTakeover},
		{"takeover", websocket.CompressionContextTakeover},
	}
	msgs := [][]byte{[]byte("hi"), chatJSON(1, 1024), chatJSON(2, 1024), chatJSON(3, 200<<10), bytes.Repeat([]byte{0, 1, 2, 3}, 5000), chatJSON(4, 60)}
	for _, takeover := range []bool{false, true} {
		for _, cm := range modes {
			for _, um := range modes {
				name := fmt.Sprintf("gateway takeover %v/client %s/upstream %s", takeover, cm.name, um.name)
				t.Run(name, func(t *testing.T) {
					up := startUpstream(t, &websocket.AcceptOptions{CompressionMode: um.mode, CompressionThreshold: 1}, nil)
					tg := startGateway(t, up.url, func(c *Config) {
						c.Compression = &Compression{ContextTakeover: takeover}
					})
					c, resp := dialCoder(t, tg, "/", &websocket.DialOptions{CompressionMode: cm.mode, CompressionThreshold: 1})
					ext := resp.Header.Get("Sec-Websocket-Extensions")
					if (cm.mode != websocket.CompressionDisabled) != strings.HasPrefix(ext, "permessage-deflate") {
						t.Fatalf("client %s: extensions %q", cm.name, ext)
					}
					c.SetReadLimit(-1)
					uc := up.next(t)
					uc.c.SetReadLimit(-1)
					ctx := context.Background()
					for i, m := range msgs {
						typ := websocket.MessageText
						if i == 4 {
							typ = websocket.MessageBinary
						}
						if err := c.Write(ctx, typ, m); err != nil {
							t.Fatal(err)
						}
						if got := uc.nextMsgOrEnd(t); got.typ != typ || !bytes.Equal(got.data, m) {
							t.Fatalf("message %d: upstream got %d bytes (type %v), want %d", i, len(got.data), got.typ, len(m))
						}
						gt, got, err := c.Read(ctx)
						if err != nil {
							t.Fatalf("message %d: echo: %v", i, err)
						}
						if gt != typ || !bytes.Equal(got, m) {
							t.Fatalf("message %d: echo of %d bytes (type %v), want %d", i, len(got), gt, len(m))
						}
					}
					c.Close(websocket.StatusNormalClosure, "")
				})
			}
		}
	}
}

// TestCompressionOnTheWire checks the frames themselves: a compressed
// client message reaches a plain upstream inflated, and the upstream's
// plain answer reaches the client compressed (RSV1), once it is as large as
// MinSize.
func TestCompressionOnTheWire(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.Compression = &Compression{MinSize: 100} })
	rc := dialRaw(t, tg.addr(), deflateOffer)
	if got := rc.resp.Header.Get("Sec-Websocket-Extensions"); got != "permessage-deflate; server_no_context_takeover; client_no_context_takeover" {
		t.Fatalf("extensions %q", got)
	}
	uc := up.next(t)
	msg := chatJSON(1, 1024)
	rc.write(mf(0x80|0x40|opText, deflateMessage(t, msg)))
	if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
		t.Fatalf("upstream got %q", got.data)
	}
	f := rc.readData()
	if f.rsv != 4 || f.op != opText || !f.fin {
		t.Fatalf("echo frame rsv %d op %d fin %v, want a compressed text frame", f.rsv, f.op, f.fin)
	}
	if len(f.payload) >= len(msg)/2 {
		t.Errorf("1 KiB of chat JSON compressed to %d bytes", len(f.payload))
	}
	if got := inflateMessage(t, f.payload); !bytes.Equal(got, msg) {
		t.Fatalf("echo inflated to %q", got)
	}
	// Under MinSize: plain, both ways.
	small := []byte(`{"type":"ping"}`)
	rc.write(mf(0x80|0x40|opText, deflateMessage(t, small)))
	if got := uc.nextMsg(t); !bytes.Equal(got.data, small) {
		t.Fatalf("upstream got %q", got.data)
	}
	if f := rc.readData(); f.rsv != 0 || !bytes.Equal(f.payload, small) {
		t.Fatalf("small echo: rsv %d, %q", f.rsv, f.payload)
	}
	// A message that compression would not shrink goes plain.
	random := make([]byte, 2048)
	rand.Read(random)
	rc.write(mf(0x80|0x40|opBinary, deflateMessage(t, random)))
	if got := uc.nextMsg(t); !bytes.Equal(got.data, random) {
		t.Fatal("random bytes: upstream got others")
	}
	if f := rc.readData(); f.rsv != 0 || !bytes.Equal(f.payload, random) {
		t.Fatalf("random bytes echoed with rsv %d, %d bytes", f.rsv, len(f.payload))
	}
	// A compressed message in three fragments (RSV1 on the first only).
	z := deflateMessage(t, msg)
	third := len(z) / 3
	rc.write(mf(0x40|opText, z[:third]),
		mf(opCont, z[third:2*third]),
		mf(0x80|opCont, z[2*third:]))
	if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
		t.Fatalf("fragmented: upstream got %d bytes", len(got.data))
	}
	if got := inflateMessage(t, rc.readData().payload); !bytes.Equal(got, msg) {
		t.Fatal("fragmented: echo differs")
	}
}

// TestCompressionContextTakeover: a client that compresses with the
// context of its earlier messages, where the gateway allows it.
func TestCompressionContextTakeover(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.Compression = &Compression{ContextTakeover: true, WindowBits: 15} })
	rc := dialRaw(t, tg.addr(), deflateOffer)
	if got := rc.resp.Header.Get("Sec-Websocket-Extensions"); got != "permessage-deflate; server_no_context_takeover" {
		t.Fatalf("extensions %q", got)
	}
	uc := up.next(t)
	var b bytes.Buffer
	fw, _ := flate.NewWriter(&b, flate.BestCompression)
	for i := range 20 {
		msg := chatJSON(i, 300+i*50)
		b.Reset()
		fw.Write(msg)
		fw.Flush()
		z := bytes.TrimSuffix(b.Bytes(), []byte{0, 0, 0xff, 0xff})
		rc.write(mf(0x80|0x40|opText, z))
		if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
			t.Fatalf("message %d (%d bytes compressed with context): upstream got %q", i, len(z), got.data)
		}
	}
}

// TestCompressionBadFrames: RSV bits where they mean nothing, and
// compressed data that does not inflate.
func TestCompressionBadFrames(t *testing.T) {
	up := startUpstream(t, nil, nil)
	on := func(c *Config) { c.Compression = &Compression{} }
	for _, c := range []struct {
		name   string
		offer  bool
		frames [][]byte
		code   int
	}{
		{"RSV1 without the extension", false, [][]byte{mf(0x80|0x40|opText, deflateMessage(t, []byte("x")))}, 1002},
		{"RSV1 on a ping", true, [][]byte{mf(0x80|0x40|opPing, nil)}, 1002},
		{"RSV1 on a continuation", true, [][]byte{
			mf(0x40|opText, []byte{}),
			mf(0x80|0x40|opCont, deflateMessage(t, []byte("x")))}, 1002},
		{"RSV2", true, [][]byte{mf(0x80|0x20|opText, []byte("x"))}, 1002},
		{"corrupt data", true, [][]byte{mf(0x80|0x40|opText, []byte{0xff, 0xff, 0xff, 0xff})}, 1007},
		{"invalid UTF-8 inflated", true, [][]byte{mf(0x80|0x40|opText, deflateMessage(t, []byte("ok \xff")))}, 1007},
	} {
		t.Run(c.name, func(t *testing.T) {
			tg := startGateway(t, up.url, on)
			var offer http.Header
			if c.offer {
				offer = deflateOffer
			}
			rc := dialRaw(t, tg.addr(), offer)
			up.next(t)
			rc.write(c.frames...)
			expectClose(t, rc, c.code)
		})
	}
}

// expectClose reads until a close frame and checks its code.
func expectClose(t *testing.T, rc *rawClient, code int) {
	t.Helper()
	for {
		f, err := rc.read()
		if err != nil {
			t.Fatalf("waiting for close %d: %v", code, err)
		}
		if f.op == opClose {
			if got, reason := closeOf(f.payload); got != code {
				t.Fatalf("close %d %q, want %d", got, reason, code)
			}
			return
		}
	}
}

// TestCompressionBomb: a 1 KiB message that inflates to four times max_message,
// in one frame and across fragments, is refused with 1009 having cost the
// gateway less than max_message + 1 MiB of heap.
func TestCompressionBomb(t *testing.T) {
	const maxMessage = 256 << 10
	bomb := deflateMessage(t, make([]byte, 1<<20)) // 1 MiB of zeros
	if len(bomb) > 1100 {
		t.Fatalf("bomb of %d bytes", len(bomb))
	}
	for _, c := range []struct {
		name   string
		frames func() [][]byte
	}{
		{"one frame", func() [][]byte {
			return [][]byte{mf(0x80|0x40|opBinary, bomb)}
		}},
		{"fragments", func() [][]byte {
			var fs [][]byte
			for i := 0; i < len(bomb); i += 128 {
				b0 := byte(opCont)
				if i == 0 {
					b0 = 0x40 | opBinary
				}
				if i+128 >= len(bomb) {
					fs = append(fs, mf(0x80|b0, bomb[i:]))
					break
				}
				fs = append(fs, mf(b0, bomb[i:i+128]))
			}
			return fs
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			up := startUpstream(t, nil, nil)
			tg := startGateway(t, up.url, func(c *Config) {
				c.Compression = &Compression{}
				c.Client.MaxMessage = maxMessage
			})
			rc := dialRaw(t, tg.addr(), deflateOffer)
			uc := up.next(t)
			frames := c.frames()
			runtime.GC()
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			rc.write(frames...)
			expectClose(t, rc, 1009)
			runtime.ReadMemStats(&after)
			grew := after.TotalAlloc - before.TotalAlloc
			t.Logf("%d compressed bytes in %d frames: 1009; %d bytes allocated meanwhile (max_message %d)", len(bomb), len(frames), grew, maxMessage)
			if grew >= maxMessage+1<<20 {
				t.Errorf("the bomb cost %d bytes of heap, want under %d", grew, maxMessage+1<<20)
			}
			select {
			case m := <-uc.msgs:
				t.Errorf("the upstream got a message of %d bytes", len(m.data))
			default:
			}
		})
	}
}

// TestCompressionInspected: Inspect sees compressed client messages
// inflated, and a message it denies is not forwarded.
func TestCompressionInspected(t *testing.T) {
	up := startUpstream(t, nil, nil)
	info := func() RequestInfo {
		return RequestInfo{Inspect: func(msg []byte, text bool) (Verdict, []byte) {
			if bytes.Contains(msg, []byte(`"room":"secret"`)) {
				return Drop, []byte(`{"error":"forbidden"}`)
			}
			return Pass, nil
		}}
	}
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.Compression = &Compression{} }, info)
	rc := dialRaw(t, tg.addr(), deflateOffer)
	uc := up.next(t)
	denied := []byte(`{"type":"say","room":"secret","text":"` + strings.Repeat("x", 500) + `"}`)
	rc.write(mf(0x80|0x40|opText, deflateMessage(t, denied)))
	if f := rc.readData(); string(f.payload) != `{"error":"forbidden"}` {
		t.Fatalf("reply %q (rsv %d)", f.payload, f.rsv)
	}
	ok := []byte(`{"type":"say","room":"lobby"}`)
	rc.write(mf(0x80|0x40|opText, deflateMessage(t, ok)))
	if got := uc.nextMsg(t); !bytes.Equal(got.data, ok) {
		t.Fatalf("upstream got %q, want the allowed message only", got.data)
	}
}

// TestCompressedFanout: messages of the gateway's own go to a compressing
// client compressed, the same bytes for every such client.
func TestCompressedFanout(t *testing.T) {
	sessions := make(chan Session, 2)
	up := startUpstream(t, nil, nil)
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.Compression = &Compression{} }, func() RequestInfo {
		return RequestInfo{OnStart: func(s Session) { sessions <- s }}
	})
	a := dialRaw(t, tg.addr(), deflateOffer)
	sa := <-sessions
	b := dialRaw(t, tg.addr(), nil)
	sb := <-sessions
	msg := chatJSON(7, 1024)
	m := NewMessage(opText, msg)
	for _, s := range []Session{sa, sb} {
		if !s.Enqueue(nil, m) {
			t.Fatal("queue refused")
		}
	}
	fa, fb := a.readData(), b.readData()
	if fa.rsv != 4 || !bytes.Equal(inflateMessage(t, fa.payload), msg) {
		t.Errorf("compressing client: rsv %d", fa.rsv)
	}
	if fb.rsv != 0 || !bytes.Equal(fb.payload, msg) {
		t.Errorf("plain client: rsv %d", fb.rsv)
	}
	if z1, z2 := m.frameFor(&deflate{minSize: 1}), m.frameFor(&deflate{minSize: 1}); &z1[0] != &z2[0] {
		t.Error("the compressed frame was made twice")
	}
}
