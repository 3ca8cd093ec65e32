package policy

import (
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestTokenResult checks the metrics label of each kind of verification,
// taken from real refusals, and that the set of labels stays small.
func TestTokenResult(t *testing.T) {
	tests := []struct {
		name   string
		token  string
		mod    func(*JWTConfig)
		result string
	}{
		{"valid", mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil)), nil, "valid"},
		{"expired", mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": verifyNow.Add(-time.Second).Unix()})), nil, "expired"},
		{"not valid yet", mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"nbf": verifyNow.Add(time.Minute).Unix()})), nil, "not_yet_valid"},
		{"bad signature", mintJWT(t, "HS256", "", hmacSecret2, claimsAt(nil)), nil, "bad_signature"},
		{"unknown issuer", mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"iss": "https://evil.test"})),
			func(c *JWTConfig) { c.Issuers[0].Issuer = "https://idp.test" }, "unknown_issuer"},
		{"wrong audience", mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"aud": "web"})),
			func(c *JWTConfig) { c.Issuers[0].Audience = []string{"api"} }, "wrong_audience"},
		{"missing exp", mintJWT(t, "HS256", "", hmacSecret, claimsAt(map[string]any{"exp": nil})), nil, "missing_claim"},
		{"required claim", mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil)),
			func(c *JWTConfig) { c.RequiredClaims = []string{"org"} }, "missing_claim"},
		{"malformed", "a.b", nil, "malformed"},
		{"too large", strings.Repeat("a", 9000), nil, "too_large"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			v := newTestVerifier(t, hsConfig(tt.mod))
			_, err := v.Verify(t.Context(), tt.token)
			if got := TokenResult(err); got != tt.result {
				t.Errorf("TokenResult(%v) = %q, want %q", err, got, tt.result)
			}
		})
	}
	t.Run("other errors", func(t *testing.T) {
		for err, want := range map[error]string{
			errors.New("boom"):                   "invalid",
			ErrToken:                             "invalid",
			fmt.Errorf("%w: no token", ErrToken): "missing",
			fmt.Errorf("%w: something unknown", ErrToken): "invalid",
		} {
			if got := TokenResult(err); got != want {
				t.Errorf("TokenResult(%v) = %q, want %q", err, got, want)
			}
		}
	})
}

// TestVerifyCacheHits checks that answers from the cache are counted.
func TestVerifyCacheHits(t *testing.T) {
	var hits atomic.Uint64
	v := newTestVerifier(t, hsConfig(func(c *JWTConfig) { c.CacheHits = &hits }))
	good := mintJWT(t, "HS256", "", hmacSecret, claimsAt(nil))
	forged := mintJWT(t, "HS256", "", hmacSecret2, claimsAt(nil))
	for i, tok := range []string{good, good, forged, forged, good} {
		v.Verify(t.Context(), tok)
		want := []uint64{0, 1, 1, 2, 3}[i]
		if got := hits.Load(); got != want {
			t.Fatalf("after verification %d: %d cache hits, want %d", i+1, got, want)
		}
	}
}
