package policy

import (
	"encoding/json"
	"net/http"
	"reflect"
	"sort"
	"testing"
)

func TestStripHeaders(t *testing.T) {
	tests := []struct {
		name  string
		names []string
		in    http.Header // raw keys, as a server may store them
		want  []string    // keys left
	}{
		{"canonical", []string{"X-User-Id"},
			http.Header{"X-User-Id": {"spoof"}, "Cookie": {"a=1"}}, []string{"Cookie"}},
		{"case variants", []string{"X-User-Id"},
			http.Header{"x-user-id": {"1"}, "X-USER-ID": {"2"}, "x-User-iD": {"3"}, "Cookie": {"a=1"}}, []string{"Cookie"}},
		{"underscore variants", []string{"X-User-Id"},
			http.Header{"X_User_Id": {"1"}, "x_user_id": {"2"}, "X-User_Id": {"3"}, "Cookie": {"a=1"}}, []string{"Cookie"}},
		{"configured with underscores", []string{"x_user_id"},
			http.Header{"X-User-Id": {"1"}, "X_USER_ID": {"2"}}, nil},
		{"several names", []string{"X-User-Id", "X-Org"},
			http.Header{"X-User-Id": {"1"}, "X_Org": {"2"}, "X-Orgs": {"3"}}, []string{"X-Orgs"}},
		{"similar names kept", []string{"X-User-Id"},
			http.Header{"X-User-Idx": {"1"}, "X-User": {"2"}, "XUser-Id": {"3"}, "X-User-Id-": {"4"}},
			[]string{"X-User", "X-User-Id-", "X-User-Idx", "XUser-Id"}},
		{"no names", nil, http.Header{"X-User-Id": {"1"}}, []string{"X-User-Id"}},
		{"empty header", []string{"X-User-Id"}, http.Header{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			StripHeaders(tt.in, tt.names)
			var got []string
			for k := range tt.in {
				got = append(got, k)
			}
			sort.Strings(got)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("headers left %q, want %q", got, tt.want)
			}
		})
	}
}

func TestClaimString(t *testing.T) {
	tests := []struct {
		name string
		v    any
		want string
		ok   bool
	}{
		{"string", "u-7", "u-7", true},
		{"empty string", "", "", true},
		{"unicode", "Zoë 東京", "Zoë 東京", true},
		{"integer", 42.0, "42", true},
		{"negative integer", -3.0, "-3", true},
		{"zero", 0.0, "0", true},
		{"large integer", 1700000000.0, "1700000000", true},
		{"2^53", 9007199254740992.0, "9007199254740992", true},
		{"fraction", 1.5, "1.5", true},
		{"huge", 1e300, "1e+300", true},
		{"true", true, "true", true},
		{"false", false, "false", true},
		{"array of strings", []any{"a", "b"}, "a,b", true},
		{"array of mixed", []any{"a", 1.0, true}, "a,1,true", true},
		{"nested arrays", []any{"a", []any{"b", "c"}}, "a,b,c", true},
		{"empty array", []any{}, "", true},
		{"missing", nil, "", false},
		{"object", map[string]any{"id": "x"}, "", false},
		{"array with an object", []any{"a", map[string]any{}}, "", false},
		{"array with null", []any{"a", nil}, "", false},
		{"newline", "a\nX-Admin: 1", "", false},
		{"carriage return", "a\rb", "", false},
		{"tab", "a\tb", "", false},
		{"NUL", "a\x00b", "", false},
		{"DEL", "a\x7fb", "", false},
		{"control character in an array", []any{"a", "b\nc"}, "", false},
		{"unsupported type", struct{}{}, "", false},
		{"int (not from JSON)", 3, "", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, ok := ClaimString(tt.v)
			if got != tt.want || ok != tt.ok {
				t.Errorf("ClaimString(%#v) = %q, %v; want %q, %v", tt.v, got, ok, tt.want, tt.ok)
			}
		})
	}
}

// claimsJSON decodes claims the way the verifier does.
func claimsJSON(t *testing.T, s string) Claims {
	t.Helper()
	var c Claims
	if err := json.Unmarshal([]byte(s), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

func TestClaimsLookup(t *testing.T) {
	c := claimsJSON(t, `{"sub":"u-7","org":{"id":"acme","team":{"name":"core"}},"roles":["a","b"],"n":null,"a.b":"dotted"}`)
	tests := []struct {
		path string
		want any
		ok   bool
	}{
		{"sub", "u-7", true},
		{"org.id", "acme", true},
		{"org.team.name", "core", true},
		{"org", map[string]any{"id": "acme", "team": map[string]any{"name": "core"}}, true},
		{"roles", []any{"a", "b"}, true},
		{"n", nil, true},
		{"missing", nil, false},
		{"org.missing", nil, false},
		{"sub.x", nil, false},
		{"roles.0", nil, false},
		{"org.", nil, false},
		{".org", nil, false},
		{"", nil, false},
		{"a.b", nil, false}, // a dotted path never reads a key with a dot
	}
	for _, tt := range tests {
		t.Run(tt.path, func(t *testing.T) {
			got, ok := c.Lookup(tt.path)
			if ok != tt.ok || !reflect.DeepEqual(got, tt.want) {
				t.Errorf("Lookup(%q) = %#v, %v; want %#v, %v", tt.path, got, ok, tt.want, tt.ok)
			}
		})
	}
}

func TestClaimsFlatten(t *testing.T) {
	c := claimsJSON(t, `{"sub":"u-7","exp":1700000000,"org":{"id":"acme","team":{"name":"core"},"bad":"x\ny"},`+
		`"roles":["a","b"],"objs":[{"x":1}],"n":null,"admin":false,"empty":{}}`)
	want := [][2]string{
		{"admin", "false"},
		{"exp", "1700000000"},
		{"org.id", "acme"},
		{"org.team.name", "core"},
		{"roles", "a,b"},
		{"sub", "u-7"},
	}
	got := c.Flatten()
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Flatten() =\n%q\nwant\n%q", got, want)
	}
	if again := c.Flatten(); !reflect.DeepEqual(again, got) {
		t.Errorf("Flatten() is not stable: %q then %q", got, again)
	}
	if got := (Claims{}).Flatten(); len(got) != 0 {
		t.Errorf("empty claims flatten to %q", got)
	}
}

func TestClaimsSubject(t *testing.T) {
	tests := []struct {
		c    Claims
		want string
	}{
		{Claims{"sub": "u-7"}, "u-7"},
		{Claims{"sub": 7.0}, ""},
		{Claims{}, ""},
		{nil, ""},
	}
	for _, tt := range tests {
		if got := tt.c.Subject(); got != tt.want {
			t.Errorf("%v.Subject() = %q, want %q", tt.c, got, tt.want)
		}
	}
}
