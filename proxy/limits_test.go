package proxy

import (
	"math"
	"math/rand/v2"
	"testing"
	"time"

	"golang.org/x/time/rate"
)

// TestRateLimitsMatchLimiter: charging a side's buckets once per read
// makes the decisions that charging golang.org/x/time/rate's limiters
// frame by frame at the read's time makes (a frame charged to both
// buckets or to neither), whatever the reads, frames and sizes.
func TestRateLimitsMatchLimiter(t *testing.T) {
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 1))
		r := &RateLimit{
			Messages:     float64(1 + rng.IntN(50)),
			MessageBurst: rng.IntN(20),
			Bytes:        float64(1 + rng.IntN(5000)),
			ByteBurst:    rng.IntN(3000),
		}
		if rng.IntN(4) == 0 {
			r.Bytes, r.ByteBurst = 0, 0
		}
		got := newRateLimits(r)
		var ref [2]*rate.Limiter // what the buckets are made of, charged per frame
		if got.msg.lim != nil {
			ref[0] = rate.NewLimiter(got.msg.lim.Limit(), got.msg.lim.Burst())
		}
		if got.bytes.lim != nil {
			ref[1] = rate.NewLimiter(got.bytes.lim.Limit(), got.bytes.lim.Burst())
		}
		now := time.Unix(1_700_000_000, 0)
		allowed := 0
		for read := range 300 {
			now = now.Add(time.Duration(rng.IntN(int(50 * time.Millisecond))))
			got.advance(now)
			for frame := range 1 + rng.IntN(8) {
				msgs, n := rng.IntN(2), rng.IntN(400)
				want := true
				for i, l := range ref {
					if l != nil {
						want = want && l.TokensAt(now) >= float64([2]int{msgs, n}[i])
					}
				}
				if want {
					for i, l := range ref {
						if l != nil && !l.AllowN(now, [2]int{msgs, n}[i]) {
							t.Fatalf("seed %d: the reference limiter refused what it held", seed)
						}
					}
					allowed++
				}
				if ok := got.allow(msgs, n); ok != want {
					t.Fatalf("seed %d, read %d, frame %d (%d messages, %d bytes): allowed %v, want %v",
						seed, read, frame, msgs, n, ok, want)
				}
			}
		}
		// What was charged reached the limiters (taken at once, not frame
		// by frame: the float may differ in its last bit).
		got.advance(now.Add(time.Hour))
		for i, b := range []*bucket{&got.msg, &got.bytes} {
			if b.lim != nil && math.Abs(b.lim.TokensAt(now)-ref[i].TokensAt(now)) > 1e-9 {
				t.Fatalf("seed %d: bucket %d holds %v tokens, the reference %v", seed, i, b.lim.TokensAt(now), ref[i].TokensAt(now))
			}
		}
		if allowed == 0 {
			t.Fatalf("seed %d: nothing allowed", seed)
		}
	}
}
