package caddymodule

import (
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"go.uber.org/zap"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("wsgate", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("wsgate", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var m Handler
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return &m, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	wsgate [<matcher>] [<upstreams...>] {
//	    name                 <name>
//	    upstream             <ws://host:port[/path]...>
//	    dial_timeout         <duration>
//	    tls {
//	        ca_file              <pem_files...>
//	        server_name          <name>
//	        insecure_skip_verify
//	        client_certificate   <cert_file> <key_file>
//	    }
//	    forward_headers      <header_names...>
//	    max_message          <size>|off
//	    max_message_upstream <size>|off
//	    rate_limit [client|upstream] {
//	        messages  <count>/<duration> [burst <count>]
//	        bytes     <size>/<duration>  [burst <size>]
//	        on_exceed close|drop|throttle
//	    }
//	    idle_timeout         <duration>
//	    ping_interval        <duration>|off
//	    pong_timeout         <duration>
//	    write_timeout        <duration>|off
//	    close_timeout        <duration>
//	    park_after           <duration>|off
//	    origins              <origins...>
//	    allow_missing_origin
//	    jwt { … }                    (see parseJWT)
//	    forward_auth <url> { … }     (see parseForwardAuth)
//	    refresh_field        <json_field>
//	    claims_header        <claim_path> <header_name>
//	    limit_connections { … }      (see parseConnectionLimits)
//	    channels { … }               (see parseChannels)
//	    relay_channels { … }         (see parseRelayChannels)
//	    rooms {                      (instead of upstreams)
//	        max_subscriptions <n>
//	        max_data          <size>
//	    }
//	    lb_policy            <policy> [<args...>] [{ … }]   (see parseLBPolicy)
//	    health_uri           <uri>
//	    health_websocket     [<uri>]
//	    health_interval      <duration>
//	    health_timeout       <duration>
//	    health_status        <status>|<N>xx
//	    health_passes        <n>
//	    health_fails         <n>
//	    fail_duration        <duration>
//	    max_fails            <n>
//	    unhealthy_close      [<close_codes...>]
//	    drain_timeout        <duration>
//	    upstream_control     <prefix>
//	    compression [off] { … }      (see parseCompression)
//	    send_queue           <n>
//	    slow_consumer        close|drop
//	    log_connections      info|debug|off
//	}
//
// Unknown or repeated subdirectives are errors, with the closest known name
// as a suggestion; upstream, origins and claims_header may repeat. A rate
// such as 100/s, 6000/1m or 1MiB/s is an amount over a duration (s, m and
// h stand for one second, minute and hour).
//
// Whatever the handler's provisioning would refuse without reading files or
// the network is refused here, with the line: values with the same checks
// (origins, upstream URLs, JWT keys and algorithms, ...) and options that
// exclude or need each other. Options that could never take effect (a
// pong_timeout with pings off, claims used without jwt or forward_auth,
// upstream options in rooms mode, ...) are logged as warnings with their
// line.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if err := h.addUpstreams(d); err != nil {
		return err
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		name := d.Val()
		if name != "upstream" {
			if seen[name] {
				return d.Errf("duplicate subdirective %q", name)
			}
			seen[name] = true
		}
		var err error
		switch name {
		case "upstream":
			if d.CountRemainingArgs() == 0 {
				return d.ArgErr()
			}
			err = h.addUpstreams(d)
		case "name":
			if !d.AllArgs(&h.Name) {
				return d.ArgErr()
			}
		case "dial_timeout":
			h.DialTimeout, err = parseDuration(d)
		case "tls":
			h.TLS, err = parseTLS(d)
		case "forward_headers":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			for _, a := range args {
				if err := proxy.CheckForwardHeader(a); err != nil {
					return d.Err(err.Error())
				}
			}
			h.ForwardHeaders = args
		case "max_message":
			h.MaxMessage, err = parseSize(d, true)
		case "max_message_upstream":
			h.MaxMessageUpstream, err = parseSize(d, true)
			if h.MaxMessageUpstream < 0 {
				h.MaxMessageUpstream = 0
			}
		case "rate_limit":
			err = h.parseRateLimit(d.NewFromNextSegment(), seen)
		case "idle_timeout":
			h.IdleTimeout, err = parseDuration(d)
		case "ping_interval":
			h.PingInterval, err = parseDurationOrOff(d)
		case "pong_timeout":
			h.PongTimeout, err = parseDuration(d)
		case "write_timeout":
			h.WriteTimeout, err = parseDurationOrOff(d)
		case "close_timeout":
			h.CloseTimeout, err = parseDuration(d)
		case "park_after":
			h.ParkAfter, err = parseDurationOrOff(d)
		case "origins":
			delete(seen, name) // may repeat
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			if _, err := policy.NewOriginPolicy(args, false); err != nil {
				return d.Err(err.Error())
			}
			h.Origins = append(h.Origins, args...)
		case "allow_missing_origin":
			if d.CountRemainingArgs() > 0 {
				return d.ArgErr()
			}
			h.AllowMissingOrigin = true
		case "jwt":
			h.JWT, err = parseJWT(d)
		case "forward_auth":
			h.ForwardAuth, err = parseForwardAuth(d)
		case "refresh_field":
			if !d.AllArgs(&h.RefreshField) {
				return d.ArgErr()
			}
		case "claims_header":
			delete(seen, name) // may repeat
			var claim, header string
			if !d.AllArgs(&claim, &header) {
				return d.ArgErr()
			}
			if h.ClaimsHeaders == nil {
				h.ClaimsHeaders = map[string]string{}
			}
			if _, dup := h.ClaimsHeaders[claim]; dup {
				return d.Errf("duplicate claims_header for claim %q", claim)
			}
			// which claim would win would depend on map order; '_' reads
			// as '-', as in the stripping of client headers
			for c, other := range h.ClaimsHeaders {
				if strings.EqualFold(strings.ReplaceAll(other, "_", "-"), strings.ReplaceAll(header, "_", "-")) {
					return d.Errf("claims %q and %q both set header %q", c, claim, header)
				}
			}
			h.ClaimsHeaders[claim] = header
		case "limit_connections":
			h.ConnectionLimits, err = parseConnectionLimits(d)
		case "channels":
			h.Channels, err = parseChannels(d)
		case "relay_channels":
			h.RelayChannels, err = parseRelayChannels(d)
		case "rooms":
			h.Rooms, err = parseRooms(d)
		case "upstream_control":
			if !d.AllArgs(&h.UpstreamControl) {
				return d.ArgErr()
			}
		case "compression":
			h.Compression, err = parseCompression(d)
		case "send_queue":
			h.SendQueue, err = parsePositiveInt(d, name)
		case "slow_consumer":
			if !d.AllArgs(&h.SlowConsumer) {
				return d.ArgErr()
			}
			if h.SlowConsumer != "close" && h.SlowConsumer != "drop" {
				return d.Errf("slow_consumer must be close or drop, not %q", h.SlowConsumer)
			}
		case "log_connections":
			if !d.AllArgs(&h.LogConnections) {
				return d.ArgErr()
			}
			switch h.LogConnections {
			case "info", "debug", "off":
			default:
				return d.Errf("log_connections must be info, debug or off, not %q", h.LogConnections)
			}
		default:
			if !slices.Contains(upstreamSubdirectives, name) {
				return unknownName(d, "subdirective", handlerSubdirectives)
			}
			err = h.parseUpstreamOption(d, name)
		}
		if err != nil {
			return err
		}
	}
	if option, err := h.conflict(); err != nil {
		return errAt(d, option, err)
	}
	for _, w := range h.ineffective() {
		warnAt(d, w.option, w.msg)
	}
	return nil
}

// addUpstreams adds the upstream URLs among the line's remaining
// arguments.
func (h *Handler) addUpstreams(d *caddyfile.Dispenser) error {
	for d.NextArg() {
		if _, err := proxy.ParseUpstream(d.Val()); err != nil {
			return d.Err(err.Error())
		}
		h.Upstreams = append(h.Upstreams, d.Val())
	}
	return nil
}

// hasPlaceholder reports whether s holds a placeholder such as
// {env.SECRET}, whose value is only known when the config is provisioned.
func hasPlaceholder(s string) bool { return strings.Contains(s, "{") }

// The names each block knows, for suggestions on a typo.
var (
	handlerSubdirectives = slices.Concat([]string{
		"name", "upstream", "dial_timeout", "tls", "forward_headers", "max_message", "max_message_upstream",
		"rate_limit", "idle_timeout", "ping_interval", "pong_timeout", "write_timeout", "close_timeout",
		"park_after", "origins", "allow_missing_origin", "jwt", "forward_auth", "refresh_field",
		"claims_header", "limit_connections", "channels", "relay_channels", "rooms", "upstream_control",
		"compression", "send_queue", "slow_consumer", "log_connections",
	}, upstreamSubdirectives)
	compressionSubdirectives = []string{"context_takeover", "window_bits", "min_size", "upstream"}
	roomsSubdirectives       = []string{"max_subscriptions", "max_data", "publish_rate", "presence_claims"}
	tlsSubdirectives         = []string{"ca_file", "server_name", "insecure_skip_verify", "client_certificate"}
	rateLimitSubdirectives   = []string{"messages", "bytes", "on_exceed"}
)

// ineffective lists options that can never take effect with the rest of
// the config.
func (h *Handler) ineffective() []warning {
	var ws []warning
	add := func(set bool, option, msg string) {
		if set {
			ws = append(ws, warning{option, option + " " + msg})
		}
	}
	add(h.PongTimeout != 0 && h.PingInterval < 0, "pong_timeout", "has no effect: ping_interval is off")
	noClaims := h.JWT == nil && h.ForwardAuth == nil
	const why = "without jwt or forward_auth there are no claims"
	add(noClaims && len(h.ClaimsHeaders) > 0, "claims_header", "has no effect: "+why)
	add(noClaims && h.ConnectionLimits != nil && h.ConnectionLimits.PerSubject > 0,
		"limit_connections", "per_subject has no effect: "+why)
	if noClaims && len(h.Channels) > 0 {
		if p, err := compileChannels(h.Channels); err == nil && p.UsesClaims() {
			ws = append(ws, warning{"channels", "channel rules with {claims.…} never match: " + why})
		}
	}
	if h.Rooms != nil {
		const rooms = "has no effect in rooms mode (there is no upstream)"
		add(h.DialTimeout != 0, "dial_timeout", rooms)
		add(h.TLS != nil, "tls", rooms)
		add(h.ForwardHeaders != nil, "forward_headers", rooms)
		add(h.MaxMessageUpstream != 0, "max_message_upstream", rooms)
		add(h.RefreshField != "", "refresh_field", "has no effect in rooms mode (clients refresh with the protocol's refresh op)")
		add(h.RateLimitUpstream != nil, "rate_limit upstream", rooms)
		if h.Compression != nil && h.Compression.NoUpstream {
			ws = append(ws, warning{"compression", "compression upstream off " + rooms})
		}
	}
	ws = append(ws, h.upstreamIneffective()...)
	if h.Rooms == nil {
		add(h.TLS != nil && !slices.ContainsFunc(h.Upstreams, func(u string) bool { return strings.HasPrefix(u, "wss://") }),
			"tls", "has no effect: no upstream is wss://")
		const fanout = "has no effect without rooms or upstream_control (nothing is fanned out)"
		add(h.UpstreamControl == "" && h.SendQueue != 0, "send_queue", fanout)
		add(h.UpstreamControl == "" && h.SlowConsumer != "", "slow_consumer", fanout)
	}
	return ws
}

// warning is an option that can never take effect, and why. option is a
// subdirective name, maybe followed by its first argument (or several
// such, separated by |: the first in the block is pointed at).
type warning struct{ option, msg string }

// adapterLog receives the Caddyfile warnings; tests replace it.
var adapterLog = func() *zap.Logger { return caddy.Log().Named("config.adapter.caddyfile") }

// errAt returns err at the line of the block's first subdirective named
// option, or of the directive itself when option is "" or absent.
func errAt(d *caddyfile.Dispenser, option string, err error) error {
	seek(d, option)
	return d.Err(err.Error())
}

// warnAt logs msg with the file and line of the block's first subdirective
// named option (or of the directive).
func warnAt(d *caddyfile.Dispenser, option, msg string) {
	seek(d, option)
	adapterLog().Warn(msg, zap.String("file", d.File()), zap.Int("line", d.Line()))
}

// seek moves d to the block's first subdirective named option (a name,
// or a name and its first argument; or several such, separated by |), or
// to the directive.
func seek(d *caddyfile.Dispenser, option string) {
	d.Reset()
	d.Next()
	if option == "" {
		return
	}
	alts := strings.Split(option, "|")
	d.RemainingArgs()
	for d.NextBlock(0) {
		found := false
		for _, alt := range alts {
			name, arg, _ := strings.Cut(alt, " ")
			if d.Val() == name && (arg == "" || d.NextArg() && d.Val() == arg) {
				found = true
				break
			}
		}
		if found {
			return
		}
		// skip the subdirective's arguments and block
		d.RemainingArgs()
		for n := d.Nesting(); d.NextBlock(n); {
		}
	}
	d.Reset()
	d.Next()
}

// unknownName is the error for the unknown name d is at, a what such as
// "tls subdirective", with the closest of known as a suggestion.
func unknownName(d *caddyfile.Dispenser, what string, known []string) error {
	name := d.Val()
	if s := closest(name, known); s != "" {
		return d.Errf("unrecognized %s %q, did you mean %q?", what, name, s)
	}
	return d.Errf("unrecognized %s %q", what, name)
}

// closest is the entry of known nearest to name, if it is near enough to
// be a typo: at most two edits, and fewer than half the name's length.
func closest(name string, known []string) string {
	best, bestDist := "", 3
	for _, k := range known {
		if dist := editDistance(name, k); dist < bestDist && 2*dist < len(name) {
			best, bestDist = k, dist
		}
	}
	return best
}

// editDistance is the Levenshtein distance between a and b, in bytes.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// parseRooms reads:
//
//	rooms {
//	    max_subscriptions <n>
//	    max_data          <size>
//	    publish_rate      <count>/<duration> [burst <count>] | off
//	    presence_claims   <claim...>
//	}
//
// parseCompression parses
//
//	compression [off] {
//	    context_takeover
//	    window_bits <8-15>
//	    min_size    <size>
//	    upstream    off
//	}
func parseCompression(d *caddyfile.Dispenser) (*Compression, error) {
	if d.NextArg() {
		if d.Val() != "off" || d.NextArg() {
			return nil, d.Errf("compression takes no argument but off, not %q", d.Val())
		}
		// The error names the line of off: NextBlock moves past an
		// empty block ({ then } on the next line) and returns false, so
		// a block is told by d no longer being at off.
		noBlock := d.Err("compression off takes no block")
		if d.NextBlock(d.Nesting()) || d.Val() != "off" {
			return nil, noBlock
		}
		return nil, nil
	}
	z := new(Compression)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("duplicate compression subdirective %q", name)
		}
		seen[name] = true
		switch name {
		case "context_takeover":
			if d.NextArg() {
				return nil, d.ArgErr()
			}
			z.ContextTakeover = true
		case "window_bits":
			n, err := parsePositiveInt(d, name)
			if err != nil {
				return nil, err
			}
			if n < 8 || n > 15 {
				return nil, d.Errf("window_bits must be 8 to 15, not %d", n)
			}
			z.WindowBits = n
		case "min_size":
			n, err := parseSize(d, false)
			if err != nil {
				return nil, err
			}
			if n > math.MaxInt32 {
				return nil, d.Errf("min_size %d is too large", n)
			}
			z.MinSize = int(n)
		case "upstream":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			if v != "off" {
				return nil, d.Errf("compression upstream takes off, not %q", v)
			}
			z.NoUpstream = true
		default:
			return nil, unknownName(d, "compression subdirective", compressionSubdirectives)
		}
	}
	return z, nil
}

func parseRooms(d *caddyfile.Dispenser) (*RoomsConfig, error) {
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	rc := new(RoomsConfig)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("duplicate rooms subdirective %q", name)
		}
		seen[name] = true
		switch name {
		case "max_subscriptions":
			n, err := parsePositiveInt(d, name)
			if err != nil {
				return nil, err
			}
			rc.MaxSubscriptions = n
		case "max_data":
			n, err := parseSize(d, false)
			if err != nil {
				return nil, err
			}
			rc.MaxData = int(n)
		case "publish_rate":
			if d.CountRemainingArgs() == 1 && d.NextArg() {
				if d.Val() == "off" {
					rc.PublishRate = -1
					continue
				}
				d.Prev()
			}
			var err error
			if rc.PublishRate, rc.PublishBurst, err = parseRate(d, false); err != nil {
				return nil, err
			}
		case "presence_claims":
			rc.PresenceClaims = d.RemainingArgs()
			if len(rc.PresenceClaims) == 0 {
				return nil, d.ArgErr()
			}
		default:
			return nil, unknownName(d, "rooms subdirective", roomsSubdirectives)
		}
	}
	return rc, nil
}

func parseDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	var v string
	if !d.AllArgs(&v) {
		return 0, d.ArgErr()
	}
	dur, err := caddy.ParseDuration(v)
	if err != nil {
		return 0, d.Errf("bad duration %q: %v", v, err)
	}
	if dur <= 0 {
		return 0, d.Errf("duration %q must be positive", v)
	}
	return caddy.Duration(dur), nil
}

// parseDurationOrOff is parseDuration that also takes "off" (-1).
func parseDurationOrOff(d *caddyfile.Dispenser) (caddy.Duration, error) {
	if d.CountRemainingArgs() == 1 && d.NextArg() {
		if d.Val() == "off" {
			return -1, nil
		}
		d.Prev()
	}
	return parseDuration(d)
}

// parsePositiveInt reads one argument that must be a positive integer.
func parsePositiveInt(d *caddyfile.Dispenser, name string) (int, error) {
	var v string
	if !d.AllArgs(&v) {
		return 0, d.ArgErr()
	}
	n, err := strconv.Atoi(v)
	if err != nil || n <= 0 {
		return 0, d.Errf("%s must be a positive number, not %q", name, v)
	}
	return n, nil
}

// parseSize reads one size argument; "off" (if allowed) gives -1.
func parseSize(d *caddyfile.Dispenser, allowOff bool) (int64, error) {
	var v string
	if !d.AllArgs(&v) {
		return 0, d.ArgErr()
	}
	if allowOff && v == "off" {
		return -1, nil
	}
	n, err := humanize.ParseBytes(v)
	if err != nil || n == 0 || n > math.MaxInt64 {
		return 0, d.Errf("bad size %q: want a positive size such as 64KiB or 1MiB", v)
	}
	return int64(n), nil
}

func parseTLS(d *caddyfile.Dispenser) (*UpstreamTLS, error) {
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	t := new(UpstreamTLS)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("duplicate tls subdirective %q", name)
		}
		seen[name] = true
		switch name {
		case "ca_file":
			t.CAFiles = d.RemainingArgs()
			if len(t.CAFiles) == 0 {
				return nil, d.ArgErr()
			}
		case "server_name":
			if !d.AllArgs(&t.ServerName) {
				return nil, d.ArgErr()
			}
		case "insecure_skip_verify":
			if d.CountRemainingArgs() > 0 {
				return nil, d.ArgErr()
			}
			t.InsecureSkipVerify = true
		case "client_certificate":
			if !d.AllArgs(&t.ClientCertFile, &t.ClientKeyFile) {
				return nil, d.ArgErr()
			}
		default:
			return nil, unknownName(d, "tls subdirective", tlsSubdirectives)
		}
	}
	return t, nil
}

// parseRateLimit reads one rate_limit segment from its own dispenser, so
// that errors about the block as a whole can point at its first line.
func (h *Handler) parseRateLimit(d *caddyfile.Dispenser, seen map[string]bool) error {
	d.Next() // consume "rate_limit"
	dir := "client"
	switch args := d.RemainingArgs(); len(args) {
	case 0:
	case 1:
		dir = args[0]
		if dir != "client" && dir != "upstream" {
			return d.Errf("rate_limit direction must be client or upstream, not %q", dir)
		}
	default:
		return d.ArgErr()
	}
	// rate_limit may appear once per direction
	delete(seen, "rate_limit")
	if seen["rate_limit "+dir] {
		return d.Errf("duplicate rate_limit for %s", dir)
	}
	seen["rate_limit "+dir] = true

	rl := new(RateLimit)
	inner := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if inner[name] {
			return d.Errf("duplicate rate_limit subdirective %q", name)
		}
		inner[name] = true
		switch name {
		case "messages":
			rate, burst, err := parseRate(d, false)
			if err != nil {
				return err
			}
			rl.Messages, rl.MessageBurst = rate, burst
		case "bytes":
			rate, burst, err := parseRate(d, true)
			if err != nil {
				return err
			}
			rl.Bytes, rl.ByteBurst = rate, burst
		case "on_exceed":
			if !d.AllArgs(&rl.OnExceed) {
				return d.ArgErr()
			}
			switch rl.OnExceed {
			case "close", "drop", "throttle":
			default:
				return d.Errf("on_exceed must be close, drop or throttle, not %q", rl.OnExceed)
			}
		default:
			return unknownName(d, "rate_limit subdirective", rateLimitSubdirectives)
		}
	}
	if rl.Messages == 0 && rl.Bytes == 0 {
		d.Reset()
		d.Next()
		return d.Err("rate_limit needs messages or bytes")
	}
	if dir == "client" {
		h.RateLimit = rl
	} else {
		h.RateLimitUpstream = rl
	}
	return nil
}

// parseRate reads "<amount>/<duration> [burst <amount>]" and returns the
// amount per second and the burst.
func parseRate(d *caddyfile.Dispenser, bytes bool) (float64, int, error) {
	args := d.RemainingArgs()
	if len(args) != 1 && (len(args) != 3 || args[1] != "burst") {
		return 0, 0, d.Errf("want <amount>/<duration> [burst <amount>]")
	}
	amountStr, perStr, ok := strings.Cut(args[0], "/")
	if !ok {
		return 0, 0, d.Errf("bad rate %q: want <amount>/<duration> such as 100/s", args[0])
	}
	amount, err := parseAmount(amountStr, bytes)
	if err != nil {
		return 0, 0, d.Errf("bad rate %q: %v", args[0], err)
	}
	var per time.Duration
	switch perStr {
	case "s":
		per = time.Second
	case "m":
		per = time.Minute
	case "h":
		per = time.Hour
	default:
		per, err = caddy.ParseDuration(perStr)
		if err != nil || per <= 0 {
			return 0, 0, d.Errf("bad rate %q: the duration must be s, m, h or a positive duration", args[0])
		}
	}
	rate := amount / per.Seconds()
	if rate <= 0 || math.IsInf(rate, 0) {
		return 0, 0, d.Errf("bad rate %q: out of range", args[0])
	}
	var burst int
	if len(args) == 3 {
		b, err := parseAmount(args[2], bytes)
		if err != nil || b > math.MaxInt32 || b != math.Trunc(b) {
			return 0, 0, d.Errf("bad burst %q", args[2])
		}
		burst = int(b)
	}
	return rate, burst, nil
}

func parseAmount(s string, bytes bool) (float64, error) {
	if bytes {
		n, err := humanize.ParseBytes(s)
		if err != nil || n == 0 {
			return 0, errAmount
		}
		return float64(n), nil
	}
	n, err := strconv.ParseFloat(s, 64)
	if err != nil || n <= 0 || math.IsInf(n, 0) || math.IsNaN(n) {
		return 0, errAmount
	}
	return n, nil
}

type amountError struct{}

func (amountError) Error() string { return "the amount must be a positive number" }

var errAmount = amountError{}
