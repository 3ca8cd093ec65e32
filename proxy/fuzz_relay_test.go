package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// fuzzBound is how long a fuzz connection may live after its input was
// written: pings after 20ms of silence, a 40ms pong timeout and a 100ms
// close timeout end any connection well within it.
const fuzzBound = 10 * time.Second

// Gateway variants of the fuzz target: bit 0 puts a channel inspector on
// client messages, bits 1-2 pick the client's rate limit (none, drop,
// close, throttle), bit 3 lets clients compress with context takeover.
// Every variant negotiates permessage-deflate with the clients that offer
// it and compresses every message it sends them (MinSize 1).
const fuzzVariants = 16

var fuzzEnv struct {
	once     sync.Once
	up       *fuzzUpstream
	gws      [fuzzVariants]*Gateway
	addrs    [fuzzVariants]string
	sessions sync.Map // connection id → Session
	fragSeen sync.Map // connection id → chan struct{}: the client read a first fragment
	next     atomic.Int64
	err      error
}

// fuzzGateways starts, once per process, the checking upstream and a
// gateway of each variant in front of it. They live until the process
// exits.
func fuzzGateways(t *testing.T) {
	fuzzEnv.once.Do(func() {
		fuzzEnv.up = newFuzzUpstream(func(id string) {
			// Between the two fragments of an echo, once the client has
			// the first: a fan-out frame, which must wait for the second.
			if ch, ok := fuzzEnv.fragSeen.Load(id); ok {
				select {
				case <-ch.(chan struct{}):
				case <-time.After(100 * time.Millisecond): // the gateway may be closing
				}
			}
			if s, ok := fuzzEnv.sessions.Load(id); ok {
				s.(Session).Enqueue(nil, NewMessage(ws.OpText, []byte("between fragments")))
			}
		})
		for v := range fuzzVariants {
			g, addr, err := startFuzzGateway(byte(v), fuzzEnv.up.url())
			if err != nil {
				fuzzEnv.err = err
				return
			}
			fuzzEnv.gws[v], fuzzEnv.addrs[v] = g, addr
		}
	})
	if fuzzEnv.err != nil {
		t.Fatal(fuzzEnv.err)
	}
}

func startFuzzGateway(variant byte, upURL string) (*Gateway, string, error) {
	cfg := Config{
		Upstreams:    []string{upURL},
		Client:       Limits{MaxMessage: 64 << 10},
		PingInterval: 20 * time.Millisecond,
		PongTimeout:  40 * time.Millisecond,
		CloseTimeout: 100 * time.Millisecond,
		WriteTimeout: 2 * time.Second,
		SendQueue:    32,
		SlowConsumer: SlowDrop,
	}
	rate := &RateLimit{Messages: 200, MessageBurst: 8, Bytes: 1 << 20, ByteBurst: 64 << 10}
	switch variant >> 1 & 3 {
	case 1:
		rate.OnExceed = ExceedDrop
	case 2:
		rate.OnExceed = ExceedClose
	case 3:
		rate.OnExceed = ExceedThrottle
	default:
		rate = nil
	}
	cfg.Client.Rate = rate
	cfg.Compression = &Compression{MinSize: 1, ContextTakeover: variant&8 != 0}
	if err := prepareTestConfig(&cfg); err != nil {
		return nil, "", err
	}
	g := New(cfg, nil, nil)
	inspect := variant&1 != 0
	srv := http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id := r.URL.Query().Get("id")
		ended := make(chan struct{})
		info := RequestInfo{
			OnStart: func(s Session) {
				fuzzEnv.sessions.Store(id, s)
				go fanOut(s, ended)
			},
			OnClose: func() {
				fuzzEnv.sessions.Delete(id)
				close(ended)
			},
		}
		if inspect {
			info.Inspect = fuzzInspect
		}
		g.ServeHTTP(w, r, info)
	})}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, "", err
	}
	go srv.Serve(ln)
	return g, ln.Addr().String(), nil
}

// fanOut enqueues a few frames for the client while the connection lives,
// concurrently with everything else written to it.
func fanOut(s Session, ended <-chan struct{}) {
	for i := range 8 {
		select {
		case <-ended:
			return
		default:
		}
		s.Enqueue(nil, NewMessage(ws.OpText, []byte("fan-out "+strconv.Itoa(i))))
		runtime.Gosched()
	}
}

// fuzzInspect is the fuzz target's channel policy: a message starting with
// 'D' is dropped with a reply, one starting with 'K' closes the connection,
// the rest pass.
func fuzzInspect(msg []byte, text bool) (Verdict, []byte) {
	switch {
	case len(msg) > 0 && msg[0] == 'D':
		return Drop, []byte(`{"error":"forbidden"}`)
	case len(msg) > 0 && msg[0] == 'K':
		return Close, nil
	}
	return Pass, nil
}

// buildFrames turns fuzz bytes into properly masked frames: each frame is
// a first header byte (FIN, RSV, opcode: any), a length byte (7-bit length,
// 126 or 127 taking the next 2 or 8 bytes), then up to that many payload
// bytes. The declared length is kept even when the input runs out, so the
// last frame may be cut short. With deflate, the payload of a frame with
// RSV1 that is not cut short is compressed (compress/flate, a fresh
// compressor each), so that compressed messages inflate.
func buildFrames(b []byte, deflate bool) []byte {
	var out []byte
	for len(b) >= 2 {
		b0, sel := b[0], b[1]
		b = b[2:]
		n := uint64(sel & 0x7f)
		switch {
		case n == 126 && len(b) >= 2:
			n = uint64(binary.BigEndian.Uint16(b))
			b = b[2:]
		case n == 127 && len(b) >= 8:
			n = binary.BigEndian.Uint64(b)
			b = b[8:]
		case n >= 126:
			n = uint64(len(b))
		}
		p := b[:min(n, uint64(len(b)))]
		b = b[len(p):]
		if deflate && b0&0x40 != 0 && uint64(len(p)) == n {
			p = flateMessage(p)
			n = uint64(len(p))
		}
		mask := [4]byte{sel, b0, byte(n), 0x5A}
		out = appendFrame(out, b0, &mask, n, p)
	}
	return out
}

// sentCloseCodes parses a client stream as far as it goes and returns the
// close codes in it (1005 for an empty close), which the gateway may echo.
func sentCloseCodes(b []byte) map[int]bool {
	codes := map[int]bool{}
	for len(b) >= 2 {
		op, masked := b[0]&0x0f, b[1]&0x80 != 0
		n := uint64(b[1] & 0x7f)
		b = b[2:]
		switch n {
		case 126:
			if len(b) < 2 {
				return codes
			}
			n = uint64(binary.BigEndian.Uint16(b))
			b = b[2:]
		case 127:
			if len(b) < 8 {
				return codes
			}
			n = binary.BigEndian.Uint64(b)
			b = b[8:]
		}
		var mask [4]byte
		if masked {
			if len(b) < 4 {
				return codes
			}
			copy(mask[:], b)
			b = b[4:]
		}
		if n > uint64(len(b)) {
			return codes
		}
		if op == opClose {
			p := append([]byte(nil), b[:n]...)
			for i := range p {
				p[i] ^= mask[i%4]
			}
			code, _ := closeOf(p)
			codes[code] = true
		}
		b = b[n:]
	}
	return codes
}

var gatewayCloseCodes = map[int]bool{1000: true, 1001: true, 1002: true, 1007: true, 1008: true, 1009: true, 1011: true}

// FuzzRelayClientFrames writes fuzz bytes as a client's frame stream to a
// gateway in front of a raw upstream that echoes every message, then reads
// until the gateway ends the connection, and checks both streams the
// gateway wrote, frame by frame.
//
// The first byte picks how the stream is written: bit 0 builds properly
// masked frames from the rest (buildFrames), else the rest is sent raw;
// the client half-closes the connection after writing unless bits 1 and 2
// are both set (then only the gateway's ping and pong timeouts can end a
// connection left mid-frame; that is slow, so it is the rarer case); bit 3
// has buildFrames compress the frames with RSV1. The second byte picks the
// setup: bits 0-2 the gateway variant (channel inspector; rate limit
// none, drop, close or throttle), bits 3-4 what the upstream does with a
// close frame (answer, hang up, stay silent, or close first after its
// first echo), bit 5 whether it echoes in two fragments with a ping and a
// fan-out frame between them, bit 6 whether the client offers
// permessage-deflate, bit 7 whether the gateway lets it compress with
// context takeover. Fan-out frames are enqueued concurrently all along.
//
// The gateway must not panic and must end every connection within
// fuzzBound. Toward both peers: well formed frames, masked toward the
// upstream only, no data frame inside another message, nothing after a
// close frame, at most one close; RSV1 only on the first frame of a data
// message to a client that agreed to compression, and such a message
// inflates (compress/flate), to valid UTF-8 if it is text; nothing
// compressed toward the upstream, which never agrees to it. Toward the
// client: any close code it sends is its own (1000, 1001, 1002, 1007,
// 1008, 1009, 1011) or one a peer sent, and a client that sent a close
// frame gets one. Toward the upstream: an upstream that sent a close frame
// gets one.
func FuzzRelayClientFrames(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		fuzzGateways(t)
		var mode, setup byte
		if len(data) > 0 {
			mode, data = data[0], data[1:]
		}
		if len(data) > 0 {
			setup, data = data[0], data[1:]
		}
		offer := setup&0x40 != 0
		stream := data
		if mode&1 != 0 {
			stream = buildFrames(data, offer && mode&8 != 0)
		}
		peerCodes := sentCloseCodes(stream)
		if setup>>3&3 == upInitiateClose {
			peerCodes[4000] = true // the upstream's, forwarded
		}
		variant := setup&7 | setup>>7<<3
		id := strconv.FormatInt(fuzzEnv.next.Add(1), 10)
		result := fuzzEnv.up.result(id)
		defer fuzzEnv.up.forget(id)
		fragSeen := make(chan struct{}, 1)
		fuzzEnv.fragSeen.Store(id, fragSeen)
		defer fuzzEnv.fragSeen.Delete(id)
		path := fmt.Sprintf("/?id=%s&close=%d", id, setup>>3&3)
		if setup&0x20 != 0 {
			path += "&fragment=1"
		}

		var offerHdr http.Header
		if offer {
			offerHdr = http.Header{"Sec-Websocket-Extensions": {"permessage-deflate; client_max_window_bits"}}
		}
		rc, err := dialRawPath(fuzzEnv.addrs[variant], path, offerHdr)
		if err != nil {
			t.Fatal(err)
		}
		if agreed := strings.HasPrefix(rc.resp.Header.Get("Sec-Websocket-Extensions"), "permessage-deflate"); agreed != offer {
			t.Fatalf("offered permessage-deflate: %v; agreed: %q", offer, rc.resp.Header.Get("Sec-Websocket-Extensions"))
		}
		defer rc.conn.Close()
		wrote := make(chan struct{})
		go func() {
			defer close(wrote)
			rc.conn.SetWriteDeadline(time.Now().Add(fuzzBound))
			if _, err := rc.conn.Write(stream); err == nil && mode&6 != 6 {
				rc.conn.(*net.TCPConn).CloseWrite()
			}
		}()

		rc.conn.SetReadDeadline(time.Now().Add(fuzzBound))
		check := streamCheck{deflate: offer}
		for {
			fr, err := readRawFrame(rc.br, 1<<20)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("the gateway did not end the connection within %v", fuzzBound)
				}
				break // EOF or reset: the gateway ended it
			}
			if err := check.frame(fr); err != nil {
				t.Fatalf("to the client: %v", err)
			}
			if check.inMsg {
				select {
				case fragSeen <- struct{}{}:
				default:
				}
			}
			if fr.op == opClose {
				if code, reason := closeOf(fr.payload); !gatewayCloseCodes[code] && !peerCodes[code] {
					t.Fatalf("the gateway sent close %d %q; the client sent %v", code, reason, peerCodes)
				}
			}
		}
		<-wrote
		if len(sentCloseCodes(stream)) > 0 && !check.closed {
			t.Fatalf("the client sent a close frame (%v) and got none", peerCodes)
		}
		select {
		case err := <-result:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(fuzzBound):
			t.Fatal("the upstream connection did not end")
		}
		// The connection is gone from the registry too.
		g := fuzzEnv.gws[variant]
		poll(t, "the connection to leave the registry", func() bool { return g.Registry().Len() == 0 })
	})
}
