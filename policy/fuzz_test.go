package policy

import (
	"context"
	"crypto/hmac"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

// The seeds of these targets are in testdata/fuzz/<target>/.

// FuzzOriginCheck compiles a random allow-list entry (an empty one means
// the same-origin default) and checks a random Origin against it. Whatever
// the input, nothing panics, and what is allowed is allowed for a reason:
// an exact entry matched byte for byte, a wildcard by scheme, port and a
// lower-case host under its domain, the same-origin default by the Host.
func FuzzOriginCheck(f *testing.F) {
	f.Fuzz(func(t *testing.T, entry, origin, host string) {
		var allowed []string
		if entry != "" {
			allowed = []string{entry}
		}
		p, err := NewOriginPolicy(allowed, false)
		if err != nil {
			return
		}
		err = p.Check([]string{origin}, host)
		if err != nil {
			if !errors.Is(err, ErrOrigin) {
				t.Fatalf("error %q is not ErrOrigin", err)
			}
			return
		}
		if origin != strings.ToLower(origin) {
			t.Fatalf("allowed Origin %q is not lower case", origin)
		}
		scheme, authority, ok := strings.Cut(origin, "://")
		if !ok {
			t.Fatalf("allowed Origin %q has no scheme", origin)
		}

		if entry == "" {
			lowHost := strings.ToLower(host)
			if scheme != "http" && scheme != "https" {
				t.Fatalf("same origin allowed scheme %q", scheme)
			}
			if authority != lowHost && lowHost != authority+":"+defaultPort(scheme) {
				t.Fatalf("same origin allowed %q for Host %q", origin, host)
			}
			return
		}

		u, err := url.Parse(entry)
		if err != nil {
			t.Fatalf("entry %q compiled but does not parse: %v", entry, err)
		}
		if !strings.HasPrefix(u.Host, "*.") {
			if want := strings.TrimSuffix(entry, "/"); origin != want {
				t.Fatalf("exact entry %q allowed %q", entry, origin)
			}
			return
		}

		// a wildcard: scheme://<labels><suffix>[:port], nothing else
		suffix := strings.TrimPrefix(u.Hostname(), "*") // ".example.com"
		if scheme != u.Scheme {
			t.Fatalf("wildcard %q allowed scheme %q", entry, scheme)
		}
		h := authority
		if port := u.Port(); port != "" {
			var ok bool
			if h, ok = strings.CutSuffix(authority, ":"+port); !ok {
				t.Fatalf("wildcard %q allowed %q without its port", entry, origin)
			}
		}
		if !strings.HasSuffix(h, suffix) || len(h) == len(suffix) {
			t.Fatalf("wildcard %q allowed host %q", entry, h)
		}
		for _, label := range strings.Split(strings.TrimSuffix(h, suffix), ".") {
			if label == "" || strings.Trim(label, "abcdefghijklmnopqrstuvwxyz0123456789-") != "" {
				t.Fatalf("wildcard %q allowed host %q (label %q)", entry, h, label)
			}
		}
	})
}

// FuzzExtractToken puts random values in the Authorization header (one
// value per line), the query, the Cookie header and Sec-WebSocket-Protocol
// (one value per line), and reads them with every kind of source. Nothing
// panics; a token comes from its source's raw input; sources are tried in
// order; StripProtocolToken drops the protocol token; RedactQuery hides the
// query token.
func FuzzExtractToken(f *testing.F) {
	f.Fuzz(func(t *testing.T, authz, query, cookie, protocol, name string) {
		r := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: query}}
		if authz != "" {
			r.Header["Authorization"] = strings.Split(authz, "\n")
		}
		if cookie != "" {
			r.Header["Cookie"] = []string{cookie}
		}
		if protocol != "" {
			r.Header["Sec-Websocket-Protocol"] = strings.Split(protocol, "\n")
		}

		var sources []TokenSource
		for _, kind := range []string{"header", "query", "cookie", "protocol"} {
			n := name
			if kind == "header" {
				n = ""
			}
			if s, err := ParseSource(kind, n); err == nil {
				sources = append(sources, s)
			}
		}

		var first *Extracted
		for _, s := range sources {
			ex, ok := ExtractToken(r, []TokenSource{s})
			if !ok {
				if ex != (Extracted{}) {
					t.Fatalf("%s: not found but returned %+v", s.Kind, ex)
				}
				continue
			}
			if ex.Token == "" || ex.Source != s {
				t.Fatalf("%s: found %+v", s.Kind, ex)
			}
			if first == nil {
				first = &ex
			}
			tok := ex.Token
			switch s.Kind {
			case FromHeader:
				v := r.Header.Values("Authorization")
				if len(v) != 1 || !strings.Contains(v[0], tok) {
					t.Fatalf("header token %q is not in %q", tok, v)
				}
				scheme, _, _ := strings.Cut(v[0], " ")
				if !strings.EqualFold(scheme, "bearer") {
					t.Fatalf("header token %q read from scheme %q", tok, scheme)
				}
			case FromQuery:
				if !queryHas(query, s.Name, tok) {
					t.Fatalf("query token %q is not the value of %q in %q", tok, s.Name, query)
				}
				redacted := RedactQuery(query, s.Name)
				r2 := &http.Request{Header: http.Header{}, URL: &url.URL{RawQuery: redacted}}
				if ex2, ok := ExtractToken(r2, []TokenSource{s}); ok && ex2.Token != "REDACTED" {
					t.Fatalf("after RedactQuery(%q) = %q the token reads %q", query, redacted, ex2.Token)
				}
			case FromCookie:
				if !strings.Contains(cookie, tok) {
					t.Fatalf("cookie token %q is not in %q", tok, cookie)
				}
			case FromProtocol:
				if !strings.Contains(protocol, tok) || strings.Contains(tok, ",") {
					t.Fatalf("protocol token %q is not an entry of %q", tok, protocol)
				}
				stripped := StripProtocolToken(r.Header.Values("Sec-Websocket-Protocol"), s.Name)
				if slices.Contains(stripped, tok) {
					t.Fatalf("StripProtocolToken(%q, %q) = %q still holds the token %q", protocol, s.Name, stripped, tok)
				}
			}
		}

		all, ok := ExtractToken(r, sources)
		if ok != (first != nil) || (ok && all != *first) {
			t.Fatalf("all sources found %+v (%v), the first that finds alone %+v", all, ok, first)
		}

		for _, e := range StripProtocolToken(r.Header.Values("Sec-Websocket-Protocol"), name) {
			if e == "" || strings.Contains(e, ",") {
				t.Fatalf("StripProtocolToken(%q) returned entry %q", protocol, e)
			}
		}
	})
}

// queryHas reports whether raw has a parameter named name (as written or
// unescaped) whose unescaped value is value.
func queryHas(raw, name, value string) bool {
	for _, kv := range strings.Split(raw, "&") {
		k, v, _ := strings.Cut(kv, "=")
		uk, errK := url.QueryUnescape(k)
		uv, errV := url.QueryUnescape(v)
		if (k == name || errK == nil && uk == name) && errV == nil && uv == value {
			return true
		}
	}
	return false
}

// fuzzVerifyConfig is the verifier FuzzVerify attacks: two HMAC keys, one
// without kid and one with kid k2.
func fuzzVerifyConfig() JWTConfig {
	return JWTConfig{
		Issuers: []IssuerConfig{{Keys: []KeyConfig{
			{Secret: hmacSecret, Algorithms: []string{"HS256", "HS384", "HS512"}},
			{ID: "k2", Secret: hmacSecret2, Algorithms: []string{"HS256"}},
		}}},
		Now: func() time.Time { return verifyNow },
	}
}

// verifySeeds are tokens for FuzzVerify, valid and not; they are also
// stored in testdata/fuzz/FuzzVerify.
func verifySeeds(t testing.TB) map[string]string {
	return map[string]string{
		"hs256":           mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil)),
		"hs384":           mintJWT(t, "HS384", "", hmacSecret, claimsAt(nil)),
		"hs512":           mintJWT(t, "HS512", "", hmacSecret, claimsAt(map[string]any{"org": map[string]any{"id": "acme"}})),
		"kid_k2":          mintJWT(t, "HS256", "k2", hmacSecret2, claimsAt(nil)),
		"kid_k2_hs384":    mintJWT(t, "HS384", "k2", hmacSecret2, claimsAt(nil)),
		"kid_k2_wrongkey": mintJWT(t, "HS256", "k2", hmacSecret, claimsAt(nil)),
		"expired":         mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": verifyNow.Add(-time.Second).Unix()})),
		"nbf_future":      mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"nbf": verifyNow.Add(time.Second).Unix()})),
		"no_exp":          mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": nil})),
		"aud_iss":         mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"aud": []string{"a", "b"}, "iss": "https://idp.test"})),
		"alg_none":        mintJWTRaw(t, nil, map[string]any{"alg": "none"}, claimsAt(nil)),
		"dots":            "..",
		"garbage":         "eyJhbGciOiJIUzI1NiJ9.e30.",
	}
}

// FuzzVerify feeds random strings to a Verifier with HMAC keys. Nothing
// panics, no error repeats the token, and whatever is accepted is a token
// validly signed with one of the test's secrets (checked here without
// golang-jwt) and valid at the test's clock: mutating a good token never
// makes another good one.
func FuzzVerify(f *testing.F) {
	for _, tok := range verifySeeds(f) {
		f.Add(tok)
	}
	v, err := NewVerifier(context.Background(), fuzzVerifyConfig())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, token string) {
		claims, err := v.Verify(context.Background(), token)
		if err != nil {
			if !errors.Is(err, ErrToken) {
				t.Fatalf("error %q is not ErrToken", err)
			}
			if len(token) > 64 && strings.Contains(err.Error(), token) {
				t.Fatalf("error %q repeats the token", err)
			}
			return
		}
		if reason := checkHMAC(token); reason != "" {
			t.Fatalf("accepted %q (claims %v), but %s", token, claims, reason)
		}
	})
}

// checkHMAC verifies token on its own, with the standard library, the way
// fuzzVerifyConfig says it must be; it returns why it is not valid, or "".
func checkHMAC(token string) string {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return "it does not have three segments"
	}
	dec := base64.RawURLEncoding
	hb, err1 := dec.DecodeString(parts[0])
	pb, err2 := dec.DecodeString(parts[1])
	sig, err3 := dec.DecodeString(parts[2])
	if err := errors.Join(err1, err2, err3); err != nil {
		return "a segment is not base64url: " + err.Error()
	}
	// a map, like golang-jwt: a struct would also take "ALG" for alg
	var header map[string]any
	if err := json.Unmarshal(hb, &header); err != nil {
		return "its header is not a JSON object"
	}
	alg, _ := header["alg"].(string)
	key, algs := hmacSecret, []string{"HS256", "HS384", "HS512"}
	if kid, ok := header["kid"]; ok {
		if kid != "k2" {
			return fmt.Sprintf("its kid %v names no key", kid)
		}
		key, algs = hmacSecret2, []string{"HS256"}
	}
	if !slices.Contains(algs, alg) {
		return "its alg " + alg + " is not allowed for its key"
	}
	_, newHash := hashFor(alg)
	m := hmac.New(newHash, key)
	m.Write([]byte(parts[0] + "." + parts[1]))
	if !hmac.Equal(m.Sum(nil), sig) {
		return "its signature is wrong"
	}
	var claims map[string]any
	if err := json.Unmarshal(pb, &claims); err != nil {
		return "its payload is not a JSON object"
	}
	now := float64(verifyNow.Unix())
	exp, ok := claims["exp"].(float64)
	if !ok || exp <= now {
		return "it has no exp in the future"
	}
	for _, c := range []string{"nbf", "iat"} {
		if v, ok := claims[c]; ok {
			if f, ok := v.(float64); !ok || f > now {
				return c + " is not in the past"
			}
		}
	}
	return ""
}

// TestFuzzVerifyOracle checks checkHMAC against the verifier on the seeds:
// if the two disagreed on them, FuzzVerify would prove nothing.
func TestFuzzVerifyOracle(t *testing.T) {
	v := newTestVerifier(t, fuzzVerifyConfig())
	accepted := 0
	for name, tok := range verifySeeds(t) {
		_, err := v.Verify(context.Background(), tok)
		reason := checkHMAC(tok)
		if (err == nil) != (reason == "") {
			t.Errorf("%s: verifier says %v, checkHMAC says %q", name, err, reason)
		}
		if err == nil {
			accepted++
		}
	}
	if accepted < 4 {
		t.Errorf("only %d seeds are valid tokens; mutating valid tokens is the point", accepted)
	}
}
