package wsgate

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"time"
)

// SubState is where a subscription stands.
type SubState int

const (
	// Subscribing: the subscribe request is on its way (or waits for a connection).
	Subscribing SubState = iota
	// Subscribed: the gateway said ok.
	Subscribed
	// Unsubscribed: over, by Unsubscribe, a refusal, or the client's end.
	Unsubscribed
)

func (s SubState) String() string { return [...]string{"subscribing", "subscribed", "unsubscribed"}[s] }

// Position is a place in a channel's history: an epoch and an offset in it.
type Position struct {
	Epoch  string `json:"epoch"`
	Offset uint64 `json:"offset"`
}

// MessageInfo comes with each message.
type MessageInfo struct {
	Channel string
	// Offset of the message in the channel's history; 0 when the channel
	// keeps none (or the message came by a plain Redis PUBLISH).
	Offset uint64
}

// SubscribedInfo comes with each ok to a subscribe: the first, and the one
// after every reconnect.
type SubscribedInfo struct {
	// First is true for the first subscribe of the subscription.
	First bool
	// Recovered is true when the gateway replayed everything missed since
	// the last message delivered. False after a resubscribe means messages
	// may have been missed: the app must reload its state.
	Recovered bool
	// Epoch and Offset are the channel's position in the reply (empty on
	// channels without history).
	Epoch  string
	Offset uint64
}

// PresenceEvent is a join or a leave.
type PresenceEvent struct {
	Channel string
	Conn    string
	Subject string
	Claims  map[string]any
}

// Handlers are a subscription's callbacks; any may be nil. They run on the
// client's callback goroutine, in order: after a (re)subscribe, Subscribed
// first, then the recovered messages, then live ones.
type Handlers struct {
	Message    func(data json.RawMessage, info MessageInfo)
	Subscribed func(SubscribedInfo)
	// Reset: history broke; messages before pos may be missing. Reload.
	Reset func(pos Position)
	Join  func(PresenceEvent)
	Leave func(PresenceEvent)
	// Error: a resubscribe was refused (the subscription ends on forbidden,
	// bad_request and not_found, and is tried again later otherwise).
	Error func(err error)
}

// SubscribeOptions tune a subscription.
type SubscribeOptions struct {
	// Since makes the first subscribe a recovery from this position (one
	// the app kept, e.g. across restarts).
	Since *Position
}

// Subscription is a channel the client stays subscribed to across
// reconnects.
type Subscription struct {
	c       *Client
	channel string
	h       Handlers

	// under the client's mu
	state  SubState
	pos    Position // last message read (or reply, or reset): since for a resubscribe
	hasPos bool
	// dpos is pos as of the last callback run: what Position reports, so
	// that a position saved for Since never passes a message dropped when
	// the subscription ended with callbacks still queued.
	dpos    Position
	hasDpos bool
	made    bool       // an ok came once
	first   chan error // the first answer, for Subscribe; nil after it
	retry   bool       // refused for now: subscribe again after a delay
	// retryAt is when (zero: not yet set by the serve loop); attempt
	// counts the refusals since the last ok.
	retryAt time.Time
	attempt int
}

// Subscribe subscribes to channel and waits for the gateway's answer; while
// not connected, it waits for the connection. An error reply is returned as
// an *Error and leaves no subscription; so does ctx ending first, which
// returns ctx.Err() at once (an unsubscribe is sent, not waited for).
func (c *Client) Subscribe(ctx context.Context, channel string, h Handlers, opts SubscribeOptions) (*Subscription, error) {
	c.mu.Lock()
	if c.state == Closed {
		err := c.closeErr
		c.mu.Unlock()
		return nil, err
	}
	if c.byCh[channel] != nil {
		c.mu.Unlock()
		return nil, ErrAlreadySubscribed
	}
	s := &Subscription{c: c, channel: channel, h: h, first: make(chan error, 1)}
	if opts.Since != nil {
		s.pos, s.hasPos = *opts.Since, true
		s.dpos, s.hasDpos = s.pos, true
	}
	c.subs = append(c.subs, s)
	c.byCh[channel] = s
	if c.cur != nil {
		s.sendLocked(c.cur)
	}
	first := s.first
	c.mu.Unlock()
	select {
	case err := <-first:
		if err != nil {
			return nil, err
		}
		return s, nil
	case <-ctx.Done():
		// The unsubscribe follows the subscribe on the connection; waiting
		// for its reply would outlast ctx on a dead path.
		c.mu.Lock()
		s.leaveLocked()
		c.mu.Unlock()
		return nil, ctx.Err()
	}
}

// Channel is the subscription's channel.
func (s *Subscription) Channel() string { return s.channel }

// State is the subscription's state now.
func (s *Subscription) State() SubState {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.state
}

// Position is where the subscription stands in the channel's history: the
// last message whose handler has run or is running (or the reply's or
// reset's position once its handler has); ok is false on channels without
// history. A message read but never handled (the subscription ended first)
// is not counted, so Position is safe to keep for SubscribeOptions.Since.
func (s *Subscription) Position() (pos Position, ok bool) {
	s.c.mu.Lock()
	defer s.c.mu.Unlock()
	return s.dpos, s.hasDpos
}

// Unsubscribe ends the subscription: no handler of it runs after Unsubscribe
// returns. When connected, it waits for the gateway's reply.
func (s *Subscription) Unsubscribe(ctx context.Context) error {
	c := s.c
	c.mu.Lock()
	cl := s.leaveLocked()
	c.mu.Unlock()
	if cl == nil {
		return nil
	}
	select {
	case r := <-cl.res:
		if errors.Is(r.err, ErrConnectionLost) {
			return nil // the gateway forgot the subscription with the connection
		}
		if r.err != nil {
			return r.err
		}
		if r.msg.Op == "error" {
			return &Error{Code: r.msg.Code, Message: r.msg.Message}
		}
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// leaveLocked ends s and, when connected, sends the unsubscribe, whose call
// it returns (nil when not connected or already over).
func (s *Subscription) leaveLocked() *call {
	c := s.c
	if s.state == Unsubscribed {
		return nil
	}
	s.removeLocked()
	s.endLocked(nil)
	if c.cur == nil {
		return nil
	}
	cl := &call{req: request{Op: "unsubscribe", Channel: s.channel}, res: make(chan callResult, 1)}
	c.sendLocked(c.cur, cl)
	return cl
}

func (s *Subscription) removeLocked() {
	c := s.c
	if i := slices.Index(c.subs, s); i >= 0 {
		c.subs = slices.Delete(c.subs, i, i+1)
	}
	if c.byCh[s.channel] == s {
		delete(c.byCh, s.channel)
	}
}

// endLocked marks s over and answers a Subscribe still waiting.
func (s *Subscription) endLocked(err error) {
	s.state = Unsubscribed
	if s.first != nil {
		if err == nil {
			err = ErrClosed
		}
		s.first <- err
		s.first = nil
	}
}

// lostLocked: the connection ended; the subscription is made again on the
// next one.
func (s *Subscription) lostLocked() {
	if s.state == Subscribed {
		s.state = Subscribing
	}
	s.retry, s.retryAt = false, time.Time{}
}

// sendLocked sends the subscribe request, with since once a position is known.
func (s *Subscription) sendLocked(cn *conn) {
	req := request{Op: "subscribe", Channel: s.channel}
	var since *Position
	if s.hasPos {
		p := s.pos
		since = &p
		req.Since = since
	}
	s.state = Subscribing
	s.c.sendLocked(cn, &call{req: req,
		onReply: func(m *inMsg) { s.reply(cn, m, since) },
		onFail:  func(err error) { s.unreadable(cn, err) }})
}

// unreadable handles a reply to a subscribe that could not be decoded: the
// first goes to Subscribe's caller, a later one is retried like an
// unavailable.
func (s *Subscription) unreadable(cn *conn, err error) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.state == Unsubscribed {
		return
	}
	if s.first != nil {
		s.removeLocked()
		s.endLocked(err)
		return
	}
	s.retryLocked(cn, err)
}

// retryLocked: the subscribe failed for now; the serve loop sends it again
// after a delay.
func (s *Subscription) retryLocked(cn *conn, err error) {
	s.retry = true
	select {
	case cn.resub <- struct{}{}:
	default:
	}
	if s.h.Error != nil {
		h := s.h.Error
		s.dispatch(func() { h(err) })
	}
}

// dispatch runs f on the callback goroutine unless s has ended by then.
func (s *Subscription) dispatch(f func()) {
	c := s.c
	c.disp.push(func() {
		c.mu.Lock()
		over := s.state == Unsubscribed
		c.mu.Unlock()
		if !over {
			f()
		}
	})
}

// dispatchAt is dispatch (f may be nil) that also moves the position
// Position reports to pos, just before f runs.
func (s *Subscription) dispatchAt(pos Position, ok bool, f func()) {
	c := s.c
	c.disp.push(func() {
		c.mu.Lock()
		over := s.state == Unsubscribed
		if !over {
			s.dpos, s.hasDpos = pos, ok
		}
		c.mu.Unlock()
		if !over && f != nil {
			f()
		}
	})
}

// reply handles the answer to a subscribe, on the reader goroutine, before
// the messages that follow it.
func (s *Subscription) reply(cn *conn, m *inMsg, since *Position) {
	c := s.c
	c.mu.Lock()
	defer c.mu.Unlock()
	if s.state == Unsubscribed {
		return
	}
	if m.Op == "error" {
		err := &Error{Code: m.Code, Message: m.Message}
		if s.first != nil || m.Code == "forbidden" || m.Code == "bad_request" || m.Code == "not_found" {
			// A first subscribe's refusal goes to its caller; a later one
			// that would be refused again ends the subscription.
			waiting := s.first != nil
			s.removeLocked()
			s.endLocked(err)
			if !waiting && s.h.Error != nil {
				h := s.h.Error
				c.disp.push(func() { h(err) })
			}
			return
		}
		// unavailable, rate_limited: the same subscribe works later.
		s.retryLocked(cn, err)
		return
	}
	info := SubscribedInfo{First: !s.made}
	if m.Epoch != "" && m.Offset != nil {
		info.Epoch, info.Offset = m.Epoch, *m.Offset
		if since != nil && m.Recovered != nil && *m.Recovered && m.Epoch == since.Epoch {
			// What was missed follows; s.pos stays at the last delivered.
			info.Recovered = true
		} else {
			s.pos = Position{Epoch: m.Epoch, Offset: *m.Offset}
		}
		s.hasPos = true
	}
	s.state = Subscribed
	s.made = true
	s.attempt = 0
	if s.first != nil {
		s.first <- nil
		s.first = nil
	}
	var f func()
	if h := s.h.Subscribed; h != nil {
		f = func() { h(info) }
	}
	s.dispatchAt(s.pos, s.hasPos, f)
}

// deliver handles a message, reset, join or leave of s's channel, on the
// reader goroutine: a message at or before the last delivered offset was
// delivered already (a recovery overlaps what came live) and is dropped.
func (s *Subscription) deliver(m *inMsg) {
	c := s.c
	c.mu.Lock()
	if s.state == Unsubscribed {
		c.mu.Unlock()
		return
	}
	var f func()
	moves := true // the position after m is what Position reports once f ran
	switch m.Op {
	case "message":
		info := MessageInfo{Channel: s.channel}
		if m.Offset != nil {
			if s.hasPos && *m.Offset <= s.pos.Offset {
				c.mu.Unlock()
				return
			}
			info.Offset = *m.Offset
			s.pos.Offset = *m.Offset
			s.hasPos = s.pos.Epoch != ""
		}
		if h := s.h.Message; h != nil {
			data := m.Data
			f = func() { h(data, info) }
		}
	case "reset":
		pos := Position{Epoch: m.Epoch}
		if m.Offset != nil {
			pos.Offset = *m.Offset
		}
		s.pos, s.hasPos = pos, true
		if h := s.h.Reset; h != nil {
			f = func() { h(pos) }
		}
	case "join", "leave":
		moves = false
		ev := PresenceEvent{Channel: s.channel, Conn: m.Conn, Subject: m.Subject, Claims: m.Claims}
		h := s.h.Join
		if m.Op == "leave" {
			h = s.h.Leave
		}
		if h != nil {
			f = func() { h(ev) }
		}
	}
	pos, ok := s.pos, s.hasPos
	c.mu.Unlock()
	switch {
	case moves:
		s.dispatchAt(pos, ok, f)
	case f != nil:
		s.dispatch(f)
	}
}
