package integration

import (
	"bufio"
	"bytes"
	"compress/flate"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
	"github.com/coder/websocket"
)

// permessage-deflate (RFC 7692) through the built gateway, seen on the
// wire: tapped proxies (tcpProxy.tap) keep the bytes between the gateway
// and its peers, which are parsed here and inflated with compress/flate.

// through is g as reached through px: the same gateway at the proxy's
// address (its handshakes then name the proxy as Host).
func (g *gateway) through(px *tcpProxy) *gateway {
	h := *g
	h.port = px.ln.Addr().(*net.TCPAddr).Port
	return &h
}

// wireMessage is a data message as it crossed a tapped connection: its
// opcode, whether its first frame had RSV1 (compressed), its frames, and
// its payload as sent (compressed or not, unmasked).
type wireMessage struct {
	op         byte
	compressed bool
	frames     int
	wire       int // bytes on the wire, headers included
	payload    []byte
}

// wireMessages parses one way of a tapped connection (the proxy's bytes
// for a single connection) past the HTTP handshake: the data messages of
// a client (masked) or of a server. A frame cut short at the end (the
// connection was still in use) ends the list.
func wireMessages(t *testing.T, b string, masked bool) []wireMessage {
	t.Helper()
	_, rest, ok := strings.Cut(b, "\r\n\r\n")
	if !ok {
		t.Fatalf("no end of the handshake in %d bytes", len(b))
	}
	br := bufio.NewReader(strings.NewReader(rest))
	var msgs []wireMessage
	open := false
	for {
		head, p, err := readFrame(br, masked)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return msgs
		}
		if err != nil {
			t.Fatalf("frame after %d messages: %v", len(msgs), err)
		}
		op := head & 0x0f
		switch {
		case op >= 0x8: // control
		case op == opCont:
			if !open {
				t.Fatalf("continuation frame outside a message after %d messages", len(msgs))
			}
			m := &msgs[len(msgs)-1]
			m.frames++
			m.wire += frameHeaderLen(len(p), masked) + len(p)
			m.payload = append(m.payload, p...)
		default:
			if open {
				t.Fatalf("new message inside message %d", len(msgs))
			}
			msgs = append(msgs, wireMessage{op: op, compressed: head&0x40 != 0, frames: 1,
				wire: frameHeaderLen(len(p), masked) + len(p), payload: p})
		}
		if op < 0x8 {
			open = head&0x80 == 0
		}
	}
}

// frameHeaderLen is the size of the header of a frame of n bytes.
func frameHeaderLen(n int, masked bool) int {
	h := 2
	switch {
	case n > 0xffff:
		h += 8
	case n > 125:
		h += 2
	}
	if masked {
		h += 4
	}
	return h
}

// handshakeHeader is a header of the request or response at the start of
// one way of a tapped connection ("" when absent).
func handshakeHeader(t *testing.T, b, name string) string {
	t.Helper()
	head, _, ok := strings.Cut(b, "\r\n\r\n")
	if !ok {
		t.Fatalf("no end of the handshake in %d bytes", len(b))
	}
	for _, line := range strings.Split(head, "\r\n")[1:] {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.EqualFold(strings.TrimSpace(k), name) {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// statusLine is the first line of one way of a tapped connection.
func statusLine(b string) string { line, _, _ := strings.Cut(b, "\r\n"); return line }

// wireInflater inflates the compressed messages of one sender with
// compress/flate, keeping the last 32 KiB of what they inflated to when the
// sender takes context over from one message to the next.
type wireInflater struct {
	takeover bool
	window   []byte
}

func (z *wireInflater) inflate(p []byte) ([]byte, error) {
	// RFC 7692 §7.2.2: the sender removed the flush's 00 00 ff ff; a final
	// empty stored block after it ends the stream.
	src := io.MultiReader(bytes.NewReader(p), bytes.NewReader([]byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff}))
	var dict []byte
	if z.takeover {
		dict = z.window
	}
	out, err := io.ReadAll(flate.NewReaderDict(src, dict))
	if err != nil {
		return nil, err
	}
	if z.takeover {
		z.window = append(z.window, out...)
		if n := len(z.window) - 32<<10; n > 0 {
			z.window = append([]byte(nil), z.window[n:]...)
		}
	}
	return out, nil
}

// deflateMessage compresses msg as one permessage-deflate message with
// compress/flate, on its own (no context).
func deflateMessage(msg []byte) []byte {
	var b bytes.Buffer
	w, _ := flate.NewWriter(&b, flate.BestCompression)
	w.Write(msg)
	w.Flush()
	return bytes.TrimSuffix(b.Bytes(), []byte{0, 0, 0xff, 0xff})
}

// catalogue is a JSON value of about 1 KiB, different for each seq, as a
// backend publishes: records with the same keys.
func catalogue(seq int) string {
	var b strings.Builder
	fmt.Fprintf(&b, `{"seq":%d,"items":[`, seq)
	for i := range 11 {
		if i > 0 {
			b.WriteByte(',')
		}
		id := seq*100 + i
		fmt.Fprintf(&b, `{"id":%d,"sku":"SKU-%05d","name":"Widget %d","status":"in_stock","price":%d.99,"warehouse":"eu-west-1"}`,
			id, id*7, id, 10+id%90)
	}
	b.WriteString(`]}`)
	return b.String()
}

// header is a header of a DevTools event's headers ("" when absent).
func header(h network.Headers, name string) string {
	for k, v := range h {
		if strings.EqualFold(k, name) {
			s, _ := v.(string)
			return s
		}
	}
	return ""
}

// TestCompressionBrowserFanOut: headless Chromium, which offers
// permessage-deflate on every WebSocket, subscribes to a room of a gateway
// with `compression`; 20 publications of about 1 KiB of JSON are posted to
// /publish. DevTools shows the 101 answering with permessage-deflate and
// server_no_context_takeover; the page gets every publication intact; on
// the wire (a tapped proxy in front of the gateway) each was one
// compressed frame that compress/flate inflates to what the page got, and
// the bytes sent are well under the payloads' size. A client on the same
// room that offers no compression gets the same publications plain, at
// more bytes than the payloads.
func TestCompressionBrowserFanOut(t *testing.T) {
	const channel, total = "news:eu", 20
	pageLn := listen(t)
	origin := "http://" + pageLn.Addr().String()
	g := startGateway(t, roomsSite(fmt.Sprintf("\t\t\torigins %s\n\t\t\tcompression", origin)))
	browserPx, plainPx := startProxy(t, g.addr()), startProxy(t, g.addr())
	browserTap, plainTap := browserPx.tap(), plainPx.tap()

	page := fmt.Sprintf(`<!doctype html><title>compression</title><script>
window.got = []; window.state = "connecting";
const ws = new WebSocket(%q, "wsgate.v1");
ws.onopen = () => ws.send(JSON.stringify({id: 1, op: "subscribe", channel: %q}));
ws.onmessage = (e) => {
	const m = JSON.parse(e.data);
	if (m.op === "message") got.push(e.data);
	else if (m.id === 1 && m.op === "ok") state = "subscribed";
	else state = "unexpected: " + e.data;
};
ws.onclose = (e) => { state = "closed " + e.code; };
</script>`, "ws://"+browserPx.addr()+"/ws", channel)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte(page))
	})}
	go srv.Serve(pageLn)
	t.Cleanup(func() { srv.Close() })

	bctx := startBrowser(t)
	tab, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()
	var mu sync.Mutex
	var offered, answered string
	var status int64
	if err := chromedp.Listen(tab, func(ev any) {
		mu.Lock()
		defer mu.Unlock()
		switch e := ev.(type) {
		case *network.EventWebSocketWillSendHandshakeRequest:
			offered = header(e.Request.Headers, "Sec-WebSocket-Extensions")
		case *network.EventWebSocketHandshakeResponseReceived:
			status, answered = e.Response.Status, header(e.Response.Headers, "Sec-WebSocket-Extensions")
		}
	}); err != nil {
		t.Fatal(err)
	}
	if err := chromedp.Do(tab, chromedp.Navigate(origin+"/")); err != nil {
		t.Fatal(err)
	}
	jsPoll(t, tab, `state === "subscribed"`, 20*time.Second)
	plain := dialRoomsWith(t, g.through(plainPx), http.Header{"Origin": {origin}})
	plain.subscribe(channel)

	mu.Lock()
	t.Logf("Chromium offered %q; the gateway answered %d %q", offered, status, answered)
	if !strings.Contains(offered, "permessage-deflate") {
		t.Fatalf("Chromium offered %q, want permessage-deflate", offered)
	}
	if status != http.StatusSwitchingProtocols || !strings.HasPrefix(answered, "permessage-deflate") ||
		!strings.Contains(answered, "server_no_context_takeover") || !strings.Contains(answered, "client_no_context_takeover") {
		t.Fatalf("the handshake's response: %d %q, want 101 with permessage-deflate, server_no_context_takeover and client_no_context_takeover", status, answered)
	}
	mu.Unlock()
	if ext := handshakeHeader(t, plainTap.fromTarget.String(), "Sec-WebSocket-Extensions"); ext != "" {
		t.Fatalf("the client that offered nothing was answered %q", ext)
	}

	browserBefore, plainBefore := len(browserTap.fromTarget.String()), len(plainTap.fromTarget.String())
	published := make([]string, total)
	for i := range published {
		published[i] = catalogue(i + 1)
		if code, resp := httpPublish(t, g, fmt.Sprintf(`{"channel":%q,"data":%s}`, channel, published[i])); code != http.StatusOK {
			t.Fatalf("publish %d: %d %s", i+1, code, resp)
		}
	}
	jsPoll(t, tab, fmt.Sprintf(`got.length >= %d`, total), 20*time.Second)
	got := jsEval[[]string](t, tab, `got`)
	if state := jsEval[string](t, tab, `state`); state != "subscribed" || len(got) != total {
		t.Fatalf("page state %q with %d messages, want %d", state, len(got), total)
	}
	payloads := 0
	for i, raw := range got {
		var m struct {
			Op, Channel string
			Data        json.RawMessage
		}
		if err := json.Unmarshal([]byte(raw), &m); err != nil || m.Channel != channel || string(m.Data) != published[i] {
			t.Fatalf("message %d on the page differs from publication %d: %.200s", i, i+1, raw)
		}
		payloads += len(raw)
	}
	deadline := time.After(20 * time.Second)
	for i := range total {
		select {
		case m := <-plain.msgs:
			if string(m.Data) != published[i] {
				t.Fatalf("the plain client's message %d differs: %.200s", i, m.Data)
			}
		case err := <-plain.errs:
			t.Fatalf("the plain client's connection ended: %v", err)
		case <-deadline:
			t.Fatalf("the plain client got %d of %d messages", i, total)
		}
	}

	// The browser's socket: the subscribe's ok, then one compressed frame
	// per publication, which inflates, on its own, to what the page got.
	browserWire := browserTap.fromTarget.String()
	msgs := wireMessages(t, browserWire, false)
	if len(msgs) != 1+total {
		t.Fatalf("%d messages to the browser on the wire, want %d", len(msgs), 1+total)
	}
	var z wireInflater
	compressedBytes := 0
	for i, m := range msgs[1:] {
		if !m.compressed || m.frames != 1 {
			t.Fatalf("publication %d went to the browser compressed: %v, in %d frames; want compressed, one frame", i+1, m.compressed, m.frames)
		}
		out, err := z.inflate(m.payload)
		if err != nil || string(out) != got[i] {
			t.Fatalf("publication %d: the frame inflates to %.100q (%v), want what the page got", i+1, out, err)
		}
		compressedBytes += m.wire
	}
	plainMsgs := wireMessages(t, plainTap.fromTarget.String(), false)
	for i, m := range plainMsgs {
		if m.compressed {
			t.Fatalf("message %d to the client without compression is compressed", i)
		}
	}
	browserSent, plainSent := len(browserWire)-browserBefore, len(plainTap.fromTarget.String())-plainBefore
	t.Logf("%d publications, %d bytes of messages: %d bytes to the browser on the wire (%d in the message frames, %.0f%%), %d to the client without compression",
		total, payloads, browserSent, compressedBytes, 100*float64(browserSent)/float64(payloads), plainSent)
	if plainSent < payloads {
		t.Fatalf("%d bytes to the plain client, fewer than the %d of the messages", plainSent, payloads)
	}
	if 2*browserSent > payloads {
		t.Fatalf("%d bytes to the browser, more than half the %d of the messages", browserSent, payloads)
	}
}

// TestCompressionChannelPolicyOnCompressedMessages: relay mode with a
// channel policy on the client's messages and `compression {
// context_takeover }`. A coder/websocket client that compresses every
// message (threshold 1) and takes context over sends joins and says, some
// to a denied channel, one an exact repeat of an earlier denied one, so
// that its frame is mostly a reference into the window. On the wire each
// is compressed (RSV1, and compress/flate inflates it to what was sent);
// the gateway inflates each, denies the denied ones with the configured
// reply and forwards only the allowed ones. A raw client then sends a compressed
// message in two frames (compress/flate): denied, and an allowed one
// passes.
func TestCompressionChannelPolicyOnCompressedMessages(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, `		compression {
			context_takeover
		}
		channels {
			allow subscribe chat:public:*
			allow publish   chat:public:*
		}
		relay_channels {
			action_field type
			channel_field room
			action subscribe join
			action publish say
			deny_reply `+"`"+`{"type":"error","code":"forbidden","room":{channel}}`+"`"+`
		}`))
	px := startProxy(t, g.addr())
	tap := px.tap()
	c := dial(t, g.through(px), "/ws", &websocket.DialOptions{CompressionMode: websocket.CompressionContextTakeover, CompressionThreshold: 1})
	ctx := ctxT(t, 30*time.Second)

	const denied = "chat:secret:vault"
	text := strings.Repeat("The quarterly numbers are in the usual folder. ", 12)
	steps := []struct {
		msg     string
		allowed bool
	}{
		{`{"type":"join","room":"chat:public:lobby"}`, true},
		{`{"type":"join","room":"` + denied + `"}`, false},
		{`{"type":"say","room":"chat:public:lobby","text":"` + text + `"}`, true},
		{`{"type":"say","room":"` + denied + `","text":"` + text + `"}`, false},
		{`{"type":"say","room":"` + denied + `","text":"` + text + `"}`, false}, // an exact repeat: a reference into the window
		{`{"type":"say","room":"chat:public:lobby","text":"bye"}`, true},
	}
	var want []string
	for _, s := range steps {
		if err := c.Write(ctx, websocket.MessageText, []byte(s.msg)); err != nil {
			t.Fatal(err)
		}
		_, reply, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("%.60s: %v", s.msg, err)
		}
		if s.allowed {
			want = append(want, s.msg)
			if string(reply) != s.msg {
				t.Fatalf("%.60s was not relayed: got %.60s", s.msg, reply)
			}
			continue
		}
		if r := `{"type":"error","code":"forbidden","room":"` + denied + `"}`; string(reply) != r {
			t.Fatalf("%.60s: got %s, want %s", s.msg, reply, r)
		}
	}

	// The client's frames: each message compressed, with context taken
	// over, inflating to what was sent; the denied name never in clear.
	msgs := wireMessages(t, tap.toTarget.String(), true)
	if len(msgs) != len(steps) {
		t.Fatalf("%d messages from the client on the wire, want %d", len(msgs), len(steps))
	}
	z := wireInflater{takeover: true}
	for i, m := range msgs {
		out, err := z.inflate(m.payload)
		if !m.compressed || err != nil || string(out) != steps[i].msg {
			t.Fatalf("message %d on the wire: compressed %v, inflates to %.60q (%v); want compressed, %.60q", i, m.compressed, out, err, steps[i].msg)
		}
	}
	if repeat := msgs[4]; 10*len(repeat.payload) > len(steps[4].msg) {
		t.Fatalf("the repeated message is %d bytes compressed, %d plain: no context taken over", len(repeat.payload), len(steps[4].msg))
	}
	t.Logf("client messages on the wire (compressed/plain bytes): %s", sizes(msgs, func(i int) int { return len(steps[i].msg) }))

	// A raw client: compressed messages in two frames each.
	r := rawDial(t, g, "/ws", http.Header{"Sec-WebSocket-Extensions": {"permessage-deflate; client_no_context_takeover"}})
	for _, s := range []struct {
		msg     string
		allowed bool
	}{
		{`{"type":"join","room":"` + denied + `","note":"in two frames"}`, false},
		{`{"type":"join","room":"chat:public:frag","note":"in two frames"}`, true},
	} {
		zb := deflateMessage([]byte(s.msg))
		r.write(frame(false, opText|0x40, zb[:len(zb)/2]), frame(true, opCont, zb[len(zb)/2:]))
		f, err := r.read(10 * time.Second)
		if err != nil {
			t.Fatalf("%s: %v", s.msg, err)
		}
		wantReply := `{"type":"error","code":"forbidden","room":"` + denied + `"}`
		if s.allowed {
			wantReply = s.msg
			want = append(want, s.msg)
		}
		if f.op != opText || string(f.payload) != wantReply {
			t.Fatalf("%s: got op %d %q, want %s", s.msg, f.op, f.payload, wantReply)
		}
	}

	// The upstream received the allowed messages, and only them.
	var got []string
	for len(up.received) > 0 {
		got = append(got, string(<-up.received))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("the upstream received:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// sizes lists the messages' compressed sizes against their plain ones.
func sizes(msgs []wireMessage, plain func(i int) int) string {
	var b strings.Builder
	for i, m := range msgs {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%d/%d", len(m.payload), plain(i))
	}
	return b.String()
}

// TestCompressionMixedPeers: a client and an upstream with different
// compression settings talk through the gateway, each behind a tapped
// proxy; messages of every size, both ways (the upstream echoes), arrive
// intact. On the wire, a side that agreed to compression sends what its
// settings say; toward a side that agreed, the gateway compresses the
// messages from 128 bytes (min_size) that came compressed, and those that
// came plain in one frame of at most 64 KiB; to a side that did not agree
// it sends nothing compressed.
func TestCompressionMixedPeers(t *testing.T) {
	json1 := catalogue(1)
	lines := func(n int) []byte {
		var b bytes.Buffer
		for i := 0; b.Len() < n; i++ {
			fmt.Fprintf(&b, "line %d: the quick brown fox jumps over the lazy dog\n", i)
		}
		return b.Bytes()[:n]
	}
	random := make([]byte, 2<<10)
	rand.Read(random)
	msgs := []struct {
		typ  websocket.MessageType
		body []byte
	}{
		{websocket.MessageText, []byte("tiny")},
		{websocket.MessageText, []byte(json1)},
		{websocket.MessageText, []byte(json1)}, // again: with context takeover, a reference into the window
		{websocket.MessageBinary, random},
		{websocket.MessageText, lines(20 << 10)},
		{websocket.MessageText, lines(100 << 10)}, // over 64 KiB: the gateway does not compress it
	}
	// gatewayCompresses: what the gateway compresses toward a side that
	// agreed, of message i, of n bytes, that came compressed or not (a
	// plain one here always comes in one frame); random bytes, which
	// compressing would not shrink, go plain.
	gatewayCompresses := func(i, n int, came bool) bool {
		return n >= 128 && (came || n <= 64<<10) && !bytes.Equal(msgs[i].body, random)
	}

	type side struct {
		agreed   bool   // permessage-deflate agreed
		takeover bool   // the side compresses with context takeover
		answer   string // the extension the gateway answers the client / the upstream answers the gateway
	}
	tests := []struct {
		name        string
		compression string // the handler's compression block
		client      websocket.CompressionMode
		upstream    websocket.CompressionMode
		c, u        side
	}{
		{
			name:        "client with context takeover, upstream without compression",
			compression: "compression {\n\t\t\tcontext_takeover\n\t\t}",
			client:      websocket.CompressionContextTakeover,
			upstream:    websocket.CompressionDisabled,
			c:           side{agreed: true, takeover: true, answer: "permessage-deflate; server_no_context_takeover"},
			u:           side{},
		},
		{
			name:        "client without compression, upstream without context takeover",
			compression: "compression",
			client:      websocket.CompressionDisabled,
			upstream:    websocket.CompressionNoContextTakeover,
			c:           side{},
			u:           side{agreed: true, answer: "permessage-deflate; client_no_context_takeover; server_no_context_takeover"},
		},
		{
			name:        "client without compression, upstream with context takeover",
			compression: "compression {\n\t\t\tcontext_takeover\n\t\t}",
			client:      websocket.CompressionDisabled,
			upstream:    websocket.CompressionContextTakeover,
			c:           side{},
			u:           side{agreed: true, takeover: true, answer: "permessage-deflate; client_no_context_takeover"},
		},
		{
			name:        "both with context takeover",
			compression: "compression {\n\t\t\tcontext_takeover\n\t\t}",
			client:      websocket.CompressionContextTakeover,
			upstream:    websocket.CompressionContextTakeover,
			c:           side{agreed: true, takeover: true, answer: "permessage-deflate; server_no_context_takeover"},
			u:           side{agreed: true, takeover: true, answer: "permessage-deflate; client_no_context_takeover"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := startCompressingUpstream(t, tt.upstream, 1)
			upPx := startProxy(t, strings.TrimPrefix(up.URL, "ws://"))
			upTap := upPx.tap()
			g := startGateway(t, relaySite("ws://"+upPx.addr(), "\t\t"+tt.compression))
			clientPx := startProxy(t, g.addr())
			clientTap := clientPx.tap()
			c := dial(t, g.through(clientPx), "/ws", &websocket.DialOptions{CompressionMode: tt.client, CompressionThreshold: 1})
			ctx := ctxT(t, 30*time.Second)
			for i, m := range msgs {
				if err := c.Write(ctx, m.typ, m.body); err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				typ, echo, err := c.Read(ctx)
				if err != nil {
					t.Fatalf("message %d: %v", i, err)
				}
				if typ != m.typ || !bytes.Equal(echo, m.body) {
					t.Fatalf("message %d (%d bytes): the echo differs (%v, %d bytes)", i, len(m.body), typ, len(echo))
				}
			}

			// The handshakes, as the peers saw them.
			if got := handshakeHeader(t, clientTap.fromTarget.String(), "Sec-WebSocket-Extensions"); got != tt.c.answer {
				t.Errorf("the gateway answered the client %q, want %q", got, tt.c.answer)
			}
			if got := handshakeHeader(t, upTap.toTarget.String(), "Sec-WebSocket-Extensions"); !strings.HasPrefix(got, "permessage-deflate") {
				t.Errorf("the gateway offered the upstream %q, want permessage-deflate", got)
			}
			if got := handshakeHeader(t, upTap.fromTarget.String(), "Sec-WebSocket-Extensions"); got != tt.u.answer {
				t.Errorf("the upstream answered %q (%s), want %q", got, statusLine(upTap.fromTarget.String()), tt.u.answer)
			}

			// Each way on the wire: what each message was sent as, and
			// that it inflates (with the sender's context) to itself.
			check := func(way string, wire string, masked bool, compressed func(i, n int) bool, takeover bool) []wireMessage {
				t.Helper()
				got := wireMessages(t, wire, masked)
				if len(got) != len(msgs) {
					t.Fatalf("%s: %d messages on the wire, want %d", way, len(got), len(msgs))
				}
				z := wireInflater{takeover: takeover}
				for i, m := range got {
					want := compressed(i, len(msgs[i].body))
					if m.compressed != want {
						t.Errorf("%s: message %d (%d bytes) compressed: %v, want %v", way, i, len(msgs[i].body), m.compressed, want)
						continue
					}
					body := m.payload
					if m.compressed {
						var err error
						if body, err = z.inflate(m.payload); err != nil {
							t.Errorf("%s: message %d does not inflate: %v", way, i, err)
							continue
						}
					}
					if !bytes.Equal(body, msgs[i].body) {
						t.Errorf("%s: message %d on the wire differs from what was sent", way, i)
					}
				}
				t.Logf("%s (wire/plain bytes): %s", way, sizes(got, func(i int) int { return len(msgs[i].body) }))
				return got
			}
			// A peer with compression compresses every message (threshold
			// 1); the gateway what its rule says, toward a side that agreed.
			peer := func(s side) func(int, int) bool { return func(int, int) bool { return s.agreed } }
			gateway := func(to, from side) func(int, int) bool {
				return func(i, n int) bool { return to.agreed && gatewayCompresses(i, n, from.agreed) }
			}
			fromClient := check("client → gateway", clientTap.toTarget.String(), true, peer(tt.c), tt.c.takeover)
			check("gateway → upstream", upTap.toTarget.String(), true, gateway(tt.u, tt.c), false)
			fromUpstream := check("upstream → gateway", upTap.fromTarget.String(), false, peer(tt.u), tt.u.takeover)
			check("gateway → client", clientTap.fromTarget.String(), false, gateway(tt.c, tt.u), false)
			// With context takeover the repeated message is mostly a
			// reference into the window the gateway kept.
			for _, w := range []struct {
				s    side
				msgs []wireMessage
				who  string
			}{{tt.c, fromClient, "client"}, {tt.u, fromUpstream, "upstream"}} {
				if w.s.takeover && len(w.msgs) == len(msgs) {
					if first, again := len(w.msgs[1].payload), len(w.msgs[2].payload); 4*again > first {
						t.Errorf("the %s's repeated message is %d bytes compressed, the first %d: no context taken over", w.who, again, first)
					}
				}
			}
		})
	}
}
