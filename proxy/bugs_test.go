package proxy

// Edge cases: frames that straddle the read buffer, closing after a peer
// broke a rule, a frame that arrives slowly.

import (
	"bufio"
	"bytes"
	"errors"
	"net"
	"strings"
	"testing"
	"time"
)

// TestControlFrameAtReadBufferEnd puts a control frame's header at the
// very end of the gateway's read buffer, so its payload arrives in
// the next read. The gateway used to slice the payload out of the buffer
// without reading it (handleClose, ownPong, a dropped control frame):
// stale bytes, or a slice-bounds panic that killed the process.
func TestControlFrameAtReadBufferEnd(t *testing.T) {
	// A masked binary frame with a 16-bit length has an 8-byte header, a
	// masked control frame a 6-byte one: 8 + n + 6 = readBufSize.
	filler := cf(opBinary, make([]byte, readBufSize-8-6))
	if len(filler)+6 != readBufSize {
		t.Fatalf("filler is %d bytes", len(filler))
	}
	t.Run("close", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		rc.write(filler, cf(opClose, closePayload(4000, "bye")))
		if code, reason := uc.closeCode(t); code != 4000 || reason != "bye" {
			t.Fatalf("upstream close %d %q, want 4000 \"bye\"", code, reason)
		}
		if code, reason, _ := rc.readClose(); code != 4000 {
			t.Fatalf("client close %d %q", code, reason)
		}
	})
	t.Run("pong", func(t *testing.T) {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, nil)
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		rc.write(filler, cf(opPong, []byte("12345678"))) // 8 bytes: checked against the ping token
		select {
		case p := <-uc.pongs:
			if string(p) != "12345678" {
				t.Fatalf("upstream got pong %q", p)
			}
		case <-time.After(waitFor):
			t.Fatal("the pong was not forwarded")
		}
	})
	t.Run("dropped ping", func(t *testing.T) {
		clock := newFakeClock()
		up := startUpstream(t, nil, nil)
		stats := NewStats()
		tg := startGateway(t, up.url, func(c *Config) {
			c.Now = clock.Now
			c.Stats = stats
			c.Client.Rate = &RateLimit{Messages: 1, OnExceed: ExceedDrop}
		})
		rc := dialRaw(t, tg.addr(), nil)
		uc := up.next(t)
		rc.write(filler, cf(opPing, []byte("dropped")))
		uc.nextMsg(t)
		poll(t, "the ping to be limited", func() bool { return stats.Snapshot().RateLimited[0][ExceedDrop] == 1 })
		clock.Advance(time.Second)
		rc.write(cf(opText, []byte("after")))
		if got := uc.nextMsg(t); string(got.data) != "after" {
			t.Fatalf("upstream got %q", got.data)
		}
	})
}

// TestNoDataAfterCloseSent: once the gateway has sent a close frame to a
// peer it must not send it data frames (RFC 6455 §5.5.1). The upstream
// (legally) sends one more message before its close reply. When the
// gateway shuts down it closes both sides at once, so that message must
// not reach the client. When the client breaks the protocol, the upstream
// is closed first and the client's close frame follows the upstream's
// reply, so the message arrives before it; after it, nothing.
func TestNoDataAfterCloseSent(t *testing.T) {
	upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
		for {
			f, err := readRawFrame(br, 1<<20)
			if err != nil {
				return
			}
			if f.op == opClose {
				conn.Write(sf(opText, []byte("late news")))
				conn.Write(sf(opClose, f.payload))
				return
			}
		}
	})
	cases := []struct {
		name     string
		close    func(tg *testGateway, rc *rawClient)
		code     int
		lateNews bool // "late news" arrives before the close frame
	}{
		{"shutdown", func(tg *testGateway, rc *rawClient) { go tg.g.Registry().Shutdown(waitFor) }, 1001, false},
		{"protocol error", func(tg *testGateway, rc *rawClient) { rc.write(appendFrame(nil, 0x81, nil, 0, nil)) }, 1002, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tg := startGateway(t, upURL, nil)
			rc := dialRaw(t, tg.addr(), nil)
			tg.waitLen(t, 1)
			tc.close(tg, rc)
			code, _, before := rc.readClose()
			if code != tc.code {
				t.Fatalf("close %d, want %d", code, tc.code)
			}
			if got := len(before) == 1 && string(before[0].payload) == "late news"; got != tc.lateNews || len(before) > 1 {
				t.Fatalf("frames before the close: %d (late news first: %v, want %v)", len(before), got, tc.lateNews)
			}
			for _, f := range rc.expectEOF() {
				if f.op < 8 {
					t.Fatalf("got data frame %q after the close frame", f.payload)
				}
			}
		})
	}
}

// TestCloseReplyAfterProtocolError: after failing a connection on a bad
// frame, the gateway waits for the client's close reply; that reply must
// be recognised (the bad frame's unread payload skipped first), so the
// connection ends at once rather than after CloseTimeout.
func TestCloseReplyAfterProtocolError(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) {
		c.CloseTimeout = 3 * time.Second
		c.Client.MaxMessage = 100
		c.Now = clock.Now
		c.Client.Rate = &RateLimit{Messages: 1, MessageBurst: 1}
	})
	cases := []struct {
		name   string
		frames [][]byte
		code   int
	}{
		{"unmasked frame", [][]byte{appendFrame(nil, 0x82, nil, 5, []byte("hello"))}, 1002},
		{"RSV1", [][]byte{appendFrame(nil, 0xC2, &testMask, 5, []byte("hello"))}, 1002},
		{"invalid UTF-8", [][]byte{cf(opText, []byte("hello\xff"))}, 1007},
		{"too big", [][]byte{cf(opBinary, make([]byte, 101))}, 1009},
		{"rate limit", [][]byte{cf(opBinary, []byte("ok")), cf(opBinary, []byte("one too many"))}, 1008},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rc := dialRaw(t, tg.addr(), nil)
			up.next(t)
			rc.write(c.frames...)
			closedAfterReply(t, rc, c.code)
		})
	}
}

// closedAfterReply reads the gateway's close frame (which must carry code),
// answers it, and checks that the gateway then closes the socket at once,
// well within the tests' 3 s CloseTimeout.
func closedAfterReply(t *testing.T, rc *rawClient, code int) {
	t.Helper()
	got, reason, _ := rc.readClose() // answers the close
	if got != code {
		t.Fatalf("close %d %q, want %d", got, reason, code)
	}
	start := time.Now()
	rc.expectEOF()
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the gateway closed the socket %v after the close reply (CloseTimeout 3s)", d)
	}
}

// TestBadHandshakeNeverDialsUpstream: a request the client side of the
// upgrade will refuse must be refused before the upstream is dialed.
func TestBadHandshakeNeverDialsUpstream(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, nil)
	resp := rawRequest(t, tg.addr(), "GET / HTTP/1.1\r\nHost: "+tg.addr()+"\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Key: "+newKey()+"\r\nSec-WebSocket-Version: 13\r\n\r\n") // no Connection: Upgrade
	if resp.StatusCode != 400 {
		t.Fatalf("HTTP %d, want 400", resp.StatusCode)
	}
	if resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("Content-Type %q: the answer was not written by WriteError", resp.Header.Get("Content-Type"))
	}
	up.noConn(t)
}

// TestSlowUpstreamFrameKeepsClient: an upstream that sends one frame
// slowly (a large message over a slow link) holds the client's write lock
// for the whole frame, so the gateway cannot ping the client. That is not
// the client's fault: the client is reading every byte, and must not be
// dropped for "ping timeout".
func TestSlowUpstreamFrameKeepsClient(t *testing.T) {
	const size, chunk = 200, 10
	upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
		payload := []byte(strings.Repeat("x", size))
		conn.Write(appendFrame(nil, 0x82, nil, size, nil)) // the header alone
		tick := time.NewTicker(25 * time.Millisecond)      // 20 chunks: 500ms
		defer tick.Stop()
		for i := 0; i < size; i += chunk {
			<-tick.C
			if _, err := conn.Write(payload[i : i+chunk]); err != nil {
				return
			}
		}
		conn.Write(sf(opText, []byte("after")))
		for {
			f, err := readRawFrame(br, 1<<20)
			if err != nil || f.op == opClose {
				return
			}
		}
	})
	tg := startGateway(t, upURL, func(c *Config) {
		c.PingInterval = 50 * time.Millisecond
		c.PongTimeout = 100 * time.Millisecond
	})
	rc := dialRaw(t, tg.addr(), nil)
	for _, want := range []string{strings.Repeat("x", size), "after"} {
		for {
			f, err := rc.read()
			if err != nil {
				t.Fatal(err)
			}
			if f.op == opPing {
				rc.write(cf(opPong, f.payload))
				continue
			}
			if f.op == opClose {
				code, reason := closeOf(f.payload)
				t.Fatalf("closed with %d %q while waiting for %.10q", code, reason, want)
			}
			if string(f.payload) != want {
				t.Fatalf("got %.10q, want %.10q", f.payload, want)
			}
			break
		}
	}
}

// TestBadCloseFrameEndsAtOnce: a client whose close frame is malformed
// has sent its close all the same, and will not send another: after the
// gateway's close frame (and the upstream's reply) the gateway drops the
// connection at once instead of waiting CloseTimeout for a reply.
func TestBadCloseFrameEndsAtOnce(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 3 * time.Second })
	cases := []struct {
		name  string
		frame []byte
		code  int
	}{
		{"1-byte payload", cf(opClose, []byte{3}), 1002},
		{"invalid code", cf(opClose, closePayload(1004, "")), 1002},
		{"invalid UTF-8 reason", cf(opClose, closePayload(1000, "\xff")), 1007},
		{"126-byte payload", cf(opClose, closePayload(1000, strings.Repeat("*", 124))), 1002},
		{"not final", cfrag(opClose, closePayload(1000, "")), 1002},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rc := dialRaw(t, tg.addr(), nil)
			up.next(t)
			rc.write(c.frame)
			start := time.Now()
			f, err := rc.read()
			if err != nil || f.op != opClose {
				t.Fatalf("op %d (%v), want a close frame", f.op, err)
			}
			if code, reason := closeOf(f.payload); code != c.code {
				t.Fatalf("close %d %q, want %d", code, reason, c.code)
			}
			rc.expectEOF() // without answering
			if d := time.Since(start); d > time.Second {
				t.Fatalf("the gateway closed the socket %v after its close frame (CloseTimeout 3s)", d)
			}
		})
	}
}

// TestCloseReplyAfterConsumedMessage: when a message the gateway consumed
// itself ends the connection (a channel policy's close verdict, a bad
// in-band refresh), the client's close reply is still recognised, so the
// connection ends at once rather than after CloseTimeout.
func TestCloseReplyAfterConsumedMessage(t *testing.T) {
	up := startUpstream(t, nil, nil)
	tg := startGatewayInfo(t, up.url, func(c *Config) { c.CloseTimeout, c.PingInterval = 3*time.Second, -1 }, func() RequestInfo {
		return RequestInfo{
			Inspect: func(msg []byte, text bool) (Verdict, []byte) {
				if string(msg) == "kill" {
					return Close, nil
				}
				return Pass, nil
			},
			Expiry:       time.Now().Add(time.Hour),
			RefreshField: "refresh",
			Refresh:      func(string) (time.Time, error) { return time.Time{}, errors.New("bad token") },
		}
	})
	for _, c := range []struct {
		name, msg string
		code      int
	}{
		{"policy close", "kill", 1008},
		{"bad refresh", `{"refresh":"forged"}`, 1008},
	} {
		t.Run(c.name, func(t *testing.T) {
			rc := dialRaw(t, tg.addr(), nil)
			up.next(t)
			rc.write(cf(opText, []byte(c.msg)))
			closedAfterReply(t, rc, c.code)
		})
	}
}

// TestCutFrameEndsAtOnce: invalid UTF-8 deep in a client frame larger than
// the read buffer is found after part of the frame went to the upstream,
// so the upstream can get no close frame. The gateway gives up on the
// upstream at once and the client gets its 1007 right away, instead of
// after the closing timeout spent waiting for a reply that cannot come.
func TestCutFrameEndsAtOnce(t *testing.T) {
	big := bytes.Repeat([]byte("a"), 2*readBufSize)
	big[readBufSize+1000] = 0xFF
	up := startUpstream(t, nil, nil)
	tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 3 * time.Second })
	rc := dialRaw(t, tg.addr(), nil)
	up.next(t)
	start := time.Now()
	rc.write(cf(opText, big))
	if code, reason, _ := rc.readClose(); code != 1007 {
		t.Fatalf("close %d %q, want 1007", code, reason)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("the client's close came %v after the frame (CloseTimeout 3s)", d)
	}
	tg.waitLen(t, 0)
}
