package rooms

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
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
}

// Conn is one client connection's subscriptions.
type Conn struct {
	hub    *Hub
	cfg    ConnConfig
	sess   proxy.Session
	pubLim *rate.Limiter // made at the first publish, so idle connections hold none

	mu     sync.Mutex
	subs   map[string]struct{}
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
	c := &Conn{hub: h, cfg: cfg, subs: map[string]struct{}{}}
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
func (c *Conn) Deliver(p *Publication) {
	if s := c.sess; s != nil {
		s.Enqueue(p.Frame(c.cfg.Format))
	}
}

// Close drops every subscription; it is the proxy's OnClose hook.
func (c *Conn) Close() {
	c.mu.Lock()
	subs := c.subs
	c.subs = nil
	c.closed = true
	c.mu.Unlock()
	for ch := range subs {
		c.hub.Unsubscribe(context.Background(), ch, c)
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
	if perr := c.do(r); perr != nil {
		return proxy.Drop, ErrorReply(r, perr)
	}
	return proxy.Drop, OK(r)
}

func (c *Conn) do(r Request) *ProtoError {
	ctx := context.Background()
	switch r.Op {
	case "ping":
		return nil
	case "refresh":
		if c.cfg.Refresh == nil {
			return &ProtoError{CodeNotFound, "token refresh is not enabled"}
		}
		exp, err := c.cfg.Refresh(r.Token)
		if err != nil {
			return &ProtoError{CodeForbidden, "invalid token"}
		}
		if c.sess.Extend(exp) != nil {
			return &ProtoError{CodeForbidden, "token expired"}
		}
		return nil
	case "presence":
		return &ProtoError{CodeNotFound, "presence is not available"}
	}
	if policy.ValidateChannel(r.Channel) != nil {
		return &ProtoError{CodeBadRequest, "invalid channel name"}
	}
	switch r.Op {
	case "subscribe":
		if r.Since != "" {
			return &ProtoError{CodeNotFound, "history is not available"}
		}
		if c.cfg.Authorize != nil && !c.cfg.Authorize("subscribe", r.Channel) {
			return &ProtoError{CodeForbidden, "subscribe to " + r.Channel + " denied"}
		}
		return c.Subscribe(ctx, r.Channel)
	case "unsubscribe":
		c.Unsubscribe(ctx, r.Channel)
		return nil
	case "publish":
		if c.cfg.Authorize != nil && !c.cfg.Authorize("publish", r.Channel) {
			return &ProtoError{CodeForbidden, "publish to " + r.Channel + " denied"}
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
			if errors.Is(err, ErrInvalidData) {
				return &ProtoError{CodeBadRequest, err.Error()}
			}
			if errors.Is(err, broker.ErrUnavailable) {
				return &ProtoError{CodeUnavailable, "delivered on this node only: the broker is unavailable"}
			}
			return &ProtoError{CodeUnavailable, "publish failed"}
		}
		return nil
	}
	return &ProtoError{CodeNotFound, "unknown op"}
}

// Subscribe subscribes the connection to channel (no policy check: the
// caller decides).
func (c *Conn) Subscribe(ctx context.Context, channel string) *ProtoError {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return &ProtoError{CodeUnavailable, "connection closing"}
	}
	if _, ok := c.subs[channel]; ok {
		c.mu.Unlock()
		return nil
	}
	if len(c.subs) >= c.cfg.MaxSubscriptions {
		c.mu.Unlock()
		return &ProtoError{CodeForbidden, "too many subscriptions (max " + strconv.Itoa(c.cfg.MaxSubscriptions) + ")"}
	}
	c.subs[channel] = struct{}{}
	c.mu.Unlock()
	if err := c.hub.Subscribe(ctx, channel, c); err != nil {
		c.mu.Lock()
		delete(c.subs, channel)
		c.mu.Unlock()
		return &ProtoError{CodeUnavailable, "subscribe failed"}
	}
	return nil
}

// Unsubscribe removes the connection from channel.
func (c *Conn) Unsubscribe(ctx context.Context, channel string) {
	c.mu.Lock()
	_, ok := c.subs[channel]
	delete(c.subs, channel)
	c.mu.Unlock()
	if ok {
		c.hub.Unsubscribe(ctx, channel, c)
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
