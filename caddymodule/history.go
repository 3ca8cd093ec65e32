package caddymodule

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/rooms"
)

// HistoryConfig keeps the latest publications of the channels that match
// Pattern, so that subscribers can recover what they missed.
type HistoryConfig struct {
	// Pattern is a channel pattern of the channel policy's kind ("*" one
	// segment, "**" any trailing segments), without claims.
	Pattern string `json:"pattern"`
	// Size is how many publications are kept per channel. Default: 100.
	Size int `json:"size,omitempty"`
	// TTL is how long a publication is kept. Default: 1h.
	TTL caddy.Duration `json:"ttl,omitempty"`
	// MetaTTL is how long a channel's epoch and offsets outlive its last
	// publication; after that its next publication starts a new epoch.
	// Default: 720h (30 days), and never less than TTL.
	MetaTTL caddy.Duration `json:"meta_ttl,omitempty"`
	// RecoverMax bounds the publications one recovery or one history
	// request returns. Default: 1000, and never more than Size.
	RecoverMax int `json:"recover_max,omitempty"`
}

// PresenceConfig keeps who is subscribed to the channels that match
// Pattern.
type PresenceConfig struct {
	// Pattern is a channel pattern, as for history.
	Pattern string `json:"pattern"`
	// TTL is how long the entries of a node that died without removing
	// them stay listed (nodes refresh theirs every TTL/3). Default: 30s.
	TTL caddy.Duration `json:"ttl,omitempty"`
	// Events sends join and leave events to the channel's subscribers.
	// Default: false.
	Events bool `json:"events,omitempty"`
}

// History and presence defaults.
const (
	defaultHistorySize  = 100
	defaultHistoryTTL   = time.Hour
	defaultPresenceTTL  = 30 * time.Second
	minPresenceTTL      = time.Second
	maxHistorySize      = 1_000_000
	maxRecoverMaxConfig = 100_000
)

// keeper decides, channel by channel, what the hub keeps: the first
// history pattern that matches, and the first presence pattern.
type keeper struct {
	history  []keptPattern[broker.HistoryOptions]
	presence []keptPattern[broker.PresenceOptions]
}

type keptPattern[T any] struct {
	match      *policy.ChannelPolicy
	opt        T
	recoverMax int
}

// patternMatcher compiles a claim-free channel pattern into a policy whose
// one rule allows any action on it.
func patternMatcher(what, pattern string) (*policy.ChannelPolicy, error) {
	p, err := policy.CompileChannelPolicy([]policy.Rule{{Effect: policy.Allow, Actions: []string{"*"}, Pattern: pattern}})
	if err != nil {
		return nil, fmt.Errorf("%s pattern %q: %w", what, pattern, err)
	}
	if p.UsesClaims() {
		return nil, fmt.Errorf("%s pattern %q: a channel's %s is shared by every client, so its pattern cannot name claims", what, pattern, what)
	}
	return p, nil
}

// newKeeper checks and compiles the app's history and presence configs.
func newKeeper(hist []HistoryConfig, pres []PresenceConfig) (*keeper, error) {
	k := new(keeper)
	for _, hc := range hist {
		m, err := patternMatcher("history", hc.Pattern)
		if err != nil {
			return nil, err
		}
		opt := broker.HistoryOptions{Size: hc.Size, TTL: time.Duration(hc.TTL), MetaTTL: time.Duration(hc.MetaTTL)}
		switch {
		case hc.Size < 0 || hc.Size > maxHistorySize:
			return nil, fmt.Errorf("history %s: size must be from 1 to %d, not %d", hc.Pattern, maxHistorySize, hc.Size)
		case hc.TTL < 0 || hc.MetaTTL < 0:
			return nil, fmt.Errorf("history %s: ttl and meta_ttl must be positive", hc.Pattern)
		case hc.RecoverMax < 0 || hc.RecoverMax > maxRecoverMaxConfig:
			return nil, fmt.Errorf("history %s: recover_max must be from 1 to %d, not %d", hc.Pattern, maxRecoverMaxConfig, hc.RecoverMax)
		}
		if opt.Size == 0 {
			opt.Size = defaultHistorySize
		}
		if opt.TTL == 0 {
			opt.TTL = defaultHistoryTTL
		}
		k.history = append(k.history, keptPattern[broker.HistoryOptions]{match: m, opt: opt, recoverMax: hc.RecoverMax})
	}
	for _, pc := range pres {
		m, err := patternMatcher("presence", pc.Pattern)
		if err != nil {
			return nil, err
		}
		opt := broker.PresenceOptions{TTL: time.Duration(pc.TTL), Events: pc.Events}
		if opt.TTL == 0 {
			opt.TTL = defaultPresenceTTL
		}
		if opt.TTL < minPresenceTTL {
			return nil, fmt.Errorf("presence %s: ttl must be at least %v, not %v", pc.Pattern, minPresenceTTL, opt.TTL)
		}
		k.presence = append(k.presence, keptPattern[broker.PresenceOptions]{match: m, opt: opt})
	}
	return k, nil
}

// options is the hub's ChannelOptions function.
func (k *keeper) options(channel string) rooms.ChannelOptions {
	var o rooms.ChannelOptions
	for i := range k.history {
		if k.history[i].match.Decide("keep", channel, nil) == policy.Allow {
			o.History, o.RecoverMax = &k.history[i].opt, k.history[i].recoverMax
			break
		}
	}
	for i := range k.presence {
		if k.presence[i].match.Decide("keep", channel, nil) == policy.Allow {
			o.Presence = &k.presence[i].opt
			break
		}
	}
	return o
}

// parseHistory reads
//
//	history <pattern> {
//	    size        <n>
//	    ttl         <duration>
//	    meta_ttl    <duration>
//	    recover_max <n>
//	}
func parseHistory(d *caddyfile.Dispenser) (HistoryConfig, error) {
	var hc HistoryConfig
	if !d.AllArgs(&hc.Pattern) {
		return hc, d.Errf("history needs one channel pattern")
	}
	if _, err := patternMatcher("history", hc.Pattern); err != nil {
		return hc, d.Err(err.Error())
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return hc, d.Errf("duplicate history option %q", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "size":
			hc.Size, err = parsePositiveInt(d, name)
			if err == nil && hc.Size > maxHistorySize {
				err = d.Errf("size must be at most %d", maxHistorySize)
			}
		case "ttl":
			hc.TTL, err = parseDuration(d)
		case "meta_ttl":
			hc.MetaTTL, err = parseDuration(d)
		case "recover_max":
			hc.RecoverMax, err = parsePositiveInt(d, name)
			if err == nil && hc.RecoverMax > maxRecoverMaxConfig {
				err = d.Errf("recover_max must be at most %d", maxRecoverMaxConfig)
			}
		default:
			err = unknownName(d, "history option", []string{"size", "ttl", "meta_ttl", "recover_max"})
		}
		if err != nil {
			return hc, err
		}
	}
	return hc, nil
}

// parsePresence reads
//
//	presence <pattern> {
//	    ttl    <duration>
//	    events
//	}
func parsePresence(d *caddyfile.Dispenser) (PresenceConfig, error) {
	var pc PresenceConfig
	if !d.AllArgs(&pc.Pattern) {
		return pc, d.Errf("presence needs one channel pattern")
	}
	if _, err := patternMatcher("presence", pc.Pattern); err != nil {
		return pc, d.Err(err.Error())
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return pc, d.Errf("duplicate presence option %q", name)
		}
		seen[name] = true
		switch name {
		case "ttl":
			ttl, err := parseDuration(d)
			if err != nil {
				return pc, err
			}
			if time.Duration(ttl) < minPresenceTTL {
				return pc, d.Errf("presence ttl must be at least %v", minPresenceTTL)
			}
			pc.TTL = ttl
		case "events":
			if d.NextArg() {
				return pc, d.ArgErr()
			}
			pc.Events = true
		default:
			return pc, unknownName(d, "presence option", []string{"ttl", "events"})
		}
	}
	return pc, nil
}

// presenceInfo is what a connection shows in presence lists and events:
// its id, its subject when it has one, and the claims the config names.
func presenceInfo(id string, claims policy.Claims, names []string) []byte {
	info := map[string]any{"conn": id}
	if sub, ok := claims["sub"].(string); ok && sub != "" {
		info["subject"] = sub
	}
	if len(names) > 0 {
		picked := map[string]any{}
		for _, n := range names {
			if v, ok := claims[n]; ok {
				picked[n] = v
			}
		}
		info["claims"] = picked
	}
	b, err := json.Marshal(info)
	if err != nil { // a claim that cannot be encoded again: leave the claims out
		delete(info, "claims")
		b, _ = json.Marshal(info)
	}
	return b
}
