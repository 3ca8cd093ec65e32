package proxy

import (
	"time"

	"github.com/gobwas/ws"
)

// limit applies the rate limits of src to a frame of n payload bytes:
// a control frame, or a data frame (newMsg: the first of its message).
// It reports whether the frame is to be dropped.
func (c *relay) limit(src, dst *peer, control, newMsg bool, n int64) (drop bool, err error) {
	if src.msgLim == nil && src.byteLim == nil {
		return false, nil
	}
	now := c.cfg.now()
	counts := control || newMsg // the frame counts as a message
	if src.limits.Rate.OnExceed == ExceedThrottle {
		var wait time.Duration
		if counts && src.msgLim != nil {
			wait = src.msgLim.ReserveN(now, 1).DelayFrom(now)
		}
		if src.byteLim != nil {
			wait = max(wait, src.byteLim.ReserveN(now, int(min(n, src.byteMax))).DelayFrom(now))
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
	ok := true
	if counts && src.msgLim != nil {
		ok = src.msgLim.AllowN(now, 1)
	}
	if ok && src.byteLim != nil {
		ok = src.byteLim.AllowN(now, int(min(n, src.byteMax)))
	}
	if ok {
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
