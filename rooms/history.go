package rooms

import (
	"context"
	"errors"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// ChannelOptions say what a channel keeps beyond live fan-out.
type ChannelOptions struct {
	// History, when set, keeps the channel's latest publications: every
	// delivery carries its offset, and a subscriber that comes back with
	// the last position it saw gets what it missed.
	History *broker.HistoryOptions
	// RecoverMax bounds the publications one recovery (or one history
	// request) returns; a subscriber that missed more is told that
	// recovery failed. Default (0): DefaultRecoverMax, and never more
	// than History.Size.
	RecoverMax int
	// Presence, when set, keeps who is subscribed to the channel.
	Presence *broker.PresenceOptions
}

// DefaultRecoverMax is ChannelOptions.RecoverMax when none is set.
const DefaultRecoverMax = 1000

// recoverMax is the bound on one recovery.
func (o ChannelOptions) recoverMax() int {
	n := o.RecoverMax
	if n <= 0 {
		n = DefaultRecoverMax
	}
	if o.History != nil {
		n = min(n, o.History.Size)
	}
	return n
}

// historyTimeout bounds a history read made while deliveries wait for it
// (a gap found in the live stream).
const historyTimeout = time.Second

var (
	errNoHistory  = errors.New("the broker keeps no history")
	errNoPresence = errors.New("the broker keeps no presence")
)

// SetChannelOptions sets how channels are kept: f is asked with a channel
// name whenever a publication, a subscription or a request needs to know.
// It may be called again (a config reload) while the hub is in use.
func (h *Hub) SetChannelOptions(f func(channel string) ChannelOptions) { h.opts.Store(&f) }

// Options returns the options of channel.
func (h *Hub) Options(channel string) ChannelOptions {
	if f := h.opts.Load(); f != nil {
		return (*f)(channel)
	}
	return ChannelOptions{}
}

// follow delivers p (through out) to whoever last got the publication at
// position at, and returns the position after it. A publication already
// delivered is skipped; one that skips offsets is preceded by those it
// skipped, read from history, or, when they cannot be read (trimmed,
// expired, more than the recovery bound, the broker unreachable), by a
// reset event that tells the subscriber it missed something; one of a new
// epoch (the history was lost) is preceded by a reset. Publications
// outside history (presence events, plain publications) pass as they come.
func (h *Hub) follow(channel string, at broker.Position, p *Publication, out func(*Publication)) broker.Position {
	if p.Offset == 0 || p.kind != kindMessage {
		out(p)
		return at
	}
	switch {
	case at.Epoch == "":
	case p.Epoch != at.Epoch:
		out(resetAt(channel, broker.Position{Epoch: p.Epoch, Offset: p.Offset - 1}))
	case p.Offset <= at.Offset:
		return at
	case p.Offset > at.Offset+1:
		if missed, ok := h.readGap(channel, at, p.Offset); ok {
			for _, m := range missed {
				out(m)
			}
		} else {
			out(resetAt(channel, broker.Position{Epoch: p.Epoch, Offset: p.Offset - 1}))
		}
	}
	out(p)
	return p.position()
}

// resetAt is the event that tells subscribers the channel's history broke:
// they may have missed publications before pos, which is where they are
// now.
func resetAt(channel string, pos broker.Position) *Publication {
	return &Publication{Channel: channel, Epoch: pos.Epoch, Offset: pos.Offset, kind: kindReset}
}

// readGap reads the publications after at and before offset from
// history, and reports whether it found every one.
func (h *Hub) readGap(channel string, at broker.Position, offset uint64) ([]*Publication, bool) {
	opt := h.Options(channel)
	hb, ok := h.b.(broker.Historian)
	want := offset - at.Offset - 1
	if !ok || opt.History == nil || want > uint64(opt.recoverMax()) {
		return nil, false
	}
	ctx, cancel := context.WithTimeout(context.Background(), historyTimeout)
	defer cancel()
	res, err := hb.History(ctx, channel, broker.HistoryQuery{After: at.Offset, Limit: int(want), Opt: *opt.History})
	if err != nil || res.Top.Epoch != at.Epoch || uint64(len(res.Pubs)) != want {
		return nil, false
	}
	return publications(channel, res.Top.Epoch, at.Offset, res.Pubs)
}

// publications turns stored publications into deliveries, and reports
// whether they follow after without a hole.
func publications(channel, epoch string, after uint64, stored []broker.Stored) ([]*Publication, bool) {
	out := make([]*Publication, len(stored))
	for i, s := range stored {
		if s.Offset != after+uint64(i)+1 {
			return nil, false
		}
		out[i] = &Publication{Channel: channel, Data: s.Data, Epoch: epoch, Offset: s.Offset}
	}
	return out, true
}

// Recovery is what a subscription to a channel with history starts from.
type Recovery struct {
	// Top is the channel's position when the subscription started: the
	// subscriber gets every publication after it (after Pubs).
	Top broker.Position
	// Recovered says whether Pubs are everything published after the
	// position asked for (false when none was asked).
	Recovered bool
	// Pubs are the publications missed, oldest first.
	Pubs []*Publication
}

// SubscribeHistory subscribes s to channel, which keeps history, and reads
// what s missed after since (nil: nothing asked). Until the caller calls
// done (it must, after sending s the reply and rec.Pubs), the publications
// that arrive are held for s; done delivers them after rec.Pubs, in order,
// without duplicate and without gap (or with a reset event where a gap
// cannot be filled). On an error s is not subscribed.
func (h *Hub) SubscribeHistory(ctx context.Context, channel string, s Subscriber, since *broker.Position) (rec Recovery, done func(), err error) {
	opt := h.Options(channel)
	hb, ok := h.b.(broker.Historian)
	if !ok || opt.History == nil {
		return rec, nil, errNoHistory
	}
	if err := h.subscribe(ctx, channel, s, &subState{pending: true}); err != nil {
		return rec, nil, err
	}
	q := broker.HistoryQuery{Opt: *opt.History}
	bound := opt.recoverMax()
	if since != nil {
		// One more than the bound tells a subscriber that missed too much.
		q.After, q.Limit = since.Offset, bound+1
	}
	res, err := hb.History(ctx, channel, q)
	if err != nil {
		h.Unsubscribe(context.WithoutCancel(ctx), channel, s)
		return rec, nil, err
	}
	rec.Top = res.Top
	if since != nil && since.Epoch == res.Top.Epoch && since.Offset <= res.Top.Offset && len(res.Pubs) <= bound {
		pubs, whole := publications(channel, res.Top.Epoch, since.Offset, res.Pubs)
		if whole && since.Offset+uint64(len(pubs)) == res.Top.Offset {
			rec.Recovered, rec.Pubs = true, pubs
		}
	}
	return rec, func() { h.caughtUp(channel, s, res.Top) }, nil
}

// caughtUp ends s's recovery at position at: the publications held for it
// are delivered from there on, and it becomes a live subscriber.
func (h *Hub) caughtUp(channel string, s Subscriber, at broker.Position) {
	r := h.room(channel)
	if r == nil {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.subs[s]
	if st == nil || !st.pending {
		return // unsubscribed meanwhile
	}
	for _, p := range st.held {
		at = h.follow(channel, at, p, s.Deliver)
	}
	st.pending, st.held, st.at = false, nil, at
	switch {
	case r.pos.Epoch == "":
		r.pos = at
	case r.pos.Epoch != at.Epoch:
		// s read a newer epoch than the live stream has shown: the others
		// learn now that the history they follow is gone.
		delete(r.subs, s)
		r.fan(resetAt(channel, at))
		r.subs[s] = st
		r.pos = at
	}
}

// ReadHistory returns the last limit publications of channel (at most the
// recovery bound) and its position.
func (h *Hub) ReadHistory(ctx context.Context, channel string, limit int) (broker.Position, []*Publication, error) {
	opt := h.Options(channel)
	hb, ok := h.b.(broker.Historian)
	if !ok || opt.History == nil {
		return broker.Position{}, nil, errNoHistory
	}
	res, err := hb.History(ctx, channel, broker.HistoryQuery{Latest: true, Limit: min(limit, opt.recoverMax()), Opt: *opt.History})
	if err != nil {
		return broker.Position{}, nil, err
	}
	pubs := make([]*Publication, len(res.Pubs))
	for i, s := range res.Pubs {
		pubs[i] = &Publication{Channel: channel, Data: s.Data, Epoch: res.Top.Epoch, Offset: s.Offset}
	}
	return res.Top, pubs, nil
}

// presencer is the broker's presence, for a channel that keeps it.
func (h *Hub) presencer(channel string) (broker.Presencer, broker.PresenceOptions, error) {
	opt := h.Options(channel).Presence
	p, ok := h.b.(broker.Presencer)
	if !ok || opt == nil {
		return nil, broker.PresenceOptions{}, errNoPresence
	}
	return p, *opt, nil
}

// Join records id (a connection) with info in channel's presence; a
// channel without presence is left alone.
func (h *Hub) Join(ctx context.Context, channel, id string, info []byte) error {
	p, opt, err := h.presencer(channel)
	if err != nil {
		return nil
	}
	return p.Join(ctx, channel, id, info, opt)
}

// Leave removes id from channel's presence.
func (h *Hub) Leave(ctx context.Context, channel, id string) error {
	p, opt, err := h.presencer(channel)
	if err != nil {
		return nil
	}
	return p.Leave(ctx, channel, id, opt)
}

// Presence lists channel's presence: id → info.
func (h *Hub) Presence(ctx context.Context, channel string) (map[string][]byte, error) {
	p, _, err := h.presencer(channel)
	if err != nil {
		return nil, err
	}
	return p.Presence(ctx, channel)
}

// PresenceCount counts channel's presence.
func (h *Hub) PresenceCount(ctx context.Context, channel string) (int, error) {
	p, _, err := h.presencer(channel)
	if err != nil {
		return 0, err
	}
	return p.PresenceCount(ctx, channel)
}

// Resync catches up the channels with history that have local
// subscribers, after the broker's stream was lost for a while: what was
// published meanwhile (which pub/sub did not keep) is read from history
// and delivered, or, when it cannot be, a reset is sent. Without it a
// channel that fell silent during the outage would show its gap only with
// its next publication.
func (h *Hub) Resync() {
	hb, ok := h.b.(broker.Historian)
	if !ok {
		return
	}
	h.mu.RLock()
	names := make([]string, 0, len(h.rooms))
	for name := range h.rooms {
		names = append(names, name)
	}
	h.mu.RUnlock()
	for _, name := range names {
		opt := h.Options(name)
		r := h.room(name)
		if opt.History == nil || r == nil {
			continue
		}
		h.resync(hb, name, r, opt)
	}
}

// resync catches one room up.
func (h *Hub) resync(hb broker.Historian, name string, r *room, opt ChannelOptions) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.pos.Epoch == "" {
		return // nothing delivered yet: its subscribers know no position to miss from
	}
	ctx, cancel := context.WithTimeout(context.Background(), historyTimeout)
	defer cancel()
	bound := opt.recoverMax()
	res, err := hb.History(ctx, name, broker.HistoryQuery{After: r.pos.Offset, Limit: bound + 1, Opt: *opt.History})
	if err != nil || (res.Top.Epoch == r.pos.Epoch && res.Top.Offset <= r.pos.Offset) {
		return
	}
	n := 0
	if pubs, whole := publications(name, res.Top.Epoch, r.pos.Offset, res.Pubs); res.Top.Epoch == r.pos.Epoch && whole &&
		len(pubs) <= bound && r.pos.Offset+uint64(len(pubs)) == res.Top.Offset {
		for _, p := range pubs {
			n += r.fan(p)
		}
	} else {
		n += r.fan(resetAt(name, res.Top))
	}
	r.pos = res.Top
	h.delivered.Add(int64(n))
}
