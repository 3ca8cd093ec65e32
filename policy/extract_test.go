package policy

import (
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

// request builds a request from a URL and header lines ("Name: value",
// repeated names make repeated headers).
func newTestRequest(t *testing.T, target string, headers ...string) *http.Request {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	r := &http.Request{Method: http.MethodGet, URL: u, Header: http.Header{}}
	for _, h := range headers {
		name, value, ok := strings.Cut(h, ": ")
		if !ok {
			t.Fatalf("bad header line %q", h)
		}
		r.Header.Add(name, value)
	}
	return r
}

func TestExtractToken(t *testing.T) {
	var (
		header   = TokenSource{Kind: FromHeader, Name: "Authorization"}
		custom   = TokenSource{Kind: FromHeader, Name: "X-Token"}
		query    = TokenSource{Kind: FromQuery, Name: "access_token"}
		cookie   = TokenSource{Kind: FromCookie, Name: "session"}
		protocol = TokenSource{Kind: FromProtocol, Name: "bearer"}
	)
	tests := []struct {
		name    string
		target  string
		headers []string
		sources []TokenSource
		want    string      // "" = not found
		from    TokenSource // where it was found
	}{
		// header
		{"bearer", "/", []string{"Authorization: Bearer abc"}, []TokenSource{header}, "abc", header},
		{"default sources", "/", []string{"Authorization: Bearer abc"}, nil, "abc", header},
		{"bearer in lower case", "/", []string{"Authorization: bearer abc"}, []TokenSource{header}, "abc", header},
		{"bearer in upper case", "/", []string{"Authorization: BEARER abc"}, []TokenSource{header}, "abc", header},
		{"bearer in mixed case", "/", []string{"Authorization: bEaReR abc"}, []TokenSource{header}, "abc", header},
		{"spaces around the token", "/", []string{"Authorization: Bearer   abc  "}, []TokenSource{header}, "abc", header},
		{"header name in lower case", "/", []string{"authorization: Bearer abc"}, []TokenSource{header}, "abc", header},
		{"basic scheme", "/", []string{"Authorization: Basic dXNlcjpwdw=="}, []TokenSource{header}, "", TokenSource{}},
		{"no scheme", "/", []string{"Authorization: abc"}, []TokenSource{header}, "", TokenSource{}},
		{"scheme only", "/", []string{"Authorization: Bearer"}, []TokenSource{header}, "", TokenSource{}},
		{"scheme and a space", "/", []string{"Authorization: Bearer "}, []TokenSource{header}, "", TokenSource{}},
		{"bearer glued to the token", "/", []string{"Authorization: Bearerabc"}, []TokenSource{header}, "", TokenSource{}},
		{"two Authorization headers", "/", []string{"Authorization: Bearer a", "Authorization: Bearer b"}, []TokenSource{header}, "", TokenSource{}},
		{"two Authorization headers, then a query", "/?access_token=q", []string{"Authorization: Bearer a", "Authorization: Bearer b"}, []TokenSource{header, query}, "q", query},
		{"custom header", "/", []string{"X-Token: Bearer abc"}, []TokenSource{custom}, "abc", custom},
		{"custom header without the scheme", "/", []string{"X-Token: abc"}, []TokenSource{custom}, "", TokenSource{}},
		{"custom header, Authorization ignored", "/", []string{"Authorization: Bearer abc"}, []TokenSource{custom}, "", TokenSource{}},

		// query
		{"query", "/?access_token=abc", nil, []TokenSource{query}, "abc", query},
		{"query among others", "/?a=1&access_token=abc&b=2", nil, []TokenSource{query}, "abc", query},
		{"query, first of two", "/?access_token=one&access_token=two", nil, []TokenSource{query}, "one", query},
		{"query, encoded name", "/?access%5Ftoken=abc", nil, []TokenSource{query}, "abc", query},
		{"query, encoded value", "/?access_token=a%2Bb%3D%3D", nil, []TokenSource{query}, "a+b==", query},
		{"query, plus is a space", "/?access_token=a+b", nil, []TokenSource{query}, "a b", query},
		{"query, bad escape", "/?access_token=%zz", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, empty value", "/?access_token=", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, no value", "/?access_token", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, longer name", "/?xaccess_token=abc", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, shorter name", "/?access=abc", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, name in another case", "/?ACCESS_TOKEN=abc", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, semicolon is not a separator", "/?a=1;access_token=abc", nil, []TokenSource{query}, "", TokenSource{}},
		{"query, no query", "/", nil, []TokenSource{query}, "", TokenSource{}},

		// cookie
		{"cookie", "/", []string{"Cookie: session=abc"}, []TokenSource{cookie}, "abc", cookie},
		{"cookie among others", "/", []string{"Cookie: a=1; session=abc; b=2"}, []TokenSource{cookie}, "abc", cookie},
		{"cookie in a second Cookie header", "/", []string{"Cookie: a=1", "Cookie: session=abc"}, []TokenSource{cookie}, "abc", cookie},
		{"cookie, quoted", "/", []string{`Cookie: session="abc"`}, []TokenSource{cookie}, "abc", cookie},
		{"cookie, empty", "/", []string{"Cookie: session="}, []TokenSource{cookie}, "", TokenSource{}},
		{"cookie, other name", "/", []string{"Cookie: sessionx=abc"}, []TokenSource{cookie}, "", TokenSource{}},
		{"cookie, none", "/", nil, []TokenSource{cookie}, "", TokenSource{}},

		// protocol
		{"protocol", "/", []string{"Sec-WebSocket-Protocol: chat, bearer, abc"}, []TokenSource{protocol}, "abc", protocol},
		{"protocol first", "/", []string{"Sec-WebSocket-Protocol: bearer, abc, chat"}, []TokenSource{protocol}, "abc", protocol},
		{"protocol without spaces", "/", []string{"Sec-WebSocket-Protocol: bearer,abc"}, []TokenSource{protocol}, "abc", protocol},
		{"protocol over two headers", "/", []string{"Sec-WebSocket-Protocol: chat, bearer", "Sec-WebSocket-Protocol: abc"}, []TokenSource{protocol}, "abc", protocol},
		{"protocol, marker at the end", "/", []string{"Sec-WebSocket-Protocol: chat, bearer"}, []TokenSource{protocol}, "", TokenSource{}},
		{"protocol, marker alone", "/", []string{"Sec-WebSocket-Protocol: bearer"}, []TokenSource{protocol}, "", TokenSource{}},
		{"protocol, marker then empty entries", "/", []string{"Sec-WebSocket-Protocol: bearer, , "}, []TokenSource{protocol}, "", TokenSource{}},
		{"protocol, marker in another case", "/", []string{"Sec-WebSocket-Protocol: Bearer, abc"}, []TokenSource{protocol}, "", TokenSource{}},
		{"protocol, custom marker", "/", []string{"Sec-WebSocket-Protocol: access_token, abc"},
			[]TokenSource{{Kind: FromProtocol, Name: "access_token"}}, "abc", TokenSource{Kind: FromProtocol, Name: "access_token"}},
		{"protocol, no marker", "/", []string{"Sec-WebSocket-Protocol: chat, abc"}, []TokenSource{protocol}, "", TokenSource{}},

		// order
		{"header before query", "/?access_token=q", []string{"Authorization: Bearer h"}, []TokenSource{header, query}, "h", header},
		{"query before header", "/?access_token=q", []string{"Authorization: Bearer h"}, []TokenSource{query, header}, "q", query},
		{"cookie before protocol", "/", []string{"Cookie: session=c", "Sec-WebSocket-Protocol: bearer, p"}, []TokenSource{cookie, protocol}, "c", cookie},
		{"protocol before cookie", "/", []string{"Cookie: session=c", "Sec-WebSocket-Protocol: bearer, p"}, []TokenSource{protocol, cookie}, "p", protocol},
		{"first source empty", "/?access_token=q", []string{"Cookie: other=1"}, []TokenSource{cookie, header, query}, "q", query},
		{"first source unusable", "/?access_token=q", []string{"Authorization: Basic x"}, []TokenSource{header, query}, "q", query},
		{"nothing anywhere", "/", nil, []TokenSource{header, query, cookie, protocol}, "", TokenSource{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ex, ok := ExtractToken(newTestRequest(t, tt.target, tt.headers...), tt.sources)
			if tt.want == "" {
				if ok {
					t.Fatalf("found %+v, want nothing", ex)
				}
				return
			}
			if !ok {
				t.Fatalf("not found, want %q", tt.want)
			}
			if ex.Token != tt.want || ex.Source != tt.from {
				t.Errorf("found %q from %+v, want %q from %+v", ex.Token, ex.Source, tt.want, tt.from)
			}
		})
	}
}

func TestParseSource(t *testing.T) {
	tests := []struct {
		kind, name string
		want       TokenSource
		err        string
	}{
		{"header", "", TokenSource{Kind: FromHeader, Name: "Authorization"}, ""},
		{"header", "X-Token", TokenSource{Kind: FromHeader, Name: "X-Token"}, ""},
		{"protocol", "", TokenSource{Kind: FromProtocol, Name: "bearer"}, ""},
		{"protocol", "access_token", TokenSource{Kind: FromProtocol, Name: "access_token"}, ""},
		{"query", "t", TokenSource{Kind: FromQuery, Name: "t"}, ""},
		{"cookie", "s", TokenSource{Kind: FromCookie, Name: "s"}, ""},
		{"query", "", TokenSource{}, "needs a name"},
		{"cookie", "", TokenSource{}, "needs a name"},
		{"body", "x", TokenSource{}, `unknown token source "body"`},
		{"Header", "", TokenSource{}, "unknown token source"},
		{"", "", TokenSource{}, "unknown token source"},
	}
	for _, tt := range tests {
		t.Run(tt.kind+" "+tt.name, func(t *testing.T) {
			got, err := ParseSource(tt.kind, tt.name)
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("error = %v, want one containing %q", err, tt.err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Errorf("ParseSource = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestStripProtocolToken(t *testing.T) {
	tests := []struct {
		name   string
		values []string
		marker string
		want   []string
	}{
		{"token after other protocols", []string{"chat, bearer, abc"}, "bearer", []string{"chat"}},
		{"token before other protocols", []string{"bearer, abc, chat, v2"}, "bearer", []string{"chat", "v2"}},
		{"only the token", []string{"bearer, abc"}, "bearer", nil},
		{"over several headers", []string{"chat", "bearer", "abc"}, "bearer", []string{"chat"}},
		{"spaces and empty entries", []string{" chat ,, bearer ,abc , "}, "bearer", []string{"chat"}},
		{"marker at the end stays", []string{"chat, bearer"}, "bearer", []string{"chat", "bearer"}},
		{"no marker", []string{"chat, v2"}, "bearer", []string{"chat", "v2"}},
		{"marker twice", []string{"bearer, a, chat, bearer, b"}, "bearer", []string{"chat"}},
		{"token offered again", []string{"abc, bearer, abc, chat"}, "bearer", []string{"chat"}},
		{"custom marker", []string{"access_token, abc, chat"}, "access_token", []string{"chat"}},
		{"nothing", nil, "bearer", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := StripProtocolToken(tt.values, tt.marker)
			if len(got) != len(tt.want) || (len(got) > 0 && !reflect.DeepEqual(got, tt.want)) {
				t.Errorf("StripProtocolToken(%q, %q) = %q, want %q", tt.values, tt.marker, got, tt.want)
			}
		})
	}
}

// TestStripProtocolTokenKeepsInput checks that the header values passed in
// are not modified (the request is still logged and used afterwards).
func TestStripProtocolTokenKeepsInput(t *testing.T) {
	values := []string{"chat, bearer, abc", "v2"}
	StripProtocolToken(values, "bearer")
	if want := []string{"chat, bearer, abc", "v2"}; !reflect.DeepEqual(values, want) {
		t.Errorf("input changed to %q", values)
	}
}

func TestRedactQuery(t *testing.T) {
	tests := []struct {
		name, raw string
		names     []string
		want      string
	}{
		{"one parameter", "access_token=abc", []string{"access_token"}, "access_token=REDACTED"},
		{"among others", "a=1&access_token=abc&b=2", []string{"access_token"}, "a=1&access_token=REDACTED&b=2"},
		{"repeated", "t=1&t=2", []string{"t"}, "t=REDACTED&t=REDACTED"},
		{"encoded name", "access%5Ftoken=abc", []string{"access_token"}, "access%5Ftoken=REDACTED"},
		{"without a value", "t", []string{"t"}, "t=REDACTED"},
		{"several names", "t=1&u=2&v=3", []string{"t", "v"}, "t=REDACTED&u=2&v=REDACTED"},
		{"other names kept", "tt=1&xt=2", []string{"t"}, "tt=1&xt=2"},
		{"no names", "t=1", nil, "t=1"},
		{"empty", "", []string{"t"}, ""},
		{"empty pieces", "&&t=1&", []string{"t"}, "&&t=REDACTED&"},
		{"a JWT under another name", "a=1&jwt=eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2ln", []string{"t"}, "a=1&jwt=REDACTED"},
		{"an escaped JWT", "x=eyJhbGciOiJIUzI1NiJ9%2EeyJzdWIiOiJ1In0%2Ec2ln", nil, "x=REDACTED"},
		{"dotted values that are not JWTs", "v=1.2.3&host=a.example.com&ip=10.0.0.1", nil, "v=1.2.3&host=a.example.com&ip=10.0.0.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := RedactQuery(tt.raw, tt.names...); got != tt.want {
				t.Errorf("RedactQuery(%q, %q) = %q, want %q", tt.raw, tt.names, got, tt.want)
			}
		})
	}
}

func TestRedact(t *testing.T) {
	const jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"
	sources := []TokenSource{{FromHeader, "Authorization"}, {FromHeader, "X-Token"}, {FromQuery, "access_token"}, {FromProtocol, "bearer"}}
	tests := []struct {
		name      string
		target    string
		header    http.Header
		want      Redacted
		protocols string
	}{
		{"nothing to hide", "/ws?room=1", nil, Redacted{URI: "/ws?room=1"}, ""},
		{"the query source", "/ws?access_token=opaque&room=1", nil, Redacted{URI: "/ws?access_token=REDACTED&room=1", Hidden: true}, ""},
		{"a JWT in another parameter", "/ws?t=" + jwt, nil, Redacted{URI: "/ws?t=REDACTED", Hidden: true}, ""},
		{"the token after the marker", "/ws", http.Header{"Sec-Websocket-Protocol": {"chat, bearer, opaque"}},
			Redacted{URI: "/ws", Hidden: true}, "chat bearer REDACTED"},
		{"a JWT without the marker", "/ws", http.Header{"Sec-Websocket-Protocol": {"chat", jwt}},
			Redacted{URI: "/ws", Hidden: true}, "chat REDACTED"},
		{"subprotocols only", "/ws", http.Header{"Sec-Websocket-Protocol": {"chat, v2.json"}},
			Redacted{URI: "/ws"}, "chat v2.json"},
		{"a header Caddy does not redact", "/ws", http.Header{"X-Token": {"opaque"}}, Redacted{URI: "/ws", Hidden: true}, ""},
		{"the Authorization header, which Caddy redacts", "/ws", http.Header{"Authorization": {"Bearer " + jwt}}, Redacted{URI: "/ws"}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tt.target, nil)
			for k, v := range tt.header {
				r.Header[k] = v
			}
			got := Redact(r, sources)
			if got.URI != tt.want.URI || got.Hidden != tt.want.Hidden || strings.Join(got.Protocols, " ") != tt.protocols {
				t.Fatalf("Redact = %+v, want %+v with protocols %q", got, tt.want, tt.protocols)
			}
		})
	}
}
