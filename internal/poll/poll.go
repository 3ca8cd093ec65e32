// Package poll waits in tests for a condition that another goroutine
// brings about, checking it with a deadline instead of sleeping.
// It imports only the standard library.
package poll

import (
	"testing"
	"time"
)

// Until checks cond, with pauses that grow from 1 ms to 20 ms, until it
// holds; it fails t when within has passed first.
func Until(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for d := time.Millisecond; !cond(); d = min(2*d, 20*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
		timer := time.NewTimer(d)
		<-timer.C
	}
}
