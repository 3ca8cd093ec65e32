package caddymodule

import (
	"errors"
	"strings"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/wsgate/wsgate/policy"
)

// parseChannels reads:
//
//	channels {
//	    allow|deny <action>[,<action>...] <pattern>
//	    ...
//	}
//
// Each rule is compiled here so a bad one is reported with its line.
func parseChannels(d *caddyfile.Dispenser) ([]ChannelRule, error) {
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	var rules []ChannelRule
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		effect := d.Val()
		if effect != "allow" && effect != "deny" {
			if s := closest(effect, []string{"allow", "deny"}); s != "" {
				return nil, d.Errf("channel rule must start with allow or deny, not %q, did you mean %q?", effect, s)
			}
			return nil, d.Errf("channel rule must start with allow or deny, not %q", effect)
		}
		var actions, pattern string
		if !d.AllArgs(&actions, &pattern) {
			return nil, d.Errf("want: %s <action>[,<action>...] <pattern>", effect)
		}
		r := ChannelRule{Effect: effect, Actions: strings.Split(actions, ","), Pattern: pattern}
		eff := policy.Deny
		if effect == "allow" {
			eff = policy.Allow
		}
		if _, err := policy.CompileChannelPolicy([]policy.Rule{{Effect: eff, Actions: r.Actions, Pattern: r.Pattern}}); err != nil {
			var pe *policy.PolicyError
			if errors.As(err, &pe) {
				return nil, d.Errf("channel rule %d (%q), position %d: %s", len(rules)+1, pe.Pattern, pe.Pos, pe.Message)
			}
			return nil, d.Errf("channel rule %d: %v", len(rules)+1, err)
		}
		rules = append(rules, r)
	}
	if len(rules) == 0 {
		return nil, d.Err("channels needs at least one rule")
	}
	return rules, nil
}

var relayChannelsSubdirectives = []string{"channel_field", "action_field", "action", "unmatched", "on_deny", "deny_reply"}

// parseRelayChannels reads:
//
//	relay_channels {
//	    channel_field <dotted.path>
//	    action_field  <dotted.path>
//	    action        <policy_action> <app_words...>
//	    unmatched     pass|deny
//	    on_deny       drop|close
//	    deny_reply    off|<template>
//	}
func parseRelayChannels(d *caddyfile.Dispenser) (*RelayChannels, error) {
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	rc := new(RelayChannels)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if name != "action" {
			if seen[name] {
				return nil, d.Errf("duplicate relay_channels subdirective %q", name)
			}
			seen[name] = true
		}
		switch name {
		case "channel_field", "action_field":
			var v string
			if !d.AllArgs(&v) {
				return nil, d.ArgErr()
			}
			if _, err := policy.ParseFieldPath(v); err != nil {
				return nil, d.Errf("%s: %v", name, err)
			}
			if name == "channel_field" {
				rc.ChannelField = v
			} else {
				rc.ActionField = v
			}
			if rc.ChannelField != "" && rc.ActionField != "" {
				if _, err := rc.messageFields(); err != nil {
					return nil, d.Err(err.Error())
				}
			}
		case "action":
			args := d.RemainingArgs()
			if len(args) < 2 {
				return nil, d.Errf("want: action <policy_action> <app_words...>")
			}
			if !policy.ValidAction(args[0]) || args[0] == "*" {
				return nil, d.Errf("bad action %q", args[0])
			}
			if rc.Actions == nil {
				rc.Actions = map[string][]string{}
			}
			if _, dup := rc.Actions[args[0]]; dup {
				return nil, d.Errf("duplicate action %q", args[0])
			}
			rc.Actions[args[0]] = args[1:]
			if _, err := rc.wordActions(); err != nil {
				return nil, d.Err(err.Error())
			}
		case "unmatched":
			if !d.AllArgs(&rc.Unmatched) {
				return nil, d.ArgErr()
			}
			if rc.Unmatched != "pass" && rc.Unmatched != "deny" {
				return nil, d.Errf("unmatched must be pass or deny, not %q", rc.Unmatched)
			}
		case "on_deny":
			if !d.AllArgs(&rc.OnDeny) {
				return nil, d.ArgErr()
			}
			if rc.OnDeny != "drop" && rc.OnDeny != "close" {
				return nil, d.Errf("on_deny must be drop or close, not %q", rc.OnDeny)
			}
		case "deny_reply":
			if !d.AllArgs(&rc.DenyReply) {
				return nil, d.ArgErr()
			}
		default:
			return nil, unknownName(d, "relay_channels subdirective", relayChannelsSubdirectives)
		}
	}
	if rc.ChannelField == "" {
		return nil, d.Err("relay_channels needs channel_field")
	}
	return rc, nil
}
