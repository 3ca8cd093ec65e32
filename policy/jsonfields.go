package policy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// Errors of ExtractJSONFields.
var (
	ErrJSON          = errors.New("malformed JSON")
	ErrJSONDuplicate = errors.New("duplicate JSON key on a policy path")
	ErrJSONType      = errors.New("policy field is not a string")
	// ErrJSONCase is a key that differs from a policy field's name only in
	// letter case. Decoders disagree on it: Go's encoding/json (and so
	// gorilla's ReadJSON) takes it for the field, with Unicode case
	// folding, while JSON.parse and most others do not.
	ErrJSONCase = errors.New("JSON key differs from a policy field only in letter case")
)

// maxJSONDepth bounds nesting in inspected messages.
const maxJSONDepth = 64

// FieldPath is a dotted path into a JSON object ("payload.room"), split.
type FieldPath []string

// ParseFieldPath splits "a.b.c".
func ParseFieldPath(s string) (FieldPath, error) {
	if s == "" {
		return nil, errors.New("empty field path")
	}
	parts := strings.Split(s, ".")
	for _, p := range parts {
		if p == "" {
			return nil, errors.New("empty name in field path " + s)
		}
	}
	return parts, nil
}

// ExtractJSONFields validates doc as one JSON value and returns the string
// values at the paths (found[i] says whether path i was present). The
// whole document is checked, so what the gateway reads is what any strict
// parser reads; a key on a policy path that appears twice in one object is
// an error (parsers disagree on which one wins), and so is a non-string
// value at a path. Keys are compared after unescaping, and a key that
// matches a path's name only when letter case is ignored is an error too.
func ExtractJSONFields(doc []byte, paths []FieldPath, vals []string, found []bool) error {
	raw := make([][]byte, len(paths))
	err := ExtractJSONFieldBytes(doc, paths, raw, found)
	for i := range paths {
		if found[i] {
			vals[i] = string(raw[i])
		}
	}
	return err
}

// ExtractJSONFieldBytes is ExtractJSONFields with the values as bytes: a
// value without escapes is a slice of doc (valid as long as doc is), one
// with escapes is unescaped into new memory. It allocates nothing for
// documents without escapes.
func ExtractJSONFieldBytes(doc []byte, paths []FieldPath, vals [][]byte, found []bool) error {
	if err := checkPaths(paths); err != nil {
		return err
	}
	s := jscan{b: doc, paths: paths, vals: vals, found: found}
	clear(found)
	s.ws()
	if err := s.value(s.all(), 0, 0); err != nil {
		return err
	}
	return s.end()
}

// EachJSONObject reads doc as one JSON message that may be a batch: when
// doc is an object, fn is called once, after it, with vals and found as
// ExtractJSONFieldBytes sets them; when doc is an array, fn is called for
// each object in it, and in arrays nested in it, in order. fn is not
// called for other values. The whole document is validated as by
// ExtractJSONFieldBytes, and an error can come after some calls of fn:
// then the message as a whole is refused.
func EachJSONObject(doc []byte, paths []FieldPath, vals [][]byte, found []bool, fn func()) error {
	if err := checkPaths(paths); err != nil {
		return err
	}
	s := jscan{b: doc, paths: paths, vals: vals, found: found}
	clear(found)
	s.ws()
	if err := s.message(s.all(), fn); err != nil {
		return err
	}
	return s.end()
}

func checkPaths(paths []FieldPath) error {
	if len(paths) > 64 {
		return errors.New("at most 64 field paths")
	}
	for _, p := range paths {
		if len(p) == 0 {
			return errors.New("empty field path")
		}
	}
	return nil
}

// all is the set of every path.
func (s *jscan) all() uint64 {
	var a uint64
	for i := range s.paths {
		a |= 1 << uint(i)
	}
	return a
}

// end checks that only whitespace follows the value.
func (s *jscan) end() error {
	s.ws()
	if s.i != len(s.b) {
		return ErrJSON
	}
	return nil
}

// message reads a value at the top of a message: an object is reported
// to fn, an array's elements are messages themselves.
func (s *jscan) message(active uint64, fn func()) error {
	if s.i >= len(s.b) {
		return ErrJSON
	}
	switch s.b[s.i] {
	case '{':
		clear(s.found)
		if err := s.object(active, 0); err != nil {
			return err
		}
		fn()
		return nil
	case '[':
		return s.elements(func() error { return s.message(active, fn) })
	}
	return s.value(0, 0, 0)
}

type jscan struct {
	b     []byte
	i     int
	paths []FieldPath
	vals  [][]byte
	found []bool
	depth int
}

func (s *jscan) ws() {
	for s.i < len(s.b) {
		switch s.b[s.i] {
		case ' ', '\t', '\n', '\r':
			s.i++
		default:
			return
		}
	}
}

// value parses one value. active is the set of paths whose first level
// elements matched so far (level is how many); targets is the set of paths
// this value completes (it must then be a string).
func (s *jscan) value(active uint64, level int, targets uint64) error {
	if s.i >= len(s.b) {
		return ErrJSON
	}
	c := s.b[s.i]
	if targets != 0 && c != '"' {
		if err := s.value(0, 0, 0); err != nil {
			return err
		}
		return ErrJSONType
	}
	switch {
	case c == '{':
		return s.object(active, level)
	case c == '[':
		return s.array()
	case c == '"':
		start := s.i
		raw, escaped, err := s.strRaw()
		if err != nil || targets == 0 {
			return err
		}
		if escaped {
			u, err := jsonUnescape(s.b[start+1 : s.i-1])
			if err != nil {
				return err
			}
			raw = []byte(u)
		}
		for p := range s.paths {
			if targets&(1<<uint(p)) != 0 {
				s.vals[p] = raw
				s.found[p] = true
			}
		}
		return nil
	case c == 't':
		return s.lit("true")
	case c == 'f':
		return s.lit("false")
	case c == 'n':
		return s.lit("null")
	case c == '-' || (c >= '0' && c <= '9'):
		return s.number()
	}
	return ErrJSON
}

func (s *jscan) enter() error {
	s.depth++
	if s.depth > maxJSONDepth {
		return ErrJSON
	}
	return nil
}

func (s *jscan) object(active uint64, level int) error {
	if err := s.enter(); err != nil {
		return err
	}
	s.i++ // {
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == '}' {
		s.i++
		s.depth--
		return nil
	}
	var seen uint64
	for {
		s.ws()
		if s.i >= len(s.b) || s.b[s.i] != '"' {
			return ErrJSON
		}
		keyStart := s.i
		raw, escaped, err := s.strRaw()
		if err != nil {
			return err
		}
		var next, targets uint64
		if active != 0 {
			key := raw
			if escaped {
				u, err := jsonUnescape(s.b[keyStart+1 : s.i-1])
				if err != nil {
					return err
				}
				key = []byte(u)
			}
			for p := range s.paths {
				if active&(1<<uint(p)) == 0 {
					continue
				}
				name := s.paths[p][level]
				if string(key) != name {
					if foldEqual(key, name) {
						return ErrJSONCase
					}
					continue
				}
				if seen&(1<<uint(p)) != 0 {
					return ErrJSONDuplicate
				}
				seen |= 1 << uint(p)
				if level == len(s.paths[p])-1 {
					targets |= 1 << uint(p)
				} else {
					next |= 1 << uint(p)
				}
			}
		}
		s.ws()
		if s.i >= len(s.b) || s.b[s.i] != ':' {
			return ErrJSON
		}
		s.i++
		s.ws()
		if targets != 0 && next != 0 {
			// one path ends where another goes deeper: the value can't be both
			if err := s.value(0, 0, 0); err != nil {
				return err
			}
			return ErrJSONType
		}
		if next != 0 && (s.i >= len(s.b) || s.b[s.i] != '{') {
			next = 0 // not an object: the deeper paths are absent
		}
		if err := s.value(next, level+1, targets); err != nil {
			return err
		}
		if done, err := s.after('}'); done || err != nil {
			return err
		}
	}
}

// after reads what follows a member or element: ',' (another comes) or
// the closing byte (done).
func (s *jscan) after(closing byte) (done bool, err error) {
	s.ws()
	switch {
	case s.i >= len(s.b):
		return false, ErrJSON
	case s.b[s.i] == ',':
		s.i++
		return false, nil
	case s.b[s.i] == closing:
		s.i++
		s.depth--
		return true, nil
	}
	return false, ErrJSON
}

func (s *jscan) array() error {
	return s.elements(func() error { return s.value(0, 0, 0) })
}

// elements reads an array, each element with elem.
func (s *jscan) elements(elem func() error) error {
	if err := s.enter(); err != nil {
		return err
	}
	s.i++ // [
	s.ws()
	if s.i < len(s.b) && s.b[s.i] == ']' {
		s.i++
		s.depth--
		return nil
	}
	for {
		s.ws()
		if err := elem(); err != nil {
			return err
		}
		if done, err := s.after(']'); done || err != nil {
			return err
		}
	}
}

func (s *jscan) lit(w string) error {
	if !strings.HasPrefix(string(s.b[s.i:min(len(s.b), s.i+len(w))]), w) {
		return ErrJSON
	}
	s.i += len(w)
	return nil
}

func (s *jscan) number() error {
	b, i := s.b, s.i
	if i < len(b) && b[i] == '-' {
		i++
	}
	switch {
	case i < len(b) && b[i] == '0':
		i++
	case i < len(b) && b[i] >= '1' && b[i] <= '9':
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	default:
		return ErrJSON
	}
	if i < len(b) && b[i] == '.' {
		i++
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return ErrJSON
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if i >= len(b) || b[i] < '0' || b[i] > '9' {
			return ErrJSON
		}
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
	}
	s.i = i
	return nil
}

// strRaw scans a string at s.i and returns its raw contents (between the
// quotes) and whether it has escapes; it validates escapes, control
// characters and UTF-8.
func (s *jscan) strRaw() ([]byte, bool, error) {
	s.i++ // opening quote
	start := s.i
	escaped := false
	var high byte // OR of all bytes: ASCII-only strings skip the UTF-8 pass
	for s.i < len(s.b) {
		c := s.b[s.i]
		high |= c
		switch {
		case c == '"':
			raw := s.b[start:s.i]
			s.i++
			if high >= utf8.RuneSelf && !utf8.Valid(raw) {
				return nil, false, ErrJSON
			}
			return raw, escaped, nil
		case c == '\\':
			escaped = true
			if s.i+1 >= len(s.b) {
				return nil, false, ErrJSON
			}
			switch s.b[s.i+1] {
			case '"', '\\', '/', 'b', 'f', 'n', 'r', 't':
				s.i += 2
			case 'u':
				if s.i+6 > len(s.b) {
					return nil, false, ErrJSON
				}
				for _, h := range s.b[s.i+2 : s.i+6] {
					if hexVal(h) < 0 {
						return nil, false, ErrJSON
					}
				}
				s.i += 6
			default:
				return nil, false, ErrJSON
			}
		case c < 0x20:
			return nil, false, ErrJSON
		default:
			// Skip the plain run up to the next byte that needs a look,
			// eight bytes at a time while none of them might.
			j := s.i + 1
			var acc uint64
			for j+8 <= len(s.b) {
				x := binary.LittleEndian.Uint64(s.b[j:])
				if (x-lsb*0x20)&^x&msb|hasZero(x^(lsb*'"'))|hasZero(x^(lsb*'\\')) != 0 {
					break
				}
				acc |= x
				j += 8
				if j-s.i > 16 {
					// A long run: find its end with bytes.IndexByte, which
					// is much faster, and check the bytes before it.
					q := bytes.IndexByte(s.b[j:], '"')
					if q < 0 {
						break
					}
					run := s.b[j : j+q]
					if bytes.IndexByte(run, '\\') >= 0 {
						break
					}
					ctl, high := ctlHigh(run)
					if ctl {
						return nil, false, ErrJSON
					}
					if high {
						acc |= msb
					}
					j += q
					break
				}
			}
			if acc&msb != 0 {
				high |= 0x80
			}
			for j < len(s.b) {
				d := s.b[j]
				if d == '"' || d == '\\' || d < 0x20 {
					break
				}
				high |= d
				j++
			}
			s.i = j
		}
	}
	return nil, false, ErrJSON
}

// Bytes in a word: lsb has 0x01 in each, msb 0x80.
const (
	lsb = 0x0101010101010101
	msb = 0x8080808080808080
)

// ctlHigh reports whether b has a control character (below 0x20) and
// whether it has a byte above 0x7F, eight bytes at a time.
func ctlHigh(b []byte) (ctl, high bool) {
	var low, acc uint64
	for len(b) >= 32 {
		x0 := binary.LittleEndian.Uint64(b)
		x1 := binary.LittleEndian.Uint64(b[8:])
		x2 := binary.LittleEndian.Uint64(b[16:])
		x3 := binary.LittleEndian.Uint64(b[24:])
		// a byte below 0x20 sets its top bit in (x - 0x20…) &^ x
		low |= (x0-lsb*0x20)&^x0 | (x1-lsb*0x20)&^x1 | (x2-lsb*0x20)&^x2 | (x3-lsb*0x20)&^x3
		acc |= x0 | x1 | x2 | x3
		b = b[32:]
	}
	for len(b) >= 8 {
		x := binary.LittleEndian.Uint64(b)
		low |= (x - lsb*0x20) &^ x
		acc |= x
		b = b[8:]
	}
	for _, c := range b {
		if c < 0x20 {
			ctl = true
		}
		acc |= uint64(c)
	}
	return ctl || low&msb != 0, acc&msb != 0
}

// hasZero is non-zero when some byte of x is zero.
func hasZero(x uint64) uint64 { return (x - lsb) &^ x & msb }

func hexVal(c byte) int {
	switch {
	case c >= '0' && c <= '9':
		return int(c - '0')
	case c >= 'a' && c <= 'f':
		return int(c-'a') + 10
	case c >= 'A' && c <= 'F':
		return int(c-'A') + 10
	}
	return -1
}

// jsonUnescape decodes the inside of a validated JSON string the way
// encoding/json does (lone surrogates become U+FFFD).
func jsonUnescape(b []byte) (string, error) {
	var out strings.Builder
	out.Grow(len(b))
	for i := 0; i < len(b); {
		c := b[i]
		if c != '\\' {
			out.WriteByte(c)
			i++
			continue
		}
		switch b[i+1] {
		case '"', '\\', '/':
			out.WriteByte(b[i+1])
		case 'b':
			out.WriteByte('\b')
		case 'f':
			out.WriteByte('\f')
		case 'n':
			out.WriteByte('\n')
		case 'r':
			out.WriteByte('\r')
		case 't':
			out.WriteByte('\t')
		case 'u':
			r := rune(hex4(b[i+2 : i+6]))
			i += 6
			if utf16.IsSurrogate(r) {
				if i+6 <= len(b) && b[i] == '\\' && b[i+1] == 'u' {
					r2 := rune(hex4(b[i+2 : i+6]))
					if dec := utf16.DecodeRune(r, r2); dec != utf8.RuneError {
						out.WriteRune(dec)
						i += 6
						continue
					}
				}
				r = utf8.RuneError
			}
			out.WriteRune(r)
			continue
		}
		i += 2
	}
	return out.String(), nil
}

func hex4(b []byte) int {
	return hexVal(b[0])<<12 | hexVal(b[1])<<8 | hexVal(b[2])<<4 | hexVal(b[3])
}

// foldEqual reports whether a JSON key some mainstream decoder may take
// for the field name: equal when letter case is ignored, as Go's
// encoding/json compares (each rune through unicode.ToLower, then
// unicode.ToUpper), as strings.EqualFold does (simple Unicode folding),
// and as lower- or upper-casing both does (Jackson, System.Text.Json).
func foldEqual(key []byte, name string) bool {
	if len(key) == len(name) && asciiEqualFold(key, name) {
		return true
	}
	if isASCII(key) && isASCII(name) {
		return false
	}
	k := string(key)
	return goFold(k) == goFold(name) || strings.EqualFold(k, name) ||
		strings.ToLower(k) == strings.ToLower(name) || strings.ToUpper(k) == strings.ToUpper(name)
}

// asciiEqualFold compares a and b folding ASCII letters only.
func asciiEqualFold[T string | []byte](a T, b string) bool {
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == y {
			continue
		}
		if x|0x20 != y|0x20 || x|0x20 < 'a' || x|0x20 > 'z' {
			return false
		}
	}
	return true
}

func isASCII[T string | []byte](b T) bool {
	for i := 0; i < len(b); i++ {
		if b[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// goFold folds s the way encoding/json matches object keys to struct
// fields.
func goFold(s string) string {
	return strings.Map(func(r rune) rune { return unicode.ToUpper(unicode.ToLower(r)) }, s)
}
