package proxy

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"runtime"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/coder/websocket"
)

// textOfSize is valid UTF-8 of exactly n bytes, mostly multi-byte code
// points, so that read-buffer boundaries split them.
func textOfSize(n int) []byte {
	const unit = "a\u00e9\u20ac\U0001F600" // 1+2+3+4 bytes
	b := bytes.Repeat([]byte(unit), n/len(unit))
	b = append(b, strings.Repeat("z", n-len(b))...)
	if len(b) != n || !utf8.Valid(b) {
		panic("textOfSize")
	}
	return b
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rand.Uint32())
	}
	return b
}

func TestEchoSizes(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	ctx := context.Background()
	for _, typ := range []websocket.MessageType{websocket.MessageText, websocket.MessageBinary} {
		for _, n := range []int{0, 125, 126, 65535, 65536, 1 << 20} {
			t.Run(fmt.Sprintf("%v/%d", typ, n), func(t *testing.T) {
				msg := randomBytes(n)
				if typ == websocket.MessageText {
					msg = textOfSize(n)
				}
				if err := c.Write(ctx, typ, msg); err != nil {
					t.Fatal(err)
				}
				got := uc.nextMsg(t)
				if got.typ != typ || !bytes.Equal(got.data, msg) {
					t.Fatalf("upstream got %v of %d bytes, want %v of %d", got.typ, len(got.data), typ, n)
				}
				rtyp, back, err := c.Read(ctx)
				if err != nil {
					t.Fatal(err)
				}
				if rtyp != typ || !bytes.Equal(back, msg) {
					t.Fatalf("client got %v of %d bytes back, want %v of %d", rtyp, len(back), typ, n)
				}
			})
		}
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatalf("close: %v", err)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusNormalClosure {
		t.Fatalf("upstream close code %d", code)
	}
	tg.waitLen(t, 0)
}

// TestFragmentedMessage sends a text message in fragments with a ping in
// between (and a code point split across fragments); the upstream gets
// one message and the ping, and the client gets the upstream's pong.
func TestFragmentedMessage(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)

	rc.write(
		cfrag(opText, []byte("Hel")),
		cf(opPing, []byte("are you there")),
		cfrag(opCont, []byte("lo, w\xc3")),
		cfrag(opCont, nil),
		cf(opCont, []byte("\xb6rld")),
	)
	got := uc.nextMsg(t)
	if got.typ != websocket.MessageText || string(got.data) != "Hello, wörld" {
		t.Fatalf("upstream got %v %q", got.typ, got.data)
	}
	select {
	case p := <-uc.pings:
		if string(p) != "are you there" {
			t.Fatalf("upstream ping payload %q", p)
		}
	default:
		t.Fatal("the ping did not reach the upstream")
	}
	var pong bool
	for {
		f, err := rc.read()
		if err != nil {
			t.Fatal(err)
		}
		if f.op == opPong {
			pong = string(f.payload) == "are you there"
			continue
		}
		if f.op != opText || !f.fin || string(f.payload) != "Hello, wörld" {
			t.Fatalf("echo: op %d fin %v %q", f.op, f.fin, f.payload)
		}
		break
	}
	if !pong {
		t.Fatal("the upstream's pong did not reach the client")
	}

	// A large binary message in fragments that cross read-buffer boundaries.
	msg := randomBytes(70000)
	rc.write(cfrag(opBinary, msg[:20000]), cfrag(opCont, msg[20000:50001]), cf(opCont, msg[50001:]))
	got = uc.nextMsg(t)
	if got.typ != websocket.MessageBinary || !bytes.Equal(got.data, msg) {
		t.Fatalf("upstream got %v of %d bytes", got.typ, len(got.data))
	}
}

// TestMaxMessageHugeHeader: a frame declaring 2^62 bytes is refused with
// 1009 at once, without the gateway reading (or allocating) the body.
func TestMaxMessageHugeHeader(t *testing.T) {
	up := startUpstream(t, nil, nil)
	// The gateway cannot find the client's close reply inside a body it
	// skips, so the socket ends after CloseTimeout.
	tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 300 * time.Millisecond })

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(appendFrame(nil, 0x82, &testMask, 1<<62, []byte("the start of a long body")))
	code, reason, data := rc.readClose()
	runtime.ReadMemStats(&after)

	if code != 1009 {
		t.Fatalf("close %d %q, want 1009", code, reason)
	}
	if len(data) != 0 {
		t.Fatalf("got %d data frames before the close", len(data))
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusMessageTooBig {
		t.Fatalf("upstream close %d, want 1009", code)
	}
	if len(uc.msgs) != 0 {
		t.Fatal("the upstream received a message")
	}
	if d := after.TotalAlloc - before.TotalAlloc; d > 2<<20 {
		t.Fatalf("allocated %d bytes for a refused 2^62-byte frame", d)
	} else {
		t.Logf("allocated %d bytes in all (gateway, upstream and client)", d)
	}
	rc.expectEOF()
}

// TestMaxMessageManyFragments: 1-byte continuation frames add up past
// MaxMessage; the gateway counts them and closes with 1009, holding no
// more than a buffer.
func TestMaxMessageManyFragments(t *testing.T) {
	const max = 64 << 10
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.Client.MaxMessage = max })

	one := cfrag(opCont, []byte{'x'})
	stream := make([]byte, 0, (max+1)*len(one))
	stream = append(stream, cfrag(opBinary, []byte{'x'})...)
	for i := 1; i <= max; i++ { // max+1 bytes in all
		stream = append(stream, one...)
	}

	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(stream)
	code, reason, _ := rc.readClose()
	runtime.ReadMemStats(&after)

	if code != 1009 {
		t.Fatalf("close %d %q, want 1009", code, reason)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusMessageTooBig {
		t.Fatalf("upstream close %d, want 1009", code)
	}
	if len(uc.msgs) != 0 {
		t.Fatal("the upstream received a message")
	}
	// The upstream (coder/websocket) assembles up to 64 KiB of the
	// message; everything together must stay far below the 2 MB bound.
	if d := after.TotalAlloc - before.TotalAlloc; d > 2<<20 {
		t.Fatalf("allocated %d bytes", d)
	} else {
		t.Logf("allocated %d bytes in all (gateway, upstream and client)", d)
	}
}

// TestMaxMessageExact: a message of exactly MaxMessage passes, in one
// frame or many.
func TestMaxMessageExact(t *testing.T) {
	const max = 1000
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.Client.MaxMessage = max })
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	msg := randomBytes(max)
	rc.write(cf(opBinary, msg), cfrag(opBinary, msg[:1]), cfrag(opCont, msg[1:999]), cf(opCont, msg[999:]))
	for i := 0; i < 2; i++ {
		if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
			t.Fatalf("message %d: upstream got %d bytes", i, len(got.data))
		}
	}
	rc.write(cf(opBinary, randomBytes(max+1)))
	if code, reason, _ := rc.readClose(); code != 1009 {
		t.Fatalf("close %d %q, want 1009", code, reason)
	}
}

// TestUpstreamMaxMessage: an upstream message over Upstream.MaxMessage
// closes the upstream with 1009 and the client with 1011.
func TestUpstreamMaxMessage(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.Upstream.MaxMessage = 100 })
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(cf(opBinary, randomBytes(101))) // within the client's limit; its echo is not
	if code, reason, _ := rc.readClose(); code != 1011 {
		t.Fatalf("client close %d %q, want 1011", code, reason)
	}
	if code, _ := uc.closeCode(t); code != websocket.StatusMessageTooBig {
		t.Fatalf("upstream close %d, want 1009", code)
	}
}

func TestProtocolErrors(t *testing.T) {
	big := textOfSize(2 * readBufSize)
	at := readBufSize + 1000 // past the first read buffer's worth
	bad := append(append(append([]byte(nil), big[:at]...), 0xFF), big[at+1:]...)
	type tc struct {
		name   string
		frames [][]byte
		code   int
		upCode int // what the upstream gets; 0: the same as the client, -1: not checked
	}
	cases := []tc{
		{name: "control frame over 125 bytes", frames: [][]byte{cf(opPing, make([]byte, 126))}, code: 1002},
		{name: "close frame over 125 bytes", frames: [][]byte{cf(opClose, closePayload(1000, strings.Repeat("r", 124)))}, code: 1002},
		{name: "fragmented ping", frames: [][]byte{cfrag(opPing, []byte("p")), cf(opCont, []byte("q"))}, code: 1002},
		{name: "fragmented close", frames: [][]byte{cfrag(opClose, closePayload(1000, ""))}, code: 1002},
		{name: "unmasked frame", frames: [][]byte{appendFrame(nil, 0x81, nil, 5, []byte("hello"))}, code: 1002},
		{name: "unmasked ping", frames: [][]byte{appendFrame(nil, 0x89, nil, 0, nil)}, code: 1002},
		{name: "RSV1", frames: [][]byte{appendFrame(nil, 0xC1, &testMask, 2, []byte("hi"))}, code: 1002},
		{name: "RSV2", frames: [][]byte{appendFrame(nil, 0xA2, &testMask, 2, []byte("hi"))}, code: 1002},
		{name: "RSV3", frames: [][]byte{appendFrame(nil, 0x92, &testMask, 2, []byte("hi"))}, code: 1002},
		{name: "RSV on ping", frames: [][]byte{appendFrame(nil, 0xB9, &testMask, 0, nil)}, code: 1002},
		{name: "continuation without start", frames: [][]byte{cf(opCont, []byte("x"))}, code: 1002},
		{name: "continuation after a whole message", frames: [][]byte{cf(opText, []byte("a")), cf(opCont, []byte("x"))}, code: 1002},
		{name: "new message inside a fragmented one", frames: [][]byte{cfrag(opText, []byte("a")), cf(opBinary, []byte("x"))}, code: 1002},
		{name: "length with the top bit set", frames: [][]byte{appendFrame(nil, 0x82, &testMask, 1<<63, nil)}, code: 1002},
		{name: "invalid UTF-8", frames: [][]byte{cf(opText, []byte("ab\xffcd"))}, code: 1007},
		{name: "overlong UTF-8", frames: [][]byte{cf(opText, []byte("\xc0\xaf"))}, code: 1007},
		{name: "surrogate", frames: [][]byte{cf(opText, []byte("\xed\xa0\x80"))}, code: 1007},
		{name: "above U+10FFFF", frames: [][]byte{cf(opText, []byte("\xf4\x90\x80\x80"))}, code: 1007},
		{name: "truncated UTF-8 at message end", frames: [][]byte{cf(opText, []byte("ab\xe2\x82"))}, code: 1007},
		{name: "invalid UTF-8 across fragments", frames: [][]byte{cfrag(opText, []byte("ab\xe2\x82")), cf(opCont, []byte("(cd"))}, code: 1007},
		{name: "surrogate across fragments", frames: [][]byte{cfrag(opText, []byte("\xed")), cfrag(opCont, []byte("\xa0")), cf(opCont, []byte("\x80"))}, code: 1007},
		{name: "truncated UTF-8 at the last fragment", frames: [][]byte{cfrag(opText, []byte("ab")), cf(opCont, []byte("\xf0\x9f\x98"))}, code: 1007},
		{name: "truncated UTF-8 then empty last fragment", frames: [][]byte{cfrag(opText, []byte("\xf0\x9f")), cf(opCont, nil)}, code: 1007},
		// The first read buffer's worth went out before the bad byte was seen: the
		// upstream's frame is cut, so it gets no close frame.
		{name: "invalid UTF-8 deep in a large frame", frames: [][]byte{cf(opText, bad)}, code: 1007, upCode: -1},
		{name: "close code 1005", frames: [][]byte{cf(opClose, closePayload(1005, ""))}, code: 1002},
		{name: "close code 1006", frames: [][]byte{cf(opClose, closePayload(1006, ""))}, code: 1002},
		{name: "close code 1004", frames: [][]byte{cf(opClose, closePayload(1004, ""))}, code: 1002},
		{name: "close code 1015", frames: [][]byte{cf(opClose, closePayload(1015, ""))}, code: 1002},
		{name: "close code 999", frames: [][]byte{cf(opClose, closePayload(999, ""))}, code: 1002},
		{name: "close code 0", frames: [][]byte{cf(opClose, closePayload(0, ""))}, code: 1002},
		{name: "close code 2999", frames: [][]byte{cf(opClose, closePayload(2999, ""))}, code: 1002},
		{name: "close code 5000", frames: [][]byte{cf(opClose, closePayload(5000, ""))}, code: 1002},
		{name: "close payload of 1 byte", frames: [][]byte{cf(opClose, []byte{3})}, code: 1002},
		{name: "close reason not UTF-8", frames: [][]byte{cf(opClose, closePayload(1000, "bye\xff"))}, code: 1007},
	}
	for op := byte(3); op <= 0xF; op++ {
		if op == opClose || op == opPing || op == opPong {
			continue
		}
		cases = append(cases, tc{name: fmt.Sprintf("reserved opcode %#x", op), frames: [][]byte{cf(op, []byte("x"))}, code: 1002})
	}

	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			up := startUpstream(t, nil, nil)
			// The connection ends CloseTimeout after the close frame (see
			// TestCloseReplyAfterProtocolError); keep that short.
			tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 300 * time.Millisecond })
			rc := dialRaw(t, tg.addr(), nil)
			uc := up.next(t)
			rc.write(c.frames...)
			code, reason, _ := rc.readClose()
			if code != c.code {
				t.Fatalf("close %d %q, want %d", code, reason, c.code)
			}
			if c.upCode != -1 {
				want := c.code
				if c.upCode != 0 {
					want = c.upCode
				}
				if code, reason := uc.closeCode(t); int(code) != want {
					t.Fatalf("upstream close %d %q, want %d", code, reason, want)
				}
			}
			rc.expectEOF()
			uc.wait(t)
			tg.waitLen(t, 0)
		})
	}
}

// TestValidEdgeFrames are frames at the limits of what is allowed; none
// closes the connection.
func TestValidEdgeFrames(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rc.write(
		cf(opPing, make([]byte, 125)),
		cf(opPong, []byte("unsolicited")),
		cf(opBinary, []byte("\xff\xfe binary is not UTF-8 checked")),
		cf(opText, nil),
		cfrag(opText, nil), cf(opCont, nil),
		// A length of 3 in the 16-bit form: not minimal, but relayed (and
		// re-encoded shorter, in place).
		append(append([]byte{0x81, 0x80 | 126, 0, 3}, testMask[:]...),
			'a'^testMask[0], 'b'^testMask[1], 'c'^testMask[2]),
	)
	for _, want := range []string{"\xff\xfe binary is not UTF-8 checked", "", "", "abc"} {
		if got := uc.nextMsg(t); string(got.data) != want {
			t.Fatalf("upstream got %q, want %q", got.data, want)
		}
	}
	for _, want := range []string{"\xff\xfe binary is not UTF-8 checked", "", "", "abc"} {
		if f := rc.readData(); string(f.payload) != want {
			t.Fatalf("client got %q, want %q", f.payload, want)
		}
	}
}

// TestCloseCarried: close codes and reasons go through unchanged in both
// directions.
func TestCloseCarried(t *testing.T) {
	t.Run("client to upstream", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		c, _ := dialCoder(t, tg, "/", nil)
		uc := up.next(t)
		if err := c.Close(4001, "client says bye"); err != nil {
			t.Fatalf("close handshake: %v", err)
		}
		if code, reason := uc.closeCode(t); code != 4001 || reason != "client says bye" {
			t.Fatalf("upstream got close %d %q", code, reason)
		}
		tg.waitLen(t, 0)
	})
	t.Run("upstream to client", func(t *testing.T) {
		up := startUpstream(t, nil, func(uc *upConn) error {
			uc.c.Read(context.Background())
			return uc.c.Close(4002, "upstream says bye")
		})
		tg := startGateway(t, up.url, nil)
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		rc.write(cf(opText, []byte("go")))
		code, reason, _ := rc.readClose()
		if code != 4002 || reason != "upstream says bye" {
			t.Fatalf("client got close %d %q", code, reason)
		}
		uc.wait(t)
		if uc.err != nil {
			t.Fatalf("upstream close handshake: %v", uc.err)
		}
		rc.expectEOF()
		tg.waitLen(t, 0)
	})
	t.Run("empty close", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		rc.write(cf(opClose, nil))
		if code, _ := uc.closeCode(t); code != websocket.StatusNoStatusRcvd {
			t.Fatalf("upstream got close %d, want none (1005)", code)
		}
		f, err := rc.read()
		if err != nil || f.op != opClose || len(f.payload) != 0 {
			t.Fatalf("client got op %d payload %q (%v), want an empty close", f.op, f.payload, err)
		}
		rc.expectEOF()
	})
	t.Run("longest reason", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		reason := strings.Repeat("\u20ac", 41) // 123 bytes
		rc.write(cf(opClose, closePayload(3999, reason)))
		if code, r := uc.closeCode(t); code != 3999 || r != reason {
			t.Fatalf("upstream got close %d %q", code, r)
		}
		f, err := rc.read()
		if code, r := closeOf(f.payload); err != nil || f.op != opClose || code != 3999 || r != reason {
			t.Fatalf("client got op %d close %d %q (%v)", f.op, code, r, err)
		}
	})
}

// TestBusySidesReadDriven: a conversation of messages in quick succession
// makes both sides' reads driven (drive.go), and every message gets
// through in order, through the switch and through the parks that end
// the driven reads (test gateways park after 2 ms).
func TestBusySidesReadDriven(t *testing.T) {
	up := startUpstream(t, nil, nil)
	stats := NewStats()
	tg := startGateway(t, up.url, func(c *Config) { c.Stats = stats })
	c, _ := dialCoder(t, tg, "/", nil)
	uc := up.next(t)
	ctx := context.Background()
	before := drives.Load()
	for round := range 3 {
		for i := range 200 {
			msg := fmt.Appendf(nil, "%d.%d", round, i)
			if err := c.Write(ctx, websocket.MessageText, msg); err != nil {
				t.Fatal(err)
			}
			if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
				t.Fatalf("upstream got %q, want %q", got.data, msg)
			}
			if _, back, err := c.Read(ctx); err != nil || !bytes.Equal(back, msg) {
				t.Fatalf("client got %q back (%v), want %q", back, err, msg)
			}
		}
		// Let both sides park before the next round.
		poll(t, "both sides to park", func() bool { return stats.Snapshot().Parked == 2 })
	}
	if n := drives.Load() - before; n < 2 {
		t.Fatalf("reads became driven %d times, want at least once per side", n)
	}
	if err := c.Close(websocket.StatusNormalClosure, ""); err != nil {
		t.Fatal(err)
	}
	tg.waitLen(t, 0)
}

// TestDrivenReadsChunkedStream: a client sends frames in pieces of random
// sizes (headers and payloads split anywhere, fragments and pings among
// them) in a conversation quick enough for both sides' reads to become
// driven; everything is relayed whole and in order.
func TestDrivenReadsChunkedStream(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	rng := rand.New(rand.NewPCG(1, 2))
	before := drives.Load()
	for i := range 400 {
		msg := fmt.Appendf(nil, "%d:%s", i, bytes.Repeat([]byte{'a' + byte(i%26)}, rng.IntN(300)))
		var stream []byte
		if i%5 == 0 {
			// In two fragments with a ping between them.
			half := len(msg) / 2
			stream = append(stream, cfrag(opText, msg[:half])...)
			stream = append(stream, cf(opPing, []byte("p"))...)
			stream = append(stream, cf(opCont, msg[half:])...)
		} else {
			stream = cf(opText, msg)
		}
		for len(stream) > 0 {
			n := min(len(stream), 1+rng.IntN(40))
			rc.write(stream[:n])
			stream = stream[n:]
		}
		if got := uc.nextMsg(t); !bytes.Equal(got.data, msg) {
			t.Fatalf("message %d: upstream got %d bytes %.20q, want %d bytes %.20q", i, len(got.data), got.data, len(msg), msg)
		}
		if f := rc.readData(); !bytes.Equal(f.payload, msg) {
			t.Fatalf("message %d: client got %d bytes back, want %d", i, len(f.payload), len(msg))
		}
	}
	if n := drives.Load() - before; n < 2 {
		t.Fatalf("reads became driven %d times, want at least once per side", n)
	}
}
