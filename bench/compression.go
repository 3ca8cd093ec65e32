package bench

import (
	"bufio"
	"bytes"
	"compress/flate"
	"context"
	"crypto/rand"
	"crypto/sha1"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Scenario z: what permessage-deflate (RFC 7692) costs the gateway and
// saves on the wire, with the `compression` defaults (no context
// takeover, min_size 128), for chat-like JSON messages of zSize bytes:
//
//   - relay: scenario c's pipelined echo (client → gateway → echo upstream
//     → client) through the wsgate route with `compression`, by clients
//     that negotiate it and by clients that do not. The echo upstream
//     does not take the gateway's offer, so with compression the gateway
//     inflates every client message and compresses every echo;
//   - fan-out: publications (wsgate_publish) to a room of fanSubs rooms
//     subscribers that negotiated compression, and to a room of as many
//     that did not, in turns, at zFanRate publications per second;
//   - idle: scenario a's measure of idle relayed connections, through the
//     route without `compression`, and through the route with it by
//     clients that do not and that do negotiate it.
//
// The clients are the harness's own: the handshake by hand (net/http's
// response parser), frames through gobwas/ws's header codec, and every
// compressing and inflating done with the standard library's
// compress/flate, never with the code the gateway compresses with
// (klauspost/compress). Bytes on the wire are counted at the clients'
// sockets: WebSocket frames, headers and masks included, TCP/IP not.

// Variant names of scenario z (the idle part has all three; the relay
// part the last two).
const (
	vZOff   = "wsgate, no compression configured"
	vZPlain = "wsgate compression, client plain"
	vZOn    = "wsgate compression, negotiated"
)

var (
	zIdleVariants  = []string{vZOff, vZPlain, vZOn}
	zRelayVariants = []string{vZPlain, vZOn}
)

// zSize is the size of scenario z's messages; zPool of them, all
// different, are sent in turn.
const (
	zSize = 1024
	zPool = 64
)

// Scenario z's fan-out rooms: subscribers that negotiated compression are
// in zRoomDeflate, the others in zRoomPlain.
const (
	zRoomPlain   = "bench:z:plain"
	zRoomDeflate = "bench:z:deflate"
)

// zInflateEvery: one message in this many (per connection, or every
// message of the subscribers whose index is a multiple of it) is inflated
// and compared with what was sent; every other one is checked for its
// RSV1 bit (and a plain one for its size).
const zInflateEvery = 16

// chatWords are the words of the chat messages' text.
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
func chatMessage(seed uint64, size int) []byte {
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

// zMessages are the messages scenario z sends in turn.
func zMessages() [][]byte {
	out := make([][]byte, zPool)
	for i := range out {
		out[i] = chatMessage(uint64(i+1), zSize)
	}
	return out
}

// deflateTail ends a flushed deflate stream; RFC 7692 has it removed from
// each message, and put back before inflating.
var deflateTail = []byte{0, 0, 0xff, 0xff}

// flateMessage compresses msg as one permessage-deflate message with
// compress/flate (a fresh compressor: no context taken over), at the
// default level, as browsers do.
func flateMessage(msg []byte) []byte {
	var b bytes.Buffer
	fw, _ := flate.NewWriter(&b, flate.DefaultCompression) // a valid level
	fw.Write(msg)
	fw.Flush()
	return bytes.TrimSuffix(b.Bytes(), deflateTail)
}

// inflateMessage inflates one permessage-deflate message (compressed
// without context takeover) with compress/flate, to at most max bytes.
func inflateMessage(p []byte, max int64) ([]byte, error) {
	r := flate.NewReader(io.MultiReader(bytes.NewReader(p), bytes.NewReader([]byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff})))
	defer r.Close()
	b, err := io.ReadAll(io.LimitReader(r, max+1))
	if err == nil && int64(len(b)) > max {
		err = fmt.Errorf("inflates to more than %d bytes", max)
	}
	return b, err
}

// rsv1 is the RSV1 bit of ws.Header.Rsv: the message is compressed.
const rsv1 = 0x4

// zFrame is msg as one masked client text frame, compressed (RSV1) when
// deflate is set.
func zFrame(msg []byte, deflate bool) []byte {
	h := ws.Header{Fin: true, OpCode: ws.OpText, Masked: true}
	p := msg
	if deflate {
		p, h.Rsv = flateMessage(msg), rsv1
	}
	h.Length = int64(len(p))
	h.Mask = [4]byte{byte(mrand.Uint32()), byte(mrand.Uint32()), byte(mrand.Uint32()), byte(mrand.Uint32())}
	var b bytes.Buffer
	ws.WriteHeader(&b, h)
	start := b.Len()
	b.Write(p)
	ws.Cipher(b.Bytes()[start:], h.Mask, 0)
	return b.Bytes()
}

// wireCount counts the bytes through a set of client sockets.
type wireCount struct{ read, written atomic.Int64 }

// countedConn is a net.Conn whose bytes are counted.
type countedConn struct {
	net.Conn
	n *wireCount
}

func (c *countedConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.read.Add(int64(n))
	return n, err
}

func (c *countedConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.written.Add(int64(n))
	return n, err
}

// zDialer opens scenario z's connections: the opening handshake written
// by hand and its response read by net/http, so that the offer and the
// answer are checked by none of the libraries the gateway uses.
type zDialer struct {
	addr     string // host:port
	path     string
	header   http.Header
	protocol string     // the subprotocol asked for and required, if any
	offer    bool       // offer permessage-deflate, as browsers do, and require it
	count    *wireCount // the socket's bytes are counted here, when set
}

// zOffer is a browser's permessage-deflate offer.
const zOffer = "permessage-deflate; client_max_window_bits"

func (d zDialer) dial(ctx context.Context, bufSize int) (*client, error) {
	nd := net.Dialer{Timeout: 10 * time.Second}
	conn, err := nd.DialContext(ctx, "tcp", d.addr)
	if err != nil {
		return nil, err
	}
	if d.count != nil {
		conn = &countedConn{Conn: conn, n: d.count}
	}
	c, err := d.handshake(conn, bufSize)
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("handshake with %s%s: %w", d.addr, d.path, err)
	}
	return c, nil
}

func (d zDialer) handshake(conn net.Conn, bufSize int) (*client, error) {
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer conn.SetDeadline(time.Time{})
	var k [16]byte
	rand.Read(k[:])
	key := base64.StdEncoding.EncodeToString(k[:])
	var b strings.Builder
	fmt.Fprintf(&b, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n", d.path, d.addr, key)
	for name, vs := range d.header {
		for _, v := range vs {
			fmt.Fprintf(&b, "%s: %s\r\n", name, v)
		}
	}
	if d.protocol != "" {
		fmt.Fprintf(&b, "Sec-WebSocket-Protocol: %s\r\n", d.protocol)
	}
	if d.offer {
		fmt.Fprintf(&b, "Sec-WebSocket-Extensions: %s\r\n", zOffer)
	}
	b.WriteString("\r\n")
	if _, err := io.WriteString(conn, b.String()); err != nil {
		return nil, err
	}
	br := bufio.NewReaderSize(conn, bufSize)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		return nil, fmt.Errorf("status %s", resp.Status)
	}
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	if got := resp.Header.Get("Sec-WebSocket-Accept"); got != base64.StdEncoding.EncodeToString(sum[:]) {
		return nil, fmt.Errorf("Sec-WebSocket-Accept %q", got)
	}
	if got := resp.Header.Get("Sec-WebSocket-Protocol"); got != d.protocol {
		return nil, fmt.Errorf("subprotocol %q agreed, want %q", got, d.protocol)
	}
	if err := checkDeflateAnswer(resp.Header.Values("Sec-WebSocket-Extensions"), d.offer); err != nil {
		return nil, err
	}
	return &client{conn: conn, br: br, bw: bufio.NewWriterSize(conn, bufSize)}, nil
}

// checkDeflateAnswer checks the gateway's answer to zOffer: with the
// defaults it must agree to permessage-deflate without context takeover
// on its side (so that each of its messages inflates on its own), and
// with no window limit the client did not ask for. Without an offer it
// must agree to nothing.
func checkDeflateAnswer(exts []string, offered bool) error {
	if !offered {
		if len(exts) > 0 {
			return fmt.Errorf("extensions %q agreed, none offered", exts)
		}
		return nil
	}
	if len(exts) != 1 {
		return fmt.Errorf("extensions %q: want permessage-deflate alone", exts)
	}
	params := strings.Split(exts[0], ";")
	if strings.TrimSpace(params[0]) != "permessage-deflate" {
		return fmt.Errorf("extension %q agreed, want permessage-deflate", exts[0])
	}
	serverNoTakeover := false
	for _, p := range params[1:] {
		switch p = strings.TrimSpace(p); p {
		case "server_no_context_takeover":
			serverNoTakeover = true
		case "client_no_context_takeover":
		default:
			return fmt.Errorf("permessage-deflate parameter %q, not asked for", p)
		}
	}
	if !serverNoTakeover {
		return fmt.Errorf("permessage-deflate %q without server_no_context_takeover", exts[0])
	}
	return nil
}

// zEcho sends frame (msg as zFrame made it) and checks the echo: msg
// again, compressed when deflate is set (the gateway compresses every
// message of zSize to a client that agreed), plain otherwise.
func (c *client) zEcho(frame, msg []byte, deflate bool) error {
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.conn.SetDeadline(time.Time{})
	if _, err := c.bw.Write(frame); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	for {
		h, err := ws.ReadHeader(c.br)
		if err != nil {
			return fmt.Errorf("reading the echo: %w", err)
		}
		if h.Length > 1<<20 {
			return fmt.Errorf("a %d-byte frame", h.Length)
		}
		p := make([]byte, h.Length)
		if _, err := io.ReadFull(c.br, p); err != nil {
			return fmt.Errorf("reading the echo: %w", err)
		}
		switch {
		case h.OpCode == ws.OpClose:
			return closedBy(p)
		case h.OpCode.IsControl():
			continue
		}
		return checkEcho(h, p, msg, deflate, true)
	}
}

// checkEcho checks one echo of msg: a whole text frame, compressed
// exactly when deflate is set; inflated (or compared) and checked against
// msg when full is set. A compressed echo may be no smaller than msg (a
// compressor may store what it fails to compress): that is counted, not
// an error.
func checkEcho(h ws.Header, p, msg []byte, deflate, full bool) error {
	switch {
	case h.OpCode != ws.OpText || !h.Fin:
		return fmt.Errorf("echo: op %v, fin %v; want one text frame", h.OpCode, h.Fin)
	case deflate != (h.Rsv == rsv1):
		return fmt.Errorf("echo: RSV %#x (compression agreed: %v)", h.Rsv, deflate)
	case !deflate && len(p) != len(msg):
		return fmt.Errorf("echo: %d bytes for a %d-byte message", len(p), len(msg))
	case !full:
		return nil
	}
	got := p
	if deflate {
		var err error
		if got, err = inflateMessage(p, int64(len(msg))); err != nil {
			return fmt.Errorf("echo: inflating: %w", err)
		}
	}
	if !bytes.Equal(got, msg) {
		return fmt.Errorf("echo differs: sent %q, got %q", msg, got)
	}
	return nil
}

// zVariant is a variant of scenario z's relay and idle parts on Caddy c.
// Its connections are checked with one echo of a chat message: compressed
// both ways when compression is negotiated.
func (e *env) zVariant(c *caddyProc, name string) variant {
	v := variant{name: name, gateway: true, want: http.StatusSwitchingProtocols}
	port, offer := c.zPort, name == vZOn
	if name == vZOff {
		port = c.esPort
	}
	v.url = fmt.Sprintf("ws://127.0.0.1:%d%s", port, benchPath)
	msgs := zMessages()
	frames := make([][]byte, len(msgs))
	for i, m := range msgs {
		frames[i] = zFrame(m, offer)
	}
	v.dial = func(i, bufSize int) (*client, error) {
		d := zDialer{addr: fmt.Sprintf("127.0.0.1:%d", port), path: benchPath, offer: offer,
			header: http.Header{"Origin": {goodOrigin}, "Authorization": {"Bearer " + e.tokES[i%len(e.tokES)]}}}
		cl, err := d.dial(context.Background(), bufSize)
		if err != nil {
			return nil, err
		}
		k := i % len(msgs)
		if err := cl.zEcho(frames[k], msgs[k], offer); err != nil {
			cl.conn.Close()
			return nil, err
		}
		return cl, nil
	}
	return v
}

// ---- the run ----

// zRelaySample is one run of scenario z's pipelined echo.
type zRelaySample struct {
	rate     float64 // echoed messages per second
	cpuPer   float64 // Caddy CPU seconds per echoed message
	cores    float64 // Caddy's CPU use
	up, down float64 // bytes per message, client → gateway and gateway → client
	genCores float64 // this process's CPU use
	// notSmaller is the share of compressed echoes no smaller than the
	// message (over the whole run).
	notSmaller float64
	// reads and writes are the gateway's read and write system calls per
	// message (/proc/PID/io), both sides of the relay counted.
	reads, writes float64
}

// zFanSample is one phase of scenario z's fan-out.
type zFanSample struct {
	published  int64
	deliveries int64
	perSec     float64 // deliveries per second
	bytesPer   float64 // bytes read by the subscribers per delivery
	cpuPer     float64 // Caddy CPU seconds per delivery
	cores      float64
	notSmaller int64 // compressed deliveries no smaller than the plain one
}

type zResult struct {
	plainSize int // bytes of a plain fan-out delivery's payload (the mean)
	relay     map[string][]zRelaySample
	fan       [2][]zFanSample // plain, compressed; one per run
	subs      int
	rate      float64
	dur       time.Duration
	idle      map[string][]idleSample
	logLines  []string
	logCount  int
}

func (e *env) runCompression(ctx context.Context) (*zResult, error) {
	res := &zResult{relay: map[string][]zRelaySample{}, idle: map[string][]idleSample{},
		subs: e.p.fanSubs, rate: e.p.zFanRate, dur: e.p.zFanDur}
	c, err := e.startCaddyKind(ctx, compressCaddy)
	if err != nil {
		return nil, err
	}
	err = e.zRelayAndFan(ctx, c, res)
	res.logLines, res.logCount = gatewayLogIssues([]*caddyProc{c})
	c.stop()
	if err != nil {
		return res, err
	}
	// Idle: a fresh Caddy per run, as in scenario a.
	for r := range e.p.runs {
		for _, name := range order(zIdleVariants, r) {
			s, err := e.idleOnce(ctx, name)
			if err != nil {
				return res, fmt.Errorf("idle, %s, run %d: %w", name, r+1, err)
			}
			e.logf("  z idle %-35s run %d: %.1f KiB RSS, %.1f KiB heap, %.1f KiB stacks, %.2f goroutines, %.2f fds per connection",
				name, r+1, s.rss/1024, s.heap/1024, s.stack/1024, s.goroutines, s.fds)
			res.idle[name] = append(res.idle[name], s)
		}
	}
	return res, nil
}

func (e *env) zRelayAndFan(ctx context.Context, c *caddyProc, res *zResult) error {
	for r := range e.p.runs {
		for _, name := range order(zRelayVariants, r) {
			s, err := e.zRelayOnce(ctx, c, name)
			if err != nil {
				return fmt.Errorf("relay, %s, run %d: %w", name, r+1, err)
			}
			e.logf("  z relay %-32s run %d: %.0f msg/s, caddy %.2f cores, %.1f µs and %.2f reads + %.2f writes per message, %.0f B up + %.0f B down per message, load generator %.2f cores",
				name, r+1, s.rate, s.cores, s.cpuPer*1e6, s.reads, s.writes, s.up, s.down, s.genCores)
			res.relay[name] = append(res.relay[name], s)
		}
	}
	zf, err := e.zFanConnect(ctx, c)
	if zf != nil {
		defer zf.close()
	}
	if err != nil {
		return fmt.Errorf("fan-out: %w", err)
	}
	res.plainSize = len(fanEnvelope(zRoomPlain, zf.msgs[0]))
	// A warm-up of each room, not counted.
	for kind := range 2 {
		if _, err := zf.phase(ctx, kind, max(1, int(e.p.zFanRate/4)), time.Second/4); err != nil {
			return fmt.Errorf("fan-out warm-up: %w", err)
		}
	}
	n := int(e.p.zFanRate * e.p.zFanDur.Seconds())
	for r := range e.p.runs {
		for _, kind := range order([]string{"0", "1"}, r) {
			k := int(kind[0] - '0')
			s, err := zf.phase(ctx, k, n, e.p.zFanDur)
			if err != nil {
				return fmt.Errorf("fan-out, %s, run %d: %w", zKindName[k], r+1, err)
			}
			e.logf("  z fan-out %-10s run %d: %d publications, %d deliveries (%.0f/s), %.0f B per delivery, %.2f µs CPU per delivery, caddy %.2f cores",
				zKindName[k], r+1, s.published, s.deliveries, s.perSec, s.bytesPer, s.cpuPer*1e6, s.cores)
			res.fan[k] = append(res.fan[k], s)
		}
	}
	return nil
}

// zKindName names the fan-out rooms: plain, compressed.
var zKindName = [2]string{"plain", "compressed"}

// zRelayOnce is tputOnce with scenario z's messages and clients: tputConns
// connections keep tputWindow messages each in flight, the next of
// zMessages each time; every echo is checked for size and RSV1, and every
// zInflateEvery-th one inflated and compared.
func (e *env) zRelayOnce(ctx context.Context, c *caddyProc, name string) (zRelaySample, error) {
	var s zRelaySample
	offer := name == vZOn
	msgs := zMessages()
	frames := make([][]byte, len(msgs))
	for i, m := range msgs {
		frames[i] = zFrame(m, offer)
	}
	var wire wireCount
	n, window := e.p.tputConns, e.p.tputWindow
	clients := make([]*client, 0, n)
	defer func() {
		for _, cl := range clients {
			cl.conn.Close()
		}
	}()
	for i := range n {
		d := zDialer{addr: fmt.Sprintf("127.0.0.1:%d", c.zPort), path: benchPath, offer: offer, count: &wire,
			header: http.Header{"Origin": {goodOrigin}, "Authorization": {"Bearer " + e.tokES[i%len(e.tokES)]}}}
		cl, err := d.dial(ctx, 64<<10)
		if err != nil {
			return s, err
		}
		clients = append(clients, cl)
		if err := cl.zEcho(frames[0], msgs[0], offer); err != nil {
			return s, err
		}
	}
	state := make([]*echoConn, n)
	var recv, notSmaller atomic.Int64
	var closing atomic.Bool
	stop := make(chan struct{})
	failed := make(chan struct{})
	var failOnce sync.Once
	fail := func() { failOnce.Do(func() { close(failed) }) }
	var writers, readers sync.WaitGroup
	for i, cl := range clients {
		st := &echoConn{tokens: make(chan struct{}, window)}
		for range window {
			st.tokens <- struct{}{}
		}
		state[i] = st
		writers.Add(1)
		go func() {
			defer writers.Done()
			for k := i; ; k++ {
				select {
				case <-stop:
					st.writeErr = cl.bw.Flush()
					return
				case <-st.tokens:
				default:
					if err := cl.bw.Flush(); err != nil {
						st.writeErr = err
						fail()
						return
					}
					select {
					case <-stop:
						return
					case <-st.tokens:
					}
				}
				if _, err := cl.bw.Write(frames[k%len(frames)]); err != nil {
					st.writeErr = err
					fail()
					return
				}
				st.sent++
			}
		}()
		readers.Add(1)
		go func() {
			defer readers.Done()
			buf := make([]byte, 4096)
			for k := i; ; k++ {
				err := func() error {
					for {
						h, err := ws.ReadHeader(cl.br)
						if err != nil {
							return err
						}
						if h.Length > int64(len(buf)) {
							return fmt.Errorf("unexpected %d-byte frame", h.Length)
						}
						p := buf[:h.Length]
						if _, err := io.ReadFull(cl.br, p); err != nil {
							return err
						}
						switch {
						case h.OpCode == ws.OpClose:
							return closedBy(p)
						case h.OpCode.IsControl():
							continue
						}
						msg := msgs[k%len(msgs)]
						if offer && len(p) >= len(msg) {
							notSmaller.Add(1)
						}
						return checkEcho(h, p, msg, offer, k%zInflateEvery == 0)
					}
				}()
				if err != nil {
					if !closing.Load() {
						st.rdErr = err
						fail()
					}
					return
				}
				st.recvd.Add(1)
				recv.Add(1)
				st.tokens <- struct{}{}
			}
		}()
	}

	measure := func() error {
		if err := pauseOrFail(ctx, failed, e.p.tputWarm); err != nil {
			return err
		}
		cpu0, err := procCPU(c.pid())
		if err != nil {
			return err
		}
		io0, err := procSyscalls(c.pid())
		if err != nil {
			return err
		}
		gen0 := selfCPU()
		r0, w0, t0 := recv.Load(), [2]int64{wire.written.Load(), wire.read.Load()}, time.Now()
		if err := pauseOrFail(ctx, failed, e.p.tputDur); err != nil {
			return err
		}
		r1, w1, t1 := recv.Load(), [2]int64{wire.written.Load(), wire.read.Load()}, time.Now()
		gen1 := selfCPU()
		cpu1, err := procCPU(c.pid())
		if err != nil {
			return err
		}
		io1, err := procSyscalls(c.pid())
		if err != nil {
			return err
		}
		secs := t1.Sub(t0).Seconds()
		msgs := float64(r1 - r0)
		if msgs == 0 {
			return errors.New("no echo in the measured window")
		}
		s.rate = msgs / secs
		s.cores = (cpu1 - cpu0).Seconds() / secs
		s.cpuPer = (cpu1 - cpu0).Seconds() / msgs
		s.genCores = (gen1 - gen0).Seconds() / secs
		s.up = float64(w1[0]-w0[0]) / msgs
		s.down = float64(w1[1]-w0[1]) / msgs
		s.reads = float64(io1[0]-io0[0]) / msgs
		s.writes = float64(io1[1]-io0[1]) / msgs
		return nil
	}
	err := measure()
	if err := endEcho(ctx, err, stop, failed, &closing, &writers, &readers, state, clients); err != nil {
		return s, err
	}
	if n := recv.Load(); n > 0 {
		s.notSmaller = float64(notSmaller.Load()) / float64(n)
	}
	return s, e.up.waitConns(ctx, 0, 30*time.Second)
}

// procSyscalls is the read and write system calls pid has made (syscr
// and syscw of /proc/PID/io).
func procSyscalls(pid int) ([2]int64, error) {
	var out [2]int64
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return out, err
	}
	seen := 0
	for line := range strings.SplitSeq(string(b), "\n") {
		name, v, _ := strings.Cut(line, ": ")
		i := 0
		switch name {
		case "syscr":
		case "syscw":
			i = 1
		default:
			continue
		}
		if out[i], err = strconv.ParseInt(strings.TrimSpace(v), 10, 64); err != nil {
			return out, fmt.Errorf("/proc/%d/io: %q", pid, line)
		}
		seen++
	}
	if seen != 2 {
		return out, fmt.Errorf("/proc/%d/io has no syscr and syscw", pid)
	}
	return out, nil
}

// zFan is scenario z's fan-out: the subscribers of both rooms, and what
// they received.
type zFan struct {
	e        *env
	c        *caddyProc
	msgs     [][]byte
	subs     [2][]*client
	wire     [2]wireCount
	got      [2]atomic.Int64 // deliveries, by room
	bigger   atomic.Int64    // compressed deliveries no smaller than plain
	expected [2]map[string]bool
	next     int // the message published next
	errMu    sync.Mutex
	err      error
	closing  atomic.Bool
	readers  sync.WaitGroup
	httpc    *http.Client
}

var zRooms = [2]string{zRoomPlain, zRoomDeflate}

// zFanConnect subscribes fanSubs connections that do not negotiate
// compression to zRoomPlain and as many that do to zRoomDeflate, and
// starts their readers.
func (e *env) zFanConnect(ctx context.Context, c *caddyProc) (*zFan, error) {
	zf := &zFan{e: e, c: c, msgs: zMessages(),
		httpc: &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DisableCompression: true}}}
	for k, room := range zRooms {
		zf.expected[k] = map[string]bool{}
		for _, m := range zf.msgs {
			zf.expected[k][string(fanEnvelope(room, m))] = true
		}
	}
	for k, room := range zRooms {
		d := zDialer{addr: fmt.Sprintf("127.0.0.1:%d", c.roomsPort), path: roomsPath, protocol: roomsSubprotocol,
			offer: k == 1, count: &zf.wire[k], header: http.Header{"Origin": {goodOrigin}}}
		subs := make([]*client, e.p.fanSubs)
		var next atomic.Int64
		var wg sync.WaitGroup
		var mu sync.Mutex
		var errs []error
		for range 32 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for ctx.Err() == nil {
					i := int(next.Add(1) - 1)
					if i >= len(subs) {
						return
					}
					cl, err := d.dial(ctx, 4096)
					if err == nil {
						if err = cl.subscribe(room); err != nil {
							cl.conn.Close()
						}
					}
					if err != nil {
						mu.Lock()
						errs = append(errs, fmt.Errorf("%s subscriber %d: %w", zKindName[k], i, err))
						mu.Unlock()
						next.Store(int64(len(subs)))
						return
					}
					subs[i] = cl
				}
			}()
		}
		wg.Wait()
		for _, cl := range subs {
			if cl != nil {
				zf.subs[k] = append(zf.subs[k], cl)
			}
		}
		if err := errors.Join(append(errs, ctx.Err())...); err != nil {
			return zf, err
		}
	}
	for k := range zf.subs {
		for i, cl := range zf.subs[k] {
			zf.readers.Add(1)
			go zf.read(cl, k, i%zInflateEvery == 0)
		}
	}
	return zf, nil
}

// fanEnvelope is a delivery as rooms subscribers get it.
func fanEnvelope(room string, data []byte) []byte {
	return []byte(`{"op":"message","channel":"` + room + `","data":` + string(data) + `}`)
}

// read counts a subscriber's deliveries, checking each for its RSV1 bit
// (set exactly in the compressed room) and, when full, its content (one
// of the messages published, inflated in the compressed room). It answers
// pings.
func (zf *zFan) read(cl *client, kind int, full bool) {
	defer zf.readers.Done()
	buf := make([]byte, 8192)
	fail := func(err error) {
		if zf.closing.Load() {
			return
		}
		zf.errMu.Lock()
		if zf.err == nil {
			zf.err = fmt.Errorf("%s subscriber: %w", zKindName[kind], err)
		}
		zf.errMu.Unlock()
	}
	plainLen := len(fanEnvelope(zRooms[kind], zf.msgs[0]))
	for {
		h, err := ws.ReadHeader(cl.br)
		if err != nil {
			fail(err)
			return
		}
		if h.Length > int64(len(buf)) {
			fail(fmt.Errorf("unexpected %d-byte frame", h.Length))
			return
		}
		p := buf[:h.Length]
		if _, err := io.ReadFull(cl.br, p); err != nil {
			fail(err)
			return
		}
		switch {
		case h.OpCode == ws.OpClose:
			fail(closedBy(p))
			return
		case h.OpCode == ws.OpPing:
			if _, err := cl.conn.Write(clientFrame(ws.OpPong, p)); err != nil {
				fail(err)
				return
			}
			continue
		case h.OpCode.IsControl():
			continue
		}
		deflate := kind == 1
		switch {
		case h.OpCode != ws.OpText || !h.Fin:
			err = fmt.Errorf("delivery: op %v, fin %v; want one text frame", h.OpCode, h.Fin)
		case deflate != (h.Rsv == rsv1):
			err = fmt.Errorf("delivery: RSV %#x (compression agreed: %v)", h.Rsv, deflate)
		case full:
			got := p
			if deflate {
				got, err = inflateMessage(p, 2*zSize)
			}
			if err == nil && !zf.expected[kind][string(got)] {
				err = fmt.Errorf("unexpected delivery %q", got)
			}
		}
		if err != nil {
			fail(err)
			return
		}
		if deflate && len(p) >= plainLen {
			zf.bigger.Add(1)
		}
		zf.got[kind].Add(1)
	}
}

// phase publishes n messages to room kind at zFanRate per second (over
// dur), waits for every subscriber to have every one, and measures.
func (zf *zFan) phase(ctx context.Context, kind, n int, dur time.Duration) (zFanSample, error) {
	var s zFanSample
	subs := int64(len(zf.subs[kind]))
	url := fmt.Sprintf("http://127.0.0.1:%d%s", zf.c.roomsPort, pubPath)
	cpu0, err := procCPU(zf.c.pid())
	if err != nil {
		return s, err
	}
	got0, bytes0, big0, t0 := zf.got[kind].Load(), zf.wire[kind].read.Load(), zf.bigger.Load(), time.Now()
	period := dur / time.Duration(max(1, n))
	tm := time.NewTimer(time.Hour)
	defer tm.Stop()
	for k := range n {
		if d := time.Until(t0.Add(time.Duration(k) * period)); d > 0 {
			tm.Reset(d)
			select {
			case <-ctx.Done():
				return s, ctx.Err()
			case <-tm.C:
			}
		}
		m := zf.msgs[zf.next%len(zf.msgs)]
		zf.next++
		body := `{"channel":"` + zRooms[kind] + `","data":` + string(m) + `}`
		if err := httpPublish(ctx, zf.httpc, url, body); err != nil {
			return s, err
		}
		s.published++
	}
	want := got0 + s.published*subs
	err = poll(ctx, 30*time.Second, "every delivery", func() (bool, error) {
		zf.errMu.Lock()
		err := zf.err
		zf.errMu.Unlock()
		return zf.got[kind].Load() >= want, err
	})
	if err != nil {
		return s, fmt.Errorf("%w (%d of %d deliveries)", err, zf.got[kind].Load()-got0, want-got0)
	}
	t1 := time.Now()
	cpu1, err := procCPU(zf.c.pid())
	if err != nil {
		return s, err
	}
	s.deliveries = zf.got[kind].Load() - got0
	if s.deliveries != s.published*subs {
		return s, fmt.Errorf("%d deliveries for %d publications to %d subscribers", s.deliveries, s.published, subs)
	}
	secs := t1.Sub(t0).Seconds()
	s.perSec = float64(s.deliveries) / secs
	s.bytesPer = float64(zf.wire[kind].read.Load()-bytes0) / float64(s.deliveries)
	s.cpuPer = (cpu1 - cpu0).Seconds() / float64(s.deliveries)
	s.cores = (cpu1 - cpu0).Seconds() / secs
	s.notSmaller = zf.bigger.Load() - big0
	return s, nil
}

// close ends every subscriber and waits for the readers.
func (zf *zFan) close() {
	zf.closing.Store(true)
	for _, subs := range zf.subs {
		for _, cl := range subs {
			cl.conn.Close()
		}
	}
	zf.readers.Wait()
	zf.httpc.CloseIdleConnections()
}

// ---- report ----

func zRelayMedian(ss []zRelaySample) zRelaySample {
	return zRelaySample{
		rate:       median(ss, func(x zRelaySample) float64 { return x.rate }),
		notSmaller: median(ss, func(x zRelaySample) float64 { return x.notSmaller }),
		cpuPer:     median(ss, func(x zRelaySample) float64 { return x.cpuPer }),
		cores:      median(ss, func(x zRelaySample) float64 { return x.cores }),
		up:         median(ss, func(x zRelaySample) float64 { return x.up }),
		down:       median(ss, func(x zRelaySample) float64 { return x.down }),
		genCores:   median(ss, func(x zRelaySample) float64 { return x.genCores }),
		reads:      median(ss, func(x zRelaySample) float64 { return x.reads }),
		writes:     median(ss, func(x zRelaySample) float64 { return x.writes }),
	}
}

func zFanMedian(ss []zFanSample) zFanSample {
	return zFanSample{
		perSec:   median(ss, func(x zFanSample) float64 { return x.perSec }),
		bytesPer: median(ss, func(x zFanSample) float64 { return x.bytesPer }),
		cpuPer:   median(ss, func(x zFanSample) float64 { return x.cpuPer }),
		cores:    median(ss, func(x zFanSample) float64 { return x.cores }),
	}
}

func (r *report) zIdleMedian(v string) (idleSample, bool) {
	if r.z == nil || len(r.z.idle[v]) == 0 {
		return idleSample{}, false
	}
	return (&report{idle: &idleResult{samples: r.z.idle}}).idleMedian(v)
}

const (
	zIdleName   = "z. idle RSS per relayed connection, compression negotiated (defaults)"
	zIdleTarget = "as a.: ≤ 6.5 KiB, no goroutine while idle"
)

func (r *report) zTargets(row func(s, target, measured, met, stretch, smet string)) {
	m, ok := r.zIdleMedian(vZOn)
	if !ok {
		row(zIdleName, zIdleTarget, r.missing('z', r.zErr), "—", "", "")
		return
	}
	meas := fmt.Sprintf("%s, %.2f goroutines", kib(m.rss), m.goroutines)
	if off, ok := r.zIdleMedian(vZOff); ok {
		meas += fmt.Sprintf("; %s without compression configured (%s)", kib(off.rss), times(m.rss/off.rss))
	}
	row(zIdleName, zIdleTarget, meas, metStr(m.rss <= 6.5*1024 && m.goroutines < 0.01), "", "")
}

func (r *report) zSection(w writer) {
	w("## z. Compression (permessage-deflate)\n\n")
	if !r.section(w, 'z', r.zErr) {
		return
	}
	z := r.z
	w("A Caddy of its own serves the wsgate route of the other scenarios twice, without and with\n")
	w("`compression` (its defaults: no context takeover either way, `min_size` 128, offered to the upstream\n")
	w("too, which the echo upstream declines), and the rooms route with `compression` and `wsgate_publish`.\n")
	w("Messages are %d different chat-like JSON messages of %s each (a `say` with id, time, author,\n", zPool, sizeStr(zSize))
	w("mentions, reactions, client details and text of common words), sent in turn. Clients that negotiate\n")
	w("compression offer it as browsers do (`%s`), compress every message with the standard\n", zOffer)
	w("library's `compress/flate` at its default level, a fresh compressor for each (the gateway agrees to\n")
	w("`client_no_context_takeover`), and check every frame's RSV1 bit (and a plain frame's size), inflating\n")
	w("one message in %d (with `compress/flate`) to compare it with what was sent; the handshake is written by hand and its\n", zInflateEvery)
	w("answer read by `net/http`. Bytes on the wire are counted at the clients' sockets: WebSocket frames,\n")
	w("headers and masks included, TCP/IP not. Gateway CPU is the Caddy process's user + system time\n")
	w("(`/proc/PID/stat`) over the measured window, divided by the messages.\n\n")

	w("**Relay**: scenario c's pipelined echo (%d connections, %d messages in flight each, %v after %v of\n",
		r.p.tputConns, r.p.tputWindow, r.p.tputDur, r.p.tputWarm)
	w("warm-up), client → gateway → echo upstream → client, through the route with `compression`, by\n")
	w("clients that do not negotiate it and by clients that do; %d runs each, interleaved. With compression\n", r.p.runs)
	w("the gateway inflates every client message (and checks it: UTF-8, rate limit, channel policy) before\n")
	w("it relays it plain to the upstream, and compresses every echo.\n\n")
	w("| client | msg/s | bytes per message, client → gateway | gateway → client | both ways | vs plain | gateway CPU per message | vs plain | gateway reads + writes per message | Caddy cores | load generator cores | echoes compressed to no less than the message |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	plain := zRelayMedian(z.relay[vZPlain])
	for _, v := range zRelayVariants {
		if len(z.relay[v]) == 0 {
			continue
		}
		m := zRelayMedian(z.relay[v])
		notSmaller := "—"
		if v == vZOn {
			notSmaller = fmt.Sprintf("%.1f %%", 100*m.notSmaller)
		}
		w("| %s | %s | %.0f B | %.0f B | %.0f B | %s | %s | %s | %.2f + %.2f | %.2f | %.2f | %s |\n", strings.TrimPrefix(v, "wsgate compression, "),
			count(m.rate), m.up, m.down, m.up+m.down, times((m.up+m.down)/(plain.up+plain.down)),
			micros(m.cpuPer*1e9), times(m.cpuPer/plain.cpuPer), m.reads, m.writes, m.cores, m.genCores, notSmaller)
	}
	w("\n**Fan-out**: %s subscribers (rooms mode, each subscribed to one room) that negotiated compression,\n", count(float64(z.subs)))
	w("and as many that did not, in two rooms of one gateway (in-process broker); %.0f publications per second\n", z.rate)
	w("(`wsgate_publish`, HTTP) for %v to one room, then to the other, %d times each, order rotated;\n", z.dur, r.p.runs)
	w("every subscriber must receive every publication. A delivery's payload is %s plain (the `{\"op\":\"message\",…}`\n", sizeStr(z.plainSize))
	w("envelope around the message); the gateway compresses each publication once for all the subscribers\n")
	w("that agreed to compression. CPU per delivery includes the publication's HTTP request, shared by the %s.\n\n", count(float64(z.subs)))
	w("| subscribers | deliveries/s | bytes per delivery, gateway → subscriber | vs plain | gateway CPU per delivery | vs plain | Caddy cores | deliveries compressed to no less than plain (every run) |\n")
	w("|---|---|---|---|---|---|---|---|\n")
	fp := zFanMedian(z.fan[0])
	for k := range z.fan {
		if len(z.fan[k]) == 0 {
			continue
		}
		m := zFanMedian(z.fan[k])
		notSmaller := "—"
		if k == 1 {
			var big, all int64
			for _, s := range z.fan[k] {
				big, all = big+s.notSmaller, all+s.deliveries
			}
			notSmaller = fmt.Sprintf("%s of %s (%.1f %%)", count(float64(big)), count(float64(all)), 100*float64(big)/float64(max(all, 1)))
		}
		w("| %s | %s | %.0f B | %s | %s | %s | %.2f | %s |\n", zKindName[k], count(m.perSec), m.bytesPer, times(m.bytesPer/fp.bytesPer),
			micros(m.cpuPer*1e9), times(m.cpuPer/fp.cpuPer), m.cores, notSmaller)
	}
	w("\n**Idle**: scenario a's measure (%s connections held %v, a fresh Caddy for every run, %d runs per variant),\n",
		count(float64(r.p.idleConns)), r.p.idleHold, r.p.runs)
	w("each connection checked with one echo of a chat message before the hold: compressed both ways when\n")
	w("compression is negotiated (so each has inflated and compressed a message before it idles).\n\n")
	w("| variant | RSS | heap+stack (heap / stacks) | goroutines | file descriptors | RSS vs no compression configured | heap+stack vs no compression configured |\n")
	w("|---|---|---|---|---|---|---|\n")
	off, okOff := r.zIdleMedian(vZOff)
	for _, v := range zIdleVariants {
		m, ok := r.zIdleMedian(v)
		if !ok {
			continue
		}
		rss, hs := "—", "—"
		if okOff {
			rss, hs = times(m.rss/off.rss), times((m.heap+m.stack)/(off.heap+off.stack))
		}
		w("| %s | %s | %s (%s / %s) | %.2f | %.2f | %s | %s |\n", v, kib(m.rss), kib(m.heap+m.stack), kib(m.heap), kib(m.stack),
			m.goroutines, m.fds, rss, hs)
	}
	w("\n")
	if z.logCount == 0 {
		w("Gateway log (relay and fan-out): no warnings or errors.\n\n")
	} else {
		w("Gateway log (relay and fan-out): %d warnings or errors, the first: %s\n\n", z.logCount, "`"+strings.Join(z.logLines, "`, `")+"`")
	}
}

func (r *report) zAppendix(w writer, list func([]float64, func(float64) string) string) {
	z := r.z
	if z == nil {
		return
	}
	for _, v := range zRelayVariants {
		w("| z. relay msg/s | %s | %s |\n", v, list(pluck(z.relay[v], func(s zRelaySample) float64 { return s.rate }), count))
		w("| z. relay gateway CPU per message | %s | %s |\n", v, list(pluck(z.relay[v], func(s zRelaySample) float64 { return s.cpuPer * 1e9 }), micros))
	}
	for k := range z.fan {
		w("| z. fan-out gateway CPU per delivery | %s | %s |\n", zKindName[k], list(pluck(z.fan[k], func(s zFanSample) float64 { return s.cpuPer * 1e9 }), micros))
		w("| z. fan-out bytes per delivery | %s | %s |\n", zKindName[k], list(pluck(z.fan[k], func(s zFanSample) float64 { return s.bytesPer }), func(x float64) string { return fmt.Sprintf("%.0f B", x) }))
	}
	for _, v := range zIdleVariants {
		w("| z. idle RSS per connection | %s | %s |\n", v, list(pluck(z.idle[v], func(s idleSample) float64 { return s.rss }), kib))
	}
}
