package policy

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/fakeclock"
)

// verifyNow is the injected "now" of the verifier tests.
var verifyNow = time.Unix(1_700_000_000, 0)

var (
	hmacSecret  = []byte("0123456789abcdef0123456789abcdef") // 32 bytes, the minimum
	hmacSecret2 = []byte("fedcba9876543210fedcba9876543210")
)

// claimsAt are the claims of a token valid at verifyNow for an hour; extra
// entries replace or add claims, and a nil value removes one.
func claimsAt(extra map[string]any) map[string]any {
	c := map[string]any{
		"sub": "u-7",
		"iat": verifyNow.Add(-time.Minute).Unix(),
		"exp": verifyNow.Add(time.Hour).Unix(),
	}
	for k, v := range extra {
		if v == nil {
			delete(c, k)
			continue
		}
		c[k] = v
	}
	return c
}

// hsConfig is a verifier config with one unnamed issuer and one HMAC key.
func hsConfig(mod func(*JWTConfig)) JWTConfig {
	cfg := JWTConfig{
		Issuers: []IssuerConfig{{Keys: []KeyConfig{{Secret: hmacSecret}}}},
		Now:     func() time.Time { return verifyNow },
	}
	if mod != nil {
		mod(&cfg)
	}
	return cfg
}

func newTestVerifier(t *testing.T, cfg JWTConfig) *Verifier {
	t.Helper()
	if cfg.Now == nil {
		cfg.Now = func() time.Time { return verifyNow }
	}
	v, err := NewVerifier(t.Context(), cfg)
	if err != nil {
		t.Fatalf("NewVerifier: %v", err)
	}
	return v
}

// checkRefused asserts that err is a token refusal containing want and
// that it does not repeat the token.
func checkRefused(t *testing.T, err error, token, want string) {
	t.Helper()
	if err == nil {
		t.Fatalf("token accepted, want a refusal containing %q", want)
	}
	if !errors.Is(err, ErrToken) {
		t.Errorf("error %q is not ErrToken", err)
	}
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not contain %q", err, want)
	}
	if l := tokenLeaks(err.Error(), token); len(l) > 0 {
		t.Errorf("error %q repeats the token (%q)", err, l)
	}
}

func TestVerifyAlgorithms(t *testing.T) {
	k := testKeyPairs()
	tests := []struct {
		name, alg string
		key       KeyConfig
		signWith  any
	}{
		{"HS256 by default", "HS256", KeyConfig{Secret: hmacSecret}, hmacSecret},
		{"HS384", "HS384", KeyConfig{Secret: hmacSecret, Algorithms: []string{"HS384"}}, hmacSecret},
		{"HS512", "HS512", KeyConfig{Secret: hmacSecret, Algorithms: []string{"HS512"}}, hmacSecret},
		{"HS512 among several", "HS512", KeyConfig{Secret: hmacSecret, Algorithms: []string{"HS256", "HS384", "HS512"}}, hmacSecret},
		{"RS256 by default", "RS256", KeyConfig{PEM: publicPEM(t, &k.rsa.PublicKey)}, k.rsa},
		{"RS256 from a certificate", "RS256", KeyConfig{PEM: certPEM(t, k.rsa)}, k.rsa},
		{"RS512", "RS512", KeyConfig{PEM: publicPEM(t, &k.rsa.PublicKey), Algorithms: []string{"RS512"}}, k.rsa},
		{"PS256", "PS256", KeyConfig{PEM: publicPEM(t, &k.rsa.PublicKey), Algorithms: []string{"PS256"}}, k.rsa},
		{"ES256 by default on P-256", "ES256", KeyConfig{PEM: publicPEM(t, &k.p256.PublicKey)}, k.p256},
		{"ES384 by default on P-384", "ES384", KeyConfig{PEM: publicPEM(t, &k.p384.PublicKey)}, k.p384},
		{"ES256 from a certificate", "ES256", KeyConfig{PEM: certPEM(t, k.p256)}, k.p256},
		{"EdDSA", "EdDSA", KeyConfig{PEM: publicPEM(t, k.ed.Public())}, k.ed},
		{"EdDSA from a certificate", "EdDSA", KeyConfig{PEM: certPEM(t, k.ed)}, k.ed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := newTestVerifier(t, JWTConfig{Issuers: []IssuerConfig{{Keys: []KeyConfig{tt.key}}}})
			tok := mintJWT(t, tt.alg, "", tt.signWith, claimsAt(map[string]any{"org": map[string]any{"id": "acme"}}))
			c, err := v.Verify(context.Background(), tok)
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if c.Subject() != "u-7" {
				t.Errorf("sub = %q, want u-7", c.Subject())
			}
			if id, _ := c.Lookup("org.id"); id != "acme" {
				t.Errorf("org.id = %v, want acme", id)
			}
		})
	}
}

func TestVerifyRefusals(t *testing.T) {
	k := testKeyPairs()
	rsaPEM := publicPEM(t, &k.rsa.PublicKey)
	rsaKey := func(c *JWTConfig) { c.Issuers = []IssuerConfig{{Keys: []KeyConfig{{PEM: rsaPEM}}}} }
	valid := mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil))
	parts := strings.Split(valid, ".")
	otherPayload := jsonSeg(t, claimsAt(map[string]any{"sub": "admin"}))

	tests := []struct {
		name  string
		cfg   JWTConfig
		token string
		want  string // a substring of the error
	}{
		{"expired", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": verifyNow.Add(-time.Second).Unix()})), "expired"},
		{"not before in the future", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"nbf": verifyNow.Add(time.Minute).Unix()})), "not valid yet"},
		{"issued in the future", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"iat": verifyNow.Add(time.Minute).Unix()})), "not valid yet"},
		{"exp is not a number", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": "tomorrow"})), "malformed"},
		{"missing exp", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": nil})), "required claim missing"},
		{"wrong audience", hsConfig(func(c *JWTConfig) { c.Issuers[0].Audience = []string{"api", "admin"} }),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"aud": []string{"web"}})), "wrong audience"},
		{"audience required but absent", hsConfig(func(c *JWTConfig) { c.Issuers[0].Audience = []string{"api"} }),
			valid, "required claim missing"},
		{"wrong issuer", hsConfig(func(c *JWTConfig) { c.Issuers[0].Issuer = "https://idp.test" }),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"iss": "https://evil.test"})), "unknown issuer"},
		{"no issuer when one is configured", hsConfig(func(c *JWTConfig) { c.Issuers[0].Issuer = "https://idp.test" }),
			valid, "unknown issuer"},
		{"issuer is not a string", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"iss": 7})), "malformed"},
		{"signed with another secret", hsConfig(nil),
			mintJWT(t, "HS256", "", hmacSecret2, claimsAt(nil)), "bad signature"},
		{"payload swapped under a good signature", hsConfig(nil),
			parts[0] + "." + otherPayload + "." + parts[2], "bad signature"},
		{"signature cut short", hsConfig(nil),
			valid[:len(valid)-8], "bad signature"},
		{"signature removed", hsConfig(nil),
			parts[0] + "." + parts[1] + ".", "bad signature"},
		{"alg none without a signature", hsConfig(nil),
			mintJWTRaw(t, nil, map[string]any{"alg": "none", "typ": "JWT"}, claimsAt(nil)), "bad signature"},
		{"alg none with the HMAC signature", hsConfig(nil),
			jsonSeg(t, map[string]any{"alg": "none"}) + "." + parts[1] + "." + parts[2], "bad signature"},
		{"alg NONE", hsConfig(nil),
			mintJWTRaw(t, nil, map[string]any{"alg": "NONE"}, claimsAt(nil)), "malformed"},
		{"no alg", hsConfig(nil),
			mintJWTRaw(t, nil, map[string]any{"typ": "JWT"}, claimsAt(nil)), "malformed"},
		{"HS256 signed with the RSA public key PEM as secret", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: rsaPEM}}}},
		}, mintJWT(t, "HS256", "", rsaPEM, claimsAt(nil)), "bad signature"},
		{"HS256 signed with the PEM on a key allowing every RSA algorithm", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: rsaPEM, Algorithms: []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}}}}},
		}, mintJWT(t, "HS256", "", rsaPEM, claimsAt(nil)), "bad signature"},
		{"HS384 on a key that allows HS256 only", hsConfig(nil),
			mintJWT(t, "HS384", "", hmacSecret, claimsAt(nil)), "bad signature"},
		{"PS256 on an RSA key that allows RS256 only", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: rsaPEM}}}},
		}, mintJWT(t, "PS256", "", k.rsa, claimsAt(nil)), "bad signature"},
		{"RS256 signed by another RSA key", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: rsaPEM}}}},
		}, mintJWT(t, "RS256", "", k.rsa2, claimsAt(nil)), "bad signature"},
		{"ES256 signature in ASN.1 form", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: publicPEM(t, &k.p256.PublicKey)}}}},
		}, asn1ES256(t, claimsAt(nil)), "bad signature"},
		{"ES384 on a P-256 key", JWTConfig{
			Issuers: []IssuerConfig{{Keys: []KeyConfig{{PEM: publicPEM(t, &k.p256.PublicKey)}}}},
		}, mintJWT(t, "ES384", "", k.p384, claimsAt(nil)), "bad signature"},
		{"unknown kid", hsConfig(func(c *JWTConfig) { c.Issuers[0].Keys[0].ID = "k1" }),
			mintJWT(t, "HS256", "k2", hmacSecret, claimsAt(nil)), "unverifiable"},
		{"no kid when the key has one", hsConfig(func(c *JWTConfig) { c.Issuers[0].Keys[0].ID = "k1" }),
			valid, "unverifiable"},
		{"a kid when the key has none", hsConfig(nil),
			mintJWT(t, "HS256", "k1", hmacSecret, claimsAt(nil)), "unverifiable"},
		{"kid is not a string", hsConfig(nil),
			mintJWTRaw(t, hmacSecret, map[string]any{"alg": "HS256", "kid": 1}, claimsAt(nil)), "unverifiable"},
		{"an unknown critical header", hsConfig(nil),
			mintJWTRaw(t, hmacSecret, map[string]any{"alg": "HS256", "crit": []string{"foo"}, "foo": 1}, claimsAt(nil)), "unsupported critical header"},
		{"b64 listed as critical", hsConfig(nil),
			mintJWTRaw(t, hmacSecret, map[string]any{"alg": "HS256", "crit": []string{"b64"}, "b64": true}, claimsAt(nil)), "unsupported critical header"},
		{"an empty critical list", hsConfig(nil),
			mintJWTRaw(t, hmacSecret, map[string]any{"alg": "HS256", "crit": []string{}}, claimsAt(nil)), "unsupported critical header"},
		{"required claim missing", hsConfig(func(c *JWTConfig) { c.RequiredClaims = []string{"sub", "org"} }),
			valid, `claim "org" missing`},
		{"required claim null", hsConfig(func(c *JWTConfig) { c.RequiredClaims = []string{"org"} }),
			mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"org": nilJSON{}})), `claim "org" missing`},
		{"HS256 token on an issuer with only an RSA key", func() JWTConfig {
			c := hsConfig(nil)
			rsaKey(&c)
			return c
		}(), mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil)), "bad signature"},
		{"too large", hsConfig(func(c *JWTConfig) { c.MaxTokenSize = 64 }), valid, "too large"},
		{"empty", hsConfig(nil), "", "malformed"},
		{"one segment", hsConfig(nil), "abc", "malformed"},
		{"two segments", hsConfig(nil), parts[0] + "." + parts[1], "malformed"},
		{"four segments", hsConfig(nil), valid + ".x", "malformed"},
		{"only dots", hsConfig(nil), "..", "malformed"},
		{"header is not JSON", hsConfig(nil), b64url([]byte("{alg")) + "." + parts[1] + "." + parts[2], "malformed"},
		{"header is not base64", hsConfig(nil), "!!!." + parts[1] + "." + parts[2], "malformed"},
		{"payload is a JSON array", hsConfig(nil), mintJWTRaw(t, hmacSecret, map[string]any{"alg": "HS256"}, []int{1}), "malformed"},
		{"a megabyte of dots", hsConfig(nil), strings.Repeat(".", 1<<20), "too large"},
		{"a megabyte of dots under a megabyte limit", hsConfig(func(c *JWTConfig) { c.MaxTokenSize = 2 << 20 }),
			strings.Repeat(".", 1<<20), "malformed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := newTestVerifier(t, tt.cfg)
			c, err := v.Verify(context.Background(), tt.token)
			if err == nil {
				t.Fatalf("accepted with claims %v", c)
			}
			checkRefused(t, err, tt.token, tt.want)
		})
	}
}

// nilJSON marshals to null, which claimsAt cannot express with nil.
type nilJSON struct{}

func (nilJSON) MarshalJSON() ([]byte, error) { return []byte("null"), nil }

// asn1ES256 signs with ES256 but encodes the signature the way crypto/ecdsa
// does (ASN.1), not the way JWS wants it.
func asn1ES256(t *testing.T, claims map[string]any) string {
	t.Helper()
	input := jsonSeg(t, map[string]any{"alg": "ES256"}) + "." + jsonSeg(t, claims)
	raw := signJWS(t, "ES256", testKeyPairs().p256, input)
	// re-encode r||s as a DER SEQUENCE of two INTEGERs
	der := func(b []byte) []byte {
		for len(b) > 1 && b[0] == 0 {
			b = b[1:]
		}
		if b[0]&0x80 != 0 {
			b = append([]byte{0}, b...)
		}
		return append([]byte{0x02, byte(len(b))}, b...)
	}
	body := append(der(raw[:32]), der(raw[32:])...)
	sig := append([]byte{0x30, byte(len(body))}, body...)
	return input + "." + b64url(sig)
}

func TestVerifyTimeBoundaries(t *testing.T) {
	exp := verifyNow.Add(time.Hour)
	nbf := verifyNow
	tests := []struct {
		name   string
		leeway time.Duration
		claims map[string]any
		now    time.Time
		want   string // "" = accepted
	}{
		{"just before exp", 0, claimsAt(map[string]any{"exp": exp.Unix()}), exp.Add(-time.Nanosecond), ""},
		{"exactly at exp", 0, claimsAt(map[string]any{"exp": exp.Unix()}), exp, "expired"},
		{"just before exp plus leeway", 30 * time.Second, claimsAt(map[string]any{"exp": exp.Unix()}), exp.Add(30*time.Second - time.Nanosecond), ""},
		{"exactly at exp plus leeway", 30 * time.Second, claimsAt(map[string]any{"exp": exp.Unix()}), exp.Add(30 * time.Second), "expired"},
		{"exactly at nbf", 0, claimsAt(map[string]any{"nbf": nbf.Unix()}), nbf, ""},
		{"just before nbf", 0, claimsAt(map[string]any{"nbf": nbf.Unix()}), nbf.Add(-time.Nanosecond), "not valid yet"},
		{"exactly at nbf minus leeway", 30 * time.Second, claimsAt(map[string]any{"nbf": nbf.Unix()}), nbf.Add(-30 * time.Second), ""},
		{"just before nbf minus leeway", 30 * time.Second, claimsAt(map[string]any{"nbf": nbf.Unix()}), nbf.Add(-30*time.Second - time.Nanosecond), "not valid yet"},
		{"exactly at iat", 0, claimsAt(map[string]any{"iat": verifyNow.Unix()}), verifyNow, ""},
		{"just before iat", 0, claimsAt(map[string]any{"iat": verifyNow.Unix()}), verifyNow.Add(-time.Nanosecond), "not valid yet"},
		{"exactly at iat minus leeway", 30 * time.Second, claimsAt(map[string]any{"iat": verifyNow.Unix()}), verifyNow.Add(-30 * time.Second), ""},
		{"just before iat minus leeway", 30 * time.Second, claimsAt(map[string]any{"iat": verifyNow.Unix()}), verifyNow.Add(-30*time.Second - time.Nanosecond), "not valid yet"},
		// golang-jwt truncates NumericDate to whole seconds (TimePrecision)
		{"fractional exp, before its second", 0, claimsAt(map[string]any{"exp": float64(exp.Unix()) + 0.5}), exp.Add(-time.Nanosecond), ""},
		{"fractional exp, at its second", 0, claimsAt(map[string]any{"exp": float64(exp.Unix()) + 0.5}), exp, "expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clk := fakeclock.New(tt.now)
			v := newTestVerifier(t, JWTConfig{
				Issuers: []IssuerConfig{{Keys: []KeyConfig{{Secret: hmacSecret}}}},
				Leeway:  tt.leeway,
				Now:     clk.Now,
			})
			tok := mintJWT(t, "HS256", "", hmacSecret, tt.claims)
			_, err := v.Verify(context.Background(), tok)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			checkRefused(t, err, tok, tt.want)
		})
	}
}

func TestVerifyClockMovesOn(t *testing.T) {
	clk := fakeclock.New(verifyNow)
	v := newTestVerifier(t, JWTConfig{
		Issuers: []IssuerConfig{{Keys: []KeyConfig{{Secret: hmacSecret}}}},
		Now:     clk.Now,
	})
	tok := mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil))
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("at t0: %v", err)
	}
	clk.Advance(time.Hour)
	if _, err := v.Verify(context.Background(), tok); !errors.Is(err, ErrToken) {
		t.Fatalf("an hour later: err = %v, want expired", err)
	}
}

func TestVerifyOptions(t *testing.T) {
	tests := []struct {
		name   string
		cfg    JWTConfig
		claims map[string]any
	}{
		{"missing exp with AllowMissingExp", hsConfig(func(c *JWTConfig) { c.AllowMissingExp = true }),
			claimsAt(map[string]any{"exp": nil})},
		{"exp still checked with AllowMissingExp", hsConfig(func(c *JWTConfig) { c.AllowMissingExp = true }),
			claimsAt(nil)},
		{"required claims present", hsConfig(func(c *JWTConfig) { c.RequiredClaims = []string{"sub", "org"} }),
			claimsAt(map[string]any{"org": "acme"})},
		{"required claim false is present", hsConfig(func(c *JWTConfig) { c.RequiredClaims = []string{"admin"} }),
			claimsAt(map[string]any{"admin": false})},
		{"one of several audiences", hsConfig(func(c *JWTConfig) { c.Issuers[0].Audience = []string{"api", "admin"} }),
			claimsAt(map[string]any{"aud": []string{"web", "admin"}})},
		{"audience as a string", hsConfig(func(c *JWTConfig) { c.Issuers[0].Audience = []string{"api"} }),
			claimsAt(map[string]any{"aud": "api"})},
		{"any iss with one unnamed issuer", hsConfig(nil),
			claimsAt(map[string]any{"iss": "https://whoever.test"})},
		{"named issuer", hsConfig(func(c *JWTConfig) { c.Issuers[0].Issuer = "https://idp.test" }),
			claimsAt(map[string]any{"iss": "https://idp.test"})},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := newTestVerifier(t, tt.cfg)
			if _, err := v.Verify(context.Background(), mintJWT(t, "HS256", "", hmacSecret, tt.claims)); err != nil {
				t.Fatalf("refused: %v", err)
			}
		})
	}
}

func TestVerifyMaxTokenSize(t *testing.T) {
	tok := mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil))
	for _, tt := range []struct {
		max  int
		want string
	}{
		{len(tok), ""},
		{len(tok) + 1, ""},
		{len(tok) - 1, "too large"},
	} {
		v := newTestVerifier(t, hsConfig(func(c *JWTConfig) { c.MaxTokenSize = tt.max }))
		_, err := v.Verify(context.Background(), tok)
		if tt.want == "" {
			if err != nil {
				t.Errorf("MaxTokenSize %d, token of %d bytes: %v", tt.max, len(tok), err)
			}
			continue
		}
		checkRefused(t, err, tok, tt.want)
	}

	// the default
	v := newTestVerifier(t, hsConfig(nil))
	big := mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"pad": strings.Repeat("x", DefaultMaxTokenSize)}))
	_, err := v.Verify(context.Background(), big)
	checkRefused(t, err, big, "too large")
}

// TestVerifyIssuers checks that a token's iss picks the issuer, and that
// its kid is looked up among that issuer's keys only.
func TestVerifyIssuers(t *testing.T) {
	k := testKeyPairs()
	v := newTestVerifier(t, JWTConfig{Issuers: []IssuerConfig{
		{Issuer: "https://a.test", Keys: []KeyConfig{{ID: "a1", Secret: hmacSecret}}},
		{Issuer: "https://b.test", Keys: []KeyConfig{
			{ID: "b1", Secret: hmacSecret2},
			{ID: "b2", PEM: publicPEM(t, &k.rsa.PublicKey)},
		}},
	}})
	iss := func(i string) map[string]any { return claimsAt(map[string]any{"iss": i}) }
	tests := []struct {
		name, token, want string
	}{
		{"a with its key", mintJWT(t, "HS256", "a1", hmacSecret, iss("https://a.test")), ""},
		{"b with its HMAC key", mintJWT(t, "HS256", "b1", hmacSecret2, iss("https://b.test")), ""},
		{"b with its RSA key", mintJWT(t, "RS256", "b2", k.rsa, iss("https://b.test")), ""},
		{"a naming b's kid, signed with b's key", mintJWT(t, "HS256", "b1", hmacSecret2, iss("https://a.test")), "unverifiable"},
		{"a naming b's RSA kid", mintJWT(t, "RS256", "b2", k.rsa, iss("https://a.test")), "invalid token"},
		{"b naming a's kid, signed with a's key", mintJWT(t, "HS256", "a1", hmacSecret, iss("https://b.test")), "unverifiable"},
		{"b's kid with a's secret", mintJWT(t, "HS256", "b1", hmacSecret, iss("https://b.test")), "bad signature"},
		{"HS256 with b's RSA kid and the PEM as secret", mintJWT(t, "HS256", "b2", publicPEM(t, &k.rsa.PublicKey), iss("https://b.test")), "unverifiable"},
		{"unknown issuer", mintJWT(t, "HS256", "a1", hmacSecret, iss("https://c.test")), "unknown issuer"},
		{"no issuer", mintJWT(t, "HS256", "a1", hmacSecret, claimsAt(nil)), "unknown issuer"},
		{"issuer differing in case", mintJWT(t, "HS256", "a1", hmacSecret, iss("https://A.test")), "unknown issuer"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := v.Verify(context.Background(), tt.token)
			if tt.want == "" {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			checkRefused(t, err, tt.token, tt.want)
		})
	}
}

func TestNewVerifierErrors(t *testing.T) {
	k := testKeyPairs()
	rsaPEM := publicPEM(t, &k.rsa.PublicKey)
	ecPEM := publicPEM(t, &k.p256.PublicKey)
	one := func(kc ...KeyConfig) JWTConfig { return JWTConfig{Issuers: []IssuerConfig{{Keys: kc}}} }
	tests := []struct {
		name string
		cfg  JWTConfig
		want string
	}{
		{"no issuer", JWTConfig{}, "no issuer"},
		{"issuer without key", JWTConfig{Issuers: []IssuerConfig{{Issuer: "a"}}}, "no key and no JWKS URL"},
		{"key with neither secret nor PEM", one(KeyConfig{ID: "x"}), "needs a secret or a PEM key"},
		{"key with both", one(KeyConfig{Secret: hmacSecret, PEM: rsaPEM}), "either a secret or a PEM key"},
		{"secret of 31 bytes", one(KeyConfig{Secret: hmacSecret[:31]}), "at least 32 bytes"},
		{"RS256 on an EC key", one(KeyConfig{PEM: ecPEM, Algorithms: []string{"RS256"}}), "algorithm RS256 does not fit"},
		{"ES384 on a P-256 key", one(KeyConfig{PEM: ecPEM, Algorithms: []string{"ES384"}}), "algorithm ES384 does not fit"},
		{"ES256 on an RSA key", one(KeyConfig{PEM: rsaPEM, Algorithms: []string{"ES256"}}), "algorithm ES256 does not fit"},
		{"HS256 on a PEM key", one(KeyConfig{PEM: rsaPEM, Algorithms: []string{"HS256"}}), "algorithm HS256 does not fit"},
		{"RS256 on a secret", one(KeyConfig{Secret: hmacSecret, Algorithms: []string{"RS256"}}), "algorithm RS256 does not fit"},
		{"none on a secret", one(KeyConfig{Secret: hmacSecret, Algorithms: []string{"none"}}), `unknown algorithm "none"`},
		{"unknown algorithm on a secret", one(KeyConfig{Secret: hmacSecret, Algorithms: []string{"HS999"}}), `unknown algorithm "HS999"`},
		{"EdDSA on an RSA key", one(KeyConfig{PEM: rsaPEM, Algorithms: []string{"EdDSA"}}), "does not fit"},
		{"PKCS#8 private key", one(KeyConfig{PEM: privatePEM(t, "PRIVATE KEY", k.rsa)}), "never configure a private key"},
		{"PKCS#1 private key", one(KeyConfig{PEM: privatePEM(t, "RSA PRIVATE KEY", k.rsa)}), "never configure a private key"},
		{"EC private key", one(KeyConfig{PEM: privatePEM(t, "EC PRIVATE KEY", k.p256)}), "never configure a private key"},
		{"Ed25519 private key", one(KeyConfig{PEM: privatePEM(t, "PRIVATE KEY", k.ed)}), "never configure a private key"},
		{"not PEM", one(KeyConfig{PEM: []byte("-----BEGIN NOTHING")}), "no PEM block"},
		{"corrupt public key", one(KeyConfig{PEM: []byte("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")}), "jwt issuer"},
		{"two keys without id", one(KeyConfig{Secret: hmacSecret}, KeyConfig{Secret: hmacSecret2}), "several keys without an id"},
		{"the same kid twice", one(KeyConfig{ID: "k", Secret: hmacSecret}, KeyConfig{ID: "k", Secret: hmacSecret2}), `key id "k" used twice`},
		{"several issuers, one unnamed", JWTConfig{Issuers: []IssuerConfig{
			{Issuer: "a", Keys: []KeyConfig{{Secret: hmacSecret}}},
			{Keys: []KeyConfig{{Secret: hmacSecret}}},
		}}, "several issuers need an issuer name each"},
		{"the same issuer twice", JWTConfig{Issuers: []IssuerConfig{
			{Issuer: "a", Keys: []KeyConfig{{Secret: hmacSecret}}},
			{Issuer: "a", Keys: []KeyConfig{{Secret: hmacSecret}}},
		}}, `jwt issuer "a": configured twice`},
		{"JWKS algorithm none", JWTConfig{Issuers: []IssuerConfig{{JWKSURL: "http://127.0.0.1:1/jwks", JWKSAlgorithms: []string{"none"}}}}, `unknown algorithm "none"`},
		{"JWKS unknown algorithm", JWTConfig{Issuers: []IssuerConfig{{JWKSURL: "http://127.0.0.1:1/jwks", JWKSAlgorithms: []string{"XS256"}}}}, `unknown algorithm "XS256"`},
		{"JWKS URL not a URL", JWTConfig{Issuers: []IssuerConfig{{JWKSURL: "not a url"}}}, "jwks"},
		{"JWKS URL not http", JWTConfig{Issuers: []IssuerConfig{{JWKSURL: "ftp://idp/jwks"}}}, "must be http(s)://host"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v, err := NewVerifier(t.Context(), tt.cfg)
			if err == nil {
				t.Fatalf("no error; got %+v", v)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
		})
	}
}

// TestCheckKeyAlgorithms checks what can be said of a static key's
// algorithms before the key is read: only its family is known.
func TestCheckKeyAlgorithms(t *testing.T) {
	tests := []struct {
		name   string
		algs   []string
		secret bool
		want   string // "" for no error
	}{
		{"HMAC on a secret", []string{"HS256", "HS512"}, true, ""},
		{"none given", nil, true, ""},
		{"RS256 on a secret", []string{"RS256"}, true, "algorithm RS256 does not fit this key (it takes HS256, HS384, HS512)"},
		{"public-key algorithms on a public key", []string{"RS256", "ES384", "EdDSA"}, false, ""},
		{"HS256 on a public key", []string{"ES256", "HS256"}, false, "algorithm HS256 does not fit"},
		{"unknown", []string{"HS256", "HS999"}, true, `unknown algorithm "HS999"`},
		{"none", []string{"none"}, false, `unknown algorithm "none"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := CheckKeyAlgorithms(tt.algs, tt.secret)
			switch {
			case tt.want == "" && err != nil:
				t.Errorf("error %q, want none", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
		})
	}
}

// BenchmarkVerifyDots measures the refusal of a megabyte of dots, both by
// the size limit and (with a larger limit) by the segment count.
func BenchmarkVerifyDots(b *testing.B) {
	dots := strings.Repeat(".", 1<<20)
	for _, max := range []int{0, 2 << 20} {
		v, err := NewVerifier(b.Context(), JWTConfig{
			Issuers:      []IssuerConfig{{Keys: []KeyConfig{{Secret: hmacSecret}}}},
			MaxTokenSize: max,
		})
		if err != nil {
			b.Fatal(err)
		}
		name := "default limit"
		if max > 0 {
			name = "2MiB limit"
		}
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				if _, err := v.Verify(context.Background(), dots); !errors.Is(err, ErrToken) {
					b.Fatal(err)
				}
			}
		})
	}
}
