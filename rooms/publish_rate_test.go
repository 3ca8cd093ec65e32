package rooms_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/fakeclock"
	"github.com/wsgate/wsgate/rooms"
)

// publishN sends n publishes on channel and counts the accepted ones; every
// other reply must be rate_limited, echo its id and say the limit.
func (c *client) publishN(channel string, n int, wantLimit string) (accepted int) {
	c.t.Helper()
	for i := 0; i < n; i++ {
		r := c.send(fmt.Sprintf(`{"id":%d,"op":"publish","channel":%q,"data":%d}`, i, channel, i))
		switch {
		case r.Op == "ok":
			accepted++
		case r.Op == "error" && r.Code == rooms.CodeRateLimited:
			if r.ID == nil || *r.ID != int64(i) || !strings.Contains(r.Message, wantLimit) {
				c.t.Fatalf("publish %d: %+v; want its id and %q in the message", i, r, wantLimit)
			}
		default:
			c.t.Fatalf("publish %d: %+v; want ok or rate_limited", i, r)
		}
	}
	return accepted
}

// TestConnPublishRate: each connection's publishes go through a token
// bucket (by default 50/s, burst 100); one over it gets rate_limited and
// reaches nobody, and the connection goes on.
func TestConnPublishRate(t *testing.T) {
	type step struct {
		after    time.Duration // clock moves this much first
		publish  int
		accepted int
	}
	tests := []struct {
		name  string
		rate  float64
		burst int
		limit string // in the rate_limited message
		steps []step
	}{
		{"default 50/s burst 100", 0, 0, "50 publishes/s (burst 100)", []step{
			{0, 20_000, 100},               // a flood: the burst goes, nothing more
			{19 * time.Millisecond, 10, 0}, // less than one token back
			{time.Millisecond, 10, 1},      // 20 ms: one
			{time.Second, 100, 50},         // one second: 50
			{time.Hour, 500, 100},          // idle: no more than the burst
		}},
		{"explicit rate and burst", 10, 3, "10 publishes/s (burst 3)", []step{
			{0, 10, 3},
			{100 * time.Millisecond, 10, 1},
			{time.Second, 20, 3},
		}},
		{"burst defaults to twice the rate", 10, 0, "10 publishes/s (burst 20)", []step{
			{0, 50, 20},
			{time.Second, 50, 10},
		}},
		{"fractional rate", 0.5, 0, "0.5 publishes/s (burst 1)", []step{
			{0, 5, 1},
			{time.Second, 5, 0},
			{time.Second, 5, 1},
		}},
		{"off", -1, 0, "", []step{
			{0, 20_000, 20_000},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := newMemoryHub(t)
			clock := fakeclock.New(time.Unix(1_700_000_000, 0))
			reader := newClient(t, h, rooms.ConnConfig{})
			reader.ok(`{"op":"subscribe","channel":"room:1"}`)
			pub := newClient(t, h, rooms.ConnConfig{PublishRate: tc.rate, PublishBurst: tc.burst, Now: clock.Now})
			total := 0
			for i, s := range tc.steps {
				clock.Advance(s.after)
				if got := pub.publishN("room:1", s.publish, tc.limit); got != s.accepted {
					t.Fatalf("step %d: %d of %d publishes accepted, want %d", i, got, s.publish, s.accepted)
				}
				total += s.accepted
				if n := len(reader.sess.queued()); n != total {
					t.Fatalf("step %d: the reader got %d messages, want the %d accepted", i, n, total)
				}
			}
			// Other requests are not counted, and the connection is open.
			pub.ok(`{"op":"ping"}`)
			pub.ok(`{"op":"subscribe","channel":"room:2"}`)
			if len(pub.sess.closes) != 0 {
				t.Fatalf("the publisher was closed: %v", pub.sess.closes)
			}
		})
	}
}

// TestConnPublishRatePerConnection: one connection's flood takes nothing
// from another's allowance, and publishes that are refused for another
// reason (policy, size) take no token.
func TestConnPublishRatePerConnection(t *testing.T) {
	h, _ := newMemoryHub(t)
	clock := fakeclock.New(time.Unix(1_700_000_000, 0))
	cfg := rooms.ConnConfig{
		PublishRate: 1, PublishBurst: 2, MaxData: 8, Now: clock.Now,
		Authorize: func(action, channel string) bool { return !strings.HasPrefix(channel, "secret:") },
	}
	flooder, other := newClient(t, h, cfg), newClient(t, h, cfg)
	if got := flooder.publishN("room:1", 1000, "1 publishes/s (burst 2)"); got != 2 {
		t.Fatalf("flooder: %d accepted, want 2", got)
	}
	for i := 0; i < 10; i++ {
		other.refused(`{"op":"publish","channel":"secret:1","data":1}`, rooms.CodeForbidden)
		other.refused(`{"op":"publish","channel":"room:1","data":"0123456789"}`, rooms.CodeTooLarge)
	}
	other.ok(`{"op":"publish","channel":"room:1","data":1}`)
	other.ok(`{"op":"publish","channel":"room:1","data":2}`)
	other.refused(`{"op":"publish","channel":"room:1","data":3}`, rooms.CodeRateLimited)
}
