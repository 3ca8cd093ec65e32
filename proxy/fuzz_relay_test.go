package proxy

import (
	"encoding/binary"
	"errors"
	"net"
	"sync"
	"testing"
	"time"
)

// fuzzBound is how long a fuzz connection may live after its input was
// written: pings after 20ms of silence, a 40ms pong timeout and a 100ms
// close timeout end any connection well within it.
const fuzzBound = 10 * time.Second

var fuzzEnv struct {
	once sync.Once
	g    *Gateway
	addr string
	err  error
}

// fuzzGateway starts, once per process, an echo upstream and a gateway in
// front of it. They live until the process exits.
func fuzzGateway(t *testing.T) (*Gateway, string) {
	fuzzEnv.once.Do(func() {
		up := newUpstream(nil, func(uc *upConn) error {
			for {
				typ, data, err := uc.c.Read(bgCtx)
				if err != nil {
					return err
				}
				if err := uc.c.Write(bgCtx, typ, data); err != nil {
					return err
				}
			}
		})
		g, srv, err := newGatewayServer(Config{
			Upstreams:    []string{up.url},
			Client:       Limits{MaxMessage: 64 << 10},
			PingInterval: 20 * time.Millisecond,
			PongTimeout:  40 * time.Millisecond,
			CloseTimeout: 100 * time.Millisecond,
		})
		if err != nil {
			fuzzEnv.err = err
			return
		}
		fuzzEnv.g, fuzzEnv.addr = g, srv.Listener.Addr().String()
	})
	if fuzzEnv.err != nil {
		t.Fatal(fuzzEnv.err)
	}
	return fuzzEnv.g, fuzzEnv.addr
}

// buildFrames turns fuzz bytes into properly masked frames: each frame is
// a first header byte (FIN, RSV, opcode: any), a length byte (7-bit length,
// 126 or 127 taking the next 2 or 8 bytes), then up to that many payload
// bytes. The declared length is kept even when the input runs out, so the
// last frame may be cut short.
func buildFrames(b []byte) []byte {
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
// gateway in front of an echo upstream, then reads until the gateway ends
// the connection. The first byte picks the mode: bit 0 builds properly
// masked frames from the rest (buildFrames), else the rest is sent raw;
// the client half-closes the connection after writing unless bits 1 and 2
// are both set (then only the gateway's ping and pong timeouts can end a
// connection left mid-frame; that is slow, so it is the rarer case). The gateway must not
// panic, must end every connection within fuzzBound, must send only well
// formed server frames, and any close code it sends must be its own
// (1000, 1001, 1002, 1007, 1008, 1009, 1011) or one the client sent.
func FuzzRelayClientFrames(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		g, addr := fuzzGateway(t)
		var mode byte
		if len(data) > 0 {
			mode, data = data[0], data[1:]
		}
		stream := data
		if mode&1 != 0 {
			stream = buildFrames(data)
		}
		peerCodes := sentCloseCodes(stream)

		rc, err := dialRawErr(addr, nil)
		if err != nil {
			t.Fatal(err)
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
		closed := false
		for {
			fr, err := readRawFrame(rc.br, 1<<20)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					t.Fatalf("the gateway did not end the connection within %v", fuzzBound)
				}
				break // EOF or reset: the gateway ended it
			}
			switch {
			case fr.masked:
				t.Fatal("the gateway sent a masked frame to the client")
			case fr.rsv != 0:
				t.Fatalf("the gateway sent RSV bits %d", fr.rsv)
			case fr.op > opBinary && fr.op < opClose, fr.op > opPong:
				t.Fatalf("the gateway sent opcode %#x", fr.op)
			case fr.op >= opClose && (len(fr.payload) > 125 || !fr.fin):
				t.Fatalf("the gateway sent a bad control frame: op %#x, %d bytes, fin %v", fr.op, len(fr.payload), fr.fin)
			case fr.op == opClose:
				if closed {
					t.Fatal("the gateway sent two close frames")
				}
				closed = true
				if len(fr.payload) == 1 {
					t.Fatal("the gateway sent a 1-byte close payload")
				}
				code, reason := closeOf(fr.payload)
				if !gatewayCloseCodes[code] && !peerCodes[code] {
					t.Fatalf("the gateway sent close %d %q; the client sent %v", code, reason, peerCodes)
				}
			}
		}
		<-wrote
		// The connection is gone from the registry too.
		poll(t, "the connection to leave the registry", func() bool { return g.Registry().Len() == 0 })
	})
}
