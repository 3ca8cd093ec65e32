package proxy

import (
	"bytes"
	"testing"
	"unicode/utf8"
)

// canContinue reports whether b is a prefix of some valid UTF-8 text, by
// brute force on its last few bytes: the missing tail of at most 3 bytes is
// tried with every possible first byte (only the second byte of a sequence
// is restricted; the 3rd and 4th accept any continuation byte).
func canContinue(b []byte) bool {
	// Split at a rune start that leaves any incomplete sequence (at most 3
	// bytes) in the tail. In valid text every byte that is not a
	// continuation byte starts a rune, so b is a valid prefix iff the head
	// is valid and the tail is a valid prefix.
	k := 0
	if len(b) > 3 {
		k = -1
		for i := len(b) - 3; i >= 0 && i >= len(b)-7; i-- {
			if utf8.RuneStart(b[i]) {
				k = i
				break
			}
		}
		if k < 0 {
			return false // 5 continuation bytes in a row
		}
	}
	if !utf8.Valid(b[:k]) {
		return false
	}
	tail := b[k:]
	if utf8.Valid(tail) {
		return true
	}
	c := make([]byte, len(tail), len(tail)+3)
	copy(c, tail)
	for x := 0x80; x <= 0xBF; x++ {
		c = append(c[:len(tail)], byte(x))
		for k := 0; k < 3; k++ {
			if utf8.Valid(c) {
				return true
			}
			c = append(c, 0x80)
		}
	}
	return false
}

var utf8Cases = []struct {
	name string
	b    []byte
}{
	{"empty", nil},
	{"ascii", []byte("hello")},
	{"2-byte", []byte("h\u00e9llo")},
	{"3-byte", []byte("\u20ac")},
	{"4-byte", []byte("\U0001F600")},
	{"mixed", []byte("a\u20ac\U0001F600b\u00e9")},
	{"U+0080", []byte{0xC2, 0x80}},
	{"U+07FF", []byte{0xDF, 0xBF}},
	{"U+0800", []byte{0xE0, 0xA0, 0x80}},
	{"U+D7FF", []byte{0xED, 0x9F, 0xBF}},
	{"U+E000", []byte{0xEE, 0x80, 0x80}},
	{"U+FFFF", []byte{0xEF, 0xBF, 0xBF}},
	{"U+10000", []byte{0xF0, 0x90, 0x80, 0x80}},
	{"U+10FFFF", []byte{0xF4, 0x8F, 0xBF, 0xBF}},
	{"two 4-byte", []byte("\U0001F600\U0010FFFF")},

	{"overlong C0 80", []byte{0xC0, 0x80}},
	{"overlong C1 BF", []byte{0xC1, 0xBF}},
	{"overlong E0 80 80", []byte{0xE0, 0x80, 0x80}},
	{"overlong E0 9F BF", []byte{0xE0, 0x9F, 0xBF}},
	{"overlong F0 80 80 80", []byte{0xF0, 0x80, 0x80, 0x80}},
	{"overlong F0 8F BF BF", []byte{0xF0, 0x8F, 0xBF, 0xBF}},
	{"surrogate D800", []byte{0xED, 0xA0, 0x80}},
	{"surrogate DFFF", []byte{0xED, 0xBF, 0xBF}},
	{"surrogate pair", []byte{0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80}},
	{"U+110000", []byte{0xF4, 0x90, 0x80, 0x80}},
	{"F5 lead", []byte{0xF5, 0x80, 0x80, 0x80}},
	{"F7 lead", []byte{0xF7, 0xBF, 0xBF, 0xBF}},
	{"F8 5-byte", []byte{0xF8, 0x88, 0x80, 0x80, 0x80}},
	{"FE", []byte{0xFE}},
	{"FF", []byte{'a', 0xFF, 'b'}},
	{"lone continuation", []byte{'a', 0x80, 'b'}},
	{"continuation run", []byte{0x80, 0xBF, 0x80, 0xBF}},
	{"bad 2nd byte", []byte{0xC2, 0x41}},
	{"bad 3rd byte", []byte{0xE2, 0x82, 0x28}},
	{"bad 4th byte", []byte{0xF0, 0x9F, 0x98, 0x28}},
	{"lead then lead", []byte{0xE2, 0xE2, 0x82, 0xAC}},
	{"truncated 2-byte at end", []byte{'a', 0xC3}},
	{"truncated 3-byte at end", []byte{'a', 0xE2, 0x82}},
	{"truncated 4-byte at end", []byte{'a', 0xF0, 0x9F, 0x98}},
	{"truncated then ascii", []byte{0xF0, 0x9F, 'a'}},
	{"valid then overlong", []byte("\u20ac\xC0\xAF")},
	{"valid then surrogate", []byte("\U0001F600\xED\xB2\x80")},
	{"valid then too big", []byte("ab\xF4\x90\x80\x80")},
}

// TestUTF8StateAllSplits feeds every case in every possible split into
// chunks (including empty chunks at both ends) and checks each feed
// against canContinue and the final answer against utf8.Valid.
func TestUTF8StateAllSplits(t *testing.T) {
	for _, tc := range utf8Cases {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.b
			prefixOK := make([]bool, len(b)+1)
			for i := range prefixOK {
				prefixOK[i] = canContinue(b[:i])
			}
			want := utf8.Valid(b)
			n := max(len(b)-1, 0)
			for mask := 0; mask < 1<<n; mask++ {
				cuts := []int{0}
				for i := 0; i < n; i++ {
					if mask&(1<<i) != 0 {
						cuts = append(cuts, i+1)
					}
				}
				cuts = append(cuts, len(b))
				var s utf8State
				ok := s.feed(nil) // an empty chunk first
				if !ok {
					t.Fatalf("empty first chunk rejected")
				}
				for i := 1; i < len(cuts) && ok; i++ {
					ok = s.feed(b[cuts[i-1]:cuts[i]])
					if ok != prefixOK[cuts[i]] {
						t.Fatalf("split %v: feed up to %d = %v, want %v", cuts, cuts[i], ok, prefixOK[cuts[i]])
					}
				}
				if ok {
					ok = s.feed([]byte{}) && s.done()
				}
				if ok != want {
					t.Fatalf("split %v: valid = %v, want %v", cuts, ok, want)
				}
			}
		})
	}
}

// TestUTF8StateWithContext puts each case after and before other text,
// so sequences start at every alignment of the carried bytes.
func TestUTF8StateWithContext(t *testing.T) {
	for _, tc := range utf8Cases {
		for _, pre := range []string{"", "x", "\u00e9", "\u20ac", "\U0001F600"} {
			for _, post := range []string{"", "y", "\u20ac"} {
				b := append(append([]byte(pre), tc.b...), post...)
				want := utf8.Valid(b)
				for chunk := 1; chunk <= 5; chunk++ {
					var s utf8State
					ok := true
					for i := 0; i < len(b) && ok; i += chunk {
						ok = s.feed(b[i:min(i+chunk, len(b))])
					}
					ok = ok && s.done()
					if ok != want {
						t.Errorf("%s with %q before and %q after, chunks of %d: valid = %v, want %v",
							tc.name, pre, post, chunk, ok, want)
					}
				}
			}
		}
	}
}

func TestUTF8StateReset(t *testing.T) {
	var s utf8State
	if !s.feed([]byte{0xF0, 0x9F}) {
		t.Fatal("incomplete sequence rejected")
	}
	if s.done() {
		t.Fatal("done() with a pending sequence")
	}
	s.reset()
	if !s.done() {
		t.Fatal("done() false after reset")
	}
	if !s.feed([]byte("abc")) || !s.done() {
		t.Fatal("text after reset rejected: the carried bytes were kept")
	}
}

// FuzzUTF8Chunks splits data into chunks whose sizes come from cuts and
// checks that feeding them all, then done(), agrees with utf8.Valid on the
// whole, and that an early rejection is never wrong.
func FuzzUTF8Chunks(f *testing.F) {
	for _, tc := range utf8Cases {
		f.Add(tc.b, []byte{1})
		f.Add(tc.b, []byte{0, 3, 1, 2})
	}
	f.Add(bytes.Repeat([]byte("\u20ac\U0001F600a"), 50), []byte{7, 2, 5})
	f.Fuzz(func(t *testing.T, data, cuts []byte) {
		if len(data) > 1<<10 || len(cuts) > 64 {
			// Longer inputs find nothing more, and the fuzzer would spend
			// minutes minimizing them.
			t.Skip()
		}
		var s utf8State
		ok := true
		pos := 0
		for i := 0; ok && pos < len(data); i++ {
			n := len(data)
			if len(cuts) > 0 {
				n = int(cuts[i%len(cuts)])
				if i >= 64*len(cuts) {
					n = max(n, 1) // make progress on long inputs with zero cuts
				}
			}
			end := min(pos+n, len(data))
			ok = s.feed(data[pos:end])
			pos = end
			if !ok && canContinue(data[:pos]) {
				t.Fatalf("feed rejected %x, a valid prefix", data[:pos])
			}
		}
		got := ok && s.done()
		if want := utf8.Valid(data); got != want {
			t.Fatalf("chunks %v of %x: valid = %v, utf8.Valid = %v", cuts, data, got, want)
		}
	})
}
