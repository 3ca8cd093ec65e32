// Package ttlmap is a map whose entries expire: the node-local records of
// idempotency keys. Time is passed in by the caller, so that tests drive
// expiry with a clock of their own.
package ttlmap

import (
	"sync"
	"time"
)

// minSweep is the size below which expired entries are left until read.
const minSweep = 1024

// Map holds keys until their expiry. The zero value is ready to use and
// safe for concurrent use.
type Map[V any] struct {
	mu      sync.Mutex
	m       map[string]entry[V]
	sweepAt int
}

type entry[V any] struct {
	v     V
	until time.Time
}

// Get returns the value of key unless it has expired at now.
func (m *Map[V]) Get(key string, now time.Time) (V, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.m[key]
	if !ok || !now.Before(e.until) {
		var zero V
		return zero, false
	}
	return e.v, true
}

// Set stores v under key until the time until.
func (m *Map[V]) Set(key string, v V, until, now time.Time) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.set(key, v, until, now)
}

// SetIfAbsent stores v under key until the time until, unless key holds
// an entry that has not expired at now. It reports whether it stored v.
func (m *Map[V]) SetIfAbsent(key string, v V, until, now time.Time) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e, ok := m.m[key]; ok && now.Before(e.until) {
		return false
	}
	m.set(key, v, until, now)
	return true
}

// Delete forgets key.
func (m *Map[V]) Delete(key string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.m, key)
}

// Len is the number of entries held, expired ones not yet swept included.
func (m *Map[V]) Len() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.m)
}

// set stores an entry; when the map has doubled since the last sweep it
// drops the expired entries first, so that memory follows the live
// entries at an amortized constant cost per Set.
func (m *Map[V]) set(key string, v V, until, now time.Time) {
	if m.m == nil {
		m.m = map[string]entry[V]{}
	}
	if len(m.m) >= max(m.sweepAt, minSweep) {
		for k, e := range m.m {
			if !now.Before(e.until) {
				delete(m.m, k)
			}
		}
		m.sweepAt = 2 * len(m.m)
	}
	m.m[key] = entry[V]{v, until}
}
