package wsgate

import (
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// tokenExpiry reads a JWT's exp without verifying it: the client only needs
// to know when to ask for a new one; the gateway verifies.
func tokenExpiry(tok string) (time.Time, bool) {
	claims := jwt.MapClaims{}
	if _, _, err := jwt.NewParser().ParseUnverified(tok, claims); err != nil {
		return time.Time{}, false
	}
	exp, err := claims.GetExpirationTime()
	if err != nil || exp == nil {
		return time.Time{}, false
	}
	return exp.Time, true
}

// refreshAt is when to refresh a token that expires at exp: before ahead
// of it, but never sooner than halfway through its remaining life, so that
// a token issued for less than 2·before is not refreshed over and over.
func refreshAt(now, exp time.Time, before time.Duration) time.Time {
	at := exp.Add(-before)
	if half := now.Add(exp.Sub(now) / 2); at.Before(half) {
		at = half
	}
	return at
}
