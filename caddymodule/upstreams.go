package caddymodule

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// LoadBalancing chooses the upstream of each new connection, as
// reverse_proxy's load_balancing does.
type LoadBalancing struct {
	// SelectionPolicy chooses among the healthy upstreams. Default:
	// round_robin.
	SelectionPolicy *SelectionPolicy `json:"selection_policy,omitempty"`
}

// SelectionPolicy is a load-balancing policy. When the dial of the chosen
// upstream fails, the policy chooses again among the others; each is
// tried at most once per connection.
type SelectionPolicy struct {
	// Policy is round_robin (the default), least_conn (the fewest live
	// connections), random, random_choose (the lighter of Choose drawn at
	// random), first (the first healthy, in order), ip_hash (by the
	// immediate peer's address), client_ip_hash (by the client's address,
	// after trusted proxies), header (by the value of the header Field),
	// cookie (by the cookie Name, set in the 101 when missing) or claim
	// (by the value of the token claim Claim). The hashing policies keep a
	// client on the same upstream while it is healthy.
	Policy string `json:"policy,omitempty"`
	// Choose is random_choose's sample size. Default: 2.
	Choose int `json:"choose,omitempty"`
	// Field is the header hashed by the header policy.
	Field string `json:"field,omitempty"`
	// Name is the cookie policy's cookie. Default: lb.
	Name string `json:"name,omitempty"`
	// Secret keys the HMAC of the upstream that is the cookie's value;
	// placeholders such as {env.LB_SECRET} are replaced when the config
	// is loaded. Default: empty.
	Secret string `json:"secret,omitempty"`
	// MaxAge is the cookie's Max-Age. Default: none (a session cookie).
	MaxAge caddy.Duration `json:"max_age,omitempty"`
	// Claim is the path of the claim hashed by the claim policy (sub,
	// org.id).
	Claim string `json:"claim,omitempty"`
	// Fallback chooses for requests without the header, cookie or claim.
	// Default: random, as reverse_proxy's.
	Fallback *SelectionPolicy `json:"fallback,omitempty"`
}

// HealthChecks set unhealthy upstreams aside. With every upstream set
// aside, clients are refused at once with 502 and a Retry-After.
type HealthChecks struct {
	// Active probes each upstream periodically. Default: off.
	Active *ActiveHealthChecks `json:"active,omitempty"`
	// Passive watches the dials (and, if configured, the closes) of
	// client connections. Default: off.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`
}

// ActiveHealthChecks probe each upstream every Interval.
type ActiveHealthChecks struct {
	// URI is the path (and query) probed: with an HTTP GET (over http://
	// for ws:// upstreams, https:// for wss://), or, with WebSocket, with
	// a WebSocket handshake that is closed at once. Required for HTTP;
	// with WebSocket, default: the upstream URL's path, or /.
	URI string `json:"uri,omitempty"`
	// WebSocket probes with a WebSocket handshake instead of a GET.
	WebSocket bool `json:"websocket,omitempty"`
	// Interval between probes of an upstream. Default: 30s.
	Interval caddy.Duration `json:"interval,omitempty"`
	// Timeout bounds a probe. Default: 5s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// ExpectStatus is the status of a healthy answer: a code, or 1 to 5
	// for any of that class. Default: any 2xx. WebSocket probes expect
	// 101.
	ExpectStatus int `json:"expect_status,omitempty"`
	// Passes is how many probes in a row bring an upstream back. Default: 1.
	Passes int `json:"passes,omitempty"`
	// Fails is how many probes in a row set it aside. Default: 1.
	Fails int `json:"fails,omitempty"`
}

// PassiveHealthChecks count failures of the upstreams seen by client
// connections.
type PassiveHealthChecks struct {
	// FailDuration is how long a failure is remembered, and how long an
	// upstream with MaxFails of them is set aside; after that one client
	// at a time is sent to it until one gets through. Required.
	FailDuration caddy.Duration `json:"fail_duration,omitempty"`
	// MaxFails is how many failures within FailDuration set an upstream
	// aside. A failure is a dial or handshake that fails (an answer of
	// 5xx, not 4xx, which judges the client). Default: 1.
	MaxFails int `json:"max_fails,omitempty"`
	// UnhealthyClose lists close codes that count as failures too when the
	// upstream ends a live connection with them (1006: it went away
	// without a close frame). Default: none.
	UnhealthyClose []int `json:"unhealthy_close,omitempty"`
}

// defaultUnhealthyClose are the codes of unhealthy_close without
// arguments: the upstream went away, or failed.
var defaultUnhealthyClose = []int{1006, 1011}

// upstreamConflict finds the upstream options that are incomplete or
// exclude each other, and names the option to blame. The engine checks
// them (in Caddyfile words); this adds what only the Caddyfile knows.
func (h *Handler) upstreamConflict() (option string, err error) {
	if lb := h.LoadBalancing; lb != nil && lb.SelectionPolicy != nil {
		if _, err := lb.SelectionPolicy.proxy(); err != nil {
			return "lb_policy", err
		}
	}
	if hc := h.HealthChecks; hc != nil {
		if p := hc.Passive; p != nil && p.FailDuration <= 0 {
			return "max_fails|unhealthy_close", errors.New("passive health checks need fail_duration")
		}
		if err := h.proxyHealth().Check(); err != nil {
			return optionOf(err, firstSet(h.activeOptions())), err
		}
	}
	if h.DrainTimeout < 0 {
		return "drain_timeout", errors.New("drain_timeout must not be negative")
	}
	return "", nil
}

// optionOf is the option an engine error starts with (it names options
// as the Caddyfile does), or otherwise.
func optionOf(err error, otherwise string) string {
	msg := err.Error()
	n := strings.IndexFunc(msg, func(r rune) bool { return r != '_' && (r < 'a' || r > 'z') })
	if n > 0 && slices.Contains(upstreamSubdirectives, msg[:n]) {
		return msg[:n]
	}
	return otherwise
}

// activeOptions are the names of the active health options, in the order
// an error about them as a whole looks for.
func (h *Handler) activeOptions() []string {
	return []string{"health_interval", "health_timeout", "health_status", "health_passes", "health_fails"}
}

// firstSet names any of options: an error or warning points at the first
// of them in the block (see seek).
func firstSet(options []string) string { return strings.Join(options, "|") }

func closeCodes(codes []int) []uint16 {
	out := make([]uint16, len(codes))
	for i, c := range codes {
		// (out of range either way: the engine refuses it)
		c = min(max(c, 0), 0xffff)
		out[i] = uint16(c)
	}
	return out
}

// proxy converts the policy for the engine.
func (p *SelectionPolicy) proxy() (proxy.LBPolicy, error) {
	out := proxy.LBPolicy{Policy: p.Policy, Choose: p.Choose, Field: p.Field, Secret: p.Secret, MaxAge: time.Duration(p.MaxAge)}
	switch p.Policy {
	case proxy.CookieHash:
		out.Field = p.Name
	case proxy.HeaderHash:
	case "claim":
		if p.Claim == "" {
			return out, errors.New("lb_policy claim needs a claim path")
		}
		out.Policy = proxy.KeyHash
	case proxy.KeyHash:
		return out, fmt.Errorf("unknown lb_policy %q", p.Policy)
	}
	if p.Fallback != nil {
		fb, err := p.Fallback.proxy()
		if err != nil {
			return out, err
		}
		out.Fallback = &fb
	}
	return out, out.Check()
}

func (a *ActiveHealthChecks) proxy() *proxy.ActiveHealth {
	out := &proxy.ActiveHealth{
		WebSocket: a.WebSocket, Interval: time.Duration(a.Interval), Timeout: time.Duration(a.Timeout),
		ExpectStatus: a.ExpectStatus, Passes: a.Passes, Fails: a.Fails,
	}
	if a.WebSocket {
		out.WebSocketURI = a.URI
	} else {
		out.URI = a.URI
	}
	return out
}

// proxyUpstreams adds the load-balancing and health options to cfg.
func (h *Handler) proxyUpstreams(cfg *proxy.Config) error {
	if lb := h.LoadBalancing; lb != nil && lb.SelectionPolicy != nil {
		p, err := lb.SelectionPolicy.proxy()
		if err != nil {
			return err
		}
		// a secret may come from the environment ({env.LB_SECRET})
		p.Secret = caddy.NewReplacer().ReplaceKnown(p.Secret, "")
		cfg.LB = p
		if lb.SelectionPolicy.Policy == "claim" {
			h.balanceClaim = lb.SelectionPolicy.Claim
		}
	}
	cfg.Health = h.proxyHealth()
	cfg.DrainTimeout = time.Duration(h.DrainTimeout)
	return nil
}

// proxyHealth converts the health checks for the engine.
func (h *Handler) proxyHealth() proxy.Health {
	var out proxy.Health
	if hc := h.HealthChecks; hc != nil {
		if hc.Active != nil {
			out.Active = hc.Active.proxy()
		}
		if p := hc.Passive; p != nil {
			out.FailDuration = time.Duration(p.FailDuration)
			out.MaxFails = p.MaxFails
			out.UnhealthyCloses = closeCodes(p.UnhealthyClose)
		}
	}
	return out
}

// balanceKey is the value of the claim the claim policy hashes, or "".
func (h *Handler) balanceKey(claims policy.Claims) string {
	if h.balanceClaim == "" || claims == nil {
		return ""
	}
	v, ok := claims.Lookup(h.balanceClaim)
	if !ok {
		return ""
	}
	s, _ := policy.ClaimString(v)
	return s
}

// lbPolicies are the lb_policy names, for suggestions.
var lbPolicies = []string{"round_robin", "least_conn", "random", "random_choose", "first", "ip_hash",
	"client_ip_hash", "header", "cookie", "claim"}

// parseLBPolicy reads, d being at lb_policy or at fallback:
//
//	lb_policy round_robin|least_conn|random|first|ip_hash|client_ip_hash
//	lb_policy random_choose [<n>]
//	lb_policy header <field> [{ fallback <policy> }]
//	lb_policy claim <path> [{ fallback <policy> }]
//	lb_policy cookie [<name> [<secret>]] [{
//	    fallback <policy>
//	    max_age  <duration>
//	}]
func parseLBPolicy(d *caddyfile.Dispenser, nested bool) (*SelectionPolicy, error) {
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	p := &SelectionPolicy{Policy: d.Val()}
	args := d.RemainingArgs()
	keyed := false
	switch p.Policy {
	case "round_robin", "least_conn", "random", "first", "ip_hash", "client_ip_hash":
		if len(args) > 0 {
			return nil, d.ArgErr()
		}
	case "random_choose":
		switch len(args) {
		case 0:
		case 1:
			n, err := strconv.Atoi(args[0])
			if err != nil || n <= 0 {
				// (0 would read as the default; the engine checks the rest)
				return nil, d.Errf("random_choose takes a positive number, not %q", args[0])
			}
			p.Choose = n
		default:
			return nil, d.ArgErr()
		}
	case "header":
		if len(args) != 1 {
			return nil, d.ArgErr()
		}
		p.Field, keyed = args[0], true
	case "claim":
		if len(args) != 1 {
			return nil, d.ArgErr()
		}
		p.Claim, keyed = args[0], true
	case "cookie":
		if len(args) > 2 {
			return nil, d.ArgErr()
		}
		if len(args) > 0 {
			p.Name = args[0]
		}
		if len(args) > 1 {
			p.Secret = args[1]
		}
		keyed = true
	default:
		what := "lb_policy"
		if nested {
			what = "fallback policy"
		}
		if s := closest(p.Policy, lbPolicies); s != "" {
			return nil, d.Errf("unrecognized %s %q, did you mean %q?", what, p.Policy, s)
		}
		return nil, d.Errf("unrecognized %s %q", what, p.Policy)
	}
	if keyed && nested {
		return nil, d.Errf("%s cannot be a fallback: it needs a fallback of its own", p.Policy)
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("duplicate lb_policy subdirective %q", name)
		}
		seen[name] = true
		switch {
		case name == "fallback" && keyed:
			fb, err := parseLBPolicy(d, true)
			if err != nil {
				return nil, err
			}
			p.Fallback = fb
		case name == "max_age" && p.Policy == "cookie":
			age, err := parseDuration(d)
			if err != nil {
				return nil, err
			}
			p.MaxAge = age
		case name == "fallback" || name == "max_age":
			return nil, d.Errf("lb_policy %s takes no %s", p.Policy, name)
		default:
			return nil, unknownName(d, "lb_policy subdirective", []string{"fallback", "max_age"})
		}
	}
	return p, nil
}

// parseUpstreamOption reads one of upstreamSubdirectives (name, d's
// current token).
func (h *Handler) parseUpstreamOption(d *caddyfile.Dispenser, name string) error {
	active := func() *ActiveHealthChecks {
		if h.HealthChecks == nil {
			h.HealthChecks = new(HealthChecks)
		}
		if h.HealthChecks.Active == nil {
			h.HealthChecks.Active = new(ActiveHealthChecks)
		}
		return h.HealthChecks.Active
	}
	passive := func() *PassiveHealthChecks {
		if h.HealthChecks == nil {
			h.HealthChecks = new(HealthChecks)
		}
		if h.HealthChecks.Passive == nil {
			h.HealthChecks.Passive = new(PassiveHealthChecks)
		}
		return h.HealthChecks.Passive
	}
	var err error
	switch name {
	case "lb_policy":
		var p *SelectionPolicy
		if p, err = parseLBPolicy(d, false); err == nil {
			h.LoadBalancing = &LoadBalancing{SelectionPolicy: p}
		}
	case "health_uri":
		a := active()
		if !d.AllArgs(&a.URI) {
			return d.ArgErr()
		}
		if a.WebSocket {
			return d.Err("health_uri and health_websocket exclude each other")
		}
	case "health_websocket":
		a := active()
		if a.URI != "" {
			return d.Err("health_uri and health_websocket exclude each other")
		}
		a.WebSocket = true
		switch args := d.RemainingArgs(); len(args) {
		case 0:
		case 1:
			a.URI = args[0]
		default:
			return d.ArgErr()
		}
	case "health_interval":
		active().Interval, err = parseDuration(d)
	case "health_timeout":
		active().Timeout, err = parseDuration(d)
	case "health_status":
		var v string
		if !d.AllArgs(&v) {
			return d.ArgErr()
		}
		n := 0
		if len(v) == 3 && strings.HasSuffix(v, "xx") && v[0] >= '1' && v[0] <= '5' {
			n = int(v[0] - '0')
		} else if n, err = strconv.Atoi(v); err != nil || n < 100 || n > 599 {
			return d.Errf("health_status takes a status such as 200 or 2xx, not %q", v)
		}
		active().ExpectStatus = n
	case "health_passes":
		active().Passes, err = parsePositiveInt(d, name)
	case "health_fails":
		active().Fails, err = parsePositiveInt(d, name)
	case "fail_duration":
		passive().FailDuration, err = parseDuration(d)
	case "max_fails":
		passive().MaxFails, err = parsePositiveInt(d, name)
	case "unhealthy_close":
		p := passive()
		args := d.RemainingArgs()
		if len(args) == 0 {
			p.UnhealthyClose = append([]int(nil), defaultUnhealthyClose...)
		}
		for _, a := range args {
			c, err := strconv.Atoi(a)
			if err != nil {
				return d.Errf("unhealthy_close takes close codes (1000-4999), not %q", a)
			}
			p.UnhealthyClose = append(p.UnhealthyClose, c)
		}
	case "drain_timeout":
		h.DrainTimeout, err = parseDuration(d)
	}
	return err
}

// upstreamSubdirectives are the names parseUpstreamOption reads.
var upstreamSubdirectives = []string{"lb_policy", "health_uri", "health_websocket", "health_interval", "health_timeout",
	"health_status", "health_passes", "health_fails", "fail_duration", "max_fails", "unhealthy_close", "drain_timeout"}

// upstreamIneffective lists the upstream options that cannot take effect,
// or are unsafe as written.
func (h *Handler) upstreamIneffective() []warning {
	var ws []warning
	add := func(set bool, option, msg string) {
		if set {
			ws = append(ws, warning{option, msg})
		}
	}
	if h.Rooms != nil {
		const rooms = " has no effect in rooms mode (there is no upstream)"
		add(h.LoadBalancing != nil, "lb_policy", "lb_policy"+rooms)
		add(h.HealthChecks != nil && h.HealthChecks.Active != nil,
			firstSet(append([]string{"health_uri", "health_websocket"}, h.activeOptions()...)), "active health checking"+rooms)
		add(h.HealthChecks != nil && h.HealthChecks.Passive != nil, firstSet([]string{"fail_duration", "max_fails", "unhealthy_close"}),
			"passive health checking"+rooms)
		add(h.DrainTimeout != 0, "drain_timeout", "drain_timeout"+rooms)
		return ws
	}
	if lb := h.LoadBalancing; lb != nil && lb.SelectionPolicy != nil {
		p := lb.SelectionPolicy
		add(p.Policy == "claim" && h.JWT == nil && h.ForwardAuth == nil,
			"lb_policy", "lb_policy claim has no effect: without jwt or forward_auth there are no claims (the fallback chooses)")
		add(p.Policy == "cookie" && p.Secret == "", "lb_policy",
			"lb_policy cookie without a secret: whoever knows the upstream URLs can tell which one a cookie names; give it a secret such as {env.LB_COOKIE_SECRET}")
	}
	return ws
}
