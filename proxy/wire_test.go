package proxy

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"testing"

	"github.com/gobwas/ws"
)

func TestEncodeHeaderKnownBytes(t *testing.T) {
	mask := [4]byte{0x37, 0xfa, 0x21, 0x3d}
	cases := []struct {
		name string
		h    ws.Header
		want []byte
	}{
		// RFC 6455 §5.7 examples.
		{"unmasked Hello", ws.Header{Fin: true, OpCode: ws.OpText, Length: 5}, []byte{0x81, 0x05}},
		{"masked Hello", ws.Header{Fin: true, OpCode: ws.OpText, Length: 5, Masked: true, Mask: mask},
			[]byte{0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d}},
		{"fragment", ws.Header{OpCode: ws.OpText, Length: 3}, []byte{0x01, 0x03}},
		{"continuation", ws.Header{Fin: true, OpCode: ws.OpContinuation, Length: 2}, []byte{0x80, 0x02}},
		{"256 bytes", ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 256}, []byte{0x82, 0x7E, 0x01, 0x00}},
		{"64 KiB", ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 65536},
			[]byte{0x82, 0x7F, 0, 0, 0, 0, 0, 1, 0, 0}},
		{"125", ws.Header{Fin: true, OpCode: ws.OpPing, Length: 125}, []byte{0x89, 125}},
		{"126", ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 126}, []byte{0x82, 0x7E, 0, 126}},
		{"65535", ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 65535}, []byte{0x82, 0x7E, 0xFF, 0xFF}},
		{"rsv", ws.Header{Fin: true, Rsv: 5, OpCode: ws.OpText}, []byte{0xD1, 0x00}},
		{"largest", ws.Header{Fin: true, OpCode: ws.OpBinary, Length: 1<<63 - 1, Masked: true, Mask: mask},
			[]byte{0x82, 0xFF, 0x7F, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x37, 0xfa, 0x21, 0x3d}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if n := headerSize(tc.h); n != len(tc.want) {
				t.Fatalf("headerSize = %d, want %d", n, len(tc.want))
			}
			b := make([]byte, len(tc.want))
			encodeHeader(b, tc.h)
			if !bytes.Equal(b, tc.want) {
				t.Fatalf("encodeHeader = % x, want % x", b, tc.want)
			}
			h, err := decodeHeader(tc.want)
			if err != nil {
				t.Fatal(err)
			}
			if h != tc.h {
				t.Fatalf("decodeHeader = %+v, want %+v", h, tc.h)
			}
		})
	}
}

func TestDecodeHeaderLengthMSB(t *testing.T) {
	b := []byte{0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 0}
	if _, err := decodeHeader(b); err != errLengthMSB {
		t.Fatalf("err = %v, want errLengthMSB", err)
	}
	// 2^62 is legal on the wire (it is refused later, by MaxMessage).
	b[2] = 0x40
	h, err := decodeHeader(b)
	if err != nil || h.Length != 1<<62 {
		t.Fatalf("decodeHeader(2^62) = %d, %v", h.Length, err)
	}
}

// wireHeaderSize is the size of the header starting with b0, b1, worked
// out the way readHeader does before calling decodeHeader.
func wireHeaderSize(b1 byte) int {
	n := 2
	if b1&0x80 != 0 {
		n += 4
	}
	switch b1 & 0x7f {
	case 126:
		n += 2
	case 127:
		n += 8
	}
	return n
}

// FuzzHeaderRoundTrip checks that encodeHeader, decodeHeader and
// headerSize agree for any header, that the encoding matches an independent
// encoder, and that decodeHeader on any header bytes neither panics nor
// accepts a length with the top bit set.
func FuzzHeaderRoundTrip(f *testing.F) {
	f.Add(true, byte(0), byte(1), false, uint64(5), uint32(0), []byte{0x81, 0x05})
	f.Add(false, byte(7), byte(15), true, uint64(126), uint32(0xdeadbeef), []byte{0x82, 0xFE, 0, 126, 1, 2, 3, 4})
	f.Add(true, byte(0), byte(2), true, uint64(65536), uint32(1), []byte{0x82, 0x7F, 0x80, 0, 0, 0, 0, 0, 0, 1})
	f.Add(true, byte(0), byte(2), false, uint64(1<<62), uint32(0), []byte{0x82, 0xFF, 0x40, 0, 0, 0, 0, 0, 0, 0, 9, 9, 9, 9})
	f.Add(true, byte(0), byte(9), false, uint64(0), uint32(0), []byte{0x89, 0x7E, 0, 5})
	f.Fuzz(func(t *testing.T, fin bool, rsv, op byte, masked bool, length uint64, mask uint32, raw []byte) {
		// Round trip of a header built from the fuzz values.
		h := ws.Header{Fin: fin, Rsv: rsv & 7, OpCode: ws.OpCode(op & 15), Masked: masked, Length: int64(length &^ (1 << 63))}
		var mk *[4]byte
		if masked {
			binary.BigEndian.PutUint32(h.Mask[:], mask)
			mk = &h.Mask
		}
		b0 := byte(h.OpCode) | h.Rsv<<4
		if fin {
			b0 |= 0x80
		}
		ref := appendFrame(nil, b0, mk, uint64(h.Length), nil)
		n := headerSize(h)
		if n != len(ref) {
			t.Fatalf("headerSize(%+v) = %d, want %d", h, n, len(ref))
		}
		b := make([]byte, n)
		encodeHeader(b, h)
		if !bytes.Equal(b, ref) {
			t.Fatalf("encodeHeader(%+v) = % x, want % x", h, b, ref)
		}
		if wireHeaderSize(b[1]) != n {
			t.Fatalf("a reader would take %d header bytes, encoded %d", wireHeaderSize(b[1]), n)
		}
		got, err := decodeHeader(b)
		if err != nil || got != h {
			t.Fatalf("decodeHeader(encodeHeader(%+v)) = %+v, %v", h, got, err)
		}

		// Arbitrary header bytes: exactly as many as the first two bytes
		// announce (what readHeader passes).
		var buf [ws.MaxHeaderSize]byte
		copy(buf[:], raw)
		size := wireHeaderSize(buf[1])
		d, err := decodeHeader(buf[:size])
		ext := buf[1] & 0x7f
		if ext == 127 && buf[2]&0x80 != 0 {
			if err != errLengthMSB {
				t.Fatalf("decodeHeader(% x) accepted a length with the top bit set: %+v, %v", buf[:size], d, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("decodeHeader(% x): %v", buf[:size], err)
		}
		if d.Length < 0 {
			t.Fatalf("decodeHeader(% x): negative length %d", buf[:size], d.Length)
		}
		if d.Fin != (buf[0]&0x80 != 0) || d.Rsv != buf[0]>>4&7 || byte(d.OpCode) != buf[0]&15 || d.Masked != (buf[1]&0x80 != 0) {
			t.Fatalf("decodeHeader(% x) = %+v: flags differ", buf[:size], d)
		}
		// The relay rewrites headers in place: the re-encoded header must
		// never be longer than the one read.
		if hs := headerSize(d); hs > size {
			t.Fatalf("headerSize(%+v) = %d > %d bytes read", d, hs, size)
		}
		re := make([]byte, headerSize(d))
		encodeHeader(re, d)
		if d2, err := decodeHeader(re); err != nil || d2 != d {
			t.Fatalf("re-encoding %+v gave %+v, %v", d, d2, err)
		}
	})
}

// feedConn writes b to the write end of a connection one byte at a time.
func feedConn(t *testing.T, w net.Conn, b []byte) {
	go func() {
		for i := range b {
			if _, err := w.Write(b[i : i+1]); err != nil {
				return
			}
		}
	}()
}

func tcpPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	if server == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// nextHeader reads one header with the reader's primitives (need, then
// decodeHeader), leaving the payload unread.
func nextHeader(rd *wireReader) (ws.Header, error) {
	rd.release()
	if err := rd.need(2); err != nil {
		return ws.Header{}, err
	}
	size := wireHeaderSize((*rd.buf)[rd.r+1])
	if err := rd.need(size); err != nil {
		return ws.Header{}, err
	}
	h, err := decodeHeader((*rd.buf)[rd.r : rd.r+size])
	rd.r += size
	return h, err
}

// TestWireReaderSplitInput reads frames that arrive one byte at a time,
// over TCP (the syscall.RawConn path, its reads plain or driven) and
// net.Pipe (the plain Read path), and checks that an idle reader holds no
// buffer.
func TestWireReaderSplitInput(t *testing.T) {
	var stream []byte
	mask := [4]byte{1, 2, 3, 4}
	stream = appendFrame(stream, 0x81, &mask, 5, []byte("hello"))
	stream = appendFrame(stream, 0x82, nil, 300, bytes.Repeat([]byte{7}, 300))
	stream = appendFrame(stream, 0x89, &mask, 0, nil)
	want := []ws.Header{
		{Fin: true, OpCode: ws.OpText, Length: 5, Masked: true, Mask: mask},
		{Fin: true, OpCode: ws.OpBinary, Length: 300},
		{Fin: true, OpCode: ws.OpPing, Masked: true, Mask: mask},
	}
	for _, kind := range []string{"tcp", "tcp-driven", "pipe"} {
		t.Run(kind, func(t *testing.T) {
			var w, r net.Conn
			if kind != "pipe" {
				w, r = tcpPair(t)
			} else {
				w, r = net.Pipe()
				t.Cleanup(func() { w.Close(); r.Close() })
			}
			feedConn(t, w, stream)
			var rd wireReader
			rd.init(r)
			if rd.direct != (kind != "pipe") {
				t.Fatalf("raw conn path = %v", rd.direct)
			}
			read := func() error {
				for i, wh := range want {
					h, err := nextHeader(&rd)
					if err != nil {
						return fmt.Errorf("frame %d: %w", i, err)
					}
					if h != wh {
						return fmt.Errorf("frame %d: %+v, want %+v", i, h, wh)
					}
					if err := rd.skip(h.Length); err != nil {
						return fmt.Errorf("frame %d: skip: %w", i, err)
					}
				}
				return nil
			}
			var err error
			if kind == "tcp-driven" {
				err = rd.drive(read)
			} else {
				err = read()
			}
			if err != nil {
				t.Fatal(err)
			}
			if rd.drv != nil {
				t.Fatal("the reader is still driven")
			}
			rd.release()
			if rd.buf != nil {
				t.Fatal("idle reader still holds a buffer")
			}
		})
	}
}

// TestWireReaderPrime checks that bytes read ahead by a handshake are
// read first.
func TestWireReaderPrime(t *testing.T) {
	w, r := tcpPair(t)
	frame := appendFrame(nil, 0x82, nil, 3, []byte{1, 2, 3})
	var rd wireReader
	rd.init(r)
	rd.prime(frame[:3])
	feedConn(t, w, frame[3:])
	h, err := nextHeader(&rd)
	if err != nil || h.Length != 3 || h.OpCode != ws.OpBinary {
		t.Fatalf("header = %+v, %v", h, err)
	}
	if err := rd.need(3); err != nil {
		t.Fatal(err)
	}
	if got := (*rd.buf)[rd.r : rd.r+3]; !bytes.Equal(got, []byte{1, 2, 3}) {
		t.Fatalf("payload = %v", got)
	}
}
