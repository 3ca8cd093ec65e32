package policy

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
)

// normalizeHeaderName folds case and treats '_' like '-', the way some
// servers (and CGI-style apps) read header names.
func normalizeHeaderName(s string) string {
	return strings.ReplaceAll(strings.ToLower(s), "_", "-")
}

// StripHeaders removes from h every header whose name, with case folded and
// '_' read as '-', equals one of names. Clients can then not spoof headers
// the gateway sets from claims (X_User_Id, x-user-id, …).
func StripHeaders(h http.Header, names []string) {
	if len(names) == 0 {
		return
	}
	want := make(map[string]bool, len(names))
	for _, n := range names {
		want[normalizeHeaderName(n)] = true
	}
	for k := range h {
		if want[normalizeHeaderName(k)] {
			delete(h, k)
		}
	}
}

// ClaimString renders a claim value for a header or placeholder: strings as
// they are, numbers and booleans in JSON form, arrays joined with commas.
// ok is false for a missing claim, objects and values with control
// characters (which could split a header).
func ClaimString(v any) (s string, ok bool) {
	switch t := v.(type) {
	case nil:
		return "", false
	case string:
		s = t
	case float64:
		s = fmt.Sprint(t)
		if t == float64(int64(t)) {
			s = fmt.Sprintf("%d", int64(t))
		}
	case bool:
		s = fmt.Sprint(t)
	case []any:
		parts := make([]string, 0, len(t))
		for _, e := range t {
			p, ok := ClaimString(e)
			if !ok {
				return "", false
			}
			parts = append(parts, p)
		}
		s = strings.Join(parts, ",")
	default:
		return "", false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] == 0x7f {
			return "", false
		}
	}
	return s, true
}

// Lookup finds a claim by dotted path ("org.id").
func (c Claims) Lookup(path string) (any, bool) {
	return lookupPath(c, strings.Split(path, "."))
}

// Flatten lists every claim that renders as a string, by dotted path, in a
// stable order (for placeholders).
func (c Claims) Flatten() [][2]string {
	var out [][2]string
	var walk func(prefix string, m map[string]any)
	walk = func(prefix string, m map[string]any) {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			if sub, ok := m[k].(map[string]any); ok {
				walk(prefix+k+".", sub)
				continue
			}
			if s, ok := ClaimString(m[k]); ok {
				out = append(out, [2]string{prefix + k, s})
			}
		}
	}
	walk("", c)
	return out
}
