package broker

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/wsgate/wsgate/internal/ttlmap"
)

// Handler receives the messages of the channels a node subscribed to. It
// is called from one goroutine per subscription stream (the memory broker:
// the publisher's, one at a time per channel that keeps history or
// presence), in the order the broker delivered them, and must not block
// for long.
type Handler func(channel string, m Message)

// Broker moves publications between nodes.
type Broker interface {
	// Publish sends data to every node subscribed to channel, this one
	// included (through its own subscription, never directly).
	Publish(ctx context.Context, channel string, data []byte) error
	// Subscribe makes this node receive channel's publications. Subscribing
	// twice is the same as once. A broker that is also a Confirmer may
	// return before the subscription takes effect.
	Subscribe(ctx context.Context, channel string) error
	// Unsubscribe stops them.
	Unsubscribe(ctx context.Context, channel string) error
	// Close releases the broker's connections.
	Close() error
}

// Confirmer is a broker whose Subscribe returns once the subscription is
// asked for, before its backend has made it. Confirm returns once every
// publication made from then on reaches this node; when the backend does not
// confirm in time it returns an error wrapping ErrUnavailable, and the
// subscription is still made when the backend can. The rooms hub finds it by
// type assertion, and confirms outside its own locks.
type Confirmer interface {
	Confirm(ctx context.Context, channel string) error
}

// ErrUnavailable wraps errors of a broker that cannot reach its backend.
var ErrUnavailable = errors.New("broker unavailable")

// ErrClosed is returned after Close.
var ErrClosed = errors.New("broker closed")

// Memory is the single-node broker: a publication goes straight to the
// handler if the channel is subscribed.
type Memory struct {
	h      Handler
	mu     sync.RWMutex
	subs   map[string]bool
	closed bool
	claims ttlmap.Map[struct{}]
	now    func() time.Time // nil: time.Now

	cmu   sync.Mutex
	chans map[string]*memChannel // channels with history or presence
	sweep int                    // history publications since the last sweep
}

// NewMemory makes a memory broker delivering to h.
func NewMemory(h Handler) *Memory {
	return &Memory{h: h, subs: map[string]bool{}, chans: map[string]*memChannel{}}
}

// Publish delivers data to the handler when channel is subscribed.
func (m *Memory) Publish(_ context.Context, channel string, data []byte) error {
	m.mu.RLock()
	ok, closed := m.subs[channel], m.closed
	m.mu.RUnlock()
	if closed {
		return ErrClosed
	}
	if ok {
		m.h(channel, Message{Data: data})
	}
	return nil
}

// Subscribe marks channel subscribed.
func (m *Memory) Subscribe(_ context.Context, channel string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return ErrClosed
	}
	m.subs[channel] = true
	return nil
}

// Unsubscribe forgets channel.
func (m *Memory) Unsubscribe(_ context.Context, channel string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.subs, channel)
	return nil
}

// Close stops deliveries.
func (m *Memory) Close() error {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	return nil
}

// Stats is what a broker that reports on itself (Redis) has counted.
type Stats struct {
	// Up is true while the broker is reachable.
	Up bool
	// Reconnects counts returns after an outage (the broker was found
	// unreachable, then reachable again).
	Reconnects uint64
	// Errors counts commands that failed while the broker was thought
	// reachable (not those refused at once during an outage), and losses
	// of the subscription connection that revealed an outage (on a Redis
	// Cluster, of any subscriber connection that had worked).
	Errors uint64
}
