package proxy

import (
	"math"
	"time"

	"github.com/gobwas/ws"
	"golang.org/x/time/rate"
)

// rateLimits are a side's token buckets. Only the side's reader charges
// them, so they can be charged without asking the limiters each time: the
// frames of one read share that read's time, and a frame's charge is
// settled against the tokens the bucket held at that time less what the
// read's earlier frames took. The limiter itself is charged once per read
// (before the first charge at a later time), and every decision is the
// one charging it frame by frame at the read's time would have made (up to
// the last bit of the float it keeps the tokens in).
type rateLimits struct {
	msg, bytes bucket
	byteMax    int64     // bytes' burst: a larger frame is charged this much
	at         time.Time // the time of the read being charged
}

// bucket is one limiter and what has been charged against it at
// rateLimits.at but not yet taken from it.
type bucket struct {
	lim   *rate.Limiter
	avail float64 // tokens at `at`, less used
	used  int
}

// newRateLimits makes the buckets of r, or returns nil when it limits
// nothing.
func newRateLimits(r *RateLimit) *rateLimits {
	if !r.enabled() {
		return nil
	}
	l := &rateLimits{}
	if r.Messages > 0 {
		b := r.MessageBurst
		if b == 0 {
			b = max(1, int(math.Ceil(r.Messages)))
		}
		l.msg.lim = rate.NewLimiter(rate.Limit(r.Messages), b)
	}
	if r.Bytes > 0 {
		b := r.ByteBurst
		if b == 0 {
			b = max(1, int(math.Ceil(r.Bytes)))
		}
		l.bytes.lim = rate.NewLimiter(rate.Limit(r.Bytes), b)
		l.byteMax = int64(b)
	}
	return l
}

// advance moves the buckets to now, taking what was charged at the
// previous time from the limiters.
func (l *rateLimits) advance(now time.Time) {
	l.msg.settle(l.at)
	l.bytes.settle(l.at)
	l.at = now
	l.msg.avail = l.msg.tokens(now)
	l.bytes.avail = l.bytes.tokens(now)
}

// allow charges a frame of msgs messages and n bytes, to both buckets or
// to neither, at the time of the last advance.
func (l *rateLimits) allow(msgs, n int) bool {
	if !l.msg.allow(msgs) {
		return false
	}
	if !l.bytes.allow(n) {
		l.msg.avail += float64(msgs)
		l.msg.used -= msgs
		return false
	}
	return true
}

func (b *bucket) tokens(now time.Time) float64 {
	if b.lim == nil {
		return 0
	}
	return b.lim.TokensAt(now)
}

// settle takes what was charged at `at` from the limiter. The tokens were
// there at that time, and nothing else charges it, so it always allows.
func (b *bucket) settle(at time.Time) {
	if b.used > 0 {
		b.lim.AllowN(at, b.used)
		b.used = 0
	}
}

// allow charges n tokens if the bucket holds them; like
// rate.Limiter.AllowN, it never allows more than the burst.
func (b *bucket) allow(n int) bool {
	if b.lim == nil {
		return true
	}
	if float64(n) > b.avail {
		return false
	}
	b.avail -= float64(n)
	b.used += n
	return true
}

// limit applies the rate limits of src to a frame of n payload bytes:
// a control frame, or a data frame (newMsg: the first of its message).
// It reports whether the frame is to be dropped.
func (c *relay) limit(src, dst *peer, control, newMsg bool, n int64) (drop bool, err error) {
	l := src.rate
	if l == nil {
		return false, nil
	}
	counts := control || newMsg // the frame counts as a message
	if src.limits.Rate.OnExceed == ExceedThrottle {
		now := c.cfg.now()
		var wait time.Duration
		if counts && l.msg.lim != nil {
			wait = l.msg.lim.ReserveN(now, 1).DelayFrom(now)
		}
		if l.bytes.lim != nil {
			wait = max(wait, l.bytes.lim.ReserveN(now, int(min(n, l.byteMax))).DelayFrom(now))
		}
		if wait > 0 {
			c.countLimited(src, ExceedThrottle)
			// Frames read before this one leave now, not after the wait.
			if err := c.flush(src, dst); err != nil {
				return false, err
			}
			t := time.NewTimer(wait)
			defer t.Stop()
			select {
			case <-t.C:
			case <-c.quitChan():
				return false, errClosing
			}
		}
		return false, nil
	}
	if src.rd.fresh {
		// The first frame charged since a read: the read's time.
		src.rd.fresh = false
		l.advance(c.cfg.now())
	}
	msgs := 0
	if counts {
		msgs = 1
	}
	if l.allow(msgs, int(min(n, l.byteMax))) {
		return false, nil
	}
	if src.limits.Rate.OnExceed == ExceedDrop && counts {
		c.countLimited(src, ExceedDrop)
		// A control frame is dropped alone (the message it came between
		// goes on); a message is dropped whole, all its fragments. Half a
		// message can't be dropped: a later fragment over the limit
		// closes the connection.
		if newMsg && src.fragmented {
			src.dropping = true
		}
		return true, nil
	}
	c.countLimited(src, ExceedClose)
	return false, &closeErr{code: ws.StatusPolicyViolation, reason: "rate limit exceeded"}
}
