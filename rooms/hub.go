package rooms

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/gobwas/ws"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
)

// Format is how a publication is framed for a subscriber.
type Format uint8

// Formats.
const (
	// FormatProtocol frames {"op":"message","channel":…,"data":…} (wsgate.v1).
	FormatProtocol Format = iota
	// FormatRaw frames the data as it is (relayed apps' own protocol).
	FormatRaw
)

// pubKind says what a Publication carries.
type pubKind uint8

const (
	kindMessage pubKind = iota
	kindJoin            // Data is the presence info of who joined
	kindLeave           // … who left
	kindReset           // the channel's history broke at Epoch and Offset
)

// Publication is one message on a channel, or an event of the channel
// (a presence join or leave, a break in its history). Its frames are
// encoded once, on first use, and shared by every subscriber.
type Publication struct {
	Channel string
	Data    []byte
	// Epoch and Offset place the publication in the channel's history
	// (Offset 0: the channel keeps none, or it bypassed history).
	Epoch  string
	Offset uint64
	kind   pubKind
	frames [2]atomic.Pointer[proxy.Message]
}

// position is where p stands in its channel's history.
func (p *Publication) position() broker.Position {
	return broker.Position{Epoch: p.Epoch, Offset: p.Offset}
}

// Frame returns the message for subscribers in format f, or nil when they
// get nothing (events are wsgate.v1 messages).
func (p *Publication) Frame(f Format) *proxy.Message {
	if m := p.frames[f].Load(); m != nil {
		return m
	}
	if f == FormatRaw && p.kind != kindMessage {
		return nil
	}
	var payload []byte
	ch, _ := json.Marshal(p.Channel)
	switch {
	case f == FormatRaw:
		payload = p.Data
	case p.kind == kindMessage:
		payload = make([]byte, 0, len(p.Data)+len(ch)+60)
		payload = append(payload, `{"op":"message","channel":`...)
		payload = append(payload, ch...)
		payload = append(payload, `,"data":`...)
		payload = append(payload, p.Data...)
		if p.Offset > 0 {
			payload = append(payload, `,"offset":`...)
			payload = strconv.AppendUint(payload, p.Offset, 10)
		}
		payload = append(payload, '}')
	case p.kind == kindReset:
		e, _ := json.Marshal(p.Epoch)
		payload = append(payload, `{"op":"reset","channel":`...)
		payload = append(payload, ch...)
		payload = append(payload, `,"epoch":`...)
		payload = append(payload, e...)
		payload = append(payload, `,"offset":`...)
		payload = strconv.AppendUint(payload, p.Offset, 10)
		payload = append(payload, '}')
	default: // join, leave: the info object's members follow op and channel
		op := `{"op":"join","channel":`
		if p.kind == kindLeave {
			op = `{"op":"leave","channel":`
		}
		payload = append(payload, op...)
		payload = append(payload, ch...)
		if rest := bytes.TrimSpace(p.Data[1:]); len(rest) > 1 { // p.Data is an object (checked on receipt)
			payload = append(payload, ',')
			payload = append(payload, rest...)
		} else {
			payload = append(payload, '}')
		}
	}
	m := proxy.NewMessage(ws.OpText, payload)
	if !p.frames[f].CompareAndSwap(nil, m) {
		m = p.frames[f].Load() // another subscriber's, encoded meanwhile: every one gets the same
	}
	return m
}

// Subscriber receives publications. Deliver must not block.
type Subscriber interface {
	Deliver(p *Publication)
}

// batchSubscriber is a subscriber that takes several publications at
// once, in order, and writes them with the other subscribers' (a
// connection: see proxy.Batch).
type batchSubscriber interface {
	DeliverAll(b *proxy.Batch, ps []*Publication)
}

// Hub holds a node's local subscriptions.
type Hub struct {
	b     broker.Broker
	bmu   sync.Mutex // serializes broker (un)subscriptions
	mu    sync.RWMutex
	rooms map[string]*room
	opts  atomic.Pointer[func(string) ChannelOptions]

	// counts for Stats
	publishedWS, publishedHTTP, received, delivered, dropped atomic.Int64

	keys keyRecord

	// OnPublish, if set, is told how long each publication (or batch)
	// that went through the broker took. Set it before use.
	OnPublish func(time.Duration)
}

// room is a channel's local subscribers. Its lock orders the channel's
// deliveries and guards subs and pos.
type room struct {
	mu   sync.Mutex
	subs map[Subscriber]*subState // nil state: a subscriber that gets everything
	// pos is the place in the channel's history of the last publication
	// delivered (Epoch "": none yet), for channels that keep history.
	pos broker.Position
	// fq holds the publications waiting for a fan-out that runs in a
	// goroutine of the room's, while one does (nil otherwise).
	fq atomic.Pointer[fanQueue]
}

// fanQueue is the queue of a room's fan-out goroutine.
type fanQueue struct {
	mu    sync.Mutex
	ps    []*Publication
	done  bool          // drained and detached from its room: a publisher makes a new one
	taken chan struct{} // closed when the fan-out takes ps; made by a publisher waiting for room in it
}

// Fan-out: a publication to a room of up to fanInline local subscribers
// is fanned out by the goroutine that hands it over (the broker's, or the
// publisher's with the memory broker) when the room is free and nothing
// of its is queued. Otherwise (a larger room, or a fan-out in progress) it
// is queued for a goroutine of the room's, started by the first
// publication queued and gone when the queue is empty, so that a
// publisher waits for no fan-out. Up to fanQueueMax publications wait per
// room; a publisher that finds the queue full waits until the fan-out
// takes it. The bound caps the delay a room published to faster than it
// can be fanned out builds up (under a second at 1,000 subscribers),
// beyond which its publishers are slowed down instead.
//
// The fan-out goroutine takes up to fanBatchMax queued publications at a
// time and hands each subscriber that follows the room live (no history
// being caught up) all of them at once, so that a room that falls behind
// costs one write per subscriber per batch, not per publication.
const (
	fanInline   = 64
	fanQueueMax = 128
	fanBatchMax = 16
)

// subState is a subscriber of a channel with history that has not yet
// caught up: while pending it is being sent history and live publications
// are held for it; after that it skips those it already got from history
// (up to at).
type subState struct {
	pending bool
	held    []*Publication
	at      broker.Position
}

// fan delivers p to every subscriber of the room; the caller holds r.mu.
func (r *room) fan(p *Publication) int { return r.fanAll([]*Publication{p}) }

// fanAll delivers ps, in order, to every subscriber of the room: all at
// once, and written together, to those that follow it live; the caller
// holds r.mu.
func (r *room) fanAll(ps []*Publication) int {
	b := proxy.NewBatch()
	defer b.End()
	n := 0
	for s, st := range r.subs {
		if st == nil {
			if bs, ok := s.(batchSubscriber); ok {
				bs.DeliverAll(b, ps)
				n += len(ps)
				continue
			}
		}
		for _, p := range ps {
			n += r.fanTo(s, r.subs[s], p)
		}
	}
	return n
}

// fanTo delivers p to s, whose state is st, and reports 1, or 0 when s
// does not get p now: it is catching up (p is held for it) or already got
// p from history. The caller holds r.mu.
func (r *room) fanTo(s Subscriber, st *subState, p *Publication) int {
	if st != nil {
		if st.pending {
			if p.kind != kindReset { // a subscriber catching up finds breaks itself
				st.held = append(st.held, p)
			}
			return 0
		}
		if p.Offset > 0 && p.Epoch == st.at.Epoch && p.Offset <= st.at.Offset {
			return 0 // already sent from history
		}
		if p.Offset > 0 || p.kind == kindReset {
			r.subs[s] = nil // past its history: from now on, everything
		}
	}
	s.Deliver(p)
	return 1
}

// NewHub makes a hub; SetBroker must be called before use (the broker
// needs the hub's Handle as its handler).
func NewHub() *Hub {
	return &Hub{rooms: map[string]*room{}, keys: keyRecord{now: time.Now}}
}

// SetBroker sets the broker.
func (h *Hub) SetBroker(b broker.Broker) { h.b = b }

// ErrInvalidData is wrapped by the errors of CheckData.
var ErrInvalidData = errors.New("invalid data")

// CheckData says why data cannot be published, or returns nil: data must
// be one JSON value in valid UTF-8, since subscribers get it in a text
// frame (and, in the wsgate.v1 format, inside a JSON message).
func CheckData(data []byte) error {
	switch {
	case !utf8.Valid(data):
		return fmt.Errorf("%w: not valid UTF-8", ErrInvalidData)
	case !json.Valid(data):
		return fmt.Errorf("%w: not valid JSON", ErrInvalidData)
	}
	return nil
}

// Handle is the broker's handler: it fans a message out locally. A
// publication that CheckData refuses (a stray plain PUBLISH), or a presence
// event whose info is not a JSON object, is dropped: framed, it would
// break every subscriber's connection.
func (h *Hub) Handle(channel string, m broker.Message) {
	h.received.Add(1)
	p := &Publication{Channel: channel, Data: m.Data, Epoch: m.Pos.Epoch, Offset: m.Pos.Offset}
	switch m.Kind {
	case broker.KindJoin, broker.KindLeave:
		p.kind, p.Epoch, p.Offset = kindJoin, "", 0
		if m.Kind == broker.KindLeave {
			p.kind = kindLeave
		}
		if !isObject(m.Data) {
			h.dropped.Add(1)
			return
		}
	default:
		if CheckData(m.Data) != nil {
			h.dropped.Add(1)
			return
		}
	}
	h.deliver(p)
}

// isObject reports whether b is one JSON object in valid UTF-8.
func isObject(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) > 1 && b[0] == '{' && utf8.Valid(b) && json.Valid(b)
}

// deliver fans p out to its channel's local subscribers, in the order
// deliver was called for the channel (see fanInline), and of the channel's
// history when it keeps one.
func (h *Hub) deliver(p *Publication) {
	r := h.room(p.Channel)
	if r == nil {
		return
	}
	for {
		// TryLock: a room being fanned out (or subscribed to) right now
		// gets the publication queued, not waited for.
		if r.mu.TryLock() {
			if r.fq.Load() == nil && len(r.subs) <= fanInline {
				n := h.fanOne(r, p)
				r.mu.Unlock()
				h.delivered.Add(int64(n))
				return
			}
			r.mu.Unlock()
		}
		if h.enqueue(r, p) {
			return
		}
	}
}

// room is channel's room, or nil when it has no local subscribers.
func (h *Hub) room(channel string) *room {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.rooms[channel]
}

// fanOne delivers p to r's subscribers, after what the channel's history
// says comes before it, and counts the deliveries; the caller holds r.mu.
func (h *Hub) fanOne(r *room, p *Publication) (n int) {
	r.pos = h.follow(p.Channel, r.pos, p, func(d *Publication) { n += r.fan(d) })
	return n
}

// enqueue queues p for r's fan-out goroutine, starting one when none
// runs. It reports false when the queue it found had just been drained:
// the caller tries again.
func (h *Hub) enqueue(r *room, p *Publication) bool {
	q := r.fq.Load()
	start := q == nil
	if start {
		q = &fanQueue{}
		if !r.fq.CompareAndSwap(nil, q) {
			return false // another publisher's queue: try again
		}
	}
	q.mu.Lock()
	for len(q.ps) >= fanQueueMax {
		if q.taken == nil {
			q.taken = make(chan struct{})
		}
		taken := q.taken
		q.mu.Unlock()
		<-taken
		q.mu.Lock()
	}
	if q.done {
		q.mu.Unlock()
		return false
	}
	q.ps = append(q.ps, p)
	q.mu.Unlock()
	if start {
		go h.fanQueued(r, q)
	}
	return true
}

// fanQueued is r's fan-out goroutine: it fans out q until q is empty,
// then detaches it from r.
func (h *Hub) fanQueued(r *room, q *fanQueue) {
	var out []*Publication
	for {
		q.mu.Lock()
		ps := q.ps
		q.ps = nil
		if q.taken != nil {
			close(q.taken)
			q.taken = nil
		}
		if len(ps) == 0 {
			q.done = true
			r.fq.CompareAndSwap(q, nil)
			q.mu.Unlock()
			return
		}
		q.mu.Unlock()
		n := 0
		for len(ps) > 0 {
			// A batch at a time, so that a subscribe to the room waits
			// for no more than one batch's fan-out.
			k := min(len(ps), fanBatchMax)
			r.mu.Lock()
			n += h.fanMany(r, ps[:k], &out)
			r.mu.Unlock()
			ps = ps[k:]
		}
		h.delivered.Add(int64(n))
	}
}

// fanMany delivers ps to r's subscribers, each after what the channel's
// history says comes before it, and counts the deliveries; the caller
// holds r.mu. out is scratch space for the sequence delivered.
func (h *Hub) fanMany(r *room, ps []*Publication, out *[]*Publication) int {
	if len(ps) == 1 {
		return h.fanOne(r, ps[0])
	}
	seq := (*out)[:0]
	for _, p := range ps {
		r.pos = h.follow(p.Channel, r.pos, p, func(d *Publication) { seq = append(seq, d) })
	}
	n := r.fanAll(seq)
	clear(seq)
	*out = seq[:0]
	return n
}

// Subscribe adds s to channel's local subscribers, subscribing the node
// when s is the first. A broker that is down is not an error: the
// subscription is made when it comes back.
func (h *Hub) Subscribe(ctx context.Context, channel string, s Subscriber) error {
	return h.subscribe(ctx, channel, s, nil)
}

// subscribe adds s with state st (nil: a plain subscriber) and returns
// once the node's subscription has taken effect: a publication made after
// it returns reaches s.
func (h *Hub) subscribe(ctx context.Context, channel string, s Subscriber, st *subState) error {
	if err := h.join(ctx, channel, s, st); err != nil {
		return err
	}
	c, ok := h.b.(broker.Confirmer)
	if !ok {
		return nil
	}
	// Outside bmu: the round trip to the broker holds up no other channel.
	if err := c.Confirm(ctx, channel); err != nil && !errors.Is(err, broker.ErrUnavailable) {
		h.Unsubscribe(context.WithoutCancel(ctx), channel, s)
		return err
	}
	return nil
}

// join adds s with state st to channel's room, and subscribes the node
// when s is the first.
func (h *Hub) join(ctx context.Context, channel string, s Subscriber, st *subState) error {
	h.bmu.Lock()
	defer h.bmu.Unlock()
	h.mu.Lock()
	r := h.rooms[channel]
	first := r == nil
	if first {
		r = &room{subs: map[Subscriber]*subState{}}
		h.rooms[channel] = r
	}
	r.mu.Lock()
	r.subs[s] = st
	r.mu.Unlock()
	h.mu.Unlock()
	if first {
		if err := h.b.Subscribe(ctx, channel); err != nil && !errors.Is(err, broker.ErrUnavailable) {
			h.remove(channel, s)
			return err
		}
	}
	return nil
}

// remove takes s out of channel's room and reports whether the room is
// now empty (and gone). The caller holds bmu.
func (h *Hub) remove(channel string, s Subscriber) (last, found bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	r := h.rooms[channel]
	if r == nil {
		return false, false
	}
	r.mu.Lock()
	_, found = r.subs[s]
	delete(r.subs, s)
	last = len(r.subs) == 0
	r.mu.Unlock()
	if last {
		delete(h.rooms, channel)
	}
	return last, found
}

// Unsubscribe removes s, unsubscribing the node after the last one.
func (h *Hub) Unsubscribe(ctx context.Context, channel string, s Subscriber) {
	h.bmu.Lock()
	defer h.bmu.Unlock()
	if last, found := h.remove(channel, s); last && found {
		h.b.Unsubscribe(ctx, channel)
	}
}

// Publish sends data to channel through the broker. When the broker is
// unavailable the publication still reaches this node's subscribers, and
// the error is returned. The broker goes first, so that this node's
// subscribers get each publication once (through the broker's echo); a
// broker that knows its backend is down answers at once, so the local
// delivery is not delayed by the outage. Data that CheckData refuses is
// not sent: the error wraps ErrInvalidData.
//
// A channel that keeps history is the exception: its publication is
// appended to history and published in one step, or, when the broker is
// unavailable, not at all (delivered here only, it would be a gap in every
// other node's subscribers' history that no one could see).
func (h *Hub) Publish(ctx context.Context, channel string, data []byte) error {
	if err := CheckData(data); err != nil {
		return err
	}
	h.publishedWS.Add(1)
	if ho := h.Options(channel).History; ho != nil {
		return h.publishHistory(ctx, []broker.HistoryPub{{Channel: channel, Data: data, Opt: *ho}})
	}
	t0 := time.Now()
	err := h.b.Publish(ctx, channel, data)
	h.published(t0, err)
	if errors.Is(err, broker.ErrUnavailable) {
		h.deliver(&Publication{Channel: channel, Data: data})
	}
	return err
}

// Channels is the number of channels with local subscribers.
func (h *Hub) Channels() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.rooms)
}

// ChannelCount is a channel and its number of local subscribers.
type ChannelCount struct {
	Channel     string
	Subscribers int
}

// ChannelCounts lists the channels with local subscribers, sorted by
// name.
func (h *Hub) ChannelCounts() []ChannelCount {
	h.mu.RLock()
	list := make([]ChannelCount, 0, len(h.rooms))
	for ch, r := range h.rooms {
		list = append(list, ChannelCount{ch, r.len()})
	}
	h.mu.RUnlock()
	slices.SortFunc(list, func(a, b ChannelCount) int { return strings.Compare(a.Channel, b.Channel) })
	return list
}

// Subscribers is the number of local subscribers of channel.
func (h *Hub) Subscribers(channel string) int {
	r := h.room(channel)
	if r == nil {
		return 0
	}
	return r.len()
}

func (r *room) len() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.subs)
}

// batchPublisher is a broker that can send several publications at once.
type batchPublisher interface {
	PublishBatch(ctx context.Context, channels []string, data [][]byte) error
}

// PublishBatch publishes several messages, in order, in one round trip
// when the broker supports it. When any data is refused by CheckData,
// nothing is sent and the error names the first such message (by index).
func (h *Hub) PublishBatch(ctx context.Context, channels []string, data [][]byte) error {
	for i, d := range data {
		if err := CheckData(d); err != nil {
			return fmt.Errorf("publication %d: %w", i, err)
		}
	}
	return h.publishBatch(ctx, channels, data)
}

// publishBatch is PublishBatch for data already checked. Publications to
// channels that keep history go in one call, the others in another: a
// channel is always on one side, so its order is kept.
func (h *Hub) publishBatch(ctx context.Context, channels []string, data [][]byte) error {
	h.publishedHTTP.Add(int64(len(channels)))
	var hist []broker.HistoryPub
	plainCh, plainData := channels, data
	for i, ch := range channels {
		if ho := h.Options(ch).History; ho != nil {
			if hist == nil { // the first: split from here on
				plainCh, plainData = slices.Clone(channels[:i]), slices.Clone(data[:i])
			}
			hist = append(hist, broker.HistoryPub{Channel: ch, Data: data[i], Opt: *ho})
		} else if hist != nil {
			plainCh, plainData = append(plainCh, ch), append(plainData, data[i])
		}
	}
	var errs []error
	if len(hist) > 0 {
		errs = append(errs, h.publishHistory(ctx, hist))
	}
	if len(plainCh) > 0 {
		errs = append(errs, h.publishPlain(ctx, plainCh, plainData))
	}
	return errors.Join(errs...)
}

// publishHistory appends to history and publishes, in one step per
// publication.
func (h *Hub) publishHistory(ctx context.Context, pubs []broker.HistoryPub) error {
	hb, ok := h.b.(broker.Historian)
	if !ok {
		return errNoHistory
	}
	t0 := time.Now()
	_, err := hb.PublishHistory(ctx, pubs)
	h.published(t0, err)
	return err
}

// publishPlain publishes to channels without history.
func (h *Hub) publishPlain(ctx context.Context, channels []string, data [][]byte) error {
	if bp, ok := h.b.(batchPublisher); ok {
		t0 := time.Now()
		err := bp.PublishBatch(ctx, channels, data)
		h.published(t0, err)
		if errors.Is(err, broker.ErrUnavailable) {
			for i, ch := range channels {
				h.deliver(&Publication{Channel: ch, Data: data[i]})
			}
		}
		return err
	}
	var errs []error
	for i, ch := range channels {
		t0 := time.Now()
		err := h.b.Publish(ctx, ch, data[i])
		h.published(t0, err)
		if err != nil {
			if errors.Is(err, broker.ErrUnavailable) {
				h.deliver(&Publication{Channel: ch, Data: data[i]})
			}
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// published reports a broker publication that started at t0.
func (h *Hub) published(t0 time.Time, err error) {
	if err == nil && h.OnPublish != nil {
		h.OnPublish(time.Since(t0))
	}
}

// Dropped counts publications received from the broker and dropped for
// not being JSON in valid UTF-8.
func (h *Hub) Dropped() int64 { return h.dropped.Load() }

// HubStats is what a hub has counted, for metrics.
type HubStats struct {
	// PublishedWS and PublishedHTTP count publications this node took
	// from clients (Publish) and from backends (PublishBatch,
	// PublishMessages: duplicates left out); Received those the broker
	// handed it (Handle), each node's own included.
	PublishedWS, PublishedHTTP, Received int64
	// Delivered counts publications handed to local subscribers (one per
	// subscriber); Invalid those received and dropped as not JSON in
	// valid UTF-8.
	Delivered, Invalid int64
	// Channels with local subscribers, and local subscriptions, now.
	Channels, Subscriptions int
}

// Stats reads the hub's counts.
func (h *Hub) Stats() HubStats {
	s := HubStats{
		PublishedWS: h.publishedWS.Load(), PublishedHTTP: h.publishedHTTP.Load(), Received: h.received.Load(),
		Delivered: h.delivered.Load(), Invalid: h.dropped.Load(),
	}
	h.mu.RLock()
	s.Channels = len(h.rooms)
	for _, r := range h.rooms {
		s.Subscriptions += r.len()
	}
	h.mu.RUnlock()
	return s
}
