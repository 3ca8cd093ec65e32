package proxy

// The checks the relay fuzz target applies to both output streams, and
// the raw upstream it runs against.

import (
	"bufio"
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync"
	"unicode/utf8"
)

// streamCheck follows one stream of frames the gateway writes to a peer
// and reports the first frame that breaks RFC 6455: masking (toward an
// upstream) or its absence (toward a client), RSV bits, opcodes, control
// frames, a data frame inside another message (§5.4), a continuation with
// no message, anything after a close frame, a second close. With deflate
// (the peer agreed to permessage-deflate, RFC 7692), RSV1 may mark the
// first frame of a data message: the message must inflate, and be valid
// UTF-8 if it is text.
type streamCheck struct {
	toUpstream bool
	deflate    bool
	inMsg      bool
	closed     bool
	closeCode  int

	zOn   bool // the message in progress is compressed
	zText bool
	z     []byte // its compressed bytes so far
}

func (s *streamCheck) frame(f rawFrame) error {
	switch {
	case f.masked != s.toUpstream:
		return fmt.Errorf("masked %v (toward an upstream: %v)", f.masked, s.toUpstream)
	case f.rsv != 0 && (f.rsv != 4 || !s.deflate || (f.op != opText && f.op != opBinary)):
		return fmt.Errorf("RSV bits %d (op %#x, compression agreed: %v)", f.rsv, f.op, s.deflate)
	case f.op > opBinary && f.op < opClose, f.op > opPong:
		return fmt.Errorf("opcode %#x", f.op)
	case f.op >= opClose && (len(f.payload) > 125 || !f.fin):
		return fmt.Errorf("bad control frame: op %#x, %d bytes, fin %v", f.op, len(f.payload), f.fin)
	case s.closed:
		return fmt.Errorf("op %#x after the close frame", f.op)
	}
	switch f.op {
	case opClose:
		if len(f.payload) == 1 {
			return errors.New("a 1-byte close payload")
		}
		s.closed = true
		s.closeCode, _ = closeOf(f.payload)
	case opText, opBinary:
		if s.inMsg {
			return fmt.Errorf("a data frame (op %#x, %d bytes) inside another message", f.op, len(f.payload))
		}
		s.inMsg = !f.fin
		s.zOn, s.zText, s.z = f.rsv == 4, f.op == opText, append(s.z[:0], f.payload...)
	case opCont:
		if !s.inMsg {
			return errors.New("a continuation frame with no message in progress")
		}
		s.inMsg = !f.fin
		if s.zOn {
			s.z = append(s.z, f.payload...)
		}
	}
	if s.zOn && !s.inMsg && (f.op == opText || f.op == opBinary || f.op == opCont) {
		s.zOn = false
		msg, err := io.ReadAll(flate.NewReader(io.MultiReader(bytes.NewReader(s.z), bytes.NewReader([]byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff}))))
		if err != nil {
			return fmt.Errorf("a compressed message of %d bytes that does not inflate: %v", len(s.z), err)
		}
		if s.zText && !utf8.Valid(msg) {
			return fmt.Errorf("a compressed text message that inflates to invalid UTF-8 (%d bytes)", len(msg))
		}
	}
	return nil
}

// flateMessage compresses p as one permessage-deflate message, with
// compress/flate.
func flateMessage(p []byte) []byte {
	var b bytes.Buffer
	fw, _ := flate.NewWriter(&b, flate.BestSpeed)
	fw.Write(p)
	fw.Flush()
	return bytes.TrimSuffix(b.Bytes(), []byte{0, 0, 0xff, 0xff})
}

// Upstream behaviours, picked per connection by the fuzz input.
const (
	upAnswerClose   = iota // answers a close frame, then closes TCP
	upDropOnClose          // closes TCP at once on a close frame
	upSilentOnClose        // never answers a close frame; reads until the gateway drops it
	upInitiateClose        // sends its own close frame after its first echo
)

// fuzzUpstream is a raw upstream: it echoes every message it receives,
// sometimes in two fragments with a ping between them (calling between
// the two the hook the fuzz target uses to enqueue a fan-out frame), and
// checks every frame the gateway sends it. Each connection's verdict goes
// to results under the id in its query.
type fuzzUpstream struct {
	srv     *httptest.Server
	mu      sync.Mutex
	results map[string]chan error
	between func(id string) // runs between the fragments of an echo
}

func newFuzzUpstream(between func(id string)) *fuzzUpstream {
	u := &fuzzUpstream{results: map[string]chan error{}, between: between}
	u.srv = httptest.NewServer(http.HandlerFunc(u.handle))
	return u
}

func (u *fuzzUpstream) url() string { return "ws://" + u.srv.Listener.Addr().String() }

// result is where connection id's verdict arrives.
func (u *fuzzUpstream) result(id string) chan error {
	u.mu.Lock()
	defer u.mu.Unlock()
	ch := u.results[id]
	if ch == nil {
		ch = make(chan error, 1)
		u.results[id] = ch
	}
	return ch
}

func (u *fuzzUpstream) forget(id string) {
	u.mu.Lock()
	delete(u.results, id)
	u.mu.Unlock()
}

func (u *fuzzUpstream) handle(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	behaviour, _ := strconv.Atoi(r.URL.Query().Get("close"))
	fragment := r.URL.Query().Get("fragment") != ""
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		u.result(id) <- err
		return
	}
	defer conn.Close()
	brw.Writer.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
		"Sec-WebSocket-Accept: " + wantAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n")
	brw.Writer.Flush()
	u.result(id) <- u.serve(id, conn, brw.Reader, behaviour, fragment)
}

// serve runs one upstream connection and returns what was wrong with the
// gateway's frames, if anything.
func (u *fuzzUpstream) serve(id string, conn net.Conn, br *bufio.Reader, behaviour int, fragment bool) error {
	var check streamCheck
	check.toUpstream = true
	var msg []byte
	var op byte
	sentClose, echoes := false, 0
	write := func(frames ...[]byte) {
		for _, f := range frames {
			conn.Write(f)
		}
	}
	for {
		f, err := readRawFrame(br, 1<<20)
		if err != nil {
			if sentClose && !check.closed && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)) {
				return errors.New("the upstream's close frame was never answered")
			}
			return nil
		}
		if err := check.frame(f); err != nil {
			return fmt.Errorf("to the upstream: %v", err)
		}
		switch f.op {
		case opClose:
			switch behaviour {
			case upDropOnClose:
				return nil
			case upSilentOnClose:
				continue
			}
			if !sentClose {
				write(sf(opClose, f.payload))
			}
			return nil
		case opPing:
			write(sf(opPong, f.payload))
			continue
		case opPong:
			continue
		case opText, opBinary:
			msg, op = append(msg[:0], f.payload...), f.op
		case opCont:
			msg = append(msg, f.payload...)
		}
		if !f.fin || sentClose {
			continue
		}
		// A whole message: echo it.
		if fragment && len(msg) >= 2 {
			half := len(msg) / 2
			write(appendFrame(nil, op, nil, uint64(half), msg[:half]))
			u.between(id)
			write(sf(opPing, []byte("between")), appendFrame(nil, 0x80|opCont, nil, uint64(len(msg)-half), msg[half:]))
		} else {
			write(sf(op, msg))
		}
		echoes++
		if behaviour == upInitiateClose && echoes == 1 {
			write(sf(opClose, closePayload(4000, "upstream done")))
			sentClose = true
		}
	}
}
