package broker

import (
	"context"
	"time"

	"github.com/redis/go-redis/v9"
)

// Claimer is a broker that can claim keys for all the nodes that share
// it: the rooms hub uses it to deliver a publication retried with the
// same idempotency key once across the cluster. It is optional; the hub
// finds it by type assertion.
type Claimer interface {
	// Claim claims each key for window and reports, key by key, whether
	// this call made the claim (true) or found it held (false). A key
	// repeated in keys is claimed by its first occurrence. On an error no
	// claim of this call is left held (as far as the backend can be
	// reached to release it).
	Claim(ctx context.Context, keys []string, window time.Duration) ([]bool, error)
	// Release gives up claims this node made, for publications that could
	// not be sent.
	Release(ctx context.Context, keys []string) error
}

// claimSpace is where claims live under the broker's prefix.
const claimSpace = "idem:"

// Claim claims keys in this process (a single node has no one else to
// agree with).
func (m *Memory) Claim(_ context.Context, keys []string, window time.Duration) ([]bool, error) {
	m.mu.RLock()
	closed, now := m.closed, m.now
	m.mu.RUnlock()
	if closed {
		return nil, ErrClosed
	}
	t := time.Now()
	if now != nil {
		t = now()
	}
	fresh := make([]bool, len(keys))
	for i, k := range keys {
		fresh[i] = m.claims.SetIfAbsent(k, struct{}{}, t.Add(window), t)
	}
	return fresh, nil
}

// Release forgets claims.
func (m *Memory) Release(_ context.Context, keys []string) error {
	for _, k := range keys {
		m.claims.Delete(k)
	}
	return nil
}

// SetClock replaces the clock that claims expire by (time.Now); for tests.
func (m *Memory) SetClock(now func() time.Time) {
	m.mu.Lock()
	m.now = now
	m.mu.Unlock()
}

// Claim sets each key with SET <prefix>idem:<key> 1 NX PX <window>, all in
// one pipelined round trip (split by slot on a cluster).
func (r *Redis) Claim(ctx context.Context, keys []string, window time.Duration) ([]bool, error) {
	if err := r.usable(); err != nil {
		return nil, err
	}
	if len(keys) == 0 {
		return nil, nil
	}
	cmds := make([]*redis.BoolCmd, len(keys))
	_, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, k := range keys {
			cmds[i] = p.SetNX(ctx, r.opt.Prefix+claimSpace+k, 1, window)
		}
		return nil
	})
	fresh := make([]bool, len(keys))
	var made []string
	for i, c := range cmds {
		fresh[i] = c.Err() == nil && c.Val()
		if fresh[i] {
			made = append(made, keys[i])
		}
	}
	if err != nil {
		// Some claims may have been made before the failure: give them
		// back, or a retry elsewhere would be taken for a duplicate of a
		// publication that was never sent.
		if len(made) > 0 {
			r.Release(context.WithoutCancel(ctx), made)
		}
		return nil, r.failed(ctx, err)
	}
	return fresh, nil
}

// Release deletes claims, one DEL per key (keys of a cluster may live on
// different nodes), pipelined.
func (r *Redis) Release(ctx context.Context, keys []string) error {
	if err := r.usable(); err != nil {
		return err
	}
	if len(keys) == 0 {
		return nil
	}
	_, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, k := range keys {
			p.Del(ctx, r.opt.Prefix+claimSpace+k)
		}
		return nil
	})
	if err != nil {
		return r.failed(ctx, err)
	}
	return nil
}

// Interface guards
var (
	_ Claimer = (*Memory)(nil)
	_ Claimer = (*Redis)(nil)
)
