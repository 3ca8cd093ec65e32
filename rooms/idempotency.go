package rooms

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/internal/ttlmap"
)

// DefaultIdempotencyWindow is how long an idempotency key is remembered
// when the caller gives no window.
const DefaultIdempotencyWindow = 5 * time.Minute

// ErrKeyInProgress is returned when a publication with the same channel
// and idempotency key is being published on this node by another call.
var ErrKeyInProgress = errors.New("a publication with this idempotency key is in progress")

// Message is a publication with an optional idempotency key.
type Message struct {
	Channel string
	Data    []byte
	// Key is the idempotency key, or "" for none. Another Message with the
	// same Channel and Key within the window is a duplicate: it is not
	// delivered again.
	Key string
}

// keyEntry is what this node knows of an idempotency key.
type keyEntry struct {
	// local: the publication reached this node's subscribers only (the
	// broker was unavailable). Without it the entry means sent through
	// the broker.
	local bool
	// busy: a call is publishing it now.
	busy bool
	// until is when the entry expires.
	until time.Time
}

// keyRecord is the node-local record of idempotency keys. It answers
// retries sent to this node without asking the broker, keeps concurrent
// retries apart, and is all there is to go by while the broker cannot
// make a cluster-wide claim.
type keyRecord struct {
	mu  sync.Mutex
	m   ttlmap.Map[keyEntry]
	now func() time.Time
}

// SetClock replaces the clock idempotency keys expire by (time.Now); for
// tests.
func (h *Hub) SetClock(now func() time.Time) {
	h.keys.mu.Lock()
	h.keys.now = now
	h.keys.mu.Unlock()
}

// pending is a keyed message of a call that this node does not know as a
// duplicate.
type pending struct {
	i     int // index in the call
	key   string
	until time.Time // end of its window, counted from before its claim
	// before is the record's entry from earlier calls, if local.
	before *keyEntry
}

// PublishMessages publishes msgs in order, as PublishBatch does, except
// that a message whose channel and idempotency key were published within
// window is not delivered again; dup reports those, message by message. A
// key repeated within msgs counts as published by its first message. Keys
// are shared by the nodes of a broker that is a broker.Claimer; with
// another broker they are this node's only.
//
// While the broker is unavailable the cluster-wide claim cannot be made:
// messages are delivered on this node only, without a second attempt to
// reach the broker (the error wraps broker.ErrUnavailable, as with
// Publish), and this node remembers their keys, so that a retry here
// while the broker is still down is not delivered to its subscribers
// again (the error is returned again). Once
// the broker is back, a retry is sent through it to every node, this one
// included. A claim made for a message that then could not be sent is
// released.
//
// Errors: data refused by CheckData (nothing is sent; the error names the
// message's index), ErrKeyInProgress when another call on this node is
// publishing the same key (nothing is sent), and the broker's errors.
func (h *Hub) PublishMessages(ctx context.Context, msgs []Message, window time.Duration) (dup []bool, err error) {
	for i, m := range msgs {
		if err := CheckData(m.Data); err != nil {
			return nil, fmt.Errorf("publication %d: %w", i, err)
		}
	}
	if window <= 0 {
		window = DefaultIdempotencyWindow
	}
	dup = make([]bool, len(msgs))
	keyed, err := h.keys.begin(msgs, dup, window)
	if err != nil {
		return nil, err
	}
	claims := make([]string, len(keyed))
	for j, p := range keyed {
		claims[j] = p.key
	}

	// The cluster-wide claim.
	skip := make([]bool, len(msgs))
	var claimErr error
	var fresh []bool
	if c, ok := h.b.(broker.Claimer); ok && len(claims) > 0 {
		fresh, claimErr = c.Claim(ctx, claims, window)
		switch {
		case claimErr == nil:
			for j, p := range keyed {
				dup[p.i] = !fresh[j]
			}
		case errors.Is(claimErr, broker.ErrUnavailable):
			// Only this node's record can tell a retry: one delivered
			// here already is not delivered here again.
			for _, p := range keyed {
				skip[p.i] = p.before != nil
			}
		default:
			h.keys.finish(keyed, dup, skip, outcomeNone)
			return nil, claimErr
		}
	}

	var chans []string
	var data [][]byte
	for i, m := range msgs {
		if !dup[i] && !skip[i] {
			chans = append(chans, m.Channel)
			data = append(data, m.Data)
		}
	}
	var pubErr error
	switch {
	case len(chans) == 0:
	case claimErr != nil:
		// The broker was just found unreachable: deliver here at once
		// rather than wait for it to fail a second time (not on channels
		// that keep history: see Publish).
		h.publishedHTTP.Add(int64(len(chans)))
		for i, ch := range chans {
			if h.Options(ch).History == nil {
				h.deliver(&Publication{Channel: ch, Data: data[i]})
			}
		}
		pubErr = claimErr
	default:
		pubErr = h.publishBatch(ctx, chans, data)
	}
	outcome := outcomeSent
	switch {
	case pubErr == nil:
	case errors.Is(pubErr, broker.ErrUnavailable):
		outcome = outcomeLocal
	default:
		outcome = outcomeNone
	}
	if pubErr != nil && fresh != nil {
		// A claim left held would make a retry to another node look like
		// a duplicate of a publication that reached this node only.
		var made []string
		for j, p := range keyed {
			if fresh[j] {
				made = append(made, p.key)
			}
		}
		if len(made) > 0 {
			h.b.(broker.Claimer).Release(context.WithoutCancel(ctx), made)
		}
	}
	h.keys.finish(keyed, dup, skip, outcome)
	if pubErr != nil {
		return nil, pubErr
	}
	if claimErr != nil {
		// All skipped: delivered on this node earlier, still not beyond.
		return nil, claimErr
	}
	return dup, nil
}

// outcome is what became of the messages a call sent.
type outcome uint8

const (
	outcomeNone  outcome = iota // delivered nowhere
	outcomeLocal                // delivered on this node only
	outcomeSent                 // sent through the broker
)

// recordKey is the key of a message in the record and in broker claims:
// channel names cannot contain '|', so it is unambiguous.
func recordKey(m Message) string { return m.Channel + "|" + m.Key }

// begin marks the keyed messages of a call busy, marks as duplicates
// those this node knows were sent (and repeats within msgs), and returns
// the others. When a key is busy it undoes its marks and returns
// ErrKeyInProgress.
func (r *keyRecord) begin(msgs []Message, dup []bool, window time.Duration) ([]pending, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	var keyed []pending
	seen := map[string]bool{}
	for i, m := range msgs {
		if m.Key == "" {
			continue
		}
		k := recordKey(m)
		if seen[k] {
			dup[i] = true
			continue
		}
		seen[k] = true
		e, ok := r.m.Get(k, now)
		switch {
		case ok && e.busy:
			for _, p := range keyed {
				r.restore(p, now)
			}
			return nil, fmt.Errorf("publication %d: %w", i, ErrKeyInProgress)
		case ok && !e.local:
			dup[i] = true
			continue
		}
		p := pending{i: i, key: k, until: now.Add(window)}
		if ok {
			p.before = &e
		}
		r.m.Set(k, keyEntry{local: e.local, busy: true, until: p.until}, p.until, now)
		keyed = append(keyed, p)
	}
	return keyed, nil
}

// finish records what became of the keyed messages of a call. A
// duplicate found by the broker's claim is left to the claim, which
// expires a window after the first publication, not after this retry.
func (r *keyRecord) finish(keyed []pending, dup, skip []bool, o outcome) {
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.now()
	for _, p := range keyed {
		if dup[p.i] || skip[p.i] || o == outcomeNone {
			r.restore(p, now)
			continue
		}
		r.m.Set(p.key, keyEntry{local: o == outcomeLocal, until: p.until}, p.until, now)
	}
}

// restore puts back what the record held before begin.
func (r *keyRecord) restore(p pending, now time.Time) {
	if p.before != nil {
		r.m.Set(p.key, *p.before, p.before.until, now)
	} else {
		r.m.Delete(p.key)
	}
}
