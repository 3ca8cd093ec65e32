package policy

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/fakeclock"
)

// TestVerifiedTokenCache: a verified token is remembered, but never past
// its exp (plus leeway) nor past verifiedTTL; a bad signature is
// remembered as a refusal for refusedTTL; other refusals are not cached.
func TestVerifiedTokenCache(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	start := time.Unix(1_800_000_000, 0)
	clock := fakeclock.New(start)
	v, err := NewVerifier(context.Background(), JWTConfig{
		Issuers: []IssuerConfig{{Keys: []KeyConfig{{Secret: secret}}}},
		Leeway:  5 * time.Second,
		Now:     clock.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	tok := mintJWT(t, "HS256", "", secret, map[string]any{"sub": "u", "exp": start.Add(30 * time.Second).Unix()})
	for i := 0; i < 2; i++ {
		if _, err := v.Verify(context.Background(), tok); err != nil {
			t.Fatalf("verify #%d: %v", i, err)
		}
	}
	if len(v.cache) != 1 {
		t.Fatalf("%d cached tokens, want 1", len(v.cache))
	}
	clock.Advance(34 * time.Second) // within exp + leeway
	if _, err := v.Verify(context.Background(), tok); err != nil {
		t.Fatalf("within leeway: %v", err)
	}
	clock.Advance(2 * time.Second) // past exp + leeway: the cache must not answer
	if _, err := v.Verify(context.Background(), tok); !errors.Is(err, ErrToken) {
		t.Fatalf("expired token: %v, want ErrToken", err)
	}

	long := mintJWT(t, "HS256", "", secret, map[string]any{"sub": "u", "exp": start.Add(time.Hour).Unix()})
	if _, err := v.Verify(context.Background(), long); err != nil {
		t.Fatal(err)
	}
	e := v.cache[keyOf(long)]
	if got := e.until.Sub(clock.Now()); got != verifiedTTL {
		t.Fatalf("cached for %v, want %v", got, verifiedTTL)
	}
	// A bad signature is remembered as a refusal for refusedTTL, then
	// checked again.
	bad := long[:len(long)-2] + "xx"
	for i := 0; i < 3; i++ {
		if _, err := v.Verify(context.Background(), bad); !errors.Is(err, ErrToken) {
			t.Fatalf("bad signature: %v", err)
		}
	}
	e, ok := v.cache[keyOf(bad)]
	if !ok || e.err == nil || e.claims != nil || e.until.Sub(clock.Now()) != refusedTTL {
		t.Fatalf("bad signature cached as %+v (%v), want a refusal for %v", e, ok, refusedTTL)
	}
	clock.Advance(refusedTTL)
	if _, err := v.Verify(context.Background(), bad); !errors.Is(err, ErrToken) {
		t.Fatalf("bad signature after the refusal expired: %v", err)
	}
	// Other refusals (here: expired) are not remembered.
	if _, ok := v.cache[keyOf(tok)]; ok && v.cache[keyOf(tok)].err != nil {
		t.Fatal("an expired token's refusal was cached")
	}
}
