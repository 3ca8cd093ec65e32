// Package fakeclock is a time source for tests that moves only when told;
// the broker, policy and rooms tests share it.
// It imports only the standard library.
package fakeclock

import (
	"sync"
	"time"
)

// Clock is a settable time source; its zero value starts at the zero time.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// New returns a clock that reads t.
func New(t time.Time) *Clock { return &Clock{t: t} }

// Now is the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock on by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}
