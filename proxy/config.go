package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Defaults applied by Config.setDefaults.
const (
	DefaultMaxMessage   = 1 << 20
	DefaultDialTimeout  = 5 * time.Second
	DefaultPingInterval = 30 * time.Second
	DefaultPongTimeout  = 30 * time.Second
	DefaultCloseTimeout = 5 * time.Second
	DefaultWriteTimeout = 10 * time.Second
	// DefaultParkAfter is the default Config.ParkAfter.
	DefaultParkAfter = 2 * time.Second
	// DefaultSendQueue is the default Config.SendQueue: room enough for
	// ten publishers that each send a burst of 100 messages at the same
	// moment (the rooms protocol's default publish rate allows one such
	// burst per connection), so a client that reads is not taken for a
	// slow consumer.
	DefaultSendQueue = 1024
)

// DefaultForwardHeaders are the client request headers copied to the
// upstream handshake when Config.ForwardHeaders is nil.
var DefaultForwardHeaders = []string{"Cookie", "Authorization", "Origin", "User-Agent", "Accept-Language"}

// OnExceed says what happens to a message that exceeds a rate limit.
type OnExceed string

// OnExceed values.
const (
	// ExceedClose closes the connection with 1008 and a reason.
	ExceedClose OnExceed = "close"
	// ExceedDrop drops the message (all its frames) and keeps the connection.
	ExceedDrop OnExceed = "drop"
	// ExceedThrottle delays reading from the sender until the limit allows
	// the message, which pushes back on the sender through TCP.
	ExceedThrottle OnExceed = "throttle"
)

// RateLimit limits the messages and bytes one side of a connection may send.
// A zero rate means no limit of that kind.
type RateLimit struct {
	// Messages per second; 0 means unlimited.
	Messages float64
	// MessageBurst is the bucket size for messages; defaults to
	// max(1, ceil(Messages)).
	MessageBurst int
	// Bytes per second (payload bytes); 0 means unlimited.
	Bytes float64
	// ByteBurst is the bucket size for bytes; defaults to max(1, ceil(Bytes)).
	// A frame larger than the burst drains the whole bucket.
	ByteBurst int
	// OnExceed defaults to ExceedClose.
	OnExceed OnExceed
}

func (r *RateLimit) enabled() bool { return r != nil && (r.Messages > 0 || r.Bytes > 0) }

// Limits applies to the messages one side sends.
type Limits struct {
	// MaxMessage is the largest message (after reassembly of fragments) in
	// bytes; larger ones close the connection with 1009. 0 means unlimited.
	MaxMessage int64
	// Rate limits messages and bytes; nil means unlimited.
	Rate *RateLimit
}

// SlowConsumer is the policy for clients that do not keep up with fan-out.
type SlowConsumer string

// SlowConsumer values.
const (
	SlowClose SlowConsumer = "close"
	SlowDrop  SlowConsumer = "drop"
)

// Config configures relayed connections. The zero value plus Upstreams is
// usable; setDefaults fills in the documented defaults.
type Config struct {
	// Upstreams are ws:// or wss:// URLs. LB chooses the upstream of each
	// connection; when a dial fails, another is tried, each at most once.
	Upstreams []string
	// LB is the load-balancing policy. Default: round robin.
	LB LBPolicy
	// Health says when an upstream is set aside. Default: never. When
	// every upstream is set aside, clients are refused at once with 502
	// and a Retry-After.
	Health Health
	// Pool holds the upstreams' state (live connections, health); Gateways
	// of successive configurations share one. nil: the Gateway's own.
	Pool *Pool
	// DrainTimeout, when positive, closes the live connections of an
	// upstream that the Pool's configurations no longer hold, this long
	// after the Gateway that held it last is closed, with 1001
	// "upstream removed". 0: they live on. The newest Gateway's value
	// applies: the configuration that removed the upstream decides.
	DrainTimeout time.Duration
	// AfterFunc runs f after d, for DrainTimeout; stop cancels it. nil
	// means time.AfterFunc.
	AfterFunc func(d time.Duration, f func()) (stop func() bool)
	// Rand returns a number in [0,n) for the policies that choose at
	// random and the spread of heartbeats; nil means math/rand/v2.
	Rand func(n int) int
	// DialTimeout bounds connecting to an upstream and its handshake.
	// Default 5s; negative is an error.
	DialTimeout time.Duration
	// TLS is used for wss:// upstreams; nil means the system roots.
	TLS *tls.Config
	// ForwardHeaders are the client request headers copied to the upstream
	// handshake. nil means DefaultForwardHeaders. Hop-by-hop and
	// Sec-WebSocket-* headers are never copied.
	ForwardHeaders []string

	// Client limits the messages from the client. MaxMessage 0 here is
	// replaced by DefaultMaxMessage; use -1 for unlimited.
	Client Limits
	// Upstream limits the messages from the upstream (unlimited by default).
	Upstream Limits

	// IdleTimeout closes a connection (1001 "idle timeout") after this long
	// without a data message in either direction. 0 disables.
	IdleTimeout time.Duration
	// PingInterval is how long the client may be silent before the gateway
	// pings it: each connection waits a share of it drawn once, from 3/4
	// of it to all of it, so that pings are spread. Default 30s; negative
	// disables pings.
	PingInterval time.Duration
	// PongTimeout is how long the gateway waits for any frame after a ping
	// before it drops the connection. Default 30s; negative is an error.
	PongTimeout time.Duration
	// CloseTimeout bounds the closing handshake. Default 5s; negative is an
	// error.
	CloseTimeout time.Duration
	// WriteTimeout bounds each write to a peer: a peer that does not take
	// the bytes within it is dropped (a client that stops reading: the
	// upstream gets 1001 "client not reading"; an upstream that stops
	// reading: the client gets 1011 "upstream not reading"). Default 10s;
	// negative disables.
	WriteTimeout time.Duration
	// ParkAfter is how long a side of a connection waits for data before
	// it gives up its goroutine (Linux; plain TCP and TLS). Default 2s;
	// negative: never.
	ParkAfter time.Duration

	// Compression, if set, negotiates permessage-deflate (RFC 7692) with
	// the clients that offer it and offers it to the upstreams. nil: none.
	Compression *Compression

	// SendQueue bounds the frames queued for a client by fan-out. Default
	// DefaultSendQueue (1024); negative is an error.
	SendQueue int
	// SlowConsumer says what happens when the queue is full: SlowClose
	// (close 1013 "slow consumer", the default) or SlowDrop (drop frames).
	SlowConsumer SlowConsumer

	// Stats, if set, counts what the connections do (for metrics).
	// Default: nil (nothing counted beyond each connection's own counts).
	Stats *Stats

	// Now is the clock for rate limits; nil means time.Now.
	Now func() time.Time

	upstreamURLs []*url.URL
	selector     selector
	monoClock    bool // Now is time.Now: read the cheaper monotonic clock instead
}

// now is Now, read from the monotonic clock alone when Now is the real
// clock (half the cost of time.Now).
func (c *Config) now() time.Time {
	if c.monoClock {
		return epoch.Add(time.Duration(mono()))
	}
	return c.Now()
}

// ParseUpstream reads an upstream URL: ws:// or wss:// with a host.
func ParseUpstream(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("upstream %q: %v", s, err)
	}
	if u.Scheme != "ws" && u.Scheme != "wss" {
		return nil, fmt.Errorf("upstream %q: scheme must be ws or wss", s)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("upstream %q: missing host", s)
	}
	return u, nil
}

// CheckForwardHeader says why a client header may not be listed in
// Config.ForwardHeaders, or returns nil.
func CheckForwardHeader(name string) error {
	if neverForward(http.CanonicalHeaderKey(name)) {
		return fmt.Errorf("header %q cannot be forwarded: the gateway manages it", name)
	}
	return nil
}

// Prepare validates c and fills in defaults. It must be called once before
// the config is used. Its errors about load balancing and health name the
// options as the Caddyfile spells them (lb_policy, health_uri, …), the one
// place they are checked. A config without upstreams serves sessions only
// (rooms).
func (c *Config) Prepare() error {
	c.upstreamURLs = c.upstreamURLs[:0]
	for _, s := range c.Upstreams {
		u, err := ParseUpstream(s)
		if err != nil {
			return err
		}
		c.upstreamURLs = append(c.upstreamURLs, u)
	}
	if len(c.upstreamURLs) > math.MaxUint16 {
		return fmt.Errorf("at most %d upstreams, not %d", math.MaxUint16, len(c.upstreamURLs))
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if err := c.Compression.prepare(); err != nil {
		return err
	}
	if c.Rand == nil {
		c.Rand = rand.IntN
	}
	sel, err := c.LB.prepare(c.Rand, false)
	if err != nil {
		return err
	}
	c.selector = sel
	if cp, ok := sel.(*cookiePick); ok {
		names := make([]string, len(c.upstreamURLs))
		for i, u := range c.upstreamURLs {
			names[i] = u.Redacted()
		}
		cp.prepareValues(names)
	}
	if err := c.Health.prepare(); err != nil {
		return err
	}
	if c.DrainTimeout < 0 {
		return errors.New("drain timeout must not be negative")
	}
	if c.AfterFunc == nil {
		c.AfterFunc = func(d time.Duration, f func()) func() bool { return time.AfterFunc(d, f).Stop }
	}
	if c.ForwardHeaders == nil {
		c.ForwardHeaders = DefaultForwardHeaders
	}
	for _, h := range c.ForwardHeaders {
		if err := CheckForwardHeader(h); err != nil {
			return err
		}
	}
	switch {
	case c.Client.MaxMessage == 0:
		c.Client.MaxMessage = DefaultMaxMessage
	case c.Client.MaxMessage < 0:
		c.Client.MaxMessage = 0
	}
	if c.Upstream.MaxMessage < 0 {
		c.Upstream.MaxMessage = 0
	}
	for _, r := range []*RateLimit{c.Client.Rate, c.Upstream.Rate} {
		if r == nil {
			continue
		}
		if r.Messages < 0 || r.Bytes < 0 || r.MessageBurst < 0 || r.ByteBurst < 0 {
			return errors.New("rate limits must not be negative")
		}
		switch r.OnExceed {
		case "":
			r.OnExceed = ExceedClose
		case ExceedClose, ExceedDrop, ExceedThrottle:
		default:
			return fmt.Errorf("on_exceed must be close, drop or throttle, not %q", r.OnExceed)
		}
	}
	// these have no "off": a negative value is a mistake, not the default
	for _, t := range []struct {
		name string
		d    time.Duration
	}{{"dial", c.DialTimeout}, {"idle", c.IdleTimeout}, {"pong", c.PongTimeout}, {"close", c.CloseTimeout}} {
		if t.d < 0 {
			return fmt.Errorf("%s timeout must not be negative", t.name)
		}
	}
	if c.PingInterval == 0 {
		c.PingInterval = DefaultPingInterval
	}
	if c.PongTimeout == 0 {
		c.PongTimeout = DefaultPongTimeout
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultCloseTimeout
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.ParkAfter == 0 {
		c.ParkAfter = DefaultParkAfter
	}
	switch {
	case c.SendQueue < 0:
		return errors.New("send queue must not be negative")
	case c.SendQueue == 0:
		c.SendQueue = DefaultSendQueue
	}
	switch c.SlowConsumer {
	case "":
		c.SlowConsumer = SlowClose
	case SlowClose, SlowDrop:
	default:
		return fmt.Errorf("slow consumer policy must be close or drop, not %q", c.SlowConsumer)
	}
	if c.Now == nil {
		c.Now = time.Now
		c.monoClock = true
	}
	return nil
}

// Check reports what Config.Prepare would refuse in h, leaving h as it is.
func (h Health) Check() error {
	if h.Active != nil {
		a := *h.Active
		h.Active = &a
	}
	return h.prepare()
}

// prepare checks h and fills in its defaults.
func (h *Health) prepare() error {
	if h.FailDuration < 0 || h.MaxFails < 0 {
		return errors.New("fail_duration and max_fails must not be negative")
	}
	if h.MaxFails == 0 {
		h.MaxFails = 1
	}
	if h.Now == nil {
		h.Now = time.Now
	}
	for _, c := range h.UnhealthyCloses {
		if c < 1000 || c > 4999 {
			return fmt.Errorf("unhealthy_close code %d: want 1000-4999", c)
		}
	}
	a := h.Active
	if a == nil {
		return nil
	}
	switch {
	case a.WebSocket && a.URI != "":
		return errors.New("health_uri and health_websocket exclude each other")
	case !a.WebSocket && a.URI == "":
		return errors.New("active health checks need health_uri or health_websocket")
	case a.WebSocket && a.ExpectStatus != 0:
		return errors.New("health_status has no place with health_websocket: a WebSocket probe expects 101")
	case a.Interval < 0 || a.Timeout < 0 || a.Passes < 0 || a.Fails < 0:
		return errors.New("health_interval, health_timeout, health_passes and health_fails must not be negative")
	case a.ExpectStatus != 0 && (a.ExpectStatus > 5 && a.ExpectStatus < 100 || a.ExpectStatus > 599):
		return fmt.Errorf("health_status %d: want a status (100-599) or a class (1-5)", a.ExpectStatus)
	}
	for _, o := range []struct{ name, uri string }{{"health_uri", a.URI}, {"health_websocket", a.WebSocketURI}} {
		if o.uri != "" && !strings.HasPrefix(o.uri, "/") {
			return fmt.Errorf("%s %q must start with /", o.name, o.uri)
		}
	}
	if a.Interval == 0 {
		a.Interval = DefaultHealthInterval
	}
	if a.Timeout == 0 {
		a.Timeout = DefaultHealthTimeout
	}
	if a.Passes == 0 {
		a.Passes = 1
	}
	if a.Fails == 0 {
		a.Fails = 1
	}
	if a.NewTicker == nil {
		a.NewTicker = func(d time.Duration) Ticker { return realTicker{time.NewTicker(d)} }
	}
	return nil
}
