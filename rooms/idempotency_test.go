package rooms_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/internal/fakeclock"
	"github.com/wsgate/wsgate/rooms"
)

// flakyBroker is a memory broker (delivery and claims) whose calls fail as
// told: down fails publishes and claims as Redis does during an outage,
// pubErr fails publishes alone, and claimGate, when set, holds every Claim
// until it is closed.
type flakyBroker struct {
	*broker.Memory
	mu        sync.Mutex
	down      bool
	pubErr    error
	claimGate chan struct{}
	claiming  chan struct{}
	released  []string
	publishes int
	// claims, when set, holds the claims instead of the embedded memory
	// broker: another node's, for a cluster of hubs.
	claims broker.Claimer
}

var errDown = fmt.Errorf("%w: connection refused", broker.ErrUnavailable)

func (b *flakyBroker) fail() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.down {
		return errDown
	}
	return b.pubErr
}

func (b *flakyBroker) set(down bool, pubErr error) {
	b.mu.Lock()
	b.down, b.pubErr = down, pubErr
	b.mu.Unlock()
}

func (b *flakyBroker) Publish(ctx context.Context, ch string, data []byte) error {
	b.mu.Lock()
	b.publishes++
	b.mu.Unlock()
	if err := b.fail(); err != nil {
		return err
	}
	return b.Memory.Publish(ctx, ch, data)
}

func (b *flakyBroker) Claim(ctx context.Context, keys []string, window time.Duration) ([]bool, error) {
	if b.claimGate != nil {
		b.claiming <- struct{}{}
		<-b.claimGate
	}
	b.mu.Lock()
	down := b.down
	b.mu.Unlock()
	if down {
		return nil, errDown
	}
	if b.claims != nil {
		return b.claims.Claim(ctx, keys, window)
	}
	return b.Memory.Claim(ctx, keys, window)
}

func (b *flakyBroker) Release(ctx context.Context, keys []string) error {
	b.mu.Lock()
	b.released = append(b.released, keys...)
	b.mu.Unlock()
	return b.Memory.Release(ctx, keys)
}

func newFlakyHub(t *testing.T) (*rooms.Hub, *flakyBroker, *recSub, *fakeclock.Clock) {
	t.Helper()
	h := rooms.NewHub()
	b := &flakyBroker{Memory: broker.NewMemory(h.Handle)}
	c := fakeclock.New(time.Unix(1_700_000_000, 0))
	b.SetClock(c.Now)
	h.SetClock(c.Now)
	h.SetBroker(b)
	t.Cleanup(func() { b.Close() })
	s := &recSub{}
	for _, ch := range []string{"a", "b"} {
		if err := h.Subscribe(context.Background(), ch, s); err != nil {
			t.Fatal(err)
		}
	}
	return h, b, s, c
}

func msg(ch, data, key string) rooms.Message {
	return rooms.Message{Channel: ch, Data: []byte(data), Key: key}
}

// TestPublishMessagesSteps runs sequences of publications on one hub and
// checks each answer, then what the subscriber got.
func TestPublishMessagesSteps(t *testing.T) {
	const window = time.Minute
	type step struct {
		before  func(b *flakyBroker, c *fakeclock.Clock)
		msgs    []rooms.Message
		wantDup string // "" for none, else e.g. "-d-" (d: duplicate)
		wantErr error
	}
	ok := func(*flakyBroker, *fakeclock.Clock) {}
	down := func(b *flakyBroker, _ *fakeclock.Clock) { b.set(true, nil) }
	up := func(b *flakyBroker, _ *fakeclock.Clock) { b.set(false, nil) }
	for _, tc := range []struct {
		name      string
		steps     []step
		delivered string
	}{
		{
			name: "retried within the window: once",
			steps: []step{
				{ok, []rooms.Message{msg("a", "1", "k")}, "-", nil},
				{ok, []rooms.Message{msg("a", "1", "k")}, "d", nil},
				{func(_ *flakyBroker, c *fakeclock.Clock) { c.Advance(window - time.Nanosecond) }, []rooms.Message{msg("a", "1", "k")}, "d", nil},
			},
			delivered: "1",
		},
		{
			name: "after the window: again",
			steps: []step{
				{ok, []rooms.Message{msg("a", "1", "k")}, "-", nil},
				{func(_ *flakyBroker, c *fakeclock.Clock) { c.Advance(window) }, []rooms.Message{msg("a", "1", "k")}, "-", nil},
			},
			delivered: "1,1",
		},
		{
			name: "repeats in one call",
			steps: []step{
				{ok, []rooms.Message{msg("a", "1", "k"), msg("a", "2", ""), msg("a", "3", "k"), msg("b", "4", "k")}, "--d-", nil},
			},
			delivered: "1,2,4",
		},
		{
			name: "outage: a retry to the same node is not delivered here again",
			steps: []step{
				{down, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{ok, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{ok, []rooms.Message{msg("a", "1", "k"), msg("a", "2", "j")}, "", broker.ErrUnavailable},
				// Back: the retry goes through the broker to every node,
				// this one included (its subscribers see it a second time).
				{up, []rooms.Message{msg("a", "1", "k")}, "-", nil},
				{ok, []rooms.Message{msg("a", "1", "k"), msg("a", "2", "j")}, "d-", nil},
				{ok, []rooms.Message{msg("a", "1", "k"), msg("a", "2", "j")}, "dd", nil},
			},
			delivered: "1,2,1,2",
		},
		{
			name: "outage: the node remembers for the window",
			steps: []step{
				{down, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{func(_ *flakyBroker, c *fakeclock.Clock) { c.Advance(window) }, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
			},
			delivered: "1,1",
		},
		{
			name: "outage: retries do not stretch the node's window",
			steps: []step{
				{down, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{func(_ *flakyBroker, c *fakeclock.Clock) { c.Advance(window / 2) }, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{func(_ *flakyBroker, c *fakeclock.Clock) { c.Advance(window / 2) }, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
			},
			delivered: "1,1",
		},
		{
			name: "claimed, then the publish fails: the claim is released",
			steps: []step{
				{func(b *flakyBroker, _ *fakeclock.Clock) { b.set(false, errDown) }, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrUnavailable},
				{up, []rooms.Message{msg("a", "1", "k")}, "-", nil},
			},
			delivered: "1,1",
		},
		{
			name: "publish fails for good: nothing recorded",
			steps: []step{
				{func(b *flakyBroker, _ *fakeclock.Clock) { b.set(false, broker.ErrClosed) }, []rooms.Message{msg("a", "1", "k")}, "", broker.ErrClosed},
				{up, []rooms.Message{msg("a", "1", "k")}, "-", nil},
			},
			delivered: "1",
		},
		{
			name: "invalid data: nothing sent, no key kept",
			steps: []step{
				{ok, []rooms.Message{msg("a", "1", "k"), msg("a", "\xff", "")}, "", rooms.ErrInvalidData},
				{ok, []rooms.Message{msg("a", "1", "k")}, "-", nil},
			},
			delivered: "1",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, b, s, c := newFlakyHub(t)
			for i, st := range tc.steps {
				st.before(b, c)
				dup, err := h.PublishMessages(context.Background(), st.msgs, window)
				if !errors.Is(err, st.wantErr) {
					t.Fatalf("step %d: error %v, want %v", i, err, st.wantErr)
				}
				var got strings.Builder
				for _, d := range dup {
					got.WriteString(map[bool]string{true: "d", false: "-"}[d])
				}
				if got.String() != st.wantDup {
					t.Fatalf("step %d: duplicates %q, want %q", i, got.String(), st.wantDup)
				}
			}
			if got := strings.Join(s.data(), ","); got != tc.delivered {
				t.Fatalf("delivered %s, want %s", got, tc.delivered)
			}
		})
	}
}

func TestPublishMessagesReleasesOnlyItsClaims(t *testing.T) {
	h, b, _, _ := newFlakyHub(t)
	ctx := context.Background()
	if _, err := h.PublishMessages(ctx, []rooms.Message{msg("a", "1", "old")}, time.Minute); err != nil {
		t.Fatal(err)
	}
	b.set(false, errDown)
	_, err := h.PublishMessages(ctx, []rooms.Message{msg("a", "1", "old"), msg("a", "2", "new"), msg("b", "3", "")}, time.Minute)
	if !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("error %v, want ErrUnavailable", err)
	}
	if got := strings.Join(b.released, ","); got != "a|new" {
		t.Fatalf("released %q, want only the claim this call made (a|new)", got)
	}
}

// TestPublishMessagesConcurrentRetry: a retry sent while the first attempt
// is still being published on this node is refused with ErrKeyInProgress,
// sends nothing, and once the first is done it is a duplicate.
func TestPublishMessagesConcurrentRetry(t *testing.T) {
	h, b, s, _ := newFlakyHub(t)
	b.claimGate, b.claiming = make(chan struct{}), make(chan struct{}, 1)
	ctx := context.Background()
	first := make(chan error, 1)
	go func() {
		_, err := h.PublishMessages(ctx, []rooms.Message{msg("a", "1", "k")}, time.Minute)
		first <- err
	}()
	<-b.claiming
	_, err := h.PublishMessages(ctx, []rooms.Message{msg("b", "0", "other"), msg("a", "1", "k")}, time.Minute)
	if !errors.Is(err, rooms.ErrKeyInProgress) || !strings.Contains(err.Error(), "publication 1") {
		t.Fatalf("concurrent retry: %v, want publication 1: ErrKeyInProgress", err)
	}
	close(b.claimGate)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	dup, err := h.PublishMessages(ctx, []rooms.Message{msg("b", "0", "other"), msg("a", "1", "k")}, time.Minute)
	if err != nil || !dup[1] || dup[0] {
		t.Fatalf("retry after the first: %v %v, want b:other sent and a:k a duplicate", dup, err)
	}
	if got := strings.Join(s.data(), ","); got != "1,0" {
		t.Fatalf("delivered %s, want 1,0", got)
	}
}

// TestPublishMessagesClaimUnavailable: once the claim finds the broker
// unreachable, the call delivers on this node without waiting for the
// broker to fail a second time.
func TestPublishMessagesClaimUnavailable(t *testing.T) {
	h, b, s, _ := newFlakyHub(t)
	b.set(true, nil)
	_, err := h.PublishMessages(context.Background(), []rooms.Message{msg("a", "1", "k"), msg("b", "2", "")}, time.Minute)
	if !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("error %v, want ErrUnavailable", err)
	}
	if b.publishes != 0 {
		t.Fatalf("%d publishes tried after the claim failed", b.publishes)
	}
	if got := strings.Join(s.data(), ","); got != "1,2" {
		t.Fatalf("delivered %s, want 1,2 on this node", got)
	}
}

// TestPublishMessagesWindowFromFirst: a node that learns of a duplicate
// from the claim does not start a window of its own: the key is free
// again on every node a window after it was first published.
func TestPublishMessagesWindowFromFirst(t *testing.T) {
	const window = time.Minute
	ctx := context.Background()
	a, ba, _, c := newFlakyHub(t)
	b, bb, sb, _ := newFlakyHub(t)
	b.SetClock(c.Now)
	bb.SetClock(c.Now)
	bb.claims = ba
	if _, err := a.PublishMessages(ctx, []rooms.Message{msg("a", "1", "k")}, window); err != nil {
		t.Fatal(err)
	}
	for _, st := range []struct {
		advance time.Duration
		wantDup bool
	}{
		{window / 2, true},
		{window/2 - time.Nanosecond, true},
		{time.Nanosecond, false},
		{window - time.Nanosecond, true},
	} {
		c.Advance(st.advance)
		dup, err := b.PublishMessages(ctx, []rooms.Message{msg("a", "1", "k")}, window)
		if err != nil || dup[0] != st.wantDup {
			t.Fatalf("at %v: dup %v, %v; want dup %v", c.Now().Sub(time.Unix(1_700_000_000, 0)), dup, err, st.wantDup)
		}
	}
	if got := strings.Join(sb.data(), ","); got != "1" {
		t.Fatalf("node B's subscriber got %s, want 1 (its own, after the window)", got)
	}
}
