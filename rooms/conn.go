package rooms

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"maps"
	"math"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// Authorizer decides an action ("subscribe", "publish") on a channel; nil
// allows everything.
type Authorizer func(action, channel string) bool

// DefaultPublishRate is the publishes per second one connection may make
// when ConnConfig.PublishRate is 0. With its burst (twice the rate), one
// connection puts at most 100 messages at once into a subscriber's send
// queue, so the bursts of several publishers fit in the proxy's default
// queue and a subscriber that reads is never taken for a slow consumer
// because one client floods.
const DefaultPublishRate = 50

// ConnConfig configures one connection's rooms.
type ConnConfig struct {
	// MaxSubscriptions per connection; default 100.
	MaxSubscriptions int
	// MaxData bounds a publish's data; default 64 KiB.
	MaxData int
	// Authorize checks subscribe and publish; nil allows all.
	Authorize Authorizer
	// Refresh verifies a refresh token and returns its expiry.
	Refresh func(token string) (time.Time, error)
	// Format of deliveries: FormatProtocol for wsgate.v1 clients,
	// FormatRaw for relayed apps.
	Format Format
	// PublishRate is how many publishes per second the connection may make
	// on average; a publish over it gets an error reply with code
	// rate_limited and is not delivered (the connection stays open).
	// Default (0): DefaultPublishRate. A negative value means no limit.
	PublishRate float64
	// PublishBurst is how many publishes may come at once. Default (0):
	// twice the per-second rate, rounded up (100 with the default rate).
	PublishBurst int
	// Now is the clock of the publish rate; nil means time.Now.
	Now func() time.Time
	// OnRateLimited, if set, is called for each publish refused for the
	// publish rate.
	OnRateLimited func()
	// ID names the connection in channels' presence (the admin API's
	// connection id); without one the connection is not listed.
	ID string
	// PresenceInfo is what the connection shows in presence lists and
	// join and leave events: a JSON object. Default: {"conn":<ID>}.
	PresenceInfo []byte
}

// Conn is one client connection's subscriptions.
type Conn struct {
	hub    *Hub
	cfg    ConnConfig
	sess   proxy.Session
	pubLim *rate.Limiter // made at the first publish, so idle connections hold none

	mu     sync.Mutex
	subs   map[string]bool // channel → joined its presence
	closed bool
}

// NewConn makes a Conn; Attach must be called when the connection starts.
func NewConn(h *Hub, cfg ConnConfig) *Conn {
	if cfg.MaxSubscriptions <= 0 {
		cfg.MaxSubscriptions = 100
	}
	if cfg.MaxData <= 0 {
		cfg.MaxData = 64 << 10
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.PresenceInfo == nil {
		id, _ := json.Marshal(cfg.ID)
		cfg.PresenceInfo = []byte(`{"conn":` + string(id) + `}`)
	}
	c := &Conn{hub: h, cfg: cfg, subs: map[string]bool{}}
	if cfg.PublishRate >= 0 {
		if cfg.PublishRate == 0 {
			c.cfg.PublishRate = DefaultPublishRate
		}
		if cfg.PublishBurst <= 0 {
			c.cfg.PublishBurst = int(min(math.MaxInt32, max(1, math.Ceil(2*c.cfg.PublishRate))))
		}
	}
	return c
}

// Attach is the proxy's OnStart hook.
func (c *Conn) Attach(s proxy.Session) { c.sess = s }

// Deliver queues a publication for the client.
func (c *Conn) Deliver(p *Publication) { c.DeliverAll(nil, []*Publication{p}) }

// DeliverAll queues publications for the client, in order, to be written
// together, with b's other writes when b is not nil.
func (c *Conn) DeliverAll(b *proxy.Batch, ps []*Publication) {
	s := c.sess
	if s == nil {
		return
	}
	if len(ps) == 1 {
		if f := ps[0].Frame(c.cfg.Format); f != nil {
			s.Enqueue(b, f)
		}
		return
	}
	fs := make([]*proxy.Message, 0, len(ps))
	for _, p := range ps {
		if f := p.Frame(c.cfg.Format); f != nil {
			fs = append(fs, f)
		}
	}
	if len(fs) > 0 {
		s.EnqueueAll(b, fs)
	}
}

// Close drops every subscription; it is the proxy's OnClose hook.
func (c *Conn) Close() {
	c.mu.Lock()
	subs := c.subs
	c.subs = nil
	c.closed = true
	c.mu.Unlock()
	for ch, joined := range subs {
		c.unsubscribe(context.Background(), ch, joined)
	}
}

// unsubscribe leaves channel (and its presence, when joined).
func (c *Conn) unsubscribe(ctx context.Context, channel string, joined bool) {
	c.hub.Unsubscribe(ctx, channel, c)
	if joined {
		ctx, cancel := context.WithTimeout(ctx, historyTimeout)
		c.hub.Leave(ctx, channel, c.cfg.ID)
		cancel()
	}
}

// Channels returns the channels the connection is subscribed to, sorted.
func (c *Conn) Channels() []string {
	c.mu.Lock()
	list := make([]string, 0, len(c.subs))
	for ch := range c.subs {
		list = append(list, ch)
	}
	c.mu.Unlock()
	slices.Sort(list)
	return list
}

// Handle is the proxy's Inspect hook in rooms mode: every client message
// is a request, consumed here, and answered.
func (c *Conn) Handle(msg []byte, text bool) (proxy.Verdict, []byte) {
	if !text {
		return proxy.Drop, ErrorReply(Request{}, &ProtoError{CodeBadRequest, "wsgate.v1 messages are JSON text"})
	}
	r, perr := ParseRequest(msg, c.cfg.MaxData)
	if perr != nil {
		return proxy.Drop, ErrorReply(r, perr)
	}
	reply, perr := c.do(r)
	switch {
	case perr != nil:
		return proxy.Drop, ErrorReply(r, perr)
	case reply == nil:
		return proxy.Drop, OK(r)
	case len(reply) == 0: // sent by do, ahead of what it delivered
		return proxy.Drop, nil
	}
	return proxy.Drop, reply
}

// sent is do's reply when do has sent the reply itself.
var sent = []byte{}

// do carries out r and returns the reply: nil for a plain ok, sent when
// it was sent already.
func (c *Conn) do(r Request) ([]byte, *ProtoError) {
	ctx := context.Background()
	switch r.Op {
	case "ping":
		return nil, nil
	case "refresh":
		if c.cfg.Refresh == nil {
			return nil, &ProtoError{CodeNotFound, "token refresh is not enabled"}
		}
		exp, err := c.cfg.Refresh(r.Token)
		if err != nil {
			return nil, &ProtoError{CodeForbidden, "invalid token"}
		}
		if c.sess.Extend(exp) != nil {
			return nil, &ProtoError{CodeForbidden, "token expired"}
		}
		return nil, nil
	}
	if policy.ValidateChannel(r.Channel) != nil {
		return nil, &ProtoError{CodeBadRequest, "invalid channel name"}
	}
	switch r.Op {
	case "subscribe":
		if perr := c.allowed("subscribe", r.Channel); perr != nil {
			return nil, perr
		}
		if c.hub.Options(r.Channel).History != nil {
			return c.subscribeHistory(ctx, r)
		}
		if r.Since != nil {
			return nil, &ProtoError{CodeNotFound, "channel " + r.Channel + " keeps no history"}
		}
		return nil, c.Subscribe(ctx, r.Channel)
	case "unsubscribe":
		c.Unsubscribe(ctx, r.Channel)
		return nil, nil
	case "publish":
		return nil, c.publish(ctx, r)
	case "history":
		return c.history(ctx, r)
	case "presence", "presence_count":
		return c.presence(ctx, r)
	}
	return nil, &ProtoError{CodeNotFound, "unknown op"}
}

// allowed asks the channel policy about action on channel.
func (c *Conn) allowed(action, channel string) *ProtoError {
	if c.cfg.Authorize != nil && !c.cfg.Authorize(action, channel) {
		to := " to "
		if action == "history" || action == "presence" {
			to = " of "
		}
		return &ProtoError{CodeForbidden, action + to + channel + " denied"}
	}
	return nil
}

func (c *Conn) publish(ctx context.Context, r Request) *ProtoError {
	if perr := c.allowed("publish", r.Channel); perr != nil {
		return perr
	}
	if c.cfg.PublishRate > 0 && c.pubLim == nil { // Handle runs on the client's reader only
		c.pubLim = rate.NewLimiter(rate.Limit(c.cfg.PublishRate), c.cfg.PublishBurst)
	}
	if c.pubLim != nil && !c.pubLim.AllowN(c.cfg.Now(), 1) {
		if c.cfg.OnRateLimited != nil {
			c.cfg.OnRateLimited()
		}
		return &ProtoError{CodeRateLimited, "more than " + strconv.FormatFloat(c.cfg.PublishRate, 'g', -1, 64) +
			" publishes/s (burst " + strconv.Itoa(c.cfg.PublishBurst) + "): not delivered"}
	}
	if err := c.hub.Publish(ctx, r.Channel, r.Data); err != nil {
		switch {
		case errors.Is(err, ErrInvalidData):
			return &ProtoError{CodeBadRequest, err.Error()}
		case errors.Is(err, broker.ErrUnavailable) && c.hub.Options(r.Channel).History != nil:
			return &ProtoError{CodeUnavailable, "not delivered: the broker is unavailable, and the channel keeps history"}
		case errors.Is(err, broker.ErrUnavailable):
			return &ProtoError{CodeUnavailable, "delivered on this node only: the broker is unavailable"}
		}
		return &ProtoError{CodeUnavailable, "publish failed"}
	}
	return nil
}

// subscribeHistory subscribes to a channel that keeps history. The reply
// carries the channel's epoch and offset (and, when the client asked with
// since, whether it recovered what it missed), and is sent here, ahead of
// the publications recovered and of the live ones.
func (c *Conn) subscribeHistory(ctx context.Context, r Request) ([]byte, *ProtoError) {
	if r.Since != nil {
		if perr := c.allowed("history", r.Channel); perr != nil {
			return nil, perr
		}
	}
	if fresh, perr := c.reserve(r.Channel); !fresh {
		return nil, perr
	}
	rec, done, err := c.hub.SubscribeHistory(ctx, r.Channel, c, r.Since)
	if err != nil {
		c.release(r.Channel)
		return nil, &ProtoError{CodeUnavailable, "subscribe failed: history cannot be read"}
	}
	extra := appendPosition(nil, rec.Top)
	if r.Since != nil {
		extra = append(extra, `,"recovered":`...)
		extra = strconv.AppendBool(extra, rec.Recovered)
	}
	c.sess.Reply(okWith(r, extra))
	for _, p := range rec.Pubs {
		c.Deliver(p)
	}
	done()
	c.join(ctx, r.Channel)
	return sent, nil
}

func (c *Conn) history(ctx context.Context, r Request) ([]byte, *ProtoError) {
	if perr := c.allowed("history", r.Channel); perr != nil {
		return nil, perr
	}
	if c.hub.Options(r.Channel).History == nil {
		return nil, &ProtoError{CodeNotFound, "channel " + r.Channel + " keeps no history"}
	}
	limit := r.Limit
	if limit == 0 {
		limit = math.MaxInt
	}
	top, pubs, err := c.hub.ReadHistory(ctx, r.Channel, limit)
	if err != nil {
		return nil, &ProtoError{CodeUnavailable, "history cannot be read"}
	}
	b := appendPosition(nil, top)
	b = append(b, `,"publications":[`...)
	for i, p := range pubs {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, `{"offset":`...)
		b = strconv.AppendUint(b, p.Offset, 10)
		b = append(b, `,"data":`...)
		b = append(b, p.Data...)
		b = append(b, '}')
	}
	return okWith(r, append(b, ']')), nil
}

func (c *Conn) presence(ctx context.Context, r Request) ([]byte, *ProtoError) {
	if perr := c.allowed("presence", r.Channel); perr != nil {
		return nil, perr
	}
	if c.hub.Options(r.Channel).Presence == nil {
		return nil, &ProtoError{CodeNotFound, "channel " + r.Channel + " keeps no presence"}
	}
	if r.Op == "presence_count" {
		n, err := c.hub.PresenceCount(ctx, r.Channel)
		if err != nil {
			return nil, &ProtoError{CodeUnavailable, "presence cannot be read"}
		}
		return okWith(r, strconv.AppendInt([]byte(`,"count":`), int64(n), 10)), nil
	}
	list, err := c.hub.Presence(ctx, r.Channel)
	if err != nil {
		return nil, &ProtoError{CodeUnavailable, "presence cannot be read"}
	}
	ids := slices.Sorted(maps.Keys(list))
	b := []byte(`,"presence":[`)
	for i, id := range ids {
		if i > 0 {
			b = append(b, ',')
		}
		b = append(b, list[id]...)
	}
	return okWith(r, append(b, ']')), nil
}

// join records the connection in channel's presence, when the channel
// keeps it and the connection has an id (relayed apps' connections,
// subscribed by their upstream, have none and are not listed).
func (c *Conn) join(ctx context.Context, channel string) {
	if c.cfg.ID == "" || c.hub.Options(channel).Presence == nil {
		return
	}
	c.mu.Lock()
	_, ok := c.subs[channel]
	if ok {
		c.subs[channel] = true
	}
	c.mu.Unlock()
	if ok {
		c.hub.Join(ctx, channel, c.cfg.ID, c.cfg.PresenceInfo)
	}
}

// Subscribe subscribes the connection to channel (no policy check: the
// caller decides).
func (c *Conn) Subscribe(ctx context.Context, channel string) *ProtoError {
	if fresh, perr := c.reserve(channel); !fresh {
		return perr
	}
	if err := c.hub.Subscribe(ctx, channel, c); err != nil {
		c.release(channel)
		return &ProtoError{CodeUnavailable, "subscribe failed"}
	}
	c.join(ctx, channel)
	return nil
}

// reserve takes a place for channel among the connection's
// subscriptions. It reports whether the place is new: not when the
// connection is subscribed already (nothing to do, no error) or cannot
// subscribe (the error says why).
func (c *Conn) reserve(channel string) (bool, *ProtoError) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch _, ok := c.subs[channel]; {
	case c.closed:
		return false, &ProtoError{CodeUnavailable, "connection closing"}
	case ok:
		return false, nil
	case len(c.subs) >= c.cfg.MaxSubscriptions:
		return false, &ProtoError{CodeForbidden, "too many subscriptions (max " + strconv.Itoa(c.cfg.MaxSubscriptions) + ")"}
	}
	c.subs[channel] = false
	return true, nil
}

// release gives back a place reserve took.
func (c *Conn) release(channel string) {
	c.mu.Lock()
	delete(c.subs, channel)
	c.mu.Unlock()
}

// Unsubscribe removes the connection from channel.
func (c *Conn) Unsubscribe(ctx context.Context, channel string) {
	c.mu.Lock()
	joined, ok := c.subs[channel]
	delete(c.subs, channel)
	c.mu.Unlock()
	if ok {
		c.unsubscribe(ctx, channel, joined)
	}
}

// Control handles an upstream control message in relay mode: a text
// message that starts with prefix followed by {"subscribe":"<channel>"} or
// {"unsubscribe":"<channel>"}. It reports whether msg was one (then it is
// consumed, whatever its content).
func (c *Conn) Control(prefix []byte) func(msg []byte) bool {
	return func(msg []byte) bool {
		body, ok := bytes.CutPrefix(msg, prefix)
		if !ok {
			return false
		}
		var cmd struct {
			Subscribe   *string `json:"subscribe"`
			Unsubscribe *string `json:"unsubscribe"`
		}
		if json.Unmarshal(body, &cmd) != nil {
			return true
		}
		ctx := context.Background()
		if cmd.Subscribe != nil && policy.ValidateChannel(*cmd.Subscribe) == nil {
			c.Subscribe(ctx, *cmd.Subscribe)
		}
		if cmd.Unsubscribe != nil {
			c.Unsubscribe(ctx, *cmd.Unsubscribe)
		}
		return true
	}
}
