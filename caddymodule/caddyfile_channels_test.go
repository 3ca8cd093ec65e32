package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// channelsInput puts lines in a channels block that starts on line 2, so
// the first rule is on line 3, and adds a relay_channels block after it.
func channelsInput(rules ...string) string {
	return "wsgate ws://a:1 {\n\tchannels {\n\t\t" + strings.Join(rules, "\n\t\t") +
		"\n\t}\n\trelay_channels {\n\t\tchannel_field channel\n\t}\n}"
}

// relayInput puts lines in a relay_channels block after a one-rule
// channels block; the first line is line 6.
func relayInput(lines ...string) string {
	return "wsgate ws://a:1 {\n\tchannels {\n\t\tallow * **\n\t}\n\trelay_channels {\n\t\t" +
		strings.Join(lines, "\n\t\t") + "\n\t}\n}"
}

func TestUnmarshalCaddyfileChannels(t *testing.T) {
	relay := &RelayChannels{ChannelField: "channel"}
	tests := []struct {
		name     string
		input    string
		channels []ChannelRule
		relay    *RelayChannels
	}{
		{
			name:     "one rule",
			input:    channelsInput("allow subscribe chat:{claims.org}:*"),
			channels: []ChannelRule{{Effect: "allow", Actions: []string{"subscribe"}, Pattern: "chat:{claims.org}:*"}},
			relay:    relay,
		},
		{
			name: "rules keep their order",
			input: channelsInput(
				"deny  publish   chat:*:announcements",
				"allow subscribe chat:{claims.org}:*",
				"allow publish   chat:{claims.org}:{claims.sub}",
				"allow subscribe user:{claims.sub}:**",
				"allow subscribe,publish room:{claims.rooms[*]}",
			),
			channels: []ChannelRule{
				{Effect: "deny", Actions: []string{"publish"}, Pattern: "chat:*:announcements"},
				{Effect: "allow", Actions: []string{"subscribe"}, Pattern: "chat:{claims.org}:*"},
				{Effect: "allow", Actions: []string{"publish"}, Pattern: "chat:{claims.org}:{claims.sub}"},
				{Effect: "allow", Actions: []string{"subscribe"}, Pattern: "user:{claims.sub}:**"},
				{Effect: "allow", Actions: []string{"subscribe", "publish"}, Pattern: "room:{claims.rooms[*]}"},
			},
			relay: relay,
		},
		{
			name:     "star action and custom words",
			input:    channelsInput("allow * pub:**", "allow typing,react_2,Seen chat:*"),
			channels: []ChannelRule{{Effect: "allow", Actions: []string{"*"}, Pattern: "pub:**"}, {Effect: "allow", Actions: []string{"typing", "react_2", "Seen"}, Pattern: "chat:*"}},
			relay:    relay,
		},
		{
			name:     "a quoted pattern",
			input:    channelsInput(`deny "*" "user-{claims.sub}:x"`),
			channels: []ChannelRule{{Effect: "deny", Actions: []string{"*"}, Pattern: "user-{claims.sub}:x"}},
			relay:    relay,
		},
		{
			name: "relay_channels with every subdirective",
			input: relayInput(
				"channel_field payload.room",
				"action_field  type",
				"action subscribe join sub",
				"action publish say message",
				"action typing_event typing",
				"unmatched deny",
				"on_deny close",
				"deny_reply off",
			),
			channels: []ChannelRule{{Effect: "allow", Actions: []string{"*"}, Pattern: "**"}},
			relay: &RelayChannels{
				ChannelField: "payload.room",
				ActionField:  "type",
				Actions: map[string][]string{
					"subscribe":    {"join", "sub"},
					"publish":      {"say", "message"},
					"typing_event": {"typing"},
				},
				Unmatched: "deny",
				OnDeny:    "close",
				DenyReply: "off",
			},
		},
		{
			name:     "relay_channels defaults stay empty",
			input:    relayInput("channel_field ch"),
			channels: []ChannelRule{{Effect: "allow", Actions: []string{"*"}, Pattern: "**"}},
			relay:    &RelayChannels{ChannelField: "ch"},
		},
		{
			name: "unmatched pass, on_deny drop and a reply template",
			input: relayInput(
				"channel_field channel",
				"unmatched pass",
				"on_deny drop",
				"deny_reply `{\"type\":\"error\",\"channel\":{channel},\"action\":{action}}`",
			),
			channels: []ChannelRule{{Effect: "allow", Actions: []string{"*"}, Pattern: "**"}},
			relay: &RelayChannels{
				ChannelField: "channel",
				Unmatched:    "pass",
				OnDeny:       "drop",
				DenyReply:    `{"type":"error","channel":{channel},"action":{action}}`,
			},
		},
		{
			name:     "relay_channels before channels",
			input:    "wsgate ws://a:1 {\n\trelay_channels {\n\t\tchannel_field c\n\t}\n\tchannels {\n\t\tdeny * x\n\t}\n}",
			channels: []ChannelRule{{Effect: "deny", Actions: []string{"*"}, Pattern: "x"}},
			relay:    &RelayChannels{ChannelField: "c"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := unmarshal(t, tt.input)
			if err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v\n%s", err, numbered(tt.input))
			}
			want := &Handler{Upstreams: []string{"ws://a:1"}, Channels: tt.channels, RelayChannels: tt.relay}
			for _, d := range handlerDiffs(got, want) {
				t.Error(d)
			}
			// what parses must provision, and survive the JSON round trip
			if err := got.provisionChannels(); err != nil {
				t.Errorf("provisionChannels: %v", err)
			}
			data, err := json.Marshal(got)
			if err != nil {
				t.Fatal(err)
			}
			checkRoundTrip(t, data, want)
		})
	}
}

func TestUnmarshalCaddyfileChannelsErrors(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string
		line    int
	}{
		// channels
		{
			name:    "rule that is not allow or deny",
			input:   channelsInput("allow * a", "permit * b"),
			wantErr: `channel rule must start with allow or deny, not "permit"`,
			line:    4,
		},
		{
			name:    "rule without a pattern",
			input:   channelsInput("allow subscribe"),
			wantErr: "want: allow <action>[,<action>...] <pattern>",
			line:    3,
		},
		{
			name:    "rule with an extra argument",
			input:   channelsInput("deny subscribe a b"),
			wantErr: "want: deny <action>[,<action>...] <pattern>",
			line:    3,
		},
		{
			name:    "actions separated by spaces",
			input:   channelsInput("allow subscribe publish chat:*"),
			wantErr: "want: allow",
			line:    3,
		},
		{
			name:    "third rule with an empty segment",
			input:   channelsInput("allow subscribe a:*", "deny publish b:**", "allow subscribe chat::x", "allow * c"),
			wantErr: `channel rule 3 ("chat::x"), position 6: empty segment`,
			line:    5,
		},
		{
			name:    "** not last",
			input:   channelsInput("allow * a", "allow * a:**:b"),
			wantErr: `channel rule 2 ("a:**:b"), position 3: ** may only be the last segment`,
			line:    4,
		},
		{
			name:    "* inside a segment",
			input:   channelsInput("allow * chat:ab*"),
			wantErr: `channel rule 1 ("chat:ab*"), position 8: * must be a whole segment`,
			line:    3,
		},
		{
			name:    "unclosed {",
			input:   channelsInput("allow * a", "allow * a", "allow * chat:{claims.org"),
			wantErr: `channel rule 3 ("chat:{claims.org"), position 6: unclosed {`,
			line:    5,
		},
		{
			name:    "placeholder that is not a claim",
			input:   channelsInput("allow * chat:{org}"),
			wantErr: `channel rule 1 ("chat:{org}"), position 7: {org}: a placeholder must be`,
			line:    3,
		},
		{
			name:    "empty claim name",
			input:   channelsInput("allow * chat:{claims.a..b}"),
			wantErr: `channel rule 1 ("chat:{claims.a..b}"), position 7: {claims.a..b}: bad claim name ""`,
			line:    3,
		},
		{
			name:    "two claims side by side",
			input:   channelsInput("allow * {claims.a}{claims.b}"),
			wantErr: `channel rule 1 ("{claims.a}{claims.b}"), position 11: two claims side by side`,
			line:    3,
		},
		{
			name:    "bad characters",
			input:   channelsInput("allow * chat/x"),
			wantErr: `channel rule 1 ("chat/x"), position 1: segment "chat/x" has characters a channel cannot have`,
			line:    3,
		},
		{
			name:    "bad action",
			input:   channelsInput("allow sub;scribe x"),
			wantErr: `channel rule 1 ("x"), position 1: bad action "sub;scribe"`,
			line:    3,
		},
		{
			name:    "empty action after a comma",
			input:   channelsInput("allow subscribe, x"),
			wantErr: `channel rule 1 ("x"), position 1: bad action ""`,
			line:    3,
		},
		{
			name:    "channels with an argument",
			input:   "wsgate ws://a:1 {\n\tchannels strict {\n\t\tallow * x\n\t}\n}",
			wantErr: "wrong argument count",
			line:    2,
		},
		{
			name:    "empty channels block",
			input:   "wsgate ws://a:1 {\n\tchannels {\n\t}\n}",
			wantErr: "channels needs at least one rule",
			line:    3,
		},
		{
			name:    "channels without a block",
			input:   "wsgate ws://a:1 {\n\tchannels\n}",
			wantErr: "channels needs at least one rule",
			line:    2,
		},
		{
			name:    "two channels blocks",
			input:   "wsgate ws://a:1 {\n\tchannels {\n\t\tallow * a\n\t}\n\tchannels {\n\t\tallow * b\n\t}\n}",
			wantErr: `duplicate subdirective "channels"`,
			line:    5,
		},

		// relay_channels
		{
			name:    "unknown subdirective",
			input:   relayInput("channel_field c", "chanel_field d"),
			wantErr: `unrecognized relay_channels subdirective "chanel_field"`,
			line:    7,
		},
		{
			name:    "duplicate channel_field",
			input:   relayInput("channel_field c", "action_field t", "channel_field d"),
			wantErr: `duplicate relay_channels subdirective "channel_field"`,
			line:    8,
		},
		{
			name:    "duplicate action_field",
			input:   relayInput("action_field t", "channel_field c", "action_field t"),
			wantErr: `duplicate relay_channels subdirective "action_field"`,
			line:    8,
		},
		{
			name:    "duplicate unmatched",
			input:   relayInput("channel_field c", "unmatched pass", "unmatched deny"),
			wantErr: `duplicate relay_channels subdirective "unmatched"`,
			line:    8,
		},
		{
			name:    "duplicate on_deny",
			input:   relayInput("channel_field c", "on_deny drop", "on_deny drop"),
			wantErr: `duplicate relay_channels subdirective "on_deny"`,
			line:    8,
		},
		{
			name:    "duplicate deny_reply",
			input:   relayInput("channel_field c", "deny_reply off", "deny_reply x"),
			wantErr: `duplicate relay_channels subdirective "deny_reply"`,
			line:    8,
		},
		{
			name:    "duplicate action",
			input:   relayInput("channel_field c", "action subscribe join", "action publish say", "action subscribe sub"),
			wantErr: `duplicate action "subscribe"`,
			line:    9,
		},
		{
			name:    "missing channel_field",
			input:   relayInput("action_field type", "unmatched deny"),
			wantErr: "relay_channels needs channel_field",
			line:    8,
		},
		{
			name:    "empty relay_channels",
			input:   "wsgate ws://a:1 {\n\trelay_channels {\n\t}\n}",
			wantErr: "relay_channels needs channel_field",
			line:    3,
		},
		{
			name:    "relay_channels with an argument",
			input:   "wsgate ws://a:1 {\n\trelay_channels json {\n\t\tchannel_field c\n\t}\n}",
			wantErr: "wrong argument count",
			line:    2,
		},
		{
			name:    "channel_field without a value",
			input:   relayInput("channel_field"),
			wantErr: "wrong argument count",
			line:    6,
		},
		{
			name:    "channel_field with two values",
			input:   relayInput("channel_field a b"),
			wantErr: "wrong argument count",
			line:    6,
		},
		{
			name:    "channel_field with an empty name",
			input:   relayInput("channel_field payload..room"),
			wantErr: "channel_field: empty name in field path payload..room",
			line:    6,
		},
		{
			name:    "action_field ending in a dot",
			input:   relayInput("channel_field c", "action_field type."),
			wantErr: "action_field: empty name in field path type.",
			line:    7,
		},
		{
			name:    "action without words",
			input:   relayInput("channel_field c", "action subscribe"),
			wantErr: "want: action <policy_action> <app_words...>",
			line:    7,
		},
		{
			name:    "action *",
			input:   relayInput("channel_field c", "action * join"),
			wantErr: `bad action "*"`,
			line:    7,
		},
		{
			name:    "bad action name",
			input:   relayInput("channel_field c", "action sub.scribe join"),
			wantErr: `bad action "sub.scribe"`,
			line:    7,
		},
		{
			name:    "bad unmatched",
			input:   relayInput("channel_field c", "unmatched drop"),
			wantErr: `unmatched must be pass or deny, not "drop"`,
			line:    7,
		},
		{
			name:    "unmatched without a value",
			input:   relayInput("channel_field c", "unmatched"),
			wantErr: "wrong argument count",
			line:    7,
		},
		{
			name:    "bad on_deny",
			input:   relayInput("channel_field c", "on_deny deny"),
			wantErr: `on_deny must be drop or close, not "deny"`,
			line:    7,
		},
		{
			name:    "deny_reply with two values",
			input:   relayInput("channel_field c", `deny_reply {"error":"forbidden"} x`),
			wantErr: "wrong argument count",
			line:    7,
		},
		{
			name:    "two relay_channels blocks",
			input:   "wsgate ws://a:1 {\n\trelay_channels {\n\t\tchannel_field c\n\t}\n\trelay_channels {\n\t\tchannel_field d\n\t}\n}",
			wantErr: `duplicate subdirective "relay_channels"`,
			line:    5,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := unmarshal(t, tt.input)
			if err == nil {
				t.Fatalf("no error; parsed %s", describe(h))
			}
			checkErrorAt(t, err, tt.input, tt.wantErr, tt.line)
		})
	}
}

// TestProvisionChannels checks the validation that needs both blocks, or
// that a JSON config reaches without the Caddyfile parser.
func TestProvisionChannels(t *testing.T) {
	allowAll := []ChannelRule{{Effect: "allow", Actions: []string{"*"}, Pattern: "**"}}
	tests := []struct {
		name    string
		h       Handler
		wantErr string // "" for success
	}{
		{"neither", Handler{}, ""},
		{"both", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "c"}}, ""},
		{"channels without relay_channels", Handler{Channels: allowAll}, "need relay_channels with a channel_field"},
		{"relay_channels without channel_field", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ActionField: "t"}}, "need relay_channels with a channel_field"},
		{"relay_channels without channels", Handler{RelayChannels: &RelayChannels{ChannelField: "c"}}, "relay_channels needs a channels block"},
		{"bad effect", Handler{Channels: []ChannelRule{{Effect: "permit", Actions: []string{"*"}, Pattern: "x"}}, RelayChannels: &RelayChannels{ChannelField: "c"}}, "effect must be allow or deny"},
		{"bad pattern", Handler{Channels: []ChannelRule{allowAll[0], {Effect: "deny", Actions: []string{"*"}, Pattern: "a::b"}}, RelayChannels: &RelayChannels{ChannelField: "c"}}, `channel rule 2 ("a::b"), position 3: empty segment`},
		{"no actions", Handler{Channels: []ChannelRule{{Effect: "allow", Pattern: "x"}}, RelayChannels: &RelayChannels{ChannelField: "c"}}, "channel rule 1"},
		{"bad channel_field", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "a."}}, "relay_channels: channel field: empty name in field path"},
		{"bad action_field", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "c", ActionField: ".t"}}, "relay_channels: action field: empty name in field path"},
		{"action_field inside channel_field", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "p", ActionField: "p.t"}}, "must name different, unnested fields"},
		{"action_field equal to channel_field", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "p.c", ActionField: "p.c"}}, "must name different, unnested fields"},
		{"fields differing in case only", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "p.room", ActionField: "p.Room"}}, "differ only in letter case"},
		{"fields under parents differing in case only", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "p.room", ActionField: "P.type"}}, "differ only in letter case"},
		{"bad action", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "c", Actions: map[string][]string{"*": {"x"}}}}, `relay_channels: bad action "*"`},
		{"bad unmatched", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "c", Unmatched: "drop"}}, "unmatched must be pass or deny"},
		{"bad on_deny", Handler{Channels: allowAll, RelayChannels: &RelayChannels{ChannelField: "c", OnDeny: "kill"}}, "on_deny must be drop or close"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.h.provisionChannels()
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("provisionChannels: %v", err)
				}
				if (tt.h.channels != nil) != (tt.h.Channels != nil) {
					t.Errorf("channel state = %v with %d rules", tt.h.channels, len(tt.h.Channels))
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("provisionChannels error = %v, want one containing %q", err, tt.wantErr)
			}
			if tt.h.channels != nil {
				t.Errorf("channel state set despite the error")
			}
		})
	}
}

// TestChannelsInspector runs relayed frames through a provisioned config.
func TestChannelsInspector(t *testing.T) {
	h, err := unmarshal(t, `wsgate ws://a:1 {
		channels {
			deny  publish   chat:*:announcements
			allow subscribe chat:{claims.org}:*
			allow publish   chat:{claims.org}:{claims.sub}
		}
		relay_channels {
			channel_field payload.room
			action_field  type
			action subscribe join
			action publish say
			deny_reply    `+"`"+`{"error":"forbidden","channel":{channel},"action":{action}}`+"`"+`
		}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	if err := h.provisionChannels(); err != nil {
		t.Fatal(err)
	}
	inspect := h.channels.inspector(policy.Claims{"org": "acme", "sub": "alice"})
	tests := []struct {
		msg   string
		text  bool
		want  proxy.Verdict
		reply string
	}{
		{`{"type":"join","payload":{"room":"chat:acme:general"}}`, true, proxy.Pass, ""},
		{`{"type":"join","payload":{"room":"chat:other:general"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:other:general","action":"subscribe"}`},
		{`{"type":"say","payload":{"room":"chat:acme:alice"}}`, true, proxy.Pass, ""},
		{`{"type":"say","payload":{"room":"chat:acme:general"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:general","action":"publish"}`},
		{`{"type":"say","payload":{"room":"chat:acme:announcements"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:announcements","action":"publish"}`},
		// an unmapped word is its own action, so subscribe works too
		{`{"type":"subscribe","payload":{"room":"chat:acme:x"}}`, true, proxy.Pass, ""},
		{`{"type":"leave","payload":{"room":"chat:acme:x"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:x","action":"leave"}`},
		{`{"payload":{"room":"chat:acme:x"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:x","action":""}`},
		// no channel: unmatched (pass by default)
		{`{"type":"ping"}`, true, proxy.Pass, ""},
		{`hello`, true, proxy.Pass, ""},
		{"\x00\x01", false, proxy.Pass, ""},
		// looks like JSON but is not strict, or is ambiguous: denied
		{`{"type":"join","payload":{"room":"chat:acme:x"}`, true, proxy.Drop, `{"error":"forbidden","channel":"","action":""}`},
		{`{"type":"join","payload":{"room":"chat:other:x","room":"chat:acme:x"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"","action":""}`},
		{`{"type":"join","payload":{"room":["chat:acme:x"]}}`, true, proxy.Drop, `{"error":"forbidden","channel":"","action":""}`},
		{`{"type":"join","payload":{"room":"chat:\u0061cme:x"}}`, true, proxy.Pass, ""},
		{`{"type":"join","payload":{"room":"chat:acme:*"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:*","action":"subscribe"}`},
		// The last decision is kept: repeats, then the same channel with
		// another action, and the same action on another channel.
		{`{"type":"join","payload":{"room":"chat:acme:general"}}`, true, proxy.Pass, ""},
		{`{"type":"join","payload":{"room":"chat:acme:general"}}`, true, proxy.Pass, ""},
		{`{"type":"say","payload":{"room":"chat:acme:general"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:general","action":"publish"}`},
		{`{"type":"say","payload":{"room":"chat:acme:general"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:general","action":"publish"}`},
		{`{"type":"say","payload":{"room":"chat:acme:alice"}}`, true, proxy.Pass, ""},
		{`{"type":"say","payload":{"room":"chat:acme:alic"}}`, true, proxy.Drop, `{"error":"forbidden","channel":"chat:acme:alic","action":"publish"}`},
		{`{"type":"join","payload":{"room":"chat:acme:alic"}}`, true, proxy.Pass, ""},
	}
	for _, tt := range tests {
		got, reply := inspect([]byte(tt.msg), tt.text)
		if got != tt.want || string(reply) != tt.reply {
			t.Errorf("%s: verdict %v reply %s; want %v %s", tt.msg, got, reply, tt.want, tt.reply)
		}
	}
}

// TestChannelsSameFieldTwice: with channel_field and action_field naming
// the same field, no frame has a channel and all of them pass.
func TestChannelsSameFieldTwice(t *testing.T) {
	h := &Handler{
		Channels:      []ChannelRule{{Effect: "deny", Actions: []string{"*"}, Pattern: "**"}},
		RelayChannels: &RelayChannels{ChannelField: "type", ActionField: "type"},
	}
	if err := h.provisionChannels(); err != nil {
		return // refusing the config is a fix too
	}
	got, _ := h.channels.inspector(nil)([]byte(`{"type":"chat:secret"}`), true)
	if got == proxy.Pass {
		t.Errorf("a deny-all policy passed a frame naming a channel")
	}
}
