package policy

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"unicode"
	"unicode/utf16"
	"unicode/utf8"
)

// ErrNotJSON is a message that no JSON decoder reads as an object or an
// array: the app's other frames, which the policy does not name a channel
// in.
var ErrNotJSON = errors.New("not a JSON message")

// MessageFields reads the channel, and the action word, that a client
// message of an app's own JSON protocol names, the way the app's upstream
// will read them:
//
//   - text and binary messages alike (a binary frame is as easy to
//     JSON.parse as a text one);
//   - after one leading byte order mark (browsers' TextDecoder drops it),
//     and in a binary message in UTF-16 or UTF-32, told apart the way
//     Python's json.loads tells a bytes document's encoding;
//   - a top-level array is a batch: each object in it (and in arrays
//     nested in it) is a message of its own;
//   - strictly (see ExtractJSONFieldBytes): keys that repeat, or differ
//     from a field's name only in letter case, refuse the message.
//
// A message that starts like JSON (after whitespace, byte order marks
// and NULs) but is not strictly valid is refused too: lenient decoders
// may still read a channel in it.
type MessageFields struct {
	paths []FieldPath // the channel, then the action if there is one
}

// NewMessageFields reads the channel at the dotted path channel, and the
// action word at action ("" for none).
func NewMessageFields(channel, action string) (*MessageFields, error) {
	c, err := ParseFieldPath(channel)
	if err != nil {
		return nil, fmt.Errorf("channel field: %w", err)
	}
	m := &MessageFields{paths: []FieldPath{c}}
	if action == "" {
		return m, nil
	}
	a, err := ParseFieldPath(action)
	if err != nil {
		return nil, fmt.Errorf("action field: %w", err)
	}
	for i := 0; i < len(a) && i < len(c); i++ {
		if a[i] == c[i] {
			if i == len(a)-1 || i == len(c)-1 {
				return nil, fmt.Errorf("action field %q and channel field %q must name different, unnested fields", action, channel)
			}
			continue
		}
		if foldEqual([]byte(a[i]), c[i]) {
			return nil, fmt.Errorf("action field %q and channel field %q differ only in letter case, which some decoders ignore", action, channel)
		}
		break
	}
	m.paths = append(m.paths, a)
	return m, nil
}

// FieldScratch is what MessageFields.Read needs for one call; a
// connection keeps one, so that reading allocates nothing.
type FieldScratch struct {
	vals  [2][]byte
	found [2]bool
}

// Read calls fn for each object in msg (binary says the frame was
// binary), with the channel and action it names; a value is nil when the
// object lacks the field, and valid only during the call. It returns
// ErrNotJSON for a message that holds no JSON, ErrJSON, ErrJSONDuplicate,
// ErrJSONType or ErrJSONCase for one that must be refused, whatever fn was
// called with before.
func (m *MessageFields) Read(msg []byte, binary bool, sc *FieldScratch, fn func(channel, action []byte)) error {
	doc := msg
	if binary {
		doc = utf8View(msg)
	}
	doc = bytes.TrimPrefix(doc, []byte("\uFEFF")) // one byte order mark, as TextDecoder drops
	vals, found := sc.vals[:len(m.paths)], sc.found[:len(m.paths)]
	defer clear(vals)
	err := EachJSONObject(doc, m.paths, vals, found, func() {
		var ch, action []byte
		if found[0] {
			ch = vals[0]
		}
		if len(found) > 1 && found[1] {
			action = vals[1]
		}
		fn(ch, action)
	})
	if errors.Is(err, ErrJSON) && !looksLikeJSON(doc) {
		return ErrNotJSON
	}
	return err
}

// looksLikeJSON says whether b, after whitespace of any kind, byte order
// marks and NULs, starts an object or an array.
func looksLikeJSON(b []byte) bool {
	for len(b) > 0 {
		if b[0] == '{' || b[0] == '[' {
			return true
		}
		if b[0] == 0 {
			b = b[1:]
			continue
		}
		r, n := utf8.DecodeRune(b)
		if r != '\uFEFF' && !unicode.IsSpace(r) {
			return false
		}
		b = b[n:]
	}
	return false
}

// utf8View is a binary message as UTF-8 text. A message that Python's
// json.loads would decode as UTF-16 or UTF-32 (a byte order mark, or NULs
// in the first bytes) is decoded, with U+FFFD for what does not decode;
// anything else is returned as is.
func utf8View(b []byte) []byte {
	switch {
	case bytes.HasPrefix(b, []byte("\x00\x00\xfe\xff")):
		return decodeUTF32(b[4:], binary.BigEndian)
	case bytes.HasPrefix(b, []byte("\xff\xfe\x00\x00")):
		return decodeUTF32(b[4:], binary.LittleEndian)
	case bytes.HasPrefix(b, []byte("\xfe\xff")):
		return decodeUTF16(b[2:], binary.BigEndian)
	case bytes.HasPrefix(b, []byte("\xff\xfe")):
		return decodeUTF16(b[2:], binary.LittleEndian)
	case len(b) >= 4 && b[0] == 0 && b[1] != 0:
		return decodeUTF16(b, binary.BigEndian)
	case len(b) >= 4 && b[0] == 0:
		return decodeUTF32(b, binary.BigEndian)
	case len(b) >= 4 && b[1] == 0 && (b[2] != 0 || b[3] != 0):
		return decodeUTF16(b, binary.LittleEndian)
	case len(b) >= 4 && b[1] == 0:
		return decodeUTF32(b, binary.LittleEndian)
	case len(b) == 2 && b[0] == 0:
		return decodeUTF16(b, binary.BigEndian)
	case len(b) == 2 && b[1] == 0:
		return decodeUTF16(b, binary.LittleEndian)
	}
	return b
}

func decodeUTF16(b []byte, order binary.ByteOrder) []byte {
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = order.Uint16(b[2*i:])
	}
	out := []byte(string(utf16.Decode(u)))
	if len(b)%2 != 0 {
		out = utf8.AppendRune(out, utf8.RuneError)
	}
	return out
}

func decodeUTF32(b []byte, order binary.ByteOrder) []byte {
	out := make([]byte, 0, len(b))
	for ; len(b) >= 4; b = b[4:] {
		out = utf8.AppendRune(out, rune(order.Uint32(b))) // AppendRune writes U+FFFD for what is not a rune
	}
	if len(b) > 0 {
		out = utf8.AppendRune(out, utf8.RuneError)
	}
	return out
}
