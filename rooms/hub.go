package rooms

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
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

// Publication is one message on a channel. Its frames are encoded once,
// on first use, and shared by every subscriber.
type Publication struct {
	Channel string
	Data    []byte
	frames  [2]atomic.Pointer[[]byte]
}

// Frame returns the encoded server frame for f.
func (p *Publication) Frame(f Format) []byte {
	if b := p.frames[f].Load(); b != nil {
		return *b
	}
	var payload []byte
	if f == FormatRaw {
		payload = p.Data
	} else {
		ch, _ := json.Marshal(p.Channel)
		payload = make([]byte, 0, len(p.Data)+len(ch)+40)
		payload = append(payload, `{"op":"message","channel":`...)
		payload = append(payload, ch...)
		payload = append(payload, `,"data":`...)
		payload = append(payload, p.Data...)
		payload = append(payload, '}')
	}
	b := proxy.EncodeServerFrame(ws.OpText, payload)
	p.frames[f].Store(&b)
	return b
}

// Subscriber receives publications. Deliver must not block.
type Subscriber interface {
	Deliver(p *Publication)
}

// Hub holds a node's local subscriptions.
type Hub struct {
	b    broker.Broker
	bmu  sync.Mutex // serializes broker (un)subscriptions
	mu   sync.RWMutex
	subs map[string]map[Subscriber]struct{}

	// counts for Stats
	publishedWS, publishedHTTP, received, delivered, dropped atomic.Int64

	keys keyRecord

	// OnPublish, if set, is told how long each publication (or batch)
	// that went through the broker took. Set it before use.
	OnPublish func(time.Duration)
}

// NewHub makes a hub; SetBroker must be called before use (the broker
// needs the hub's Handle as its handler).
func NewHub() *Hub {
	return &Hub{subs: map[string]map[Subscriber]struct{}{}, keys: keyRecord{now: time.Now}}
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

// Handle is the broker's handler: it fans a publication out locally. Data
// that CheckData refuses (a stray plain PUBLISH) is dropped: framed, it
// would break every subscriber's connection.
func (h *Hub) Handle(channel string, m broker.Message) {
	data := m.Data
	h.received.Add(1)
	if CheckData(data) != nil {
		h.dropped.Add(1)
		return
	}
	h.deliver(channel, data)
}

// deliver fans checked data out to channel's local subscribers.
func (h *Hub) deliver(channel string, data []byte) {
	p := &Publication{Channel: channel, Data: data}
	h.mu.RLock()
	set := h.subs[channel]
	n := 0
	for s := range set {
		s.Deliver(p)
		n++
	}
	h.mu.RUnlock()
	h.delivered.Add(int64(n))
}

// Subscribe adds s to channel's local subscribers, subscribing the node
// when s is the first. A broker that is down is not an error: the
// subscription is made when it comes back.
func (h *Hub) Subscribe(ctx context.Context, channel string, s Subscriber) error {
	h.bmu.Lock()
	defer h.bmu.Unlock()
	h.mu.Lock()
	set := h.subs[channel]
	first := set == nil
	if first {
		set = map[Subscriber]struct{}{}
		h.subs[channel] = set
	}
	set[s] = struct{}{}
	h.mu.Unlock()
	if first {
		if err := h.b.Subscribe(ctx, channel); err != nil && !errors.Is(err, broker.ErrUnavailable) {
			h.mu.Lock()
			delete(set, s)
			if len(set) == 0 {
				delete(h.subs, channel)
			}
			h.mu.Unlock()
			return err
		}
	}
	return nil
}

// Unsubscribe removes s, unsubscribing the node after the last one.
func (h *Hub) Unsubscribe(ctx context.Context, channel string, s Subscriber) {
	h.bmu.Lock()
	defer h.bmu.Unlock()
	h.mu.Lock()
	set := h.subs[channel]
	if set == nil {
		h.mu.Unlock()
		return
	}
	delete(set, s)
	last := len(set) == 0
	if last {
		delete(h.subs, channel)
	}
	h.mu.Unlock()
	if last {
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
func (h *Hub) Publish(ctx context.Context, channel string, data []byte) error {
	if err := CheckData(data); err != nil {
		return err
	}
	h.publishedWS.Add(1)
	t0 := time.Now()
	err := h.b.Publish(ctx, channel, data)
	h.published(t0, err)
	if errors.Is(err, broker.ErrUnavailable) {
		h.deliver(channel, data)
	}
	return err
}

// Channels is the number of channels with local subscribers.
func (h *Hub) Channels() int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.subs)
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
	list := make([]ChannelCount, 0, len(h.subs))
	for ch, set := range h.subs {
		list = append(list, ChannelCount{ch, len(set)})
	}
	h.mu.RUnlock()
	slices.SortFunc(list, func(a, b ChannelCount) int { return strings.Compare(a.Channel, b.Channel) })
	return list
}

// Subscribers is the number of local subscribers of channel.
func (h *Hub) Subscribers(channel string) int {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return len(h.subs[channel])
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

// publishBatch is PublishBatch for data already checked.
func (h *Hub) publishBatch(ctx context.Context, channels []string, data [][]byte) error {
	h.publishedHTTP.Add(int64(len(channels)))
	if bp, ok := h.b.(batchPublisher); ok {
		t0 := time.Now()
		err := bp.PublishBatch(ctx, channels, data)
		h.published(t0, err)
		if errors.Is(err, broker.ErrUnavailable) {
			for i, ch := range channels {
				h.deliver(ch, data[i])
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
				h.deliver(ch, data[i])
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
	s.Channels = len(h.subs)
	for _, set := range h.subs {
		s.Subscriptions += len(set)
	}
	h.mu.RUnlock()
	return s
}
