package caddymodule

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"os"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap/zapcore"

	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// registry tracks every relayed connection of the process. It lives outside
// any one configuration so that a config reload leaves live connections
// alone, while process exit still closes each of them with 1001.
var registry = proxy.NewRegistry()

// shutdownLimit caps how long exit waits for closing handshakes; each
// connection bounds its own by its close_timeout, and the wait ends when
// the last one has finished (one wait for all handlers).
const shutdownLimit = time.Minute

// Handler relays WebSocket connections to upstream apps, enforcing
// frame-level limits. Requests that are not WebSocket upgrades pass to the
// next handler untouched.
type Handler struct {
	// Name identifies the handler: the handler label of its metrics
	// (handlers with the same name add up), the handler field and filter
	// of the admin API's connection listings, and its connection log
	// lines. Default: "wsgate".
	Name string `json:"name,omitempty"`

	// Upstreams are the ws:// or wss:// URLs of the app. LoadBalancing
	// chooses the upstream of each connection; when its dial fails another
	// is tried, each at most once. An upstream URL with a path is dialled
	// at that path; without one, at the client's request path. The
	// client's query string is appended.
	Upstreams []string `json:"upstreams,omitempty"`

	// LoadBalancing chooses among the healthy upstreams. Default:
	// round_robin.
	LoadBalancing *LoadBalancing `json:"load_balancing,omitempty"`

	// HealthChecks set unhealthy upstreams aside. Default: none (every
	// upstream is always tried).
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// DrainTimeout closes the live connections of an upstream that a
	// reload removed, this long after the reload, with 1001 "upstream
	// removed" (clients reconnect, and reach the upstreams configured
	// now). Default: none (they live on until they end).
	DrainTimeout caddy.Duration `json:"drain_timeout,omitempty"`

	// DialTimeout bounds connecting to an upstream and its handshake.
	// Default: 5s. Negative is an error.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// TLS configures connections to wss:// upstreams. Default: system roots,
	// server name from the URL.
	TLS *UpstreamTLS `json:"tls,omitempty"`

	// ForwardHeaders are the client request headers copied to the upstream
	// handshake. Default: Cookie, Authorization, Origin, User-Agent,
	// Accept-Language. X-Forwarded-For/Proto/Host and X-Real-IP are always
	// set by the gateway; hop-by-hop and Sec-WebSocket-* headers are never
	// copied.
	ForwardHeaders []string `json:"forward_headers,omitempty"`

	// MaxMessage is the largest message a client may send, in bytes, after
	// reassembly of fragments; larger ones close the connection with 1009.
	// Default: 1 MiB (1048576). -1 means unlimited.
	MaxMessage int64 `json:"max_message,omitempty"`

	// MaxMessageUpstream is the largest message the upstream may send.
	// Default: unlimited (messages stream through without being held).
	MaxMessageUpstream int64 `json:"max_message_upstream,omitempty"`

	// RateLimit limits what each client sends. Default: no limit.
	RateLimit *RateLimit `json:"rate_limit,omitempty"`

	// RateLimitUpstream limits what the upstream sends on each connection.
	// Default: no limit.
	RateLimitUpstream *RateLimit `json:"rate_limit_upstream,omitempty"`

	// IdleTimeout closes a connection with 1001 "idle timeout" after this
	// long without a data message in either direction. Default: none.
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// PingInterval is how long a client may be silent before the gateway
	// pings it. Default: 30s. A negative value disables pings.
	PingInterval caddy.Duration `json:"ping_interval,omitempty"`

	// PongTimeout is how long the gateway waits for any frame after a ping
	// before it drops the client; it has no effect with pings off.
	// Default: 30s. Negative is an error.
	PongTimeout caddy.Duration `json:"pong_timeout,omitempty"`

	// WriteTimeout bounds each write to a peer. A client that does not
	// take the bytes within it is dropped and the upstream gets 1001
	// "client not reading"; an upstream that does not is dropped and the
	// client gets 1011 "upstream not reading". Default: 10s. A negative
	// value disables it.
	WriteTimeout caddy.Duration `json:"write_timeout,omitempty"`

	// CloseTimeout bounds the closing handshake: once the gateway has sent
	// a close frame, the peer has this long to answer before its socket is
	// dropped. Default: 5s. Negative is an error.
	CloseTimeout caddy.Duration `json:"close_timeout,omitempty"`

	// ParkAfter is how long a side of a connection waits for data before
	// its reader goroutine is released (the socket is then watched with
	// epoll; Linux, plain TCP and TLS). Default: 2s. A negative value
	// keeps the goroutines.
	ParkAfter caddy.Duration `json:"park_after,omitempty"`

	// Origins allowed to open sockets: exact origins (https://app.example.com)
	// and subdomain wildcards (https://*.example.com). Default: same origin
	// (the Origin's host must equal the request's Host).
	Origins []string `json:"origins,omitempty"`
	// AllowMissingOrigin lets requests without an Origin header through
	// (non-browser clients). Default: false (refused with 403).
	AllowMissingOrigin bool `json:"allow_missing_origin,omitempty"`

	// JWT verifies a token at the upgrade. Default: no token required.
	JWT *JWT `json:"jwt,omitempty"`
	// ForwardAuth checks credentials (a session cookie) with an auth
	// endpoint. With JWT too, a request that carries a token is decided by
	// JWT and one without by forward auth.
	ForwardAuth *ForwardAuth `json:"forward_auth,omitempty"`
	// RefreshField enables in-band token refresh: a client text message
	// {"<field>": "<new token>"} is consumed by the gateway and moves the
	// connection's expiry. Default: none (connections close at exp).
	RefreshField string `json:"refresh_field,omitempty"`
	// ClaimsHeaders maps claim paths (sub, org.id) to headers set on the
	// upstream handshake. Headers of these names sent by the client are
	// removed first, whatever their case or '_' spelling.
	ClaimsHeaders map[string]string `json:"claims_headers,omitempty"`
	// ConnectionLimits caps open connections. Default: none.
	ConnectionLimits *ConnectionLimits `json:"connection_limits,omitempty"`

	// Rooms serves the wsgate.v1 rooms protocol (subprotocol "wsgate.v1")
	// instead of relaying to an upstream: clients subscribe to and publish
	// on channels, fanned out through the wsgate app's broker.
	Rooms *RoomsConfig `json:"rooms,omitempty"`

	// UpstreamControl, in relay mode, is a prefix (such as "wsgate:") that
	// marks upstream text messages meant for the gateway:
	// <prefix>{"subscribe":"<channel>"} or {"unsubscribe":…} subscribes the
	// connection, and publications on the channel are then sent to the
	// client as they are. Such messages never reach the client, and client
	// messages starting with the prefix never reach the upstream.
	UpstreamControl string `json:"upstream_control,omitempty"`

	// Compression negotiates permessage-deflate (RFC 7692) with the clients
	// that offer it, and offers it to the upstreams. Absent: none.
	Compression *Compression `json:"compression,omitempty"`

	// SendQueue bounds the fan-out messages waiting for one client (rooms
	// or upstream_control). Default: 1024 (the bursts of ten rooms
	// publishers at the default publish rate, arriving at once). Negative
	// is an error.
	SendQueue int `json:"send_queue,omitempty"`
	// SlowConsumer is what happens when the queue is full: "close" (close
	// 1013 "slow consumer") or "drop" (the message is dropped for this
	// client). Default: close.
	SlowConsumer string `json:"slow_consumer,omitempty"`

	// Channels is the channel policy: ordered rules, first match wins, and
	// anything unmatched is denied. Default: none (no channel checks).
	Channels []ChannelRule `json:"channels,omitempty"`
	// RelayChannels says where relayed client frames name their channel
	// and action; required with Channels.
	RelayChannels *RelayChannels `json:"relay_channels,omitempty"`

	// LogConnections is the level of the line logged when a connection
	// ends: "info", "debug" or "off". Default: info.
	LogConnections string `json:"log_connections,omitempty"`

	gw           *proxy.Gateway
	metrics      *handlerMetrics
	balanceClaim string        // the claim the claim policy hashes
	connLog      zapcore.Level // when logConns
	logConns     bool
	auth         authState
	channels     *channelState
	hub          *rooms.Hub
}

// RoomsConfig configures rooms mode.
type RoomsConfig struct {
	// MaxSubscriptions per connection. Default: 100.
	MaxSubscriptions int `json:"max_subscriptions,omitempty"`
	// MaxData bounds the data of one publish, in bytes. Default: 65536.
	MaxData int `json:"max_data,omitempty"`
	// PublishRate is how many publishes per second each connection may
	// make on average; a publish over it gets an error reply with code
	// rate_limited and is not delivered, and the connection stays open.
	// Default: 50. -1 means no limit.
	PublishRate float64 `json:"publish_rate,omitempty"`
	// PublishBurst is how many publishes a connection may make at once.
	// Default: twice the per-second rate, rounded up (100 with the default
	// rate).
	PublishBurst int `json:"publish_burst,omitempty"`
	// PresenceClaims names the claims a connection shows in presence
	// lists and join and leave events, next to its connection id and
	// subject (the sub claim). Default: none.
	PresenceClaims []string `json:"presence_claims,omitempty"`
}

// RateLimit limits the messages and bytes one side of a connection sends.
type RateLimit struct {
	// Messages is the sustained message rate, per second. Pings and pongs
	// count as messages. Default: unlimited.
	Messages float64 `json:"messages,omitempty"`
	// MessageBurst is how many messages may arrive at once. Default: the
	// per-second rate rounded up (at least 1).
	MessageBurst int `json:"message_burst,omitempty"`
	// Bytes is the sustained payload byte rate, per second. Default:
	// unlimited.
	Bytes float64 `json:"bytes,omitempty"`
	// ByteBurst is how many bytes may arrive at once. Default: one second's
	// worth. A frame larger than the burst uses the whole bucket.
	ByteBurst int `json:"byte_burst,omitempty"`
	// OnExceed is what happens to a message over the limit: "close" (close
	// 1008 "rate limit exceeded"), "drop" (the message is discarded; a
	// message whose later fragments go over closes instead), or "throttle"
	// (the gateway stops reading from the sender until the limit allows).
	// Default: close.
	OnExceed string `json:"on_exceed,omitempty"`
}

// UpstreamTLS configures TLS to wss:// upstreams.
type UpstreamTLS struct {
	// CAFiles are PEM files of the CAs trusted for upstream certificates,
	// instead of the system roots.
	CAFiles []string `json:"ca_files,omitempty"`
	// ServerName overrides the name sent in SNI and verified.
	ServerName string `json:"server_name,omitempty"`
	// InsecureSkipVerify turns off certificate verification. For testing
	// only.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
	// ClientCertFile and ClientKeyFile are a PEM certificate and key the
	// gateway presents to the upstream (mutual TLS).
	ClientCertFile string `json:"client_cert_file,omitempty"`
	ClientKeyFile  string `json:"client_key_file,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.wsgate",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision builds the relay engine from the config.
func (h *Handler) Provision(ctx caddy.Context) error {
	if err := h.Rooms.validate(); err != nil {
		return err
	}
	cfg, err := h.proxyConfig()
	if err != nil {
		return err
	}
	if h.Name == "" {
		h.Name = defaultName
	}
	if err := h.provisionMetrics(ctx); err != nil {
		return err
	}
	cfg.Stats = h.metrics.stats
	cfg.Pool = h.metrics.pool
	h.gw = proxy.New(cfg, registry, ctx.Slogger())
	registry.SetReleaseMemory(releaseMemory(ctx))
	if h.Rooms != nil || h.UpstreamControl != "" {
		if h.hub, _, err = hubFor(ctx); err != nil {
			return err
		}
	}
	if err := h.provisionChannels(); err != nil {
		return err
	}
	return h.provisionAuth(ctx)
}

// conflict finds options that exclude or need each other, and names the
// option to blame ("" for the directive itself). The Caddyfile parser
// reports it with that option's line; provisioning, for JSON configs.
func (h *Handler) conflict() (option string, err error) {
	switch {
	case h.Rooms != nil && len(h.Upstreams) > 0:
		return "", errors.New("wsgate: rooms and upstream exclude each other")
	case h.Rooms == nil && len(h.Upstreams) == 0:
		return "", errors.New("wsgate needs at least one upstream (or rooms)")
	case h.Rooms != nil && h.UpstreamControl != "":
		return "upstream_control", errors.New("wsgate: upstream_control is for relay mode")
	case h.RefreshField != "" && h.JWT == nil:
		return "refresh_field", errors.New("refresh_field needs jwt")
	}
	if option, err := h.upstreamConflict(); err != nil {
		return option, err
	}
	return h.channelConflict()
}

func (h *Handler) proxyConfig() (proxy.Config, error) {
	if _, err := h.conflict(); err != nil {
		return proxy.Config{}, err
	}
	cfg := proxy.Config{
		SendQueue:      h.SendQueue,
		SlowConsumer:   proxy.SlowConsumer(h.SlowConsumer),
		Upstreams:      h.Upstreams,
		DialTimeout:    time.Duration(h.DialTimeout),
		ForwardHeaders: h.ForwardHeaders,
		Client:         proxy.Limits{MaxMessage: h.MaxMessage, Rate: h.RateLimit.proxy()},
		Upstream:       proxy.Limits{MaxMessage: h.MaxMessageUpstream, Rate: h.RateLimitUpstream.proxy()},
		IdleTimeout:    time.Duration(h.IdleTimeout),
		PingInterval:   time.Duration(h.PingInterval),
		PongTimeout:    time.Duration(h.PongTimeout),
		WriteTimeout:   time.Duration(h.WriteTimeout),
		CloseTimeout:   time.Duration(h.CloseTimeout),
		ParkAfter:      time.Duration(h.ParkAfter),
	}
	if z := h.Compression; z != nil {
		cfg.Compression = &proxy.Compression{ContextTakeover: z.ContextTakeover, WindowBits: z.WindowBits,
			MinSize: z.MinSize, NoUpstream: z.NoUpstream}
	}
	if err := h.proxyUpstreams(&cfg); err != nil {
		return cfg, err
	}
	if h.TLS != nil {
		tc, err := h.TLS.config()
		if err != nil {
			return cfg, fmt.Errorf("upstream tls: %w", err)
		}
		cfg.TLS = tc
	}
	if err := cfg.Prepare(); err != nil {
		return cfg, fmt.Errorf("wsgate: %w", err)
	}
	return cfg, nil
}

func (r *RateLimit) proxy() *proxy.RateLimit {
	if r == nil {
		return nil
	}
	return &proxy.RateLimit{
		Messages: r.Messages, MessageBurst: r.MessageBurst,
		Bytes: r.Bytes, ByteBurst: r.ByteBurst,
		OnExceed: proxy.OnExceed(r.OnExceed),
	}
}

func (t *UpstreamTLS) config() (*tls.Config, error) {
	tc := &tls.Config{ServerName: t.ServerName, InsecureSkipVerify: t.InsecureSkipVerify}
	if len(t.CAFiles) > 0 {
		pool := x509.NewCertPool()
		for _, f := range t.CAFiles {
			pem, err := os.ReadFile(f)
			if err != nil {
				return nil, fmt.Errorf("reading CA file: %w", err)
			}
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("CA file %s holds no PEM certificate", f)
			}
		}
		tc.RootCAs = pool
	}
	if (t.ClientCertFile == "") != (t.ClientKeyFile == "") {
		return nil, fmt.Errorf("client certificate needs both a certificate and a key file")
	}
	if t.ClientCertFile != "" {
		cert, err := tls.LoadX509KeyPair(t.ClientCertFile, t.ClientKeyFile)
		if err != nil {
			return nil, fmt.Errorf("loading client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}

// Validate checks the config (Provision has already prepared it).
func (h *Handler) Validate() error {
	if h.gw == nil {
		return fmt.Errorf("wsgate: not provisioned")
	}
	return nil
}

// Cleanup runs when this config is replaced or the process exits. On a
// reload live connections keep running with the config they started with;
// on exit every connection is closed with 1001.
func (h *Handler) Cleanup() error {
	h.cleanupAuth()
	if caddy.Exiting() {
		registry.Shutdown(shutdownLimit)
		return nil
	}
	if h.gw != nil {
		// stops its health checks, and drains the upstreams that the
		// config replacing this one dropped
		h.gw.Close()
	}
	return nil
}

// ServeHTTP relays WebSocket upgrades and passes other requests on.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if !proxy.IsUpgrade(r) {
		return next.ServeHTTP(w, r)
	}
	start := time.Now()
	result := h.serveUpgrade(w, r, start)
	h.metrics.upgrade(h.mode(), result, time.Since(start))
	return nil
}

// serveUpgrade serves an upgrade request and names its result.
func (h *Handler) serveUpgrade(w http.ResponseWriter, r *http.Request, start time.Time) string {
	info := proxy.RequestInfo{}
	info.ClientIP, _ = caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	info.TrustedProxy, _ = caddyhttp.GetVar(r.Context(), caddyhttp.TrustedProxyVarKey).(bool)
	claims, refused := h.authorize(w, r, &info)
	if refused != "" {
		return refused
	}
	if h.logConns && h.auth.logger.Core().Enabled(h.connLog) {
		// (a hook costs each connection some memory while it lives)
		info.OnEnd = h.connectionLogger(r, claims, start)
	}
	info.Meta = proxy.ConnInfo{Subject: claims.Subject(), Remote: info.ClientIP, Handler: h.Name, Mode: "relay"}
	if h.Rooms != nil {
		info.Meta.Mode = "rooms"
		return string(h.serveRooms(w, r, info, claims))
	}
	if h.channels != nil {
		info.Inspect = h.channels.inspector(claims)
	}
	if h.UpstreamControl != "" {
		h.addUpstreamControl(&info)
	}
	info.BalanceKey = h.balanceKey(claims)
	return string(h.gw.ServeHTTP(w, r, info))
}

// mode is the mode label of the handler's metrics.
func (h *Handler) mode() string {
	if h.Rooms != nil {
		return "rooms"
	}
	return "relay"
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)

// Compression configures permessage-deflate. Every compressed message
// received is inflated whole, with max_message as the bound on what it
// inflates to; every message the gateway compresses is compressed on its
// own, so one compressed frame serves every subscriber of a publication.
type Compression struct {
	// ContextTakeover lets peers compress a message with the context of
	// their earlier ones: better ratios on small messages, for a window of
	// up to 2^window_bits bytes held per connection and compressing side.
	// Default false: clients are asked for client_no_context_takeover and
	// upstreams for server_no_context_takeover, and no connection holds a
	// window.
	ContextTakeover bool `json:"context_takeover,omitempty"`
	// WindowBits (8 to 15) is the window clients that offer
	// client_max_window_bits may compress with, and the one asked of the
	// upstreams with context takeover. Default 15.
	WindowBits int `json:"window_bits,omitempty"`
	// MinSize is the smallest message the gateway compresses (bytes);
	// smaller ones are sent plain. Default 128.
	MinSize int `json:"min_size,omitempty"`
	// NoUpstream: compression is not offered to the upstreams.
	NoUpstream bool `json:"no_upstream,omitempty"`
}
