package policy

import (
	"errors"
	"sync"
)

// ErrTooMany is returned when a connection limit is reached.
var ErrTooMany = errors.New("too many connections")

// ConnLimits caps open connections: in all, per client IP, per subject.
// Zero means no cap of that kind.
type ConnLimits struct {
	Total, PerIP, PerSubject int
}

// ConnCounter counts open connections against ConnLimits.
type ConnCounter struct {
	mu     sync.Mutex
	limits ConnLimits
	total  int
	ip     map[string]int
	sub    map[string]int
}

// NewConnCounter makes a counter.
func NewConnCounter(l ConnLimits) *ConnCounter {
	return &ConnCounter{limits: l, ip: map[string]int{}, sub: map[string]int{}}
}

// SetLimits changes the caps (on a config reload); counts are kept.
func (c *ConnCounter) SetLimits(l ConnLimits) {
	c.mu.Lock()
	c.limits = l
	c.mu.Unlock()
}

// Acquire counts a new connection, or returns an error naming the limit
// reached. release must be called when the connection ends; calling it more
// than once has no further effect.
func (c *ConnCounter) Acquire(ip, subject string) (release func(), err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	l := c.limits
	switch {
	case l.Total > 0 && c.total >= l.Total:
		return nil, errors.Join(ErrTooMany, errors.New("gateway limit"))
	case l.PerIP > 0 && c.ip[ip] >= l.PerIP:
		return nil, errors.Join(ErrTooMany, errors.New("per-IP limit"))
	case l.PerSubject > 0 && subject != "" && c.sub[subject] >= l.PerSubject:
		return nil, errors.Join(ErrTooMany, errors.New("per-subject limit"))
	}
	c.total++
	c.ip[ip]++
	if subject != "" {
		c.sub[subject]++
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.total--
			if c.ip[ip]--; c.ip[ip] <= 0 {
				delete(c.ip, ip)
			}
			if subject != "" {
				if c.sub[subject]--; c.sub[subject] <= 0 {
					delete(c.sub, subject)
				}
			}
		})
	}, nil
}

// Open reports the number of counted connections.
func (c *ConnCounter) Open() (total int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.total
}
