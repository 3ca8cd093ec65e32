package policy

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"unicode/utf8"
)

// jfPaths parses dotted paths that must be valid.
func jfPaths(t testing.TB, paths ...string) []FieldPath {
	t.Helper()
	out := make([]FieldPath, len(paths))
	for i, p := range paths {
		fp, err := ParseFieldPath(p)
		if err != nil {
			t.Fatalf("ParseFieldPath(%q): %v", p, err)
		}
		out[i] = fp
	}
	return out
}

// jfExtract runs ExtractJSONFields with fresh result slices; missing
// paths come back as "<missing>".
func jfExtract(doc string, paths []FieldPath) ([]string, error) {
	vals := make([]string, len(paths))
	found := make([]bool, len(paths))
	for i := range found {
		found[i] = true // must be reset
		vals[i] = "stale"
	}
	err := ExtractJSONFields([]byte(doc), paths, vals, found)
	for i := range vals {
		if !found[i] {
			vals[i] = "<missing>"
		}
	}
	return vals, err
}

const jfMissing = "<missing>"

func TestParseFieldPath(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want FieldPath
	}{
		{"channel", FieldPath{"channel"}},
		{"payload.room", FieldPath{"payload", "room"}},
		{"a.b.c", FieldPath{"a", "b", "c"}},
		{"with space", FieldPath{"with space"}},
		{"", nil},
		{".", nil},
		{"a.", nil},
		{".a", nil},
		{"a..b", nil},
	} {
		got, err := ParseFieldPath(tc.in)
		if tc.want == nil {
			if err == nil {
				t.Errorf("ParseFieldPath(%q) = %q, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != fmt.Sprint(tc.want) || len(got) != len(tc.want) {
			t.Errorf("ParseFieldPath(%q) = %q, %v; want %q", tc.in, got, err, tc.want)
		}
	}
}

// TestExtractJSONFields checks found values, absent paths and the errors
// on policy paths. Where a value is found, encoding/json must decode the
// same value there.
func TestExtractJSONFields(t *testing.T) {
	deep := func(n int) string { return strings.Repeat("[", n) + strings.Repeat("]", n) }
	tests := []struct {
		name  string
		doc   string
		paths []string
		want  []string // jfMissing for an absent path
		err   error
	}{
		// found and missing
		{"top-level fields", `{"type":"join","channel":"chat:a"}`, []string{"channel", "type"}, []string{"chat:a", "join"}, nil},
		{"nested path", `{"type":"say","payload":{"room":"r1","text":"hi"}}`, []string{"payload.room", "type"}, []string{"r1", "say"}, nil},
		{"deep path", `{"a":{"b":{"c":{"d":"x"}}}}`, []string{"a.b.c.d"}, []string{"x"}, nil},
		{"whitespace everywhere", " \t\r\n{ \"a\" :\n{\"b\"\t:\r\"x\" } , \"c\" : [ 1 , 2 ] }\n ", []string{"a.b"}, []string{"x"}, nil},
		{"missing field", `{"x":1}`, []string{"channel"}, []string{jfMissing}, nil},
		{"one found, one missing", `{"channel":"a"}`, []string{"channel", "type"}, []string{"a", jfMissing}, nil},
		{"empty object", `{}`, []string{"channel"}, []string{jfMissing}, nil},
		{"missing leaf", `{"payload":{"text":"hi"}}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"intermediate is a string", `{"payload":"room"}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"intermediate is null", `{"payload":null}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"intermediate is a number", `{"payload":1}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"intermediate is an array", `{"payload":[{"room":"r1"}]}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"top level is an array", `[{"channel":"a"}]`, []string{"channel"}, []string{jfMissing}, nil},
		{"top level is a string", `"channel"`, []string{"channel"}, []string{jfMissing}, nil},
		{"top level is a number", `12`, []string{"channel"}, []string{jfMissing}, nil},
		{"top level is null", `null`, []string{"channel"}, []string{jfMissing}, nil},
		{"key at the wrong depth", `{"x":{"channel":"a"}}`, []string{"channel"}, []string{jfMissing}, nil},
		{"leaf name at the top", `{"room":"a","payload":{}}`, []string{"payload.room"}, []string{jfMissing}, nil},
		{"a key in another case", `{"Channel":"a"}`, []string{"channel"}, nil, ErrJSONCase},
		{"a key in another case after the exact one", `{"channel":"a","CHANNEL":"b"}`, []string{"channel"}, nil, ErrJSONCase},
		{"a key in another case, escaped", `{"channel":"a","\u0043hannel":"b"}`, []string{"channel"}, nil, ErrJSONCase},
		{"the Kelvin sign folds to k", `{"kind":"a","\u212aind":"b"}`, []string{"kind"}, nil, ErrJSONCase},
		{"the long s folds to s", "{\"\u017fub\":\"a\"}", []string{"sub"}, nil, ErrJSONCase},
		{"dotless i upper-cases to I", "{\"\u0131d\":\"a\"}", []string{"id"}, nil, ErrJSONCase},
		{"another case on a deeper level", `{"payload":{"ROOM":"a"}}`, []string{"payload.room"}, nil, ErrJSONCase},
		{"another case of the parent", `{"Payload":{"room":"a"}}`, []string{"payload.room"}, nil, ErrJSONCase},
		{"another case off the path is ignored", `{"x":{"Channel":"a"},"channel":"b"}`, []string{"channel"}, []string{"b"}, nil},
		{"a longer key is not a case variant", `{"channels":"a","channel":"b"}`, []string{"channel"}, []string{"b"}, nil},
		{"a non-letter differing by 0x20 is not a case variant", `{"a@":"a","a` + "`" + `":"b"}`, []string{"a`"}, []string{"b"}, nil},
		{"empty string value", `{"channel":""}`, []string{"channel"}, []string{""}, nil},
		{"no paths", `{"a":1}`, nil, nil, nil},
		{"values after the path are checked", `{"channel":"a","x":{"y":[1,2,{"z":null}]}}`, []string{"channel"}, []string{"a"}, nil},

		// non-string values
		{"number", `{"channel":1}`, []string{"channel"}, nil, ErrJSONType},
		{"true", `{"channel":true}`, []string{"channel"}, nil, ErrJSONType},
		{"null", `{"channel":null}`, []string{"channel"}, nil, ErrJSONType},
		{"object", `{"channel":{"a":"b"}}`, []string{"channel"}, nil, ErrJSONType},
		{"array", `{"channel":["a"]}`, []string{"channel"}, nil, ErrJSONType},
		{"nested number", `{"payload":{"room":5}}`, []string{"payload.room"}, nil, ErrJSONType},
		{"second path not a string", `{"channel":"a","type":0}`, []string{"channel", "type"}, nil, ErrJSONType},
		{"non-string off the path is fine", `{"channel":"a","room":5}`, []string{"channel"}, []string{"a"}, nil},
		{"one path ends where another goes on", `{"a":{"b":"x"}}`, []string{"a", "a.b"}, nil, ErrJSONType},
		{"… even when the shorter one is a string", `{"a":"x"}`, []string{"a.b", "a"}, nil, ErrJSONType},

		// duplicates
		{"duplicate on the path", `{"channel":"a","channel":"b"}`, []string{"channel"}, nil, ErrJSONDuplicate},
		{"duplicate with the same value", `{"channel":"a","channel":"a"}`, []string{"channel"}, nil, ErrJSONDuplicate},
		{"duplicate of a non-string", `{"channel":"a","channel":1}`, []string{"channel"}, nil, ErrJSONDuplicate},
		{"duplicate intermediate", `{"payload":{"room":"a"},"payload":{"room":"b"}}`, []string{"payload.room"}, nil, ErrJSONDuplicate},
		{"duplicate intermediate, one not an object", `{"payload":1,"payload":{"room":"b"}}`, []string{"payload.room"}, nil, ErrJSONDuplicate},
		{"duplicate leaf in a nested object", `{"payload":{"room":"a","x":1,"room":"b"}}`, []string{"payload.room"}, nil, ErrJSONDuplicate},
		{"duplicate spelled with an escape", `{"channel":"a","\u0063hannel":"b"}`, []string{"channel"}, nil, ErrJSONDuplicate},
		{"duplicate spelled with \\/", `{"a/b":"a","a\/b":"b"}`, []string{"a/b"}, nil, ErrJSONDuplicate},
		{"duplicate of the second path", `{"channel":"a","type":"x","type":"y"}`, []string{"channel", "type"}, nil, ErrJSONDuplicate},
		{"duplicates elsewhere are fine", `{"x":1,"x":2,"channel":"a"}`, []string{"channel"}, []string{"a"}, nil},
		{"duplicates beside the path are fine", `{"payload":{"t":1,"t":2,"room":"r"}}`, []string{"payload.room"}, []string{"r"}, nil},
		{"duplicates in another object are fine", `{"other":{"channel":"a","channel":"b"},"channel":"c"}`, []string{"channel"}, []string{"c"}, nil},
		{"duplicates in an array are fine", `{"list":[{"channel":"a","channel":"b"}],"channel":"c"}`, []string{"channel"}, []string{"c"}, nil},
		{"same key in sibling objects", `{"a":{"room":"x"},"payload":{"room":"y"}}`, []string{"payload.room"}, []string{"y"}, nil},

		// escapes
		{"escaped key", `{"\u0063hannel":"a"}`, []string{"channel"}, []string{"a"}, nil},
		{"escaped quote in a key", `{"ch\"annel":"a"}`, []string{`ch"annel`}, []string{"a"}, nil},
		{"escaped key on an inner level", `{"p\u0061yload":{"r\u006fom":"a"}}`, []string{"payload.room"}, []string{"a"}, nil},
		{"escaped backslash in a key", `{"ch\\annel":"a"}`, []string{"ch\\annel"}, []string{"a"}, nil},
		{"escaped value", `{"c":"a\"b\\c\/d\be\ff\ng\rh\ti"}`, []string{"c"}, []string{"a\"b\\c/d\be\ff\ng\rh\ti"}, nil},
		{"\\u escape", `{"c":"caf\u00e9 \u00E9"}`, []string{"c"}, []string{"café é"}, nil},
		{"\\u0000", `{"c":"a\u0000b"}`, []string{"c"}, []string{"a\x00b"}, nil},
		{"surrogate pair", `{"c":"\ud83d\ude00"}`, []string{"c"}, []string{"😀"}, nil},
		{"surrogate pair in upper case", `{"c":"\uD83D\uDE00!"}`, []string{"c"}, []string{"😀!"}, nil},
		{"lone high surrogate", `{"c":"\ud83d"}`, []string{"c"}, []string{"\ufffd"}, nil},
		{"lone high surrogate then text", `{"c":"\ud83dx"}`, []string{"c"}, []string{"\ufffdx"}, nil},
		{"lone low surrogate", `{"c":"\ude00"}`, []string{"c"}, []string{"\ufffd"}, nil},
		{"two high surrogates", `{"c":"\ud83d\ud83d"}`, []string{"c"}, []string{"\ufffd\ufffd"}, nil},
		{"high surrogate then a plain escape", `{"c":"\ud83d\u0041"}`, []string{"c"}, []string{"\ufffdA"}, nil},
		{"high surrogate then \\n", `{"c":"\ud83d\n"}`, []string{"c"}, []string{"\ufffd\n"}, nil},
		{"raw UTF-8", `{"c":"日本語 😀"}`, []string{"c"}, []string{"日本語 😀"}, nil},
		{"escaped U+2028", `{"c":"\u2028"}`, []string{"c"}, []string{"\u2028"}, nil},
		{"DEL is allowed raw", "{\"c\":\"a\x7fb\"}", []string{"c"}, []string{"a\x7fb"}, nil},

		// malformed
		{"empty", ``, []string{"c"}, nil, ErrJSON},
		{"blank", " \n\t", []string{"c"}, nil, ErrJSON},
		{"open brace", `{`, []string{"c"}, nil, ErrJSON},
		{"close brace", `}`, []string{"c"}, nil, ErrJSON},
		{"key without value", `{"c"}`, []string{"c"}, nil, ErrJSON},
		{"key without colon", `{"c" "a"}`, []string{"c"}, nil, ErrJSON},
		{"colon without value", `{"c":}`, []string{"c"}, nil, ErrJSON},
		{"trailing comma in an object", `{"c":"a",}`, []string{"c"}, nil, ErrJSON},
		{"trailing comma in an array", `{"c":"a","x":[1,]}`, []string{"c"}, nil, ErrJSON},
		{"leading comma", `{,"c":"a"}`, []string{"c"}, nil, ErrJSON},
		{"missing comma", `{"c":"a" "x":1}`, []string{"c"}, nil, ErrJSON},
		{"missing comma in an array", `{"x":[1 2]}`, []string{"c"}, nil, ErrJSON},
		{"single quotes", `{'c':'a'}`, []string{"c"}, nil, ErrJSON},
		{"bare key", `{c:"a"}`, []string{"c"}, nil, ErrJSON},
		{"non-string key", `{1:"a"}`, []string{"c"}, nil, ErrJSON},
		{"leading zero", `{"x":01}`, []string{"c"}, nil, ErrJSON},
		{"negative leading zero", `{"x":-01}`, []string{"c"}, nil, ErrJSON},
		{"fraction without digits", `{"x":1.}`, []string{"c"}, nil, ErrJSON},
		{"fraction without integer", `{"x":.5}`, []string{"c"}, nil, ErrJSON},
		{"lone minus", `{"x":-}`, []string{"c"}, nil, ErrJSON},
		{"exponent without digits", `{"x":1e}`, []string{"c"}, nil, ErrJSON},
		{"exponent sign without digits", `{"x":1e+}`, []string{"c"}, nil, ErrJSON},
		{"plus sign", `{"x":+1}`, []string{"c"}, nil, ErrJSON},
		{"hex number", `{"x":0x10}`, []string{"c"}, nil, ErrJSON},
		{"NaN", `{"x":NaN}`, []string{"c"}, nil, ErrJSON},
		{"Infinity", `{"x":Infinity}`, []string{"c"}, nil, ErrJSON},
		{"truncated true", `{"x":tru}`, []string{"c"}, nil, ErrJSON},
		{"truncated null at the end", `{"x":nul`, []string{"c"}, nil, ErrJSON},
		{"True", `{"x":True}`, []string{"c"}, nil, ErrJSON},
		{"truex", `{"x":truex}`, []string{"c"}, nil, ErrJSON},
		{"unknown escape", `{"c":"\x"}`, []string{"c"}, nil, ErrJSON},
		{"escaped single quote", `{"c":"\'"}`, []string{"c"}, nil, ErrJSON},
		{"short \\u", `{"c":"\u12"}`, []string{"c"}, nil, ErrJSON},
		{"short \\u at the end", `{"c":"\u12`, []string{"c"}, nil, ErrJSON},
		{"bad hex", `{"c":"\u12G4"}`, []string{"c"}, nil, ErrJSON},
		{"\\U", `{"c":"\U0041"}`, []string{"c"}, nil, ErrJSON},
		{"backslash at the end", `{"c":"\`, []string{"c"}, nil, ErrJSON},
		{"raw newline in a string", "{\"c\":\"a\nb\"}", []string{"c"}, nil, ErrJSON},
		{"raw tab in a string", "{\"c\":\"a\tb\"}", []string{"c"}, nil, ErrJSON},
		{"raw NUL in a string", "{\"c\":\"a\x00b\"}", []string{"c"}, nil, ErrJSON},
		{"raw control char in a key", "{\"c\x01\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"invalid UTF-8 in a value", "{\"c\":\"a\xffb\"}", []string{"c"}, nil, ErrJSON},
		{"invalid UTF-8 off the path", "{\"x\":\"\xc0\xaf\",\"c\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"invalid UTF-8 in a key", "{\"c\xff\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"surrogate half encoded in UTF-8", "{\"c\":\"\xed\xa0\x80\"}", []string{"c"}, nil, ErrJSON},
		{"unterminated string", `{"c":"a`, []string{"c"}, nil, ErrJSON},
		{"unterminated key", `{"c`, []string{"c"}, nil, ErrJSON},
		{"unclosed object after the path", `{"c":"a"`, []string{"c"}, nil, ErrJSON},
		{"unclosed object after a comma", `{"c":"a",`, []string{"c"}, nil, ErrJSON},
		{"unclosed array", `{"x":[`, []string{"c"}, nil, ErrJSON},
		{"mismatched brackets", `{"x":[}`, []string{"c"}, nil, ErrJSON},
		{"mismatched close", `{"x":{]}`, []string{"c"}, nil, ErrJSON},
		{"bad value after the path", `{"c":"a","x":[1,}`, []string{"c"}, nil, ErrJSON},
		{"comment", `{"c":"a"} // hi`, []string{"c"}, nil, ErrJSON},
		{"block comment", `{/* */"c":"a"}`, []string{"c"}, nil, ErrJSON},
		{"BOM", "\ufeff{\"c\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"NUL", "\x00", []string{"c"}, nil, ErrJSON},
		{"non-breaking space", "\u00a0{\"c\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"vertical tab", "\v{\"c\":\"a\"}", []string{"c"}, nil, ErrJSON},
		{"form feed", "{\f\"c\":\"a\"}", []string{"c"}, nil, ErrJSON},

		// trailing data
		{"trailing whitespace", "{\"c\":\"a\"} \r\n\t", []string{"c"}, []string{"a"}, nil},
		{"trailing brace", `{"c":"a"}}`, []string{"c"}, nil, ErrJSON},
		{"second object", `{"c":"a"}{"c":"b"}`, []string{"c"}, nil, ErrJSON},
		{"second value after a space", `{"c":"a"} 1`, []string{"c"}, nil, ErrJSON},
		{"trailing garbage", `{"c":"a"}x`, []string{"c"}, nil, ErrJSON},
		{"trailing NUL", "{\"c\":\"a\"}\x00", []string{"c"}, nil, ErrJSON},
		{"trailing comma", `{"c":"a"},`, []string{"c"}, nil, ErrJSON},
		{"number then garbage", `1x`, []string{"c"}, nil, ErrJSON},

		// depth
		{"64 levels", deep(64), []string{"c"}, []string{jfMissing}, nil},
		{"65 levels", deep(65), []string{"c"}, nil, ErrJSON},
		{"65 levels after the path", `{"c":"a","x":` + deep(64) + `}`, []string{"c"}, nil, ErrJSON},
		{"64 levels around the path", strings.Repeat(`{"a":`, 63) + `{"c":"x"}` + strings.Repeat("}", 63), []string{strings.Repeat("a.", 63) + "c"}, []string{"x"}, nil},
		{"65 levels of objects", strings.Repeat(`{"a":`, 65) + `1` + strings.Repeat("}", 65), []string{"c"}, nil, ErrJSON},
		{"deep but closed levels do not add up", `{"x":` + deep(63) + `,"y":` + deep(63) + `,"c":"a"}`, []string{"c"}, []string{"a"}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := jfExtract(tt.doc, jfPaths(t, tt.paths...))
			if tt.err != nil {
				if err != tt.err {
					t.Fatalf("error %v, want %v", err, tt.err)
				}
				if tt.err == ErrJSON && json.Valid([]byte(tt.doc)) && utf8.ValidString(tt.doc) && !strings.Contains(tt.name, "levels") {
					t.Errorf("refused as malformed but encoding/json accepts it")
				}
				return
			}
			if err != nil {
				t.Fatalf("error %v", err)
			}
			if fmt.Sprintf("%q", got) != fmt.Sprintf("%q", tt.want) {
				t.Errorf("got %q, want %q", got, tt.want)
			}
			// encoding/json must read the same values
			var v any
			if err := json.Unmarshal([]byte(tt.doc), &v); err != nil {
				t.Fatalf("encoding/json: %v", err)
			}
			for i, p := range jfPaths(t, tt.paths...) {
				want, ok := jfLookup(v, p)
				s, isStr := want.(string)
				if !ok || !isStr {
					s = jfMissing
				}
				if got[i] != s {
					t.Errorf("path %s: got %q, encoding/json reads %q", tt.paths[i], got[i], s)
				}
			}
		})
	}
}

// TestExtractJSONFieldsResults checks how the result slices are used.
func TestExtractJSONFieldsResults(t *testing.T) {
	paths := jfPaths(t, "a", "b")
	vals := []string{"old", "old"}
	found := []bool{true, true}
	if err := ExtractJSONFields([]byte(`{"b":"x"}`), paths, vals, found); err != nil {
		t.Fatal(err)
	}
	if found[0] || !found[1] || vals[1] != "x" {
		t.Errorf("found %v vals %q; want [false true] and b = x", found, vals)
	}
	// found is reset even when the document is refused
	found = []bool{true, true}
	if err := ExtractJSONFields([]byte(`nope`), paths, vals, found); err != ErrJSON {
		t.Fatalf("error %v, want ErrJSON", err)
	}
	if found[0] || found[1] {
		t.Errorf("found %v after an error, want all false", found)
	}
	// the value does not alias the document
	doc := []byte(`{"a":"abc"}`)
	if err := ExtractJSONFields(doc, paths, vals, found); err != nil {
		t.Fatal(err)
	}
	copy(doc, `{"a":"xyz"}`)
	if vals[0] != "abc" {
		t.Errorf("value changed with the document: %q", vals[0])
	}
}

// TestExtractJSONFieldsSamePathTwice asks for one field under two names, as
// relay_channels does when channel_field and action_field are equal.
func TestExtractJSONFieldsSamePathTwice(t *testing.T) {
	got, err := jfExtract(`{"type":"chat:secret"}`, jfPaths(t, "type", "type"))
	if err != nil {
		t.Fatal(err)
	}
	if got[0] != "chat:secret" || got[1] != "chat:secret" {
		t.Errorf("got %q, want the value for both paths", got)
	}
}

// TestExtractJSONFieldsManyPaths asks for more paths than the scanner's
// 64-bit sets hold.
func TestExtractJSONFieldsManyPaths(t *testing.T) {
	var names []string
	var doc strings.Builder
	doc.WriteString("{")
	for i := 0; i < 66; i++ {
		names = append(names, fmt.Sprintf("f%d", i))
		if i > 0 {
			doc.WriteString(",")
		}
		fmt.Fprintf(&doc, `"f%d":"v"`, i)
	}
	doc.WriteString("}")
	got, err := jfExtract(doc.String(), jfPaths(t, names...))
	if err == nil {
		for i, v := range got {
			if v != "v" {
				t.Errorf("path %d: %q, want v (or an error for too many paths)", i, v)
			}
		}
	}
}

// TestExtractJSONFieldsEmptyPath passes a path with no names, which
// ParseFieldPath never makes but the exported function accepts.
func TestExtractJSONFieldsEmptyPath(t *testing.T) {
	defer func() {
		if r := recover(); r != nil {
			t.Errorf("panic: %v", r)
		}
	}()
	_, _ = jfExtract(`{"a":"b"}`, []FieldPath{{}})
}

// jfLookup walks a decoded document.
func jfLookup(v any, path FieldPath) (any, bool) {
	for _, name := range path {
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		if v, ok = m[name]; !ok {
			return nil, false
		}
	}
	return v, true
}

// jfNode is a JSON value read with encoding/json's tokenizer, keeping
// every member of an object in order, duplicates included.
type jfNode struct {
	kind    byte // '{', '[', '"', or 'v' for anything else
	str     string
	members []jfMember
}

type jfMember struct {
	key string
	val *jfNode
}

// jfTree reads one value with json.Decoder; the document must be valid.
func jfTree(doc []byte) (*jfNode, int, error) {
	dec := json.NewDecoder(bytes.NewReader(doc))
	dec.UseNumber()
	maxDepth := 0
	var read func(depth int) (*jfNode, error)
	read = func(depth int) (*jfNode, error) {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case json.Delim:
			depth++
			maxDepth = max(maxDepth, depth)
			n := &jfNode{kind: byte(t)}
			for dec.More() {
				key := ""
				if t == '{' {
					k, err := dec.Token()
					if err != nil {
						return nil, err
					}
					key = k.(string)
				}
				v, err := read(depth)
				if err != nil {
					return nil, err
				}
				n.members = append(n.members, jfMember{key, v})
			}
			if _, err := dec.Token(); err != nil { // the closing delimiter
				return nil, err
			}
			return n, nil
		case string:
			return &jfNode{kind: '"', str: t}, nil
		}
		return &jfNode{kind: 'v'}, nil
	}
	n, err := read(0)
	if err != nil {
		return nil, 0, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, 0, fmt.Errorf("trailing data: %v", err)
	}
	return n, maxDepth, nil
}

// jfDuplicateOnPath says whether some object along path has the path's key
// twice.
func jfDuplicateOnPath(n *jfNode, path FieldPath) bool {
	if n.kind != '{' || len(path) == 0 {
		return false
	}
	var hits []*jfNode
	for _, m := range n.members {
		if m.key == path[0] {
			hits = append(hits, m.val)
		}
	}
	if len(hits) > 1 {
		return true
	}
	return len(hits) == 1 && jfDuplicateOnPath(hits[0], path[1:])
}

// jfCaseOnPath says whether an object along path (following exact keys)
// has a key other than the path's name that fold matches to it.
func jfCaseOnPath(n *jfNode, path FieldPath, fold func(a, b string) bool) bool {
	if n.kind != '{' || len(path) == 0 {
		return false
	}
	for _, m := range n.members {
		if m.key == path[0] {
			if jfCaseOnPath(m.val, path[1:], fold) {
				return true
			}
		} else if fold(m.key, path[0]) {
			return true
		}
	}
	return false
}

// jfLooseFold is wider than any decoder's notion of case folding.
func jfLooseFold(a, b string) bool {
	return strings.EqualFold(strings.ToLower(a), strings.ToLower(b)) || strings.EqualFold(strings.ToUpper(a), strings.ToUpper(b))
}

// jfNonStringOnPath says whether some member on path (duplicates included)
// ends the path with a value that is not a string, or, with prefix, whether
// the path is present at all.
func jfNonStringOnPath(n *jfNode, path FieldPath, prefix bool) bool {
	if n.kind != '{' {
		return false
	}
	for _, m := range n.members {
		if m.key != path[0] {
			continue
		}
		if len(path) == 1 {
			if prefix || m.val.kind != '"' {
				return true
			}
			continue
		}
		if jfNonStringOnPath(m.val, path[1:], prefix) {
			return true
		}
	}
	return false
}

// jfFuzzPaths are the path sets the fuzzer picks from. No set has two
// equal paths (see TestExtractJSONFieldsSamePathTwice).
var jfFuzzPaths = [][]string{
	{"channel", "type"},
	{"payload.room", "type"},
	{"a", "b.c"},
	{"a.b.c", "\u00e9"},
	{"a", "a.b"},
	{"", ""}, // placeholder: the empty-name key, see below
}

// FuzzExtractJSONFields compares ExtractJSONFields with encoding/json:
// a document is accepted only if json.Valid accepts it (and it is UTF-8 and
// at most 64 deep); duplicate and type errors only come from policy paths;
// and found values are what encoding/json decodes there. Seeds are in
// testdata/fuzz/FuzzExtractJSONFields.
func FuzzExtractJSONFields(f *testing.F) {
	f.Fuzz(func(t *testing.T, doc []byte, sel uint8) {
		names := jfFuzzPaths[int(sel)%len(jfFuzzPaths)]
		var paths []FieldPath
		if names[0] == "" {
			paths = []FieldPath{{"k"}, {"\"", "\\"}}
		} else {
			for _, n := range names {
				p, _ := ParseFieldPath(n)
				paths = append(paths, p)
			}
		}
		vals := make([]string, len(paths))
		found := make([]bool, len(paths))
		err := ExtractJSONFields(doc, paths, vals, found)
		if err != nil && err != ErrJSON && err != ErrJSONType && err != ErrJSONDuplicate && err != ErrJSONCase {
			t.Fatalf("unexpected error %v", err)
		}

		if !json.Valid(doc) {
			if err == nil {
				t.Fatalf("accepted %q, which encoding/json refuses", doc)
			}
			return
		}
		// stricter than encoding/json by design
		if !utf8.Valid(doc) {
			if err == nil {
				t.Fatalf("accepted %q, which is not UTF-8", doc)
			}
			return
		}
		tree, depth, terr := jfTree(doc)
		if terr != nil {
			t.Fatalf("json.Valid accepts %q but the tokenizer says %v", doc, terr)
		}
		if depth > maxJSONDepth {
			if err == nil {
				t.Fatalf("accepted %q, %d deep", doc, depth)
			}
			return
		}

		dup, nonString, loose, strict := false, false, false, false
		for i, p := range paths {
			loose = loose || jfCaseOnPath(tree, p, jfLooseFold)
			strict = strict || jfCaseOnPath(tree, p, strings.EqualFold)
			dup = dup || jfDuplicateOnPath(tree, p)
			nonString = nonString || jfNonStringOnPath(tree, p, false)
			for j, q := range paths {
				if i != j && len(p) < len(q) && fmt.Sprint(q[:len(p)]) == fmt.Sprint(p) {
					nonString = nonString || jfNonStringOnPath(tree, p, true)
				}
			}
		}
		switch err {
		case ErrJSON:
			t.Fatalf("refused %q as malformed; encoding/json accepts it", doc)
		case ErrJSONDuplicate:
			if !dup {
				t.Fatalf("%q: duplicate reported, but no path has a duplicate key", doc)
			}
			return
		case ErrJSONType:
			if !nonString {
				t.Fatalf("%q: type error reported, but no path ends in a non-string", doc)
			}
			return
		case ErrJSONCase:
			if !loose {
				t.Fatalf("%q: case error reported, but no key on a path is a case variant of its name", doc)
			}
			return
		}
		if strict {
			t.Fatalf("%q: accepted with a key on a path that strings.EqualFold matches to its name", doc)
		}
		if dup {
			t.Fatalf("%q: accepted with a duplicate key on a path", doc)
		}
		if nonString {
			t.Fatalf("%q: accepted with a non-string value on a path", doc)
		}
		var v any
		dec := json.NewDecoder(bytes.NewReader(doc))
		dec.UseNumber()
		if err := dec.Decode(&v); err != nil {
			t.Fatalf("encoding/json: %v", err)
		}
		for i, p := range paths {
			want, ok := jfLookup(v, p)
			if ok != found[i] {
				t.Fatalf("%q: path %q found = %v, encoding/json: %v", doc, p, found[i], ok)
			}
			if ok && want.(string) != vals[i] {
				t.Fatalf("%q: path %q = %q, encoding/json reads %q", doc, p, vals[i], want)
			}
		}
	})
}

// TestCtlHigh checks the word-at-a-time scan against a byte loop, for a
// control character or a high byte at every position of strings of every
// length up to 80, next to all kinds of neighbours.
func TestCtlHigh(t *testing.T) {
	for n := 0; n <= 80; n++ {
		for pos := 0; pos < n; pos++ {
			for _, c := range []byte{0x00, 0x01, 0x1f, 0x20, 0x21, 0x7f, 0x80, 0x9f, 0xff} {
				for _, fill := range []byte{'a', 0x20, 0x7f, 0xc3} {
					b := bytes.Repeat([]byte{fill}, n)
					b[pos] = c
					wantCtl, wantHigh := false, false
					for _, x := range b {
						wantCtl = wantCtl || x < 0x20
						wantHigh = wantHigh || x >= 0x80
					}
					if ctl, high := ctlHigh(b); ctl != wantCtl || high != wantHigh {
						t.Fatalf("ctlHigh(%x) = %v, %v; want %v, %v", b, ctl, high, wantCtl, wantHigh)
					}
				}
			}
		}
	}
}

// TestExtractJSONFieldsLongStrings puts one special byte sequence at every
// position of long string values (where the scan switches to
// bytes.IndexByte) and checks validity and the value against encoding/json.
func TestExtractJSONFieldsLongStrings(t *testing.T) {
	specials := []string{`\"`, `\\`, `\n`, `\u00e9`, "\x01", "\x1f", "é", "\xff", "\xc3", "😀", "\xed\xa0\x80", `\x`, `"`}
	paths := []FieldPath{{"room"}}
	vals := make([]string, 1)
	found := make([]bool, 1)
	for n := 17; n <= 90; n += 7 {
		for pos := 0; pos <= n; pos++ {
			for _, sp := range specials {
				val := strings.Repeat("a", pos) + sp + strings.Repeat("b", n-pos)
				doc := []byte(`{"room":"` + val + `","p":"` + val + `"}`)
				var ref struct{ Room string }
				refErr := json.Unmarshal(doc, &ref)
				if refErr == nil && !utf8.Valid(doc) {
					refErr = errors.New("invalid UTF-8") // encoding/json replaces it; we refuse
				}
				err := ExtractJSONFields(doc, paths, vals, found)
				if (err == nil) != (refErr == nil) {
					t.Fatalf("%q: err %v, encoding/json %v", doc, err, refErr)
				}
				if err == nil && (!found[0] || vals[0] != ref.Room) {
					t.Fatalf("%q: got %q, want %q", doc, vals[0], ref.Room)
				}
			}
		}
	}
}

// TestExtractJSONFieldBytes: values without escapes are slices of the
// document and cost no allocation; escaped ones are unescaped copies.
func TestExtractJSONFieldBytes(t *testing.T) {
	doc := []byte(`{"type":"say","room":"org:acme:1","p":"x"}`)
	paths := []FieldPath{{"room"}, {"type"}}
	vals := make([][]byte, 2)
	found := make([]bool, 2)
	allocs := testing.AllocsPerRun(100, func() {
		if err := ExtractJSONFieldBytes(doc, paths, vals, found); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("%v allocations per call, want 0", allocs)
	}
	if string(vals[0]) != "org:acme:1" || string(vals[1]) != "say" || !found[0] || !found[1] {
		t.Fatalf("got %q %q %v", vals[0], vals[1], found)
	}
	if i := bytes.Index(doc, vals[0]); i < 0 || &doc[i] != &vals[0][0] {
		t.Error("an unescaped value is not a slice of the document")
	}
	doc = []byte(`{"type":"s\u0061y","room":"org:acme:1"}`)
	if err := ExtractJSONFieldBytes(doc, paths, vals, found); err != nil || string(vals[1]) != "say" {
		t.Fatalf("escaped: %q %v", vals[1], err)
	}
}
