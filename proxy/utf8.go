package proxy

import "unicode/utf8"

// utf8State validates UTF-8 text that arrives in chunks (a fragmented
// message, or a frame streamed through a small buffer). A code point split
// across chunks is carried over in at most 3 bytes.
type utf8State struct {
	carry [utf8.UTFMax]byte
	n     uint8
}

func (s *utf8State) reset() { s.n = 0 }

// feed reports whether p, following what was fed before, can still be the
// prefix of valid UTF-8.
func (s *utf8State) feed(p []byte) bool {
	if s.n > 0 {
		need := seqLen(s.carry[0])
		for int(s.n) < need && len(p) > 0 {
			s.carry[s.n] = p[0]
			s.n++
			p = p[1:]
		}
		if int(s.n) < need {
			return validPrefix(s.carry[:s.n])
		}
		if !utf8.Valid(s.carry[:need]) {
			return false
		}
		s.n = 0
	}
	// Find where a trailing, incomplete sequence starts (at most 3 bytes back).
	cut := len(p)
	for i := len(p) - 1; i >= 0 && i >= len(p)-utf8.UTFMax; i-- {
		if utf8.RuneStart(p[i]) {
			if !utf8.FullRune(p[i:]) {
				cut = i
			}
			break
		}
	}
	if !utf8.Valid(p[:cut]) {
		return false
	}
	tail := p[cut:]
	if len(tail) == 0 {
		return true
	}
	s.n = uint8(copy(s.carry[:], tail))
	return validPrefix(tail)
}

// done reports whether the text fed so far ended on a code point boundary.
func (s *utf8State) done() bool { return s.n == 0 }

// seqLen is the length of the sequence a lead byte starts; 1 for bytes that
// cannot start one (they fail utf8.Valid).
func seqLen(b byte) int {
	switch {
	case b < 0xC2:
		return 1
	case b < 0xE0:
		return 2
	case b < 0xF0:
		return 3
	case b < 0xF5:
		return 4
	}
	return 1
}

// validPrefix reports whether an incomplete sequence can still become valid,
// so an impossible sequence fails as soon as it is seen.
func validPrefix(p []byte) bool {
	if len(p) == 0 {
		return true
	}
	if seqLen(p[0]) <= len(p) {
		return utf8.Valid(p)
	}
	if len(p) >= 2 {
		lo, hi := byte(0x80), byte(0xBF)
		switch p[0] {
		case 0xE0:
			lo = 0xA0
		case 0xED:
			hi = 0x9F
		case 0xF0:
			lo = 0x90
		case 0xF4:
			hi = 0x8F
		}
		if p[1] < lo || p[1] > hi {
			return false
		}
	}
	for _, b := range p[1:] {
		if b&0xC0 != 0x80 {
			return false
		}
	}
	return true
}
