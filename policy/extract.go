package policy

import (
	"fmt"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
)

// SourceKind says where a token is read from.
type SourceKind string

// Token sources.
const (
	// FromHeader reads "Authorization: Bearer <token>" (or another header
	// named by Name, with the same Bearer scheme).
	FromHeader SourceKind = "header"
	// FromQuery reads the query parameter Name.
	FromQuery SourceKind = "query"
	// FromCookie reads the cookie Name.
	FromCookie SourceKind = "cookie"
	// FromProtocol reads the Sec-WebSocket-Protocol entry that follows the
	// entry Name (the browser trick: new WebSocket(url, ["bearer", token])).
	FromProtocol SourceKind = "protocol"
)

// TokenSource is one place a token may come from.
type TokenSource struct {
	Kind SourceKind
	Name string
}

// DefaultSources are tried when none are configured.
var DefaultSources = []TokenSource{{Kind: FromHeader, Name: "Authorization"}}

// ParseSource reads "header [name]", "query <name>", "cookie <name>" or
// "protocol [marker]".
func ParseSource(kind, name string) (TokenSource, error) {
	s := TokenSource{Kind: SourceKind(kind), Name: name}
	switch s.Kind {
	case FromHeader:
		if s.Name == "" {
			s.Name = "Authorization"
		}
	case FromProtocol:
		if s.Name == "" {
			s.Name = "bearer"
		}
	case FromQuery, FromCookie:
		if s.Name == "" {
			return s, fmt.Errorf("token source %s needs a name", kind)
		}
	default:
		return s, fmt.Errorf("unknown token source %q: want header, query, cookie or protocol", kind)
	}
	return s, nil
}

// Extracted is a token found in a request.
type Extracted struct {
	Token  string
	Source TokenSource
}

// ExtractToken returns the first token found in the sources, in order.
func ExtractToken(r *http.Request, sources []TokenSource) (Extracted, bool) {
	if len(sources) == 0 {
		sources = DefaultSources
	}
	for _, s := range sources {
		var tok string
		switch s.Kind {
		case FromHeader:
			tok = bearer(r.Header.Values(s.Name))
		case FromQuery:
			tok = queryParam(r.URL.RawQuery, s.Name)
		case FromCookie:
			if c, err := r.Cookie(s.Name); err == nil {
				tok = c.Value
			}
		case FromProtocol:
			tok = protocolToken(r.Header.Values("Sec-Websocket-Protocol"), s.Name)
		}
		if tok != "" {
			return Extracted{Token: tok, Source: s}, true
		}
	}
	return Extracted{}, false
}

func bearer(values []string) string {
	if len(values) != 1 {
		return ""
	}
	scheme, tok, ok := strings.Cut(values[0], " ")
	if !ok || !strings.EqualFold(scheme, "bearer") {
		return ""
	}
	return strings.TrimSpace(tok)
}

func queryParam(raw, name string) string {
	for raw != "" {
		var kv string
		kv, raw, _ = strings.Cut(raw, "&")
		k, v, _ := strings.Cut(kv, "=")
		if k == name || (strings.ContainsAny(k, "%+") && unescape(k) == name) {
			return unescape(v)
		}
	}
	return ""
}

func unescape(s string) string {
	u, err := url.QueryUnescape(s)
	if err != nil {
		return ""
	}
	return u
}

// protocolEntries splits Sec-WebSocket-Protocol values into entries.
func protocolEntries(values []string) []string {
	var out []string
	for _, v := range values {
		for _, p := range strings.Split(v, ",") {
			if p = textproto.TrimString(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func protocolToken(values []string, marker string) string {
	e := protocolEntries(values)
	for i := 0; i+1 < len(e); i++ {
		if e[i] == marker {
			return e[i+1]
		}
	}
	return ""
}

// StripProtocolToken returns the offered subprotocols without the marker
// and the token that follows it, so neither reaches the upstream, and the
// token is never echoed back as the accepted subprotocol. The token is
// dropped wherever else it is offered too.
func StripProtocolToken(values []string, marker string) []string {
	tok := protocolToken(values, marker)
	e := protocolEntries(values)
	out := e[:0]
	for i := 0; i < len(e); i++ {
		if e[i] == marker && i+1 < len(e) {
			i++
			continue
		}
		if tok != "" && e[i] == tok {
			continue
		}
		out = append(out, e[i])
	}
	return out
}

// RedactQuery replaces the values of the named query parameters, and of
// any parameter whose value looks like a JWT.
func RedactQuery(raw string, names ...string) string {
	if raw == "" {
		return raw
	}
	parts := strings.Split(raw, "&")
	for i, kv := range parts {
		k, v, _ := strings.Cut(kv, "=")
		if looksLikeJWT(unescape(v)) || looksLikeJWT(v) {
			parts[i] = k + "=REDACTED"
			continue
		}
		for _, n := range names {
			if k == n || unescape(k) == n {
				parts[i] = k + "=REDACTED"
			}
		}
	}
	return strings.Join(parts, "&")
}

// Redacted is a request as a log line may show it.
type Redacted struct {
	// URI is the request's path and query, with token values replaced by
	// REDACTED.
	URI string
	// Protocols are the Sec-WebSocket-Protocol entries, token entries
	// replaced by REDACTED.
	Protocols []string
	// Hidden says whether Caddy's access log would show a token of this
	// request: in the query, in Sec-WebSocket-Protocol, or in a header
	// that Caddy does not redact (it does Authorization,
	// Proxy-Authorization and Cookie).
	Hidden bool
}

// Redact returns what of r may be logged when tokens are read from
// sources: query parameters and protocol entries that a source reads, and
// any value that looks like a JWT, wherever it is, are redacted.
func Redact(r *http.Request, sources []TokenSource) Redacted {
	var query, markers []string
	var out Redacted
	for _, s := range sources {
		switch s.Kind {
		case FromQuery:
			query = append(query, s.Name)
		case FromProtocol:
			markers = append(markers, s.Name)
		case FromHeader:
			switch textproto.CanonicalMIMEHeaderKey(s.Name) {
			case "Authorization", "Proxy-Authorization", "Cookie":
			default:
				out.Hidden = out.Hidden || len(r.Header.Values(s.Name)) > 0
			}
		}
	}
	out.URI = r.URL.EscapedPath()
	if q := r.URL.RawQuery; q != "" {
		rq := RedactQuery(q, query...)
		out.Hidden = out.Hidden || rq != q
		out.URI += "?" + rq
	}
	e := protocolEntries(r.Header.Values("Sec-Websocket-Protocol"))
	for i := 0; i < len(e); i++ {
		if i > 0 && slices.Contains(markers, e[i-1]) || looksLikeJWT(e[i]) {
			e[i] = "REDACTED"
			out.Hidden = true
		}
	}
	out.Protocols = e
	return out
}

// looksLikeJWT says whether s has the shape of a compact JWS or JWE: three
// or five base64url segments, the first long enough to be a header.
func looksLikeJWT(s string) bool {
	segs := strings.Split(s, ".")
	if (len(segs) != 3 && len(segs) != 5) || len(segs[0]) < 8 {
		return false
	}
	for _, seg := range segs {
		for i := 0; i < len(seg); i++ {
			c := seg[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '=') {
				return false
			}
		}
	}
	return true
}
