package caddymodule

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// ChannelRule is one rule of the channel policy.
type ChannelRule struct {
	// Effect is "allow" or "deny".
	Effect string `json:"effect"`
	// Actions the rule applies to: "subscribe", "publish", custom words, or
	// "*" for any.
	Actions []string `json:"actions"`
	// Pattern is a channel pattern: ':'-separated segments, "*" for one
	// segment, "**" (last) for any number of trailing segments, and
	// {claims.path} or {claims.path[*]} (any element of an array claim)
	// substituted as literals.
	Pattern string `json:"pattern"`
}

// RelayChannels says how channel and action are read from relayed client
// frames (JSON text messages of the app's own protocol).
type RelayChannels struct {
	// ActionField is the dotted path of the action word ("type").
	ActionField string `json:"action_field,omitempty"`
	// ChannelField is the dotted path of the channel ("payload.room").
	ChannelField string `json:"channel_field"`
	// Actions maps policy actions to the app's words:
	// {"subscribe": ["join", "subscribe"], "publish": ["say", "message"]}.
	// A word that is not mapped is its own action.
	Actions map[string][]string `json:"actions,omitempty"`
	// Unmatched decides messages that name no channel: text or binary
	// that is not JSON, JSON without the channel field. "pass" or "deny".
	// Default: pass. A message that starts like JSON but does not parse
	// strictly, has a duplicate policy key, a key that differs from a
	// policy field only in letter case, or a non-string channel is always
	// denied; an array is a batch whose every object is checked.
	Unmatched string `json:"unmatched,omitempty"`
	// OnDeny is "drop" (the message is discarded and the client gets
	// DenyReply) or "close" (close 1008 "forbidden"). Default: drop.
	OnDeny string `json:"on_deny,omitempty"`
	// DenyReply is the text sent to the client for a dropped message;
	// {channel} and {action} are replaced by JSON strings. Default:
	// {"error":"forbidden","channel":{channel}}. "off" sends nothing.
	DenyReply string `json:"deny_reply,omitempty"`
}

const defaultDenyReply = `{"error":"forbidden","channel":{channel}}`

type channelState struct {
	policy    *policy.ChannelPolicy
	fields    *policy.MessageFields
	words     map[string]string // app word → policy action
	unmatched proxy.Verdict
	deny      proxy.Verdict
	reply     string
	// denials counts refusals by action: the actions the config names,
	// "other" for any other word, "unmatched" for messages that name no
	// channel (unmatched deny) and "invalid" for malformed ones.
	denials map[string]prometheus.Counter
}

// countDenied counts a refusal of action.
func (cs *channelState) countDenied(action string) {
	c, ok := cs.denials[action]
	if !ok {
		c = cs.denials["other"]
	}
	if c != nil {
		c.Inc()
	}
}

// setDenials prepares the denial counters of the actions the config can
// name (none without metrics).
func (cs *channelState) setDenials(m *handlerMetrics, rules []ChannelRule, extra ...string) {
	if m == nil {
		return
	}
	cs.denials = map[string]prometheus.Counter{}
	add := func(a string) {
		if a != "*" && cs.denials[a] == nil {
			cs.denials[a] = m.denials(a)
		}
	}
	for _, r := range rules {
		for _, a := range r.Actions {
			add(a)
		}
	}
	for _, a := range cs.words {
		add(a)
	}
	for _, a := range extra {
		add(a)
	}
}

// channelConflict finds channel options that need or exclude others, and
// names the one to blame.
func (h *Handler) channelConflict() (option string, err error) {
	switch {
	case h.RelayChannels != nil && len(h.Channels) == 0:
		return "relay_channels", errors.New("relay_channels needs a channels block")
	case h.RelayChannels != nil && h.Rooms != nil:
		return "relay_channels", errors.New("relay_channels is for relay mode; rooms clients name channels in the protocol")
	case len(h.Channels) > 0 && h.Rooms == nil && (h.RelayChannels == nil || h.RelayChannels.ChannelField == ""):
		return "channels", errors.New("channels in relay mode need relay_channels with a channel_field: without it no frame would be checked")
	}
	return "", nil
}

// compileChannels compiles the channel rules.
func compileChannels(rules []ChannelRule) (*policy.ChannelPolicy, error) {
	prules := make([]policy.Rule, 0, len(rules))
	for _, r := range rules {
		var eff policy.Effect
		switch r.Effect {
		case "allow":
			eff = policy.Allow
		case "deny":
			eff = policy.Deny
		default:
			return nil, fmt.Errorf("channel rule %q: effect must be allow or deny", r.Pattern)
		}
		prules = append(prules, policy.Rule{Effect: eff, Actions: r.Actions, Pattern: r.Pattern})
	}
	return policy.CompileChannelPolicy(prules)
}

// messageFields reads the channel field and, if set, the action field.
func (rc *RelayChannels) messageFields() (*policy.MessageFields, error) {
	f, err := policy.NewMessageFields(rc.ChannelField, rc.ActionField)
	if err != nil {
		return nil, fmt.Errorf("relay_channels: %w", err)
	}
	return f, nil
}

// wordActions maps the app's words to policy actions.
func (rc *RelayChannels) wordActions() (map[string]string, error) {
	m := map[string]string{}
	for action, words := range rc.Actions {
		if !policy.ValidAction(action) || action == "*" {
			return nil, fmt.Errorf("relay_channels: bad action %q", action)
		}
		for _, w := range words {
			if prev, dup := m[w]; dup && prev != action {
				// name the actions in a stable order: map order is not
				return nil, fmt.Errorf("relay_channels: word %q maps to both %s and %s", w, min(prev, action), max(prev, action))
			}
			m[w] = action
		}
	}
	return m, nil
}

func (h *Handler) provisionChannels() error {
	if _, err := h.channelConflict(); err != nil {
		return err
	}
	if len(h.Channels) == 0 {
		return nil
	}
	p, err := compileChannels(h.Channels)
	if err != nil {
		return err
	}
	if h.Rooms != nil {
		h.channels = &channelState{policy: p}
		h.channels.setDenials(h.metrics, h.Channels, "subscribe", "publish")
		return nil
	}
	rc := h.RelayChannels
	cs := &channelState{policy: p, reply: defaultDenyReply, deny: proxy.Drop}
	if cs.fields, err = rc.messageFields(); err != nil {
		return err
	}
	if cs.words, err = rc.wordActions(); err != nil {
		return err
	}
	switch rc.Unmatched {
	case "", "pass":
		cs.unmatched = proxy.Pass
	case "deny":
		cs.unmatched = proxy.Drop
	default:
		return fmt.Errorf("relay_channels: unmatched must be pass or deny, not %q", rc.Unmatched)
	}
	switch rc.OnDeny {
	case "", "drop":
	case "close":
		cs.deny = proxy.Close
	default:
		return fmt.Errorf("relay_channels: on_deny must be drop or close, not %q", rc.OnDeny)
	}
	switch rc.DenyReply {
	case "":
	case "off":
		cs.reply = ""
	default:
		cs.reply = rc.DenyReply
	}
	if cs.unmatched != proxy.Pass {
		cs.unmatched = cs.deny
	}
	cs.setDenials(h.metrics, h.Channels, "other", "unmatched", "invalid")
	h.channels = cs
	return nil
}

// inspector decides relayed client messages for one connection. A
// message passes when every object in it (one, or each of a batch) is
// allowed; the first refused one names the channel in the reply.
func (cs *channelState) inspector(claims policy.Claims) func([]byte, bool) (proxy.Verdict, []byte) {
	// A connection's claims do not change, so neither does the decision
	// for a channel and action: the last one is kept, since a connection
	// mostly talks on one channel at a time. (The inspector runs on the
	// client's reader only.)
	var last struct {
		ch, word, action string
		allow, ok        bool
	}
	var scratch policy.FieldScratch
	return func(msg []byte, text bool) (proxy.Verdict, []byte) {
		verdict, named := proxy.Pass, false
		var deniedCh, deniedAction string
		err := cs.fields.Read(msg, !text, &scratch, func(ch, word []byte) {
			if ch == nil {
				if cs.unmatched != proxy.Pass && verdict == proxy.Pass {
					verdict = cs.unmatched
				}
				return
			}
			named = true
			if !last.ok || string(ch) != last.ch || string(word) != last.word {
				last.ch, last.word, last.ok = string(ch), string(word), true
				last.action = last.word
				if a, ok := cs.words[last.word]; ok {
					last.action = a
				}
				last.allow = cs.policy.Decide(last.action, last.ch, claims) == policy.Allow
			}
			if !last.allow && (verdict == proxy.Pass || deniedCh == "") {
				verdict, deniedCh, deniedAction = cs.deny, last.ch, last.action
			}
		})
		switch {
		case errors.Is(err, policy.ErrNotJSON), err == nil && !named: // no object names a channel
			if cs.unmatched != proxy.Pass {
				cs.countDenied("unmatched")
			}
			return cs.unmatched, nil
		case err != nil:
			cs.countDenied("invalid")
			return cs.deny, cs.replyFor("", "")
		case verdict == proxy.Pass:
			return proxy.Pass, nil
		case deniedCh == "":
			cs.countDenied("unmatched") // an object of a batch named none
		default:
			cs.countDenied(deniedAction)
		}
		return verdict, cs.replyFor(deniedCh, deniedAction)
	}
}

func (cs *channelState) replyFor(ch, action string) []byte {
	if cs.reply == "" || cs.deny == proxy.Close {
		return nil
	}
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) }
	return []byte(strings.NewReplacer("{channel}", q(ch), "{action}", q(action)).Replace(cs.reply))
}
