package policy

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"encoding/json"
	"math/big"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// jwk is one key of a JWK set, as an IdP publishes it.
type jwk map[string]any

func rsaJWK(kid, alg string, pub *rsa.PublicKey) jwk {
	k := jwk{"kty": "RSA", "kid": kid, "use": "sig",
		"n": b64url(pub.N.Bytes()), "e": b64url(big.NewInt(int64(pub.E)).Bytes())}
	if alg != "" {
		k["alg"] = alg
	}
	return k
}

func ecJWK(t *testing.T, kid string, pub *ecdsa.PublicKey) jwk {
	t.Helper()
	b, err := pub.Bytes() // 0x04 || X || Y
	if err != nil {
		t.Fatal(err)
	}
	n := (len(b) - 1) / 2
	return jwk{"kty": "EC", "kid": kid, "use": "sig", "crv": pub.Curve.Params().Name,
		"x": b64url(b[1 : 1+n]), "y": b64url(b[1+n:])}
}

func edJWK(kid string, pub ed25519.PublicKey) jwk {
	return jwk{"kty": "OKP", "kid": kid, "use": "sig", "crv": "Ed25519", "x": b64url(pub)}
}

// jwksServer is an IdP's JWKS endpoint that counts its hits and can be
// made to fail.
type jwksServer struct {
	*httptest.Server
	hits atomic.Int32
	hit  chan struct{} // one value per hit, dropped when full

	mu     sync.Mutex
	keys   []jwk
	status int    // 0 means 200
	body   string // replaces the JWK set when set
}

func newJWKSServer(t *testing.T, keys ...jwk) *jwksServer {
	t.Helper()
	s := &jwksServer{keys: keys, hit: make(chan struct{}, 100)}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		select {
		case s.hit <- struct{}{}:
		default:
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if s.status != 0 {
			w.WriteHeader(s.status)
			return
		}
		if s.body != "" {
			w.Write([]byte(s.body))
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"keys": s.keys})
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *jwksServer) setKeys(keys ...jwk) {
	s.mu.Lock()
	s.keys = keys
	s.mu.Unlock()
}

func (s *jwksServer) fail(status int, body string) {
	s.mu.Lock()
	s.status, s.body = status, body
	s.mu.Unlock()
}

// waitHits waits until the server has been hit n more times.
func (s *jwksServer) waitHits(t *testing.T, n int) {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for range n {
		select {
		case <-s.hit:
		case <-deadline:
			t.Fatalf("the JWKS server was not hit %d more times within 5s", n)
		}
	}
}

// drainHits forgets the hits seen so far.
func (s *jwksServer) drainHits() {
	for {
		select {
		case <-s.hit:
		default:
			return
		}
	}
}

// jwksIssuer is an issuer config that reads keys from s and never refetches
// on its own during a test.
func jwksIssuer(s *jwksServer, mod func(*IssuerConfig)) JWTConfig {
	ic := IssuerConfig{JWKSURL: s.URL, JWKSRefresh: time.Hour, JWKSMinRefresh: time.Hour}
	if mod != nil {
		mod(&ic)
	}
	return JWTConfig{
		Issuers:    []IssuerConfig{ic},
		HTTPClient: &http.Client{Timeout: 5 * time.Second},
	}
}

func TestJWKSKeyTypes(t *testing.T) {
	k := testKeyPairs()
	tests := []struct {
		name, alg, kid string
		signWith       any
	}{
		{"RS256 with alg in the JWK", "RS256", "r1", k.rsa},
		{"PS256 without alg in the JWK", "PS256", "r2", k.rsa2},
		{"RS512 without alg in the JWK", "RS512", "r2", k.rsa2},
		{"ES256", "ES256", "e256", k.p256},
		{"ES384", "ES384", "e384", k.p384},
		{"EdDSA", "EdDSA", "ed", k.ed},
	}
	srv := newJWKSServer(t,
		rsaJWK("r1", "RS256", &k.rsa.PublicKey),
		rsaJWK("r2", "", &k.rsa2.PublicKey),
		ecJWK(t, "e256", &k.p256.PublicKey),
		ecJWK(t, "e384", &k.p384.PublicKey),
		edJWK("ed", k.ed.Public().(ed25519.PublicKey)),
	)
	v := newTestVerifier(t, jwksIssuer(srv, nil))
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := v.Verify(context.Background(), mintJWT(t, tt.alg, tt.kid, tt.signWith, claimsAt(nil)))
			if err != nil {
				t.Fatalf("Verify: %v", err)
			}
			if c.Subject() != "u-7" {
				t.Errorf("sub = %q", c.Subject())
			}
		})
	}
	if n := srv.hits.Load(); n != 1 {
		t.Errorf("JWKS fetched %d times, want once", n)
	}
}

func TestJWKSRefusals(t *testing.T) {
	k := testKeyPairs()
	hmacKey := []byte("a symmetric key an IdP should never publish")
	srv := newJWKSServer(t,
		rsaJWK("r1", "RS256", &k.rsa.PublicKey),
		rsaJWK("r2", "", &k.rsa2.PublicKey),
		ecJWK(t, "e1", &k.p256.PublicKey),
		jwk{"kty": "oct", "kid": "h1", "k": b64url(hmacKey)},
	)
	rsaPEM := publicPEM(t, &k.rsa.PublicKey)
	tests := []struct {
		name  string
		mod   func(*IssuerConfig)
		token string
		want  string
	}{
		{"HS256 with an RSA kid and the PEM as secret", nil, mintJWT(t, "HS256", "r1", rsaPEM, claimsAt(nil)), "bad signature"},
		{"HS256 with an RSA kid and the modulus as secret", nil, mintJWT(t, "HS256", "r1", k.rsa.N.Bytes(), claimsAt(nil)), "bad signature"},
		{"HS256 with an RSA kid when HS256 is allowed", func(ic *IssuerConfig) { ic.JWKSAlgorithms = []string{"RS256", "HS256"} },
			mintJWT(t, "HS256", "r2", rsaPEM, claimsAt(nil)), "unverifiable"},
		{"HS256 with a published oct key", nil, mintJWT(t, "HS256", "h1", hmacKey, claimsAt(nil)), "bad signature"},
		{"RS256 naming an EC kid", nil, mintJWT(t, "RS256", "e1", k.rsa, claimsAt(nil)), "unverifiable"},
		{"ES256 naming an RSA kid", nil, mintJWT(t, "ES256", "r2", k.p256, claimsAt(nil)), "unverifiable"},
		{"PS256 on a JWK that says RS256", nil, mintJWT(t, "PS256", "r1", k.rsa, claimsAt(nil)), "unverifiable"},
		{"PS256 when only RS256 is allowed", func(ic *IssuerConfig) { ic.JWKSAlgorithms = []string{"RS256"} },
			mintJWT(t, "PS256", "r2", k.rsa2, claimsAt(nil)), "bad signature"},
		{"signed by another key under a known kid", nil, mintJWT(t, "RS256", "r1", k.rsa2, claimsAt(nil)), "bad signature"},
		{"no kid", nil, mintJWT(t, "RS256", "", k.rsa, claimsAt(nil)), "unverifiable"},
		{"alg none with a known kid", nil, mintJWTRaw(t, nil, map[string]any{"alg": "none", "kid": "r1"}, claimsAt(nil)), "bad signature"},
		{"expired", nil, mintJWT(t, "RS256", "r1", k.rsa, claimsAt(map[string]any{"exp": verifyNow.Add(-time.Hour).Unix()})), "expired"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := newTestVerifier(t, jwksIssuer(srv, tt.mod))
			_, err := v.Verify(context.Background(), tt.token)
			checkRefused(t, err, tt.token, tt.want)
		})
	}
}

func TestJWKSRotation(t *testing.T) {
	k := testKeyPairs()
	srv := newJWKSServer(t, rsaJWK("old", "RS256", &k.rsa.PublicKey))
	v := newTestVerifier(t, jwksIssuer(srv, nil))
	if n := srv.hits.Load(); n != 1 {
		t.Fatalf("JWKS fetched %d times at start, want once", n)
	}
	verify := func(kid string, key any) error {
		_, err := v.Verify(context.Background(), mintJWT(t, "RS256", kid, key, claimsAt(nil)))
		return err
	}
	if err := verify("old", k.rsa); err != nil {
		t.Fatalf("old key: %v", err)
	}

	// the IdP publishes a new key; the first token signed with it makes one
	// refetch and is accepted
	srv.setKeys(rsaJWK("old", "RS256", &k.rsa.PublicKey), rsaJWK("new", "RS256", &k.rsa2.PublicKey))
	if err := verify("new", k.rsa2); err != nil {
		t.Fatalf("new key after rotation: %v", err)
	}
	if n := srv.hits.Load(); n != 2 {
		t.Errorf("JWKS fetched %d times after the new kid, want 2", n)
	}
	for range 3 {
		if err := verify("new", k.rsa2); err != nil {
			t.Fatalf("new key again: %v", err)
		}
		if err := verify("old", k.rsa); err != nil {
			t.Fatalf("old key after rotation: %v", err)
		}
	}
	if n := srv.hits.Load(); n != 2 {
		t.Errorf("JWKS fetched %d times for known kids, want 2", n)
	}

	// the old key is withdrawn: the set read at the last fetch still has it
	// until the next refetch, which the rate limit holds back
	srv.setKeys(rsaJWK("new", "RS256", &k.rsa2.PublicKey))
	if err := verify("old", k.rsa); err != nil {
		t.Fatalf("old key before a refetch: %v", err)
	}
}

func TestJWKSUnknownKidRefetchIsRateLimited(t *testing.T) {
	k := testKeyPairs()
	srv := newJWKSServer(t, rsaJWK("a", "RS256", &k.rsa.PublicKey))
	v := newTestVerifier(t, jwksIssuer(srv, nil))
	for i, kid := range []string{"x", "y", "x", "z", "a-but-not"} {
		tok := mintJWT(t, "RS256", kid, k.rsa, claimsAt(nil))
		_, err := v.Verify(context.Background(), tok)
		checkRefused(t, err, tok, "unverifiable")
		if n, want := srv.hits.Load(), int32(2); n != want {
			t.Fatalf("after unknown kid #%d: JWKS fetched %d times, want %d (start + one refetch per JWKSMinRefresh)", i+1, n, want)
		}
	}
	// a key that appears now is not seen until the limiter allows a refetch
	srv.setKeys(rsaJWK("a", "RS256", &k.rsa.PublicKey), rsaJWK("b", "RS256", &k.rsa2.PublicKey))
	tok := mintJWT(t, "RS256", "b", k.rsa2, claimsAt(nil))
	_, err := v.Verify(context.Background(), tok)
	checkRefused(t, err, tok, "unverifiable")
	if _, err := v.Verify(context.Background(), mintJWT(t, "RS256", "a", k.rsa, claimsAt(nil))); err != nil {
		t.Fatalf("known kid: %v", err)
	}
	if n := srv.hits.Load(); n != 2 {
		t.Errorf("JWKS fetched %d times, want 2", n)
	}
}

func TestJWKSIdPDown(t *testing.T) {
	k := testKeyPairs()
	tests := []struct {
		name string
		down func(*jwksServer)
		// background tells whether the server sees the periodic refreshes
		background bool
	}{
		{"HTTP 500", func(s *jwksServer) { s.fail(http.StatusInternalServerError, "") }, true},
		{"HTTP 404", func(s *jwksServer) { s.fail(http.StatusNotFound, "") }, true},
		{"not JSON", func(s *jwksServer) { s.fail(0, "<html>maintenance</html>") }, true},
		{"a JWK it cannot read", func(s *jwksServer) { s.fail(0, `{"keys":[{"kty":"RSA","kid":"a","n":"!!","e":"AQAB"}]}`) }, true},
		{"connection refused", func(s *jwksServer) { s.Close() }, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newJWKSServer(t, rsaJWK("a", "RS256", &k.rsa.PublicKey))
			// refresh often, so the periodic refresh fails several times
			v := newTestVerifier(t, jwksIssuer(srv, func(ic *IssuerConfig) { ic.JWKSRefresh = 10 * time.Millisecond }))
			good := mintJWT(t, "RS256", "a", k.rsa, claimsAt(nil))
			if _, err := v.Verify(context.Background(), good); err != nil {
				t.Fatalf("while the IdP is up: %v", err)
			}

			tt.down(srv)
			if tt.background {
				srv.drainHits()
				srv.waitHits(t, 3)
			}
			// an unknown kid makes a refetch, which fails too
			unknown := mintJWT(t, "RS256", "b", k.rsa2, claimsAt(nil))
			_, err := v.Verify(context.Background(), unknown)
			checkRefused(t, err, unknown, "unverifiable")

			if _, err := v.Verify(context.Background(), good); err != nil {
				t.Fatalf("with the IdP down, the last good keys must still verify: %v", err)
			}
		})
	}
}

func TestJWKSIdPDownAtStart(t *testing.T) {
	k := testKeyPairs()
	srv := newJWKSServer(t, rsaJWK("a", "RS256", &k.rsa.PublicKey))
	srv.fail(http.StatusServiceUnavailable, "")
	// short enough that the second token waits for the limiter rather
	// than being refused at once
	v := newTestVerifier(t, jwksIssuer(srv, func(ic *IssuerConfig) { ic.JWKSMinRefresh = 50 * time.Millisecond }))
	tok := mintJWT(t, "RS256", "a", k.rsa, claimsAt(nil))
	_, err := v.Verify(context.Background(), tok)
	checkRefused(t, err, tok, "unverifiable")

	srv.fail(0, "")
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("after the IdP came up: %v", err)
	}
	if n := srv.hits.Load(); n != 3 {
		t.Errorf("JWKS fetched %d times, want 3 (start, two refetches)", n)
	}
}

// TestJWKSWithStaticKeys checks an issuer with both: static keys by kid
// first, then the JWKS.
func TestJWKSWithStaticKeys(t *testing.T) {
	k := testKeyPairs()
	srv := newJWKSServer(t, rsaJWK("remote", "RS256", &k.rsa.PublicKey))
	cfg := jwksIssuer(srv, func(ic *IssuerConfig) {
		ic.Keys = []KeyConfig{{ID: "local", Secret: hmacSecret}}
	})
	v := newTestVerifier(t, cfg)
	for _, tok := range []string{
		mintJWT(t, "HS256", "local", hmacSecret, claimsAt(nil)),
		mintJWT(t, "RS256", "remote", k.rsa, claimsAt(nil)),
	} {
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Errorf("Verify: %v", err)
		}
	}
	// HS256 is allowed for the static key; it must not reach the JWKS key
	tok := mintJWT(t, "HS256", "remote", publicPEM(t, &k.rsa.PublicKey), claimsAt(nil))
	_, err := v.Verify(context.Background(), tok)
	checkRefused(t, err, tok, "unverifiable")
}
