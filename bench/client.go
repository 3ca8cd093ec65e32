package bench

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Tokens are minted here with the standard library, independently of the
// JWT library the gateway verifies them with.

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

func benchClaims(i int) map[string]any {
	now := time.Now()
	return map[string]any{
		"sub": fmt.Sprintf("bench-%d", i),
		"org": "acme",
		"iat": now.Unix(),
		// Longer than any run: the gateway closes a socket whose token
		// expires.
		"exp": now.Add(6 * time.Hour).Unix(),
	}
}

func signingInput(alg string, claims map[string]any) string {
	hdr, _ := json.Marshal(map[string]string{"alg": alg, "typ": "JWT"})
	body, _ := json.Marshal(claims)
	return b64(hdr) + "." + b64(body)
}

func mintES256(k *ecdsa.PrivateKey, claims map[string]any) (string, error) {
	input := signingInput("ES256", claims)
	digest := sha256.Sum256([]byte(input))
	r, s, err := ecdsa.Sign(rand.Reader, k, digest[:])
	if err != nil {
		return "", err
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return input + "." + b64(sig), nil
}

func mintHS256(secret []byte, claims map[string]any) string {
	input := signingInput("HS256", claims)
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(input))
	return input + "." + b64(m.Sum(nil))
}

// variant is one way of reaching the echo upstream.
type variant struct {
	name    string
	url     string
	dialers []ws.Dialer // one per token of the pool, used in turn
	gateway bool        // the traffic crosses Caddy
	want    int         // the handshake status expected: 101 or a refusal
	rooms   bool        // wsgate.v1: a connection is checked by subscribing, not by an echo
	// dial, when set, opens and checks connection i in place of the
	// dialers (scenario z's variants).
	dial func(i, bufSize int) (*client, error)
}

// Variant names. The first four reach the upstream; the next two are
// refused by wsgate before any upgrade; the rooms variant has no upstream;
// the TLS variants (idle connections only) run in a tlsCaddy.
const (
	vWsgate       = "wsgate"
	vWsgateHS     = "wsgate HS256"
	vStock        = "stock"
	vDirect       = "direct"
	vRejectOrigin = "wsgate, bad Origin"
	vRejectToken  = "wsgate, bad token"
	// vRooms is wsgate's rooms mode (wsgate.v1): no upstream; each
	// connection subscribes to a room of its own.
	vRooms = "wsgate rooms"
	// vWsgateTLS and vStockTLS are wsgate and stock with the client over
	// HTTPS; vWsgateWSS is wsgate with the client over plain HTTP and
	// the upstream over wss://.
	vWsgateTLS = "wsgate TLS"
	vStockTLS  = "stock TLS"
	vWsgateWSS = "wsgate wss upstream"
)

// caddyKindFor is the configuration that serves variant name.
func caddyKindFor(name string) caddyKind {
	switch name {
	case vWsgateTLS, vStockTLS, vWsgateWSS:
		return tlsCaddy
	case vZOff, vZPlain, vZOn:
		return compressCaddy
	}
	return benchCaddy
}

// variant builds the named variant against Caddy c (nil for direct). Every
// variant sends the same Origin and a token of the same size, so the bytes
// on the wire match; only wsgate reads them.
func (e *env) variant(c *caddyProc, name string) variant {
	v := variant{name: name, gateway: name != vDirect, want: http.StatusSwitchingProtocols}
	origin, tokens := goodOrigin, e.tokES
	port, scheme := 0, "ws"
	var tlsConf *tls.Config
	switch name {
	case vWsgate:
		port = c.esPort
	case vWsgateHS:
		port, tokens = c.hsPort, e.tokHS
	case vStock:
		port = c.stockPort
	case vWsgateTLS:
		port, scheme, tlsConf = c.esTLSPort, "wss", c.clientTLS
	case vStockTLS:
		port, scheme, tlsConf = c.stockTLSPort, "wss", c.clientTLS
	case vWsgateWSS:
		port = c.wssPort
	case vDirect:
	case vRejectOrigin:
		port, origin, v.want = c.esPort, badOrigin, http.StatusForbidden
	case vRejectToken:
		port, tokens, v.want = c.esPort, e.tokBad, http.StatusUnauthorized
	case vZOff, vZPlain, vZOn:
		return e.zVariant(c, name)
	case vRooms:
		v.rooms = true
		v.url = fmt.Sprintf("ws://127.0.0.1:%d%s", c.roomsPort, roomsPath)
		v.dialers = []ws.Dialer{roomsDialer()}
		return v
	default:
		panic("unknown variant " + name)
	}
	if name == vDirect {
		v.url = "ws://" + e.up.addr() + benchPath
	} else {
		v.url = fmt.Sprintf("%s://127.0.0.1:%d%s", scheme, port, benchPath)
	}
	for _, tok := range tokens {
		h := http.Header{"Origin": {origin}, "Authorization": {"Bearer " + tok}}
		v.dialers = append(v.dialers, ws.Dialer{Header: ws.HandshakeHeaderHTTP(h), Timeout: 10 * time.Second, TLSConfig: tlsConf})
	}
	return v
}

// Benchmark messages are JSON objects that name a channel the policy
// allows, {"type":"say","room":"org:acme:1","p":"…"}, padded to the size
// wanted; the padding starts with 16 hex digits of timestamp.
const (
	msgPrefix = `{"type":"say","room":"org:acme:1","p":"`
	tsOffset  = len(msgPrefix)
	minMsg    = tsOffset + 16 + len(`"}`)
)

func payload(size int) []byte {
	size = max(size, minMsg)
	b := make([]byte, size)
	copy(b, msgPrefix)
	for i := tsOffset; i < size-2; i++ {
		b[i] = 'x'
	}
	copy(b[size-2:], `"}`)
	return b
}

func putTS(b []byte, ns int64) {
	var raw [8]byte
	binary.BigEndian.PutUint64(raw[:], uint64(ns))
	hex.Encode(b[tsOffset:tsOffset+16], raw[:])
}

func getTS(b []byte) (int64, bool) {
	if len(b) < tsOffset+16 {
		return 0, false
	}
	var raw [8]byte
	if _, err := hex.Decode(raw[:], b[tsOffset:tsOffset+16]); err != nil {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(raw[:])), true
}

// clientFrame is p as one masked client frame, ready to be written as is.
// Reusing one mask for a connection's copies of a frame is what keeps the
// throughput client cheap; servers never check masks for freshness.
func clientFrame(op ws.OpCode, p []byte) []byte {
	var mask [4]byte
	binary.LittleEndian.PutUint32(mask[:], mrand.Uint32())
	var b bytes.Buffer
	ws.WriteHeader(&b, ws.Header{Fin: true, OpCode: op, Masked: true, Mask: mask, Length: int64(len(p))})
	start := b.Len()
	b.Write(p)
	ws.Cipher(b.Bytes()[start:], mask, 0)
	return b.Bytes()
}

// client is one load-generating connection.
type client struct {
	conn    net.Conn
	br      *bufio.Reader
	bw      *bufio.Writer
	scratch []byte
}

// dialClient connects through v with the i-th token and checks that a
// benchmark message comes back unchanged (a wsgate refusal or a policy
// reply would not).
func dialClient(v variant, i, bufSize int) (*client, error) {
	if v.dial != nil {
		c, err := v.dial(i, bufSize)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", v.name, err)
		}
		return c, nil
	}
	conn, br, _, err := v.dialers[i%len(v.dialers)].Dial(context.Background(), v.url)
	if err != nil {
		return nil, fmt.Errorf("%s: dialing %s: %w", v.name, v.url, err)
	}
	c := &client{conn: conn, br: br, bw: bufio.NewWriterSize(conn, bufSize)}
	if c.br == nil {
		c.br = bufio.NewReaderSize(conn, bufSize)
	}
	check := c.echoCheck
	if v.rooms {
		check = func() error { return c.subscribe(idleRoom(i)) }
	}
	if err := check(); err != nil {
		conn.Close()
		return nil, fmt.Errorf("%s: %w", v.name, err)
	}
	return c, nil
}

func (c *client) echoCheck() error {
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.conn.SetDeadline(time.Time{})
	p := payload(64)
	putTS(p, time.Now().UnixNano())
	if err := c.write(ws.OpText, p); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	got, err := c.read(make([]byte, 4096))
	if err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	if !bytes.Equal(got, p) {
		return fmt.Errorf("echo differs: sent %q, got %q", p, got)
	}
	return nil
}

// write buffers p as one masked frame with a fresh mask.
func (c *client) write(op ws.OpCode, p []byte) error {
	var mask [4]byte
	binary.LittleEndian.PutUint32(mask[:], mrand.Uint32())
	if err := ws.WriteHeader(c.bw, ws.Header{Fin: true, OpCode: op, Masked: true, Mask: mask, Length: int64(len(p))}); err != nil {
		return err
	}
	if cap(c.scratch) < len(p) {
		c.scratch = make([]byte, len(p))
	}
	s := c.scratch[:len(p)]
	copy(s, p)
	ws.Cipher(s, mask, 0)
	_, err := c.bw.Write(s)
	return err
}

// read returns the next data message (one frame: the benchmark never
// fragments, and neither may anything on the way), read into buf.
func (c *client) read(buf []byte) ([]byte, error) {
	for {
		h, err := ws.ReadHeader(c.br)
		if err != nil {
			return nil, err
		}
		if h.Length > int64(len(buf)) {
			return nil, fmt.Errorf("unexpected %d-byte frame", h.Length)
		}
		p := buf[:h.Length]
		if _, err := io.ReadFull(c.br, p); err != nil {
			return nil, err
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		switch {
		case h.OpCode == ws.OpClose:
			return nil, closedBy(p)
		case h.OpCode.IsControl():
			continue
		case !h.Fin || h.OpCode == ws.OpContinuation:
			return nil, errors.New("unexpected fragmented message")
		}
		return p, nil
	}
}

// skip reads past the next data message and returns its length.
func (c *client) skip() (int64, error) {
	for {
		h, err := ws.ReadHeader(c.br)
		if err != nil {
			return 0, err
		}
		if h.OpCode == ws.OpClose {
			p := make([]byte, min(h.Length, 125))
			io.ReadFull(c.br, p)
			if h.Masked {
				ws.Cipher(p, h.Mask, 0)
			}
			return 0, closedBy(p)
		}
		if _, err := c.br.Discard(int(h.Length)); err != nil {
			return 0, err
		}
		if !h.OpCode.IsControl() {
			return h.Length, nil
		}
	}
}

// subscriber is a subscribed connection of a fan-out scenario (d, h, k,
// p); the scenario's own subscriber type embeds it.
type subscriber struct {
	cl   *client
	wmu  sync.Mutex // writes: answers to heartbeats
	mu   sync.Mutex // err, and the embedding type's records
	err  error      // why its reader ended, unless the scenario ended it
	done chan struct{}
}

func newSubscriber(cl *client) subscriber {
	return subscriber{cl: cl, done: make(chan struct{})}
}

func (s *subscriber) sub() *subscriber { return s }

// write sends an encoded frame.
func (s *subscriber) write(f []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	_, err := s.cl.conn.Write(f)
	return err
}

// pong answers a ping whose payload is p.
func (s *subscriber) pong(p []byte) error { return s.write(clientFrame(ws.OpPong, p)) }

// read is s's reader: readMessages until it fails, then the failure is
// recorded unless closing says the scenario ended the connection.
func (s *subscriber) read(closing *atomic.Bool, maxLen int, base time.Time, pong func([]byte) error, msg func(p []byte, at time.Duration) error) {
	defer close(s.done)
	err := readMessages(s.cl, maxLen, base, pong, msg)
	s.mu.Lock()
	if !closing.Load() {
		s.err = err
	}
	s.mu.Unlock()
}

// closeSubscribers closes every connection, then waits for every reader.
func closeSubscribers[S interface{ sub() *subscriber }](subs []S) {
	for _, s := range subs {
		s.sub().cl.conn.Close()
	}
	for _, s := range subs {
		<-s.sub().done
	}
}

// readMessages reads the server's frames from cl until one fails, and
// returns why: a close frame ends it (closedBy), a ping's payload goes to
// pong (which answers it), other control frames are skipped, and each
// whole data message goes to msg with the time it arrived, since base.
// A frame longer than maxLen, or a fragment, is an error.
func readMessages(cl *client, maxLen int, base time.Time, pong func(payload []byte) error, msg func(p []byte, at time.Duration) error) error {
	buf := make([]byte, min(maxLen, 1024))
	for {
		h, err := ws.ReadHeader(cl.br)
		if err != nil {
			return err
		}
		if h.Length > int64(maxLen) {
			return fmt.Errorf("unexpected %d-byte frame", h.Length)
		}
		if int(h.Length) > len(buf) {
			buf = make([]byte, h.Length)
		}
		p := buf[:h.Length]
		if _, err := io.ReadFull(cl.br, p); err != nil {
			return err
		}
		at := time.Since(base)
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		switch {
		case h.OpCode == ws.OpClose:
			return closedBy(p)
		case h.OpCode == ws.OpPing:
			if err := pong(p); err != nil {
				return err
			}
		case h.OpCode.IsControl():
		case !h.Fin || h.OpCode == ws.OpContinuation:
			return errors.New("unexpected fragmented message")
		default:
			if err := msg(p, at); err != nil {
				return err
			}
		}
	}
}

func closedBy(p []byte) error {
	code, reason := ws.ParseCloseFrameData(p)
	return fmt.Errorf("closed by the server: %d %q", code, reason)
}
