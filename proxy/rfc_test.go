package proxy

// Duties the gateway has as each peer's WebSocket endpoint (RFC 6455):
// message boundaries toward the client, answers to close frames, and what
// happens when a peer stops taking bytes.

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/gobwas/ws"
)

// TestPolicyReplyBetweenFragments: a channel-policy reply to a client
// message must not land between the fragments of a message the upstream is
// sending slowly (RFC 6455 §5.4): the client would read it as a broken
// message and fail the connection.
func TestPolicyReplyBetweenFragments(t *testing.T) {
	const reply = `{"error":"forbidden"}`
	upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
		conn.Write(appendFrame(nil, opText, nil, 6, []byte("hello ")))
		for {
			f, err := readRawFrame(br, 1<<20)
			if err != nil || f.op == opClose {
				return
			}
			// M2 comes after M1 on the client's socket, so once M2 is
			// here the gateway has judged M1 and made its reply.
			if string(f.payload) == "M2" {
				conn.Write(sf(opCont, []byte("world")))
			}
		}
	})
	tg := startGatewayInfo(t, upURL, nil, func() RequestInfo {
		return RequestInfo{Inspect: func(msg []byte, _ bool) (Verdict, []byte) {
			if string(msg) == "M1" {
				return Drop, []byte(reply)
			}
			return Pass, nil
		}}
	})
	rc := dialRaw(t, tg.addr(), nil)
	mr := &msgReader{rc: rc}
	if f, _, done := mr.frame(t); done || f.op != opText || string(f.payload) != "hello " {
		t.Fatalf("first frame: opcode %d FIN %v %q, want the first fragment of \"hello world\"", f.op, f.fin, f.payload)
	}
	rc.write(cf(opText, []byte("M1")), cf(opText, []byte("M2")))
	got := map[string]bool{}
	for range 2 {
		op, msg := mr.next(t)
		if op != opText {
			t.Fatalf("message %q of opcode %d, want text", msg, op)
		}
		got[string(msg)] = true
	}
	if !got["hello world"] || !got[reply] {
		t.Fatalf("client got %v, want \"hello world\" and the reply", got)
	}
}

// TestEnqueueBetweenFragments: a fan-out frame queued for a client while
// the upstream is between the fragments of a message must wait until the
// message is complete (RFC 6455 §5.4). Many messages in a row, because a
// frame that is written at once wins the race only most of the time.
func TestEnqueueBetweenFragments(t *testing.T) {
	const n = 50
	send := make(chan struct{}) // the upstream sends its next frame
	quit := make(chan struct{})
	upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
		gone := make(chan struct{})
		go func() {
			defer close(gone)
			for {
				if f, err := readRawFrame(br, 1<<20); err != nil || f.op == opClose {
					return
				}
			}
		}()
		next := func() bool {
			select {
			case <-send:
				return true
			case <-gone:
			case <-quit:
			}
			return false
		}
		// The test says when to send each frame: a first fragment only
		// once the client has read everything before it, so a held frame
		// always has a final fragment to wait for.
		for i := range n {
			if !next() {
				return
			}
			conn.Write(appendFrame(nil, opText, nil, uint64(len(firstHalf(i))), []byte(firstHalf(i))))
			if !next() {
				return
			}
			conn.Write(sf(opCont, []byte("second half")))
		}
		<-gone
	})
	t.Cleanup(func() { close(quit) })
	sessions := make(chan Session, 1)
	tg := startGatewayInfo(t, upURL, nil, func() RequestInfo {
		return RequestInfo{OnStart: func(s Session) { sessions <- s }}
	})
	rc := dialRaw(t, tg.addr(), nil)
	var s Session
	select {
	case s = <-sessions:
	case <-time.After(waitFor):
		t.Fatal("OnStart was not called")
	}
	signal := func() {
		t.Helper()
		select {
		case send <- struct{}{}:
		case <-time.After(waitFor):
			t.Fatal("the upstream is not waiting to send")
		}
	}
	mr := &msgReader{rc: rc}
	for i := range n {
		signal()
		if f, _, done := mr.frame(t); done || f.op != opText || string(f.payload) != firstHalf(i) {
			t.Fatalf("message %d: opcode %d FIN %v %q, want the first fragment %q", i, f.op, f.fin, f.payload, firstHalf(i))
		}
		pushed := fmt.Sprintf("pushed %d", i)
		if !s.Enqueue(nil, NewMessage(ws.OpText, []byte(pushed))) {
			t.Fatalf("Enqueue %d refused", i)
		}
		signal()
		want := map[string]bool{firstHalf(i) + "second half": true, pushed: true}
		for range 2 {
			_, msg := mr.next(t)
			if !want[string(msg)] {
				t.Fatalf("round %d: got message %q, want one of %v", i, msg, want)
			}
			delete(want, string(msg))
		}
	}
}

func firstHalf(i int) string { return fmt.Sprintf("message %d, first half, ", i) }

// TestClientCloseIsAnswered: the gateway is the client's endpoint, so it
// answers the client's close frame (RFC 6455 §5.5.1) before it closes the
// TCP connection, whatever the upstream does with the close it was passed
// on: hang up at once, or never answer.
func TestClientCloseIsAnswered(t *testing.T) {
	for _, tc := range []struct {
		name   string
		hangUp bool
	}{
		{"upstream hangs up", true},
		{"upstream stays silent", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := make(chan []byte, 1) // the close payload the upstream was passed
			upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
				for {
					f, err := readRawFrame(br, 1<<20)
					if err != nil {
						return
					}
					if f.op == opClose {
						got <- f.payload
						if tc.hangUp {
							return
						}
					}
				}
			})
			tg := startGateway(t, upURL, func(c *Config) {
				c.CloseTimeout = 300 * time.Millisecond
				c.PingInterval = -1
			})
			rc := dialRaw(t, tg.addr(), nil)
			rc.write(cf(opClose, closePayload(4000, "bye")))
			select {
			case p := <-got:
				if code, reason := closeOf(p); code != 4000 || reason != "bye" {
					t.Fatalf("upstream got close %d %q, want 4000 \"bye\"", code, reason)
				}
			case <-time.After(waitFor):
				t.Fatal("the client's close frame did not reach the upstream")
			}
			for {
				f, err := rc.read()
				if err != nil {
					t.Fatalf("the gateway ended the connection without answering the client's close frame: %v", err)
				}
				if f.op == opClose {
					if code, reason := closeOf(f.payload); code != 4000 {
						t.Fatalf("client got close %d %q, want its own code 4000 echoed", code, reason)
					}
					break
				}
				if f.op != opPing && f.op != opPong {
					t.Fatalf("client got a frame of opcode %d after its close frame", f.op)
				}
			}
			rc.expectEOF()
			tg.waitLen(t, 0)
		})
	}
}

// TestUpstreamCloseIsAnswered: roles swapped. The gateway is the
// upstream's endpoint too, and answers its close frame before the TCP
// connection ends, whether the client hangs up at once or never answers
// the close it was passed on.
func TestUpstreamCloseIsAnswered(t *testing.T) {
	for _, tc := range []struct {
		name   string
		hangUp bool
	}{
		{"client hangs up", true},
		{"client stays silent", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := make(chan struct{})
			type ending struct {
				payload []byte // the close frame the upstream got, if any
				err     error  // otherwise how its connection ended
			}
			ended := make(chan ending, 1)
			upURL := startRawUpstream(t, func(conn net.Conn, br *bufio.Reader) {
				select {
				case <-start:
				case <-time.After(waitFor):
					return
				}
				conn.Write(sf(opClose, closePayload(4001, "bye")))
				for {
					f, err := readRawFrame(br, 1<<20)
					if err != nil {
						ended <- ending{err: err}
						return
					}
					if f.op == opClose {
						ended <- ending{payload: f.payload}
						return
					}
				}
			})
			tg := startGateway(t, upURL, func(c *Config) {
				c.CloseTimeout = 300 * time.Millisecond
				c.PingInterval = -1
			})
			rc := dialRaw(t, tg.addr(), nil)
			close(start)
			f, err := rc.read()
			if err != nil || f.op != opClose {
				t.Fatalf("client got opcode %d (%v), want the upstream's close frame", f.op, err)
			}
			if code, reason := closeOf(f.payload); code != 4001 || reason != "bye" {
				t.Fatalf("client got close %d %q, want 4001 \"bye\"", code, reason)
			}
			if tc.hangUp {
				rc.conn.Close()
			} else {
				rc.expectEOF()
			}
			select {
			case e := <-ended:
				if e.err != nil {
					t.Fatalf("the gateway ended the upstream's connection without answering its close frame: %v", e.err)
				}
				if code, reason := closeOf(e.payload); code != 4001 {
					t.Fatalf("upstream got close %d %q, want its own code 4001 echoed", code, reason)
				}
			case <-time.After(waitFor):
				t.Fatal("the upstream's connection did not end")
			}
			tg.waitLen(t, 0)
		})
	}
}

// TestDroppedPingKeepsMessage: with on_exceed drop, a ping over the rate
// limit that arrives between the fragments of an allowed message is
// dropped alone; the message it interrupted still goes through whole.
func TestDroppedPingKeepsMessage(t *testing.T) {
	clock := newFakeClock()
	up := startUpstream(t, nil, nil)
	stats := NewStats()
	tg := startGateway(t, up.url, func(c *Config) {
		c.Now = clock.Now
		c.Stats = stats
		c.Client.Rate = &RateLimit{Messages: 1, OnExceed: ExceedDrop}
		c.PingInterval = -1
	})
	rc := dialRaw(t, tg.addr(), nil)
	uc := up.next(t)
	// "ab" takes the one token; the ping finds none.
	rc.write(cfrag(opText, []byte("ab")), cf(opPing, []byte("over")), cf(opCont, []byte("cd")))
	poll(t, "the ping to be limited", func() bool { return stats.Snapshot().RateLimited[0][ExceedDrop] == 1 })
	clock.Advance(time.Second)
	rc.write(cf(opText, []byte("next")))
	for _, want := range []string{"abcd", "next"} {
		if got := uc.nextMsgOrEnd(t); got.typ != websocket.MessageText || string(got.data) != want {
			t.Fatalf("upstream got %v %q, want text %q", got.typ, got.data, want)
		}
	}
}

// writeTimeout is the Config.WriteTimeout of the tests of peers that stop
// reading; they allow the gateway a second more than that.
const writeTimeout = 500 * time.Millisecond

// TestWriteTimeoutClientNotReading: a client that stops reading while the
// upstream keeps sending is dropped once a write to it has been stuck for
// WriteTimeout. The upstream hears it as the client's doing (1001), and
// the connection leaves nothing behind: no registry entry, no goroutine,
// no socket.
func TestWriteTimeoutClientNotReading(t *testing.T) {
	watch := newStallWatch()
	up := startUpstream(t, nil, func(uc *upConn) error {
		// coder/websocket handles a close frame only inside Read.
		ended := make(chan error, 1)
		go func() {
			_, _, err := uc.c.Read(bgCtx)
			ended <- err
		}()
		msg := make([]byte, 64<<10)
		watch.progress()
		for uc.c.Write(bgCtx, websocket.MessageBinary, msg) == nil {
			watch.progress()
		}
		select {
		case err := <-ended:
			return err
		case <-time.After(waitFor):
			uc.c.CloseNow()
			return <-ended
		}
	})
	stats := NewStats()
	tg := startGateway(t, up.url, func(c *Config) {
		c.WriteTimeout = writeTimeout
		c.CloseTimeout = writeTimeout
		c.PingInterval = -1
		c.Stats = stats
	})
	fds := openFDs()
	rc := dialRaw(t, tg.addr(), nil) // never reads
	uc := up.next(t)
	watch.until(t, writeTimeout+time.Second, "the gateway to drop the client that does not read",
		func() bool { return isDone(uc.done) })
	if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || reason != "client not reading" {
		t.Fatalf("upstream got close %d %q, want 1001 \"client not reading\"", code, reason)
	}
	tg.waitLen(t, 0)
	checkWriteTimeout(t, stats, "client")
	poll(t, "the pumps to end", func() bool { return pumps() == 0 })
	rc.conn.Close()
	waitFDs(t, fds)
}

// checkWriteTimeout checks that the connection that ended was counted as a
// write timeout on side, which closed first and without a close frame.
func checkWriteTimeout(t *testing.T, stats *Stats, side string) {
	t.Helper()
	s := stats.Snapshot()
	client, upstream := uint64(0), uint64(0)
	if side == "client" {
		client = 1
	} else {
		upstream = 1
	}
	if s.WriteTimeoutsClient != client || s.WriteTimeoutsUpstream != upstream {
		t.Errorf("write timeouts: client %d, upstream %d; want %d, %d", s.WriteTimeoutsClient, s.WriteTimeoutsUpstream, client, upstream)
	}
	if s.Closes[CloseKey{side, "none"}] != 1 || len(s.Closes) != 1 {
		t.Errorf("closes %v, want one %s none", s.Closes, side)
	}
}

// TestWriteTimeoutUpstreamNotReading: roles swapped. An upstream that
// stops reading while the client keeps sending is given up on once a
// write to it has been stuck for WriteTimeout; the client gets 1011.
func TestWriteTimeoutUpstreamNotReading(t *testing.T) {
	release := make(chan struct{})
	var once sync.Once
	releaseUpstream := func() { once.Do(func() { close(release) }) }
	upURL := startRawUpstream(t, func(net.Conn, *bufio.Reader) { <-release })
	t.Cleanup(releaseUpstream)
	stats := NewStats()
	tg := startGateway(t, upURL, func(c *Config) {
		c.WriteTimeout = writeTimeout
		c.CloseTimeout = writeTimeout
		c.PingInterval = -1
		c.Stats = stats
	})
	fds := openFDs()
	rc := dialRaw(t, tg.addr(), nil)
	// The client reads while it floods, as a browser does: what it reads
	// is the close frame.
	read := make(chan struct{})
	var f rawFrame
	var err error
	go func() {
		defer close(read)
		for {
			if f, err = rc.read(); err != nil || f.op == opClose {
				return
			}
		}
	}()
	watch := newStallWatch()
	stop := flood(t, rc.conn, cf(opBinary, make([]byte, 64<<10)), watch)
	watch.until(t, writeTimeout+time.Second, "a close frame for the client of an upstream that does not read",
		func() bool { return isDone(read) })
	if err != nil {
		t.Fatalf("the client's connection ended without a close frame: %v", err)
	}
	if code, reason := closeOf(f.payload); code != 1011 || reason != "upstream not reading" {
		t.Fatalf("client got close %d %q, want 1011 \"upstream not reading\"", code, reason)
	}
	stop()
	releaseUpstream()
	tg.waitLen(t, 0)
	checkWriteTimeout(t, stats, "upstream")
	poll(t, "the pumps to end", func() bool { return pumps() == 0 })
	waitFDs(t, fds)
}

// TestUnreadRepliesDropClient: the channel-policy replies to a client that
// never reads pile up until one cannot be written. That failure is the
// client's: the upstream gets 1001 (not 1011, not silence), and nothing is
// blamed on the upstream.
func TestUnreadRepliesDropClient(t *testing.T) {
	up := startUpstream(t, nil, nil)
	reply := bytes.Repeat([]byte("denied "), 512)
	tg := startGatewayInfo(t, up.url, func(c *Config) {
		c.WriteTimeout = writeTimeout
		c.CloseTimeout = writeTimeout
		c.PingInterval = -1
	}, func() RequestInfo {
		return RequestInfo{Inspect: func([]byte, bool) (Verdict, []byte) { return Drop, reply }}
	})
	rc := dialRaw(t, tg.addr(), nil) // never reads
	uc := up.next(t)
	watch := newStallWatch()
	flood(t, rc.conn, bytes.Repeat(cf(opText, []byte(`{"channel":"secret"}`)), 64), watch)
	watch.until(t, writeTimeout+time.Second, "the upstream to hear that the client is gone",
		func() bool { return isDone(uc.done) })
	if code, reason := uc.closeCode(t); code != websocket.StatusGoingAway || strings.Contains(reason, "upstream") {
		t.Fatalf("upstream got close %d %q, want 1001 (the client's doing)", code, reason)
	}
	tg.waitLen(t, 0)
	poll(t, "the pumps to end", func() bool { return pumps() == 0 })
	if lines := tg.log.linesWith("upstream went away"); len(lines) > 0 {
		t.Fatalf("the client's failure was logged as the upstream's:\n%s", strings.Join(lines, "\n"))
	}
}

// TestUnreadPongsDropSession: a session (no upstream) whose client floods
// pings and never reads the pongs is dropped once a pong cannot be
// written, and nothing about it mentions an upstream, which it does not
// have.
func TestUnreadPongsDropSession(t *testing.T) {
	cfg := Config{WriteTimeout: writeTimeout, CloseTimeout: writeTimeout, PingInterval: -1}
	if err := prepareTestConfig(&cfg); err != nil {
		t.Fatal(err)
	}
	logs, logger := newLogBuffer()
	g := New(cfg, nil, logger)
	tg := serveGateway(t, g, func(w http.ResponseWriter, r *http.Request) {
		g.ServeSession(w, r, RequestInfo{Inspect: dropAll}, "test.v1")
	}, false)
	rc := dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}}) // never reads
	tg.waitLen(t, 1)
	watch := newStallWatch()
	flood(t, rc.conn, bytes.Repeat(cf(opPing, bytes.Repeat([]byte("p"), 125)), 64), watch)
	watch.until(t, writeTimeout+time.Second, "the gateway to drop the session whose client does not read",
		func() bool { return g.Registry().Len() == 0 })
	poll(t, "the pumps to end", func() bool { return pumps() == 0 })
	if lines := logs.linesWith("upstream"); len(lines) > 0 {
		t.Fatalf("a session without upstream logged:\n%s", strings.Join(lines, "\n"))
	}
}
