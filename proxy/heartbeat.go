package proxy

import (
	"bytes"
	"encoding/json"
	"math"
	"time"

	"github.com/gobwas/ws"
)

// tick runs when the client's read deadline passes: it sends a ping after
// pingAfter (the connection's share of PingInterval) of silence, drops a
// client that did not answer within PongTimeout, enforces the token's
// expiry and IdleTimeout, and sets the next deadline. Deadlines change
// only here, never per frame.
func (c *relay) tick() error {
	if c.closing.Load() {
		return errClosing
	}
	cfg := c.cfg
	now := mono()
	next := int64(math.MaxInt64)
	if cfg.PingInterval > 0 {
		if c.pingOut && c.client.rd.lastRead > c.pingAt {
			c.pingOut = false
		}
		if c.pingOut {
			due := c.pingAt + int64(cfg.PongTimeout)
			if now >= due {
				return &closeErr{side: clientSide, code: ws.StatusGoingAway, reason: "ping timeout"}
			}
			next = due
		} else if due := c.client.rd.lastRead + c.pingAfter; now < due {
			next = due
		} else {
			wrote, err := c.client.w.tryControl(ws.OpPing, c.pingToken[:])
			switch {
			case err != nil:
				return err
			case wrote:
				c.lockMiss = 0
				c.pingOut, c.pingAt = true, now
				next = now + int64(cfg.PongTimeout)
			case !c.client.w.writing():
				// The writer is held by a frame whose payload is still
				// coming from the upstream: the client is not the one
				// stalling. Try again shortly.
				c.lockMiss = 0
				next = now + int64(min(time.Second, cfg.PongTimeout))
			default:
				// A write to the client is in progress. Its deadline ends
				// it if the client stopped reading; without one, a write
				// that lasts PongTimeout means the client is not reading.
				if c.lockMiss == 0 {
					c.lockMiss = now
				} else if now-c.lockMiss >= int64(cfg.PongTimeout) {
					return &closeErr{side: clientSide, code: ws.StatusGoingAway, reason: "ping timeout"}
				}
				next = now + int64(min(time.Second, cfg.PongTimeout))
			}
		}
	}
	if c.expiry != 0 {
		if now >= c.expiry {
			return &closeErr{side: clientSide, code: ws.StatusPolicyViolation, reason: "token expired"}
		}
		next = min(next, c.expiry)
	}
	if cfg.IdleTimeout > 0 {
		due := c.lastData.Load() + int64(cfg.IdleTimeout)
		if now >= due {
			return &closeErr{side: gatewaySide, code: ws.StatusGoingAway, reason: "idle timeout"}
		}
		next = min(next, due)
	}
	c.nextTick = next
	if next != math.MaxInt64 {
		c.client.rd.conn.SetReadDeadline(epoch.Add(time.Duration(next)))
	} else {
		// Nothing is due (the expiry was lifted): no deadline, not the
		// one that woke us.
		c.client.rd.conn.SetReadDeadline(time.Time{})
	}
	if c.closing.Load() {
		// beginClosing raced with us: its deadline wins.
		c.client.rd.conn.SetReadDeadline(c.readDeadline(&c.client))
	}
	return nil
}

// pingAfter draws a connection's silence before a ping: between 3/4 of
// interval and all of it. Connections opened together (after a restart,
// say) then ping at different times, and drift further apart with every
// ping, so their heartbeats never come in one wave.
func pingAfter(interval time.Duration, rnd func(int) int) int64 {
	const steps = 1024
	return int64(interval) - int64(interval/4)*int64(rnd(steps))/steps
}

// maxRefreshMessage bounds the client text messages inspected for an
// in-band token refresh.
const maxRefreshMessage = 12 << 10

// setExpiry records when the client's credentials expire.
func (c *relay) setExpiry(exp time.Time) {
	c.expiry = max(1, mono()+int64(exp.Sub(c.cfg.Now())))
}

// refresher verifies tokens sent in band (RequestInfo.Refresh); field is
// the message's field, quoted.
type refresher struct {
	verify func(token string) (time.Time, error)
	field  string
}

// tryRefresh consumes a client message {"<field>": "<token>"}: the token is
// verified, and the connection's expiry moves to the new token's. A refresh
// with a bad token closes the connection (1008 "invalid token"), one with
// a token that has already expired too (1008 "token expired"). It runs
// after the size and rate limits, so signature checks are bounded like
// any other message.
func (c *relay) tryRefresh(payload []byte) (bool, error) {
	if len(payload) == 0 || payload[0] != '{' || !bytes.Contains(payload, []byte(c.refresh.field)) {
		return false, nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(payload, &m) != nil {
		return false, nil
	}
	raw, ok := m[c.refresh.field[1:len(c.refresh.field)-1]]
	if !ok {
		return false, nil
	}
	var token string
	if json.Unmarshal(raw, &token) != nil || token == "" {
		return true, &closeErr{code: ws.StatusPolicyViolation, reason: "invalid token"}
	}
	exp, err := c.refresh.verify(token)
	if err != nil {
		return true, &closeErr{code: ws.StatusPolicyViolation, reason: "invalid token"}
	}
	if err := c.extend(exp); err != nil {
		return true, err
	}
	return true, c.tick()
}

// errRefreshExpired is a refresh with a token whose exp has passed.
var errRefreshExpired = &closeErr{side: clientSide, code: ws.StatusPolicyViolation, reason: "token expired"}

// extend moves the connection's expiry to exp (zero: never); a time that
// has already passed is refused. The next deadline is set by the caller's
// tick.
func (c *relay) extend(exp time.Time) error {
	if !exp.IsZero() && !exp.After(c.cfg.Now()) {
		return errRefreshExpired
	}
	if exp.IsZero() {
		c.expiry = 0
	} else {
		c.setExpiry(exp)
	}
	if c.client.rd.onTimeout == nil {
		c.client.rd.onTimeout = c.tick
		c.client.rd.track = true
	}
	return nil
}
