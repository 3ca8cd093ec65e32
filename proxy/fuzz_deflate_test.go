package proxy

import (
	"bufio"
	"bytes"
	"compress/flate"
	"errors"
	"io"
	"runtime"
	"testing"
	"unicode/utf8"

	"github.com/gobwas/ws"
)

// The inflate path checked against the standard library's compress/flate,
// which the gateway does not use (it inflates with klauspost/compress).

// fuzzInBits maps a fuzz byte to a peer's context takeover: 0 (none) or a
// window of 8 to 15 bits.
func fuzzInBits(b uint8) uint8 {
	if b%9 == 0 {
		return 0
	}
	return 7 + b%9
}

// lastBytes is the end of b, at most n bytes of it.
func lastBytes(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}

// refInflate inflates a permessage-deflate message with compress/flate,
// reading at most max bytes of output (so a bomb stops there).
func refInflate(wire, dict []byte, max int64) ([]byte, error) {
	src := io.MultiReader(bytes.NewReader(wire), bytes.NewReader([]byte{0, 0, 0xff, 0xff, 1, 0, 0, 0xff, 0xff}))
	r := flate.NewReaderDict(src, dict)
	defer r.Close()
	return io.ReadAll(io.LimitReader(r, max))
}

// closeCode is the close code of an inflate error, or 0 when err is not a
// *closeErr.
func closeCode(err error) int {
	var ce *closeErr
	if errors.As(err, &ce) {
		return int(ce.code)
	}
	return 0
}

// invalidWithin reports whether the first n bytes of b (all of b when it
// is shorter) can no longer be the start of valid UTF-8.
func invalidWithin(b []byte, n int64) bool {
	var u utf8State
	return !u.feed(b[:min(int64(len(b)), n)])
}

// inflateAllocBound is the most (*deflate).inflate may allocate for a
// message with this limit: the 64 KiB pieces it inflates into (limit /
// inflateChunk + 1 of them, and one more as the first holds the headroom),
// the joined message on success, and slack for an inflater the pool had
// to make.
func inflateAllocBound(limit int64) uint64 {
	return uint64(limit+ws.MaxHeaderSize) + uint64(limit/inflateChunk+2)*inflateChunk + 256<<10
}

// FuzzInflate feeds arbitrary bytes to (*deflate).inflate as the
// compressed payload of a message, with a limit, as text or binary, with
// or without the window of the peer's earlier messages (context
// takeover), and checks the result against compress/flate's:
//
//   - compress/flate inflates it to at most limit bytes: ours returns
//     those bytes (and keeps the end of them as the next message's window),
//     unless it is text that is not valid UTF-8, which fails with 1007;
//   - compress/flate goes past limit: ours fails with 1009 (or with 1007
//     for text that is already invalid within the first limit bytes),
//     having allocated no more than the limit allows;
//   - compress/flate fails within the limit: ours fails with 1007.
//
// A failed message leaves the window as it was.
func FuzzInflate(f *testing.F) {
	f.Fuzz(func(t *testing.T, wire []byte, limit32 uint32, text bool, window []byte, bits uint8) {
		limit := 1 + int64(limit32%(2<<20))
		inBits := fuzzInBits(bits)
		var dict []byte
		if inBits != 0 {
			dict = lastBytes(window, 1<<inBits)
		}
		ref, refErr := refInflate(wire, dict, limit+1)

		d := &deflate{inBits: inBits, window: bytes.Clone(dict)}
		var u utf8State
		measure := int64(len(ref)) > limit || len(ref) > 256<<10
		var m0, m1 runtime.MemStats
		if measure {
			runtime.ReadMemStats(&m0)
		}
		buf, pooled, err := d.inflate(wire, limit, text, &u)
		if measure {
			runtime.ReadMemStats(&m1)
			if grew := m1.TotalAlloc - m0.TotalAlloc; grew > inflateAllocBound(limit) {
				t.Errorf("inflating (limit %d, reference %d bytes) allocated %d bytes, over %d", limit, len(ref), grew, inflateAllocBound(limit))
			}
		}
		if err == nil {
			if int64(len(buf)-ws.MaxHeaderSize) > limit {
				t.Fatalf("returned %d bytes, over the limit %d", len(buf)-ws.MaxHeaderSize, limit)
			}
			got := buf[ws.MaxHeaderSize:]
			if !bytes.Equal(got, ref) || refErr != nil || int64(len(ref)) > limit {
				t.Fatalf("inflated to %d bytes; compress/flate: %d bytes (limit %d), error %v", len(got), len(ref), limit, refErr)
			}
			if text && !utf8.Valid(got) {
				t.Fatal("invalid UTF-8 text inflated without an error")
			}
			if inBits != 0 {
				want := lastBytes(append(bytes.Clone(dict), ref...), 1<<inBits)
				if !bytes.Equal(d.window, want) {
					t.Fatalf("window of %d bytes after the message, want the last %d bytes of window and message", len(d.window), len(want))
				}
			} else if d.window != nil {
				t.Fatal("a window kept without context takeover")
			}
			if pooled {
				putMessage(buf)
			}
			return
		}
		if buf != nil {
			t.Fatal("a buffer returned with an error")
		}
		if inBits != 0 && !bytes.Equal(d.window, dict) {
			t.Fatal("a failed message changed the window")
		}
		code := closeCode(err)
		switch {
		case int64(len(ref)) > limit:
			if code != 1009 && (code != 1007 || !text || !invalidWithin(ref, limit)) {
				t.Fatalf("compress/flate inflated past the limit %d; ours: %v (code %d)", limit, err, code)
			}
		case refErr != nil:
			if code != 1007 {
				t.Fatalf("compress/flate failed (%v) after %d bytes (limit %d); ours: %v (code %d)", refErr, len(ref), limit, err, code)
			}
		default:
			if code != 1007 || !text || utf8.Valid(ref) {
				t.Fatalf("compress/flate inflated %d bytes (limit %d, text %v, valid UTF-8 %v); ours failed: %v (code %d)", len(ref), limit, text, utf8.Valid(ref), err, code)
			}
		}
	})
}

// fuzzLevels are the compress/flate levels the round trip picks from.
var fuzzLevels = []int{flate.HuffmanOnly, flate.NoCompression, 1, 2, 3, 4, 5, 6, 7, 8, 9}

// refDeflate compresses msgs as a peer would, one permessage-deflate
// message each (00 00 ff ff removed), with compress/flate at level: with
// inBits 0 each from a fresh compressor; with inBits 15 all from one
// compressor, flushed after each (context takeover with the full window);
// with a smaller window each from a compressor primed with the last
// 2^inBits bytes of the messages before it, so that no reference reaches
// further back than the window.
func refDeflate(t *testing.T, msgs [][]byte, level int, inBits uint8) [][]byte {
	var out [][]byte
	var b bytes.Buffer
	cut := func(z []byte) {
		if !bytes.HasSuffix(z, deflateTail) {
			t.Fatalf("compress/flate's flushed message ends with %x", z[max(0, len(z)-4):])
		}
		out = append(out, bytes.Clone(z[:len(z)-4]))
	}
	if inBits == 15 {
		fw, err := flate.NewWriter(&b, level)
		if err != nil {
			t.Fatal(err)
		}
		start := 0
		for _, m := range msgs {
			fw.Write(m)
			fw.Flush()
			cut(b.Bytes()[start:])
			start = b.Len()
		}
		return out
	}
	var sent []byte
	for _, m := range msgs {
		b.Reset()
		var dict []byte
		if inBits != 0 {
			dict = lastBytes(sent, 1<<inBits)
		}
		fw, err := flate.NewWriterDict(&b, level, dict)
		if err != nil {
			t.Fatal(err)
		}
		fw.Write(m)
		fw.Flush()
		cut(b.Bytes())
		sent = append(sent, m...)
	}
	return out
}

// FuzzInflateRoundTrip compresses fuzz messages with compress/flate (at
// any level, with and without context takeover; the last one repeated
// up to 256 times, so that small inputs reach messages larger than the
// 64 KiB pieces they are inflated into) and inflates them in turn
// with (*deflate).inflate, so that the fuzzer explores the success path:
// every message comes back as it was, with the limit at its exact size,
// and fails with 1009 one byte under it; the last one, as text, fails with
// 1007 exactly when it is not valid UTF-8. The gateway's own compress and
// compressedFrame are checked the other way: compress/flate inflates what
// they make back to the message.
func FuzzInflateRoundTrip(f *testing.F) {
	f.Fuzz(func(t *testing.T, prev, msg []byte, repeat uint8, level uint8, bits uint8, text, huffman bool) {
		if n := 1 + int(repeat); n > 1 && len(msg) > 0 {
			msg = bytes.Repeat(msg, min(n, max(1, (256<<10)/len(msg))))
		}
		lv := fuzzLevels[int(level)%len(fuzzLevels)]
		inBits := fuzzInBits(bits)
		msgs := [][]byte{prev, msg}
		wires := refDeflate(t, msgs, lv, inBits)
		d := &deflate{inBits: inBits}
		for i, m := range msgs {
			isText := text && i == len(msgs)-1
			if len(m) > 0 {
				// One byte under the limit: 1009, or 1007 for text
				// already invalid within it; the window stays.
				before := bytes.Clone(d.window)
				var u utf8State
				_, _, err := d.inflate(wires[i], int64(len(m)-1), isText, &u)
				if len(m) == 1 {
					// a limit of 0 is never asked for
				} else if code := closeCode(err); code != 1009 && (code != 1007 || !isText || !invalidWithin(m, int64(len(m)-1))) {
					t.Fatalf("message %d (%d bytes, level %d, window %d) with a limit of %d: %v", i, len(m), lv, inBits, len(m)-1, err)
				}
				if !bytes.Equal(d.window, before) {
					t.Fatalf("message %d: a failed message changed the window", i)
				}
			}
			var u utf8State
			buf, pooled, err := d.inflate(wires[i], max(1, int64(len(m))), isText, &u)
			if isText && !utf8.Valid(m) {
				if code := closeCode(err); code != 1007 {
					t.Fatalf("message %d: invalid UTF-8 text: %v", i, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("message %d (%d bytes, %d compressed, level %d, window %d): %v", i, len(m), len(wires[i]), lv, inBits, err)
			}
			if got := buf[ws.MaxHeaderSize:]; !bytes.Equal(got, m) {
				t.Fatalf("message %d (%d bytes, level %d, window %d) inflated to %d different bytes", i, len(m), lv, inBits, len(got))
			}
			if pooled {
				putMessage(buf)
			}
		}

		// The gateway's compressor, inflated by compress/flate.
		z := compress([]byte("head"), msg, huffman)
		if string(z[:4]) != "head" {
			t.Fatal("compress overwrote dst")
		}
		got, err := refInflate(z[4:], nil, int64(len(msg))+1)
		if err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("compress (huffman %v): compress/flate inflates %d bytes of %d to %d bytes (error %v)", huffman, len(z)-4, len(msg), len(got), err)
		}
		op := ws.OpBinary
		if text {
			op = ws.OpText
		}
		frame := compressedFrame(ws.Header{Fin: true, OpCode: op}, msg, huffman)
		if frame == nil {
			// it would not shrink: the message goes plain
			if len(z)-4 < len(msg) {
				t.Fatalf("no compressed frame for %d bytes that compress to %d", len(msg), len(z)-4)
			}
			return
		}
		fr, err := readRawFrame(bufio.NewReader(bytes.NewReader(frame)), 1<<30)
		if err != nil {
			t.Fatal(err)
		}
		if !fr.fin || fr.rsv != 4 || fr.op != byte(op) || fr.masked {
			t.Fatalf("compressed frame: fin %v rsv %d op %d masked %v", fr.fin, fr.rsv, fr.op, fr.masked)
		}
		if got, err := refInflate(fr.payload, nil, int64(len(msg))+1); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("compressed frame: inflated to %d bytes, error %v", len(got), err)
		}
	})
}
