package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"

	xunicode "golang.org/x/text/encoding/unicode"
	"golang.org/x/text/encoding/unicode/utf32"
)

// mfRead runs Read and lists what it saw, one "channel/action" per object
// ("-" for a missing field).
func mfRead(t testing.TB, m *MessageFields, msg []byte, binary bool) ([]string, error) {
	t.Helper()
	var sc FieldScratch
	var got []string
	err := m.Read(msg, binary, &sc, func(ch, action []byte) {
		got = append(got, mfShow(ch)+"/"+mfShow(action))
	})
	return got, err
}

func mfShow(b []byte) string {
	if b == nil {
		return "-"
	}
	return string(b)
}

func utf16Bytes(t testing.TB, s string, e xunicode.Endianness, bom xunicode.BOMPolicy) []byte {
	t.Helper()
	b, err := xunicode.UTF16(e, bom).NewEncoder().Bytes([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func utf32Bytes(t testing.TB, s string, e utf32.Endianness, bom utf32.BOMPolicy) []byte {
	t.Helper()
	b, err := utf32.UTF32(e, bom).NewEncoder().Bytes([]byte(s))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestMessageFields(t *testing.T) {
	m, err := NewMessageFields("channel", "type")
	if err != nil {
		t.Fatal(err)
	}
	const join = `{"type":"join","channel":"chat:acme:x"}`
	tests := []struct {
		name   string
		msg    []byte
		binary bool
		want   []string
		err    error
	}{
		{"text object", []byte(join), false, []string{"chat:acme:x/join"}, nil},
		{"binary object", []byte(join), true, []string{"chat:acme:x/join"}, nil},
		{"no channel", []byte(`{"type":"ping"}`), false, []string{"-/ping"}, nil},
		{"a scalar", []byte(`"hello"`), false, nil, nil},
		{"not JSON", []byte(`hello`), false, nil, ErrNotJSON},
		{"binary, not JSON", []byte{0x89, 'P', 'N', 'G'}, true, nil, ErrNotJSON},
		{"empty", nil, false, nil, ErrNotJSON},
		{"a byte order mark first", []byte("\uFEFF" + join), false, []string{"chat:acme:x/join"}, nil},
		{"a byte order mark first, binary", []byte("\uFEFF" + join), true, []string{"chat:acme:x/join"}, nil},
		{"two byte order marks", []byte("\uFEFF\uFEFF" + join), false, nil, ErrJSON},
		{"a byte order mark after a space", []byte(" \uFEFF" + join), false, nil, ErrJSON},
		{"a no-break space first", []byte("\u00a0" + join), false, nil, ErrJSON},
		{"a NUL first", []byte("\x00" + join), false, nil, ErrJSON},
		{"UTF-16 LE with a BOM", utf16Bytes(t, join, xunicode.LittleEndian, xunicode.UseBOM), true, []string{"chat:acme:x/join"}, nil},
		{"UTF-16 BE without a BOM", utf16Bytes(t, join, xunicode.BigEndian, xunicode.IgnoreBOM), true, []string{"chat:acme:x/join"}, nil},
		{"UTF-16 LE without a BOM", utf16Bytes(t, join, xunicode.LittleEndian, xunicode.IgnoreBOM), true, []string{"chat:acme:x/join"}, nil},
		{"UTF-32 BE with a BOM", utf32Bytes(t, join, utf32.BigEndian, utf32.UseBOM), true, []string{"chat:acme:x/join"}, nil},
		{"UTF-32 LE without a BOM", utf32Bytes(t, join, utf32.LittleEndian, utf32.IgnoreBOM), true, []string{"chat:acme:x/join"}, nil},
		{"UTF-16 in a text frame is not decoded", utf16Bytes(t, join, xunicode.LittleEndian, xunicode.IgnoreBOM), false, nil, ErrJSON},
		{"an array of objects", []byte(`[` + join + `,{"type":"leave","channel":"chat:evil:x"}]`), false,
			[]string{"chat:acme:x/join", "chat:evil:x/leave"}, nil},
		{"nested arrays", []byte(`[[` + join + `],1,"x",[]]`), false, []string{"chat:acme:x/join"}, nil},
		{"objects inside objects are not messages", []byte(`{"x":` + join + `}`), false, []string{"-/-"}, nil},
		{"a bad element refuses the batch", []byte(`[` + join + `,{"channel":1}]`), false, []string{"chat:acme:x/join"}, ErrJSONType},
		{"a case variant", []byte(`{"type":"join","channel":"chat:acme:x","CHANNEL":"chat:evil:x"}`), false, nil, ErrJSONCase},
		{"a case variant of the action", []byte(`{"Type":"leave","type":"join","channel":"c"}`), false, nil, ErrJSONCase},
		{"a duplicate", []byte(`{"type":"join","channel":"a","channel":"b"}`), false, nil, ErrJSONDuplicate},
		{"JSON with a trailing comma", []byte(`{"type":"join","channel":"a",}`), false, nil, ErrJSON},
		{"JSON with a comment after it", []byte(`{"channel":"a"} // hi`), false, []string{"a/-"}, ErrJSON},
		{"invalid UTF-8 in a binary object", []byte("{\"channel\":\"a\xff\"}"), true, nil, ErrJSON},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := mfRead(t, m, tt.msg, tt.binary)
			if !errors.Is(err, tt.err) || (err != nil) != (tt.err != nil) {
				t.Fatalf("error %v, want %v", err, tt.err)
			}
			if fmt.Sprint(got) != fmt.Sprint(tt.want) {
				t.Fatalf("read %q, want %q", got, tt.want)
			}
		})
	}
}

// TestMessageFieldsAllocations: a plain text message is read without
// allocating.
func TestMessageFieldsAllocations(t *testing.T) {
	m, err := NewMessageFields("payload.room", "type")
	if err != nil {
		t.Fatal(err)
	}
	msg := []byte(`{"type":"say","payload":{"room":"org:acme:1","text":"hi"}}`)
	var sc FieldScratch
	n := 0
	allocs := testing.AllocsPerRun(100, func() {
		if err := m.Read(msg, false, &sc, func(ch, a []byte) { n += len(ch) + len(a) }); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 || n == 0 {
		t.Fatalf("%v allocations per call (read %d bytes), want 0", allocs, n)
	}
}

// The field layouts the differential fuzz target tries; the names have
// letters with Unicode case variants (k: the Kelvin sign, s: the long s).
var mfConfigs = []struct{ channel, action string }{
	{"channel", "type"},
	{"payload.room", "type"},
	{"room", ""},
	{"kind", "sub"},
	{"data.id", "data.op"},
}

// mfStruct builds the struct an upstream in Go decodes into: *string for
// each field (nil when absent), nested structs for dotted paths.
func mfStruct(paths []FieldPath) reflect.Type {
	type node struct {
		name string
		kids []*node
		leaf bool
	}
	root := &node{}
	for _, p := range paths {
		n := root
		for i, name := range p {
			var next *node
			for _, k := range n.kids {
				if k.name == name {
					next = k
				}
			}
			if next == nil {
				next = &node{name: name}
				n.kids = append(n.kids, next)
			}
			next.leaf = i == len(p)-1
			n = next
		}
	}
	var build func(n *node) reflect.Type
	build = func(n *node) reflect.Type {
		var fields []reflect.StructField
		for i, k := range n.kids {
			typ := reflect.TypeFor[*string]()
			if !k.leaf {
				typ = reflect.PointerTo(build(k))
			}
			fields = append(fields, reflect.StructField{
				Name: fmt.Sprintf("F%d", i), Type: typ, Tag: reflect.StructTag(`json:"` + k.name + `"`),
			})
		}
		return reflect.StructOf(fields)
	}
	return build(root)
}

// mfStructField follows path in a decoded struct.
func mfStructField(v reflect.Value, path FieldPath) string {
	for _, name := range path {
		if v.Kind() == reflect.Pointer {
			if v.IsNil() {
				return "-"
			}
			v = v.Elem()
		}
		found := false
		for i := 0; i < v.NumField(); i++ {
			if tag, _ := strings.CutPrefix(string(v.Type().Field(i).Tag), `json:"`); strings.TrimSuffix(tag, `"`) == name {
				v, found = v.Field(i), true
				break
			}
		}
		if !found {
			panic("no field " + name)
		}
	}
	if v.IsNil() {
		return "-"
	}
	return v.Elem().String()
}

// mfMapField follows path in a document decoded into map[string]any
// (exact keys, the last duplicate wins, as JSON.parse reads).
func mfMapField(v any, path FieldPath) string {
	for _, name := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return "-"
		}
		if v, ok = m[name]; !ok {
			return "-"
		}
	}
	s, ok := v.(string)
	if !ok {
		return fmt.Sprintf("<%T>", v)
	}
	return s
}

// mfObjects lists, in order, the objects a decoder that takes a top-level
// array as a batch finds in a valid document: the message itself when it
// is an object, the objects in it (and in nested arrays) when it is an
// array.
func mfObjects(doc []byte) []json.RawMessage {
	d := bytes.TrimLeft(doc, " \t\r\n")
	switch {
	case len(d) == 0:
		return nil
	case d[0] == '{':
		return []json.RawMessage{doc}
	case d[0] == '[':
		var elems []json.RawMessage
		if err := json.Unmarshal(doc, &elems); err != nil {
			panic(err)
		}
		var out []json.RawMessage
		for _, e := range elems {
			out = append(out, mfObjects(e)...)
		}
		return out
	}
	return nil
}

// mfViews are the texts that upstreams decode from a message: the bytes
// as they are (Go's encoding/json), without a leading byte order mark
// (TextDecoder, then JSON.parse), and for a binary message, the bytes
// decoded in the encoding Python's json.loads detects.
func mfViews(msg []byte, binary bool) [][]byte {
	views := [][]byte{msg, bytes.TrimPrefix(msg, []byte("\uFEFF"))}
	if !binary {
		return views
	}
	var enc interface{ Bytes([]byte) ([]byte, error) }
	switch {
	case bytes.HasPrefix(msg, []byte{0, 0, 0xfe, 0xff}), bytes.HasPrefix(msg, []byte{0xff, 0xfe, 0, 0}):
		enc = utf32.UTF32(utf32.BigEndian, utf32.ExpectBOM).NewDecoder()
	case bytes.HasPrefix(msg, []byte{0xfe, 0xff}), bytes.HasPrefix(msg, []byte{0xff, 0xfe}):
		enc = xunicode.UTF16(xunicode.BigEndian, xunicode.ExpectBOM).NewDecoder()
	case len(msg) >= 4 && msg[0] == 0 && msg[1] != 0, len(msg) == 2 && msg[0] == 0:
		enc = xunicode.UTF16(xunicode.BigEndian, xunicode.IgnoreBOM).NewDecoder()
	case len(msg) >= 4 && msg[0] == 0:
		enc = utf32.UTF32(utf32.BigEndian, utf32.IgnoreBOM).NewDecoder()
	case len(msg) >= 4 && msg[1] == 0 && (msg[2] != 0 || msg[3] != 0), len(msg) == 2 && msg[1] == 0:
		enc = xunicode.UTF16(xunicode.LittleEndian, xunicode.IgnoreBOM).NewDecoder()
	case len(msg) >= 4 && msg[1] == 0:
		enc = utf32.UTF32(utf32.LittleEndian, utf32.IgnoreBOM).NewDecoder()
	default:
		return views
	}
	if d, err := enc.Bytes(msg); err == nil {
		views = append(views, d, bytes.TrimPrefix(d, []byte("\uFEFF")))
	}
	return views
}

// FuzzMessageFields is differential: for a message the policy passes, the
// channel and action read from each object are what Go's encoding/json
// decodes into a struct with those fields (case-insensitive keys, the last
// duplicate wins) and what a decoder into a map decodes (exact keys, the
// last duplicate wins, as JSON.parse), for every text an upstream may
// decode from the message; a message read as holding no JSON is one no
// decoder finds an object in. Seeds are in testdata/fuzz/FuzzMessageFields.
func FuzzMessageFields(f *testing.F) {
	f.Fuzz(func(t *testing.T, msg []byte, binary bool, sel uint8) {
		cfg := mfConfigs[int(sel)%len(mfConfigs)]
		m, err := NewMessageFields(cfg.channel, cfg.action)
		if err != nil {
			t.Fatal(err)
		}
		got, err := mfRead(t, m, msg, binary)
		if err != nil && !errors.Is(err, ErrNotJSON) {
			return // refused
		}
		typ := mfStruct(m.paths)
		for _, view := range mfViews(msg, binary) {
			if !json.Valid(view) {
				continue
			}
			objs := mfObjects(view)
			if errors.Is(err, ErrNotJSON) {
				if len(objs) > 0 {
					t.Fatalf("%q passed unread, but decodes to %d objects as %q", msg, len(objs), view)
				}
				continue
			}
			if len(objs) != len(got) {
				t.Fatalf("%q: read %d objects %q; %q holds %d", msg, len(got), got, view, len(objs))
			}
			for i, obj := range objs {
				sv := reflect.New(typ)
				_ = json.Unmarshal(obj, sv.Interface()) // a type error still decodes the rest, and some upstreams ignore it
				var mv any
				if err := json.Unmarshal(obj, &mv); err != nil {
					t.Fatalf("%q: %v", obj, err)
				}
				var inStruct, inMap []string
				for _, p := range m.paths {
					inStruct = append(inStruct, mfStructField(sv.Elem(), p))
					inMap = append(inMap, mfMapField(mv, p))
				}
				if len(m.paths) == 1 {
					inStruct, inMap = append(inStruct, "-"), append(inMap, "-")
				}
				if want := strings.Join(inStruct, "/"); got[i] != want {
					t.Fatalf("%q: read %q, encoding/json into a struct decodes %q from %q", msg, got[i], want, view)
				}
				if want := strings.Join(inMap, "/"); got[i] != want {
					t.Fatalf("%q: read %q, a last-wins decoder into a map decodes %q from %q", msg, got[i], want, view)
				}
			}
		}
	})
}
