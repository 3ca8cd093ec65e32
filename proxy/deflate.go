package proxy

import (
	stdflate "compress/flate"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/gobwas/httphead"
	"github.com/gobwas/ws"
	"github.com/gobwas/ws/wsflate"
	"github.com/klauspost/compress/flate"
)

// permessage-deflate (RFC 7692).
//
// The gateway inflates every compressed message it receives, whole, with
// MaxMessage as the limit on what it inflates to, so that every check sees
// the payload and a decompression bomb costs at most MaxMessage bytes. It
// compresses each message it sends on its own (no context taken over from
// earlier messages, which RFC 7692 allows whatever was agreed): so one
// compressed frame serves every subscriber of a publication, and no
// connection holds a compressor. It tells its peers so
// (server_no_context_takeover to clients, client_no_context_takeover to
// upstreams), and by default asks them to do the same, so that no
// connection holds an inflater's window either.

// Compression configures permessage-deflate. A nil *Compression in Config
// negotiates none.
type Compression struct {
	// ContextTakeover lets peers compress a message with the context of
	// their earlier ones (better ratios for small messages), at the cost
	// of a window of up to 2^WindowBits bytes held per connection and side
	// that compresses. Default false: clients are asked for
	// client_no_context_takeover, upstreams for server_no_context_takeover.
	ContextTakeover bool
	// WindowBits (8 to 15) is the largest window a client may compress
	// with when it offers client_max_window_bits, and the one asked of
	// upstreams with ContextTakeover. Default 15.
	WindowBits int
	// MinSize is the smallest message the gateway compresses; smaller ones
	// are sent plain. Default DefaultCompressionMinSize.
	MinSize int
	// NoUpstream: compression is not offered to the upstreams.
	NoUpstream bool
}

// DefaultCompressionMinSize is the default Compression.MinSize: below it,
// deflate's framing costs about what it saves.
const DefaultCompressionMinSize = 128

// compressionLevel is the deflate level of every message the gateway
// compresses: the fastest, which on JSON comes within a few percent of
// the default level's size at a third of its time.
const compressionLevel = flate.BestSpeed

func (z *Compression) prepare() error {
	if z == nil {
		return nil
	}
	if z.WindowBits == 0 {
		z.WindowBits = 15
	}
	if z.WindowBits < 8 || z.WindowBits > 15 {
		return fmt.Errorf("compression window bits %d: want 8 to 15", z.WindowBits)
	}
	if z.MinSize < 0 {
		return fmt.Errorf("compression min size %d: want at least 0", z.MinSize)
	}
	if z.MinSize == 0 {
		z.MinSize = DefaultCompressionMinSize
	}
	return nil
}

// deflate is what one peer agreed to; a peer without it negotiated no
// compression.
type deflate struct {
	minSize int
	// inBits is the window of the peer's compressor when it may take
	// context over from one message to the next; 0 when it may not.
	inBits uint8
	// huffman: the peer inflates with a window under 32 KiB, so messages
	// to it are compressed without back-references.
	huffman bool

	// The message being received: wire holds its compressed bytes when
	// they span frames or outgrow the read buffer; drop, it is inflated
	// only to keep the context, then dropped.
	drop bool
	wire []byte
	// window is the end of what the peer's messages inflated to, with
	// context takeover: the next message may refer back into it.
	window []byte
}

// compresses reports whether a message of n bytes to the peer is
// compressed.
func (d *deflate) compresses(n int) bool { return d != nil && n >= d.minSize }

const extensionHeader = "Sec-Websocket-Extensions"

// accept picks the first permessage-deflate offer of the client that the
// gateway can take and returns the response for it, and the peer's state;
// "" and nil when there is none. Offers with unknown, repeated or invalid
// parameters are declined (RFC 7692 §5).
func (z *Compression) accept(r *http.Request) (string, *deflate) {
	if z == nil {
		return "", nil
	}
	for _, v := range r.Header[extensionHeader] {
		opts, ok := httphead.ParseOptions([]byte(v), nil)
		if !ok {
			continue
		}
		for _, opt := range opts {
			if string(opt.Name) != wsflate.ExtensionName {
				continue
			}
			var p wsflate.Parameters
			if p.Parse(opt) != nil {
				continue
			}
			d := &deflate{minSize: z.MinSize}
			var b strings.Builder
			b.WriteString("permessage-deflate; server_no_context_takeover")
			if p.ServerMaxWindowBits.Defined() {
				// Messages to the client use no back-references under a
				// 32 KiB window; any window is honoured so.
				d.huffman = p.ServerMaxWindowBits < 15
				b.WriteString("; server_max_window_bits=")
				b.WriteString(strconv.Itoa(int(p.ServerMaxWindowBits)))
			}
			if !z.ContextTakeover {
				b.WriteString("; client_no_context_takeover")
			} else {
				bits := 15
				if p.ClientMaxWindowBits > 1 { // 1: offered without a value
					bits = int(p.ClientMaxWindowBits)
				}
				if p.ClientMaxWindowBits.Defined() && z.WindowBits < bits {
					bits = z.WindowBits
					b.WriteString("; client_max_window_bits=")
					b.WriteString(strconv.Itoa(bits))
				}
				d.inBits = uint8(bits)
			}
			return b.String(), d
		}
	}
	return "", nil
}

// offer is the permessage-deflate offer made to upstreams (none with
// NoUpstream).
func (z *Compression) offer() []httphead.Option {
	if z == nil || z.NoUpstream {
		return nil
	}
	p := wsflate.Parameters{ClientNoContextTakeover: true, ServerNoContextTakeover: !z.ContextTakeover}
	if !z.ContextTakeover || z.WindowBits == 15 {
		return []httphead.Option{p.Option()}
	}
	// A smaller window first; upstreams that cannot honour it take the
	// second offer, without it.
	small := p
	small.ServerMaxWindowBits = wsflate.WindowBits(z.WindowBits)
	return []httphead.Option{small.Option(), p.Option()}
}

// accepted reads an upstream's answer to the offer: the peer's state, nil
// when it took no compression, or an error for an answer that breaks RFC
// 7692 (the handshake then fails).
func (z *Compression) accepted(exts []httphead.Option) (*deflate, error) {
	for _, opt := range exts {
		if string(opt.Name) != wsflate.ExtensionName {
			continue
		}
		var p wsflate.Parameters
		if err := p.Parse(opt); err != nil {
			return nil, fmt.Errorf("upstream's permessage-deflate response: %w", err)
		}
		if !z.ContextTakeover && !p.ServerNoContextTakeover {
			return nil, errors.New("upstream's permessage-deflate response lacks the server_no_context_takeover it was offered")
		}
		if p.ClientMaxWindowBits == 1 {
			return nil, errors.New("upstream's permessage-deflate response has client_max_window_bits without a value")
		}
		d := &deflate{minSize: z.MinSize, huffman: p.ClientMaxWindowBits.Defined() && p.ClientMaxWindowBits < 15}
		if !p.ServerNoContextTakeover {
			d.inBits = 15
			if p.ServerMaxWindowBits.Defined() {
				d.inBits = uint8(p.ServerMaxWindowBits)
			}
		}
		return d, nil
	}
	return nil, nil
}

// Compressing.

// compressors pools deflate writers: [0] at compressionLevel, [1] Huffman
// only.
var compressors [2]sync.Pool

// deflateTail ends every flushed deflate stream; RFC 7692 §7.2.1 has it
// removed from the message.
var deflateTail = []byte{0, 0, 0xff, 0xff}

// appendBuffer is an io.Writer appending to a byte slice.
type appendBuffer struct{ b []byte }

func (a *appendBuffer) Write(p []byte) (int, error) { a.b = append(a.b, p...); return len(p), nil }

// compress appends payload, compressed as one permessage-deflate message,
// to dst.
func compress(dst, payload []byte, huffman bool) []byte {
	b := deflateInto(dst, payload, huffman)
	if !huffman && len(b)-len(dst) >= len(payload) {
		// The fastest level stores a block in which it finds no match
		// early on (it skips ahead faster the longer it goes without one,
		// as in random data): it does so with about one chat message in
		// six of 1 KiB. Huffman coding alone still shrinks text by a third.
		b = deflateInto(b[:len(dst)], payload, true)
	}
	return b
}

// deflateInto is compress with one compressor: compressionLevel, or
// Huffman only.
func deflateInto(dst, payload []byte, huffman bool) []byte {
	k, level := 0, compressionLevel
	if huffman {
		k, level = 1, flate.HuffmanOnly
	}
	out := &appendBuffer{b: dst}
	fw, _ := compressors[k].Get().(*flate.Writer)
	if fw == nil {
		fw, _ = flate.NewWriter(out, level) // level is valid
	} else {
		fw.Reset(out)
	}
	fw.Write(payload) // appendBuffer never fails
	fw.Flush()
	fw.Reset(nil) // drop out: the pool holds no message
	compressors[k].Put(fw)
	b := out.b
	if len(b) >= len(dst)+4 && string(b[len(b)-4:]) == string(deflateTail) {
		b = b[:len(b)-4]
	}
	return b
}

// Inflating.

var (
	errInflate = &closeErr{code: ws.StatusInvalidFramePayloadData, reason: "invalid compressed data"}
	// inflateTail restores what the sender removed (deflateTail) and adds
	// a final empty block, so the inflater ends at the message's end.
	inflateTail = []byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff}
)

// inflateErr is a new closeErr for data that does not inflate: asCloseErr
// fills in its side, which a shared one would keep for every later error.
func inflateErr() *closeErr { e := *errInflate; return &e }

// inflateSource feeds a compressed message, then inflateTail, to an
// inflater; it is an io.ByteReader, so the inflater reads no further.
type inflateSource struct {
	b    []byte
	tail int
}

func (s *inflateSource) Read(p []byte) (int, error) {
	if len(s.b) > 0 {
		n := copy(p, s.b)
		s.b = s.b[n:]
		return n, nil
	}
	if s.tail == len(inflateTail) {
		return 0, io.EOF
	}
	n := copy(p, inflateTail[s.tail:])
	s.tail += n
	return n, nil
}

func (s *inflateSource) ReadByte() (byte, error) {
	if len(s.b) > 0 {
		c := s.b[0]
		s.b = s.b[1:]
		return c, nil
	}
	if s.tail == len(inflateTail) {
		return 0, io.EOF
	}
	s.tail++
	return inflateTail[s.tail-1], nil
}

// inflater is a pooled inflater, reset for each message. It is the
// standard library's: klauspost/compress's (v1.20.1) keeps the Huffman
// table it built for one stream when the next declares an empty one
// (RFC 1951 allows a distance code with no codes), so that stream's
// symbols decode with a table of the inflater's previous message,
// another connection's, where compress/flate rejects them.
type inflater struct {
	src inflateSource
	r   io.ReadCloser
}

var inflaters = sync.Pool{New: func() any {
	f := new(inflater)
	f.r = stdflate.NewReader(&f.src)
	return f
}}

// inflateChunk is the size of the pieces a message is inflated into: a
// bomb stops at the limit having filled at most limit/inflateChunk + 1 of
// them.
const inflateChunk = 64 << 10

// inflate inflates a compressed message (wire), with the peer's context
// when it takes it over, into a buffer with ws.MaxHeaderSize bytes of
// headroom (for the frame it is forwarded in). The message may inflate to
// at most limit bytes (limit > 0): past it, inflating stops and the result
// is 1009. Text is checked as UTF-8 as it is inflated. When pooled, the
// caller hands the buffer back with putMessage once the message is written.
func (d *deflate) inflate(wire []byte, limit int64, text bool, u *utf8State) (buf []byte, pooled bool, err error) {
	f := inflaters.Get().(*inflater)
	defer inflaters.Put(f)
	f.src = inflateSource{b: wire}
	var dict []byte
	if d.inBits != 0 {
		dict = d.window
	}
	if err := f.r.(stdflate.Resetter).Reset(&f.src, dict); err != nil {
		return nil, false, inflateErr()
	}
	// Inflate into pooled chunks; the first has the headroom. A message
	// that fits the first is returned in it.
	var chunks []*[]byte
	defer func() {
		for _, c := range chunks {
			readBufPool.Put(c)
		}
	}()
	total := int64(0)
	for {
		c := readBufPool.Get().(*[]byte)
		chunks = append(chunks, c)
		b := *c
		off := 0
		if len(chunks) == 1 {
			off = ws.MaxHeaderSize
		}
		for off < len(b) {
			n, rerr := f.r.Read(b[off:])
			if n > 0 {
				total += int64(n)
				if total > limit {
					return nil, false, tooBig()
				}
				if text && !u.feed(b[off:off+n]) {
					return nil, false, invalidUTF8()
				}
			}
			off += n
			if rerr == io.EOF {
				if text && !u.done() {
					return nil, false, invalidUTF8()
				}
				*c = b[:off]
				buf, pooled = d.assemble(chunks)
				if pooled {
					chunks = chunks[:0]
				}
				return buf, pooled, nil
			}
			if rerr != nil {
				return nil, false, inflateErr()
			}
		}
	}
}

// assemble joins the inflated chunks (the last one cut to its length) into
// one message buffer, keeping the window when the peer takes context
// over. A message in one chunk is that chunk (pooled).
func (d *deflate) assemble(chunks []*[]byte) ([]byte, bool) {
	var buf []byte
	pooled := len(chunks) == 1
	if pooled {
		buf = *chunks[0]
		*chunks[0] = (*chunks[0])[:cap(*chunks[0])]
	} else {
		n := 0
		for _, c := range chunks {
			n += len(*c)
		}
		buf = make([]byte, 0, n)
		for _, c := range chunks {
			buf = append(buf, *c...)
			*c = (*c)[:cap(*c)]
		}
	}
	if d.inBits != 0 {
		d.keepWindow(buf[ws.MaxHeaderSize:])
	}
	return buf, pooled
}

// keepWindow appends msg to the window, keeping its last 2^inBits bytes.
func (d *deflate) keepWindow(msg []byte) {
	size := 1 << d.inBits
	if len(msg) >= size {
		d.window = append(d.window[:0], msg[len(msg)-size:]...)
		return
	}
	if cut := len(d.window) + len(msg) - size; cut > 0 {
		d.window = d.window[:copy(d.window, d.window[cut:])]
	}
	d.window = append(d.window, msg...)
}

// putMessage hands a pooled message buffer back.
func putMessage(buf []byte) {
	b := buf[:cap(buf)]
	readBufPool.Put(&b)
}

// Messages of the gateway's own.

// Message is a message of the gateway's own for clients (a publication),
// encoded once: as a plain frame, and on first use as a compressed frame
// for each kind of client that negotiated compression. It is shared by
// every client it goes to, and never modified.
type Message struct {
	frame []byte
	z     [2]atomic.Pointer[[]byte] // compressed frames: full window, Huffman only
}

// NewMessage encodes payload as a message of op (text or binary).
func NewMessage(op ws.OpCode, payload []byte) *Message {
	return &Message{frame: EncodeServerFrame(op, payload)}
}

// Frame is the plain frame.
func (m *Message) Frame() []byte { return m.frame }

// Payload is the message's payload.
func (m *Message) Payload() []byte { return m.frame[frameHeaderSize(m.frame):] }

// frameFor is the frame for a client with d (nil: no compression).
func (m *Message) frameFor(d *deflate) []byte {
	payload := m.Payload()
	if !d.compresses(len(payload)) {
		return m.frame
	}
	k := 0
	if d.huffman {
		k = 1
	}
	if b := m.z[k].Load(); b != nil {
		return *b
	}
	b := compressedFrame(ws.Header{Fin: true, OpCode: ws.OpCode(m.frame[0] & 0x0f)}, payload, d.huffman)
	if b == nil {
		b = m.frame // it does not shrink
	}
	if !m.z[k].CompareAndSwap(nil, &b) {
		return *m.z[k].Load() // made meanwhile for another client: every one gets the same
	}
	return b
}

// rsv1 is the RSV1 bit in ws.Header.Rsv: the message is compressed.
const rsv1 = 0x4

// compressedFrame encodes payload, compressed, as one frame with header h
// (unmasked); nil when compressing does not make it smaller.
func compressedFrame(h ws.Header, payload []byte, huffman bool) []byte {
	b := compress(make([]byte, ws.MaxHeaderSize, ws.MaxHeaderSize+len(payload)/2+64), payload, huffman)
	if len(b)-ws.MaxHeaderSize >= len(payload) {
		return nil
	}
	h.Rsv = rsv1
	h.Length = int64(len(b) - ws.MaxHeaderSize)
	hs := headerSize(h)
	encodeHeader(b[ws.MaxHeaderSize-hs:ws.MaxHeaderSize], h)
	return b[ws.MaxHeaderSize-hs:]
}
