package policy

import (
	"errors"
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"
)

// chRule reads one rule written the way the Caddyfile writes it:
// "allow subscribe,publish chat:{claims.org}:*".
func chRule(t testing.TB, line string) Rule {
	t.Helper()
	f := strings.Fields(line)
	if len(f) != 3 {
		t.Fatalf("test rule %q: want <effect> <actions> <pattern>", line)
	}
	r := Rule{Actions: strings.Split(f[1], ","), Pattern: f[2]}
	switch f[0] {
	case "allow":
		r.Effect = Allow
	case "deny":
		r.Effect = Deny
	default:
		t.Fatalf("test rule %q: effect %q", line, f[0])
	}
	return r
}

func chRules(t testing.TB, lines ...string) []Rule {
	t.Helper()
	rules := make([]Rule, len(lines))
	for i, l := range lines {
		rules[i] = chRule(t, l)
	}
	return rules
}

// chPolicy compiles rules that must compile.
func chPolicy(t testing.TB, lines ...string) *ChannelPolicy {
	t.Helper()
	p, err := CompileChannelPolicy(chRules(t, lines...))
	if err != nil {
		t.Fatalf("CompileChannelPolicy: %v", err)
	}
	return p
}

// TestChannelPatterns checks every pattern form with a single allow rule:
// a channel is allowed exactly when the pattern matches it.
func TestChannelPatterns(t *testing.T) {
	type query struct {
		channel string
		match   bool
	}
	tests := []struct {
		name    string
		pattern string
		claims  Claims
		queries []query
	}{
		{
			name:    "literal",
			pattern: "chat:lobby",
			queries: []query{
				{"chat:lobby", true},
				{"chat:lobby2", false},
				{"chat:lobb", false},
				{"chat", false},
				{"chat:lobby:x", false},
				{"Chat:lobby", false},
				{"x:chat:lobby", false},
			},
		},
		{
			name:    "single-segment literal",
			pattern: "lobby",
			queries: []query{{"lobby", true}, {"lobby:x", false}, {"lobbyx", false}},
		},
		{
			name:    "literal with every punctuation a channel may have",
			pattern: "a-_.@=+~!$&'(),z:x",
			queries: []query{{"a-_.@=+~!$&'(),z:x", true}, {"a-_.@=+~!$&'(),z:y", false}},
		},
		{
			name:    "star is one segment",
			pattern: "chat:*",
			queries: []query{
				{"chat:x", true},
				{"chat:lobby", true},
				{"chat", false},
				{"chat:x:y", false},
				{"chatx:y", false},
			},
		},
		{
			name:    "star in the middle",
			pattern: "chat:*:announcements",
			queries: []query{
				{"chat:acme:announcements", true},
				{"chat:acme:announcement", false},
				{"chat:acme:x:announcements", false},
				{"chat:announcements", false},
			},
		},
		{
			name:    "star first",
			pattern: "*:x",
			queries: []query{{"a:x", true}, {"x", false}, {"a:b:x", false}},
		},
		{
			name:    "star alone",
			pattern: "*",
			queries: []query{{"a", true}, {"a:b", false}},
		},
		{
			name:    "trailing ** takes zero or more segments",
			pattern: "user:**",
			queries: []query{
				{"user", true},
				{"user:a", true},
				{"user:a:b:c", true},
				{"users", false},
				{"users:a", false},
				{"use", false},
				{"x:user", false},
			},
		},
		{
			name:    "** alone takes any channel",
			pattern: "**",
			queries: []query{{"a", true}, {"a:b:c", true}},
		},
		{
			name:    "star then **",
			pattern: "a:*:**",
			queries: []query{{"a", false}, {"a:b", true}, {"a:b:c:d", true}, {"b:b", false}},
		},
		{
			name:    "claim as a whole segment",
			pattern: "chat:{claims.org}:*",
			claims:  Claims{"org": "acme"},
			queries: []query{
				{"chat:acme:general", true},
				{"chat:acm:general", false},
				{"chat:acmex:general", false},
				{"chat:xacme:general", false},
				{"chat:other:general", false},
				{"chat:acme", false},
				{"chat:acme:a:b", false},
			},
		},
		{
			name:    "nested claim",
			pattern: "org:{claims.tenant.id}:status",
			claims:  Claims{"tenant": map[string]any{"id": "t1"}, "id": "t2"},
			queries: []query{{"org:t1:status", true}, {"org:t2:status", false}},
		},
		{
			name:    "deeply nested claim",
			pattern: "{claims.a.b.c}",
			claims:  Claims{"a": map[string]any{"b": map[string]any{"c": "deep"}}},
			queries: []query{{"deep", true}, {"a", false}},
		},
		{
			name:    "nested claim through a non-object",
			pattern: "{claims.a.b}",
			claims:  Claims{"a": "b"},
			queries: []query{{"b", false}, {"a", false}},
		},
		{
			name:    "nested claim through an array",
			pattern: "{claims.a.b}",
			claims:  Claims{"a": []any{map[string]any{"b": "x"}}},
			queries: []query{{"x", false}},
		},
		{
			name:    "text before a claim",
			pattern: "user-{claims.sub}",
			claims:  Claims{"sub": "alice"},
			queries: []query{
				{"user-alice", true},
				{"user-alic", false},
				{"user-alice2", false},
				{"useralice", false},
				{"user-", false},
				{"alice", false},
			},
		},
		{
			name:    "text after a claim",
			pattern: "{claims.sub}-inbox:**",
			claims:  Claims{"sub": "alice"},
			queries: []query{{"alice-inbox", true}, {"alice-inbox:x", true}, {"alice-inbo", false}, {"alice", false}},
		},
		{
			name:    "text around and between claims",
			pattern: "x{claims.a}.{claims.b}y",
			claims:  Claims{"a": "1", "b": "2"},
			queries: []query{{"x1.2y", true}, {"x1.2", false}, {"x12y", false}, {"x2.1y", false}},
		},
		{
			name:    "claims whose values overlap the text between them",
			pattern: "{claims.a}-{claims.b}",
			claims:  Claims{"a": "x-y", "b": "z"},
			queries: []query{{"x-y-z", true}, {"x-y", false}, {"y-z", false}},
		},
		{
			name:    "array claim",
			pattern: "room:{claims.rooms[*]}",
			claims:  Claims{"rooms": []any{"r1", "r2"}},
			queries: []query{
				{"room:r1", true},
				{"room:r2", true},
				{"room:r3", false},
				{"room:r1,r2", false},
				{"room:r1r2", false},
				{"room:r", false},
			},
		},
		{
			name:    "array claim inside a segment",
			pattern: "room-{claims.rooms[*]}-log",
			claims:  Claims{"rooms": []any{"a", "bb"}},
			queries: []query{{"room-a-log", true}, {"room-bb-log", true}, {"room-b-log", false}, {"room-a-bb-log", false}},
		},
		{
			name:    "array claim with mixed elements",
			pattern: "room:{claims.rooms[*]}",
			claims:  Claims{"rooms": []any{nil, map[string]any{"x": "y"}, []any{"inner"}, "", 5.0, true, "r1"}},
			queries: []query{
				{"room:r1", true},
				{"room:5", true},
				{"room:true", true},
				{"room:null", false},
				{"room:inner", false},
				{"room:y", false},
			},
		},
		{
			name:    "empty array claim",
			pattern: "room:{claims.rooms[*]}",
			claims:  Claims{"rooms": []any{}},
			queries: []query{{"room:x", false}},
		},
		{
			name:    "[*] on a string claim",
			pattern: "room:{claims.rooms[*]}",
			claims:  Claims{"rooms": "r1"},
			queries: []query{{"room:r1", false}},
		},
		{
			name:    "array claim without [*]",
			pattern: "room:{claims.rooms}",
			claims:  Claims{"rooms": []any{"r1"}},
			queries: []query{{"room:r1", false}},
		},
		{
			name:    "nested array claim",
			pattern: "team:{claims.org.teams[*]}",
			claims:  Claims{"org": map[string]any{"teams": []any{"red", "blue"}}},
			queries: []query{{"team:red", true}, {"team:blue", true}, {"team:green", false}},
		},
		{
			name:    "integer claim",
			pattern: "u:{claims.uid}",
			claims:  Claims{"uid": 42.0},
			queries: []query{{"u:42", true}, {"u:42.0", false}, {"u:4", false}, {"u:420", false}, {"u:4.2e1", false}},
		},
		{
			name:    "fractional claim",
			pattern: "u:{claims.uid}",
			claims:  Claims{"uid": 1.5},
			queries: []query{{"u:1.5", true}, {"u:1.50", false}, {"u:1", false}},
		},
		{
			name:    "negative claim",
			pattern: "u:{claims.uid}",
			claims:  Claims{"uid": -3.0},
			queries: []query{{"u:-3", true}, {"u:3", false}},
		},
		{
			// numbers render in plain decimal, never with an exponent
			name:    "large claim",
			pattern: "u:{claims.uid}",
			claims:  Claims{"uid": 1e21},
			queries: []query{{"u:1000000000000000000000", true}, {"u:1e+21", false}, {"u:1e21", false}},
		},
		{
			name:    "number claim with text",
			pattern: "shard-{claims.n}-x",
			claims:  Claims{"n": 7.0},
			queries: []query{{"shard-7-x", true}, {"shard-7", false}},
		},
		{
			name:    "true claim",
			pattern: "flag:{claims.admin}",
			claims:  Claims{"admin": true},
			queries: []query{{"flag:true", true}, {"flag:false", false}, {"flag:1", false}},
		},
		{
			name:    "false claim",
			pattern: "flag:{claims.admin}",
			claims:  Claims{"admin": false},
			queries: []query{{"flag:false", true}, {"flag:true", false}},
		},
		{
			name:    "null and object claims never match",
			pattern: "{claims.a}:{claims.b}",
			claims:  Claims{"a": nil, "b": map[string]any{}},
			queries: []query{{"null:x", false}},
		},
		{
			name:    "missing claim",
			pattern: "chat:{claims.org}:*",
			claims:  Claims{"sub": "alice"},
			queries: []query{{"chat:alice:x", false}, {"chat:x:x", false}},
		},
		{
			name:    "nil claims",
			pattern: "chat:{claims.org}:*",
			queries: []query{{"chat:x:x", false}},
		},
		{
			name:    "empty string claim",
			pattern: "chat:x{claims.org}:*",
			claims:  Claims{"org": ""},
			queries: []query{{"chat:x:y", false}, {"chat:x:y:z", false}},
		},
		{
			name:    "empty string claim between text",
			pattern: "{claims.org}-{claims.sub}",
			claims:  Claims{"org": "", "sub": "a"},
			queries: []query{{"-a", false}, {"a", false}},
		},
		{
			name:    "empty string element of an array claim",
			pattern: "room-{claims.rooms[*]}",
			claims:  Claims{"rooms": []any{"", "r1"}},
			queries: []query{{"room-", false}, {"room-r1", true}},
		},
		{
			name:    "claim used twice",
			pattern: "dm:{claims.sub}:{claims.sub}",
			claims:  Claims{"sub": "alice"},
			queries: []query{{"dm:alice:alice", true}, {"dm:alice:bob", false}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := chPolicy(t, "allow * "+tt.pattern)
			for _, q := range tt.queries {
				want := Deny
				if q.match {
					want = Allow
				}
				if got := p.Decide("subscribe", q.channel, tt.claims); got != want {
					t.Errorf("%q on %q with %v: %v, want %v", tt.pattern, q.channel, tt.claims, got, want)
				}
				// the reference matcher must agree, or the table is wrong
				if ref := chRefDecide(chRules(t, "allow * "+tt.pattern), "subscribe", q.channel, tt.claims); ref != want {
					t.Errorf("reference on %q: %v, want %v", q.channel, ref, want)
				}
			}
		})
	}
}

// TestChannelPolicyDecide checks rule order, actions and the default.
func TestChannelPolicyDecide(t *testing.T) {
	type query struct {
		action, channel string
		want            Effect
	}
	claims := Claims{"org": "acme", "sub": "alice", "rooms": []any{"r1"}}
	tests := []struct {
		name    string
		rules   []string
		claims  Claims
		queries []query
	}{
		{
			name:  "no rules deny everything",
			rules: nil,
			queries: []query{
				{"subscribe", "a", Deny},
				{"*", "a", Deny},
			},
		},
		{
			name:  "deny before allow wins",
			rules: []string{"deny * chat:x:secret", "allow * chat:x:*"},
			queries: []query{
				{"subscribe", "chat:x:secret", Deny},
				{"subscribe", "chat:x:public", Allow},
			},
		},
		{
			name:  "allow before deny wins",
			rules: []string{"allow * chat:x:*", "deny * chat:x:secret"},
			queries: []query{
				{"subscribe", "chat:x:secret", Allow},
				{"subscribe", "chat:x:public", Allow},
			},
		},
		{
			name:  "allow after a deny that does not match",
			rules: []string{"deny publish chat:*:announcements", "allow subscribe,publish chat:*:*"},
			queries: []query{
				{"publish", "chat:acme:announcements", Deny},
				{"subscribe", "chat:acme:announcements", Allow},
				{"publish", "chat:acme:general", Allow},
			},
		},
		{
			name:  "unmatched is denied",
			rules: []string{"allow * chat:*"},
			queries: []query{
				{"subscribe", "other", Deny},
				{"subscribe", "chat:a:b", Deny},
			},
		},
		{
			name:  "per-action rules",
			rules: []string{"allow subscribe chat:*", "allow publish chat:mine"},
			queries: []query{
				{"subscribe", "chat:a", Allow},
				{"publish", "chat:a", Deny},
				{"publish", "chat:mine", Allow},
				{"presence", "chat:a", Deny},
				{"", "chat:a", Deny},
			},
		},
		{
			name:  "a deny for one action does not touch another",
			rules: []string{"deny publish **", "allow * **"},
			queries: []query{
				{"publish", "a", Deny},
				{"subscribe", "a", Allow},
				{"typing", "a", Allow},
			},
		},
		{
			name:  "star action",
			rules: []string{"allow * pub:*"},
			queries: []query{
				{"subscribe", "pub:x", Allow},
				{"publish", "pub:x", Allow},
				{"typing", "pub:x", Allow},
				{"", "pub:x", Allow},
				{"subscribe", "priv:x", Deny},
			},
		},
		{
			name:  "star among other actions",
			rules: []string{"allow subscribe,* pub:*"},
			queries: []query{
				{"publish", "pub:x", Allow},
			},
		},
		{
			name:  "custom action words are case-sensitive",
			rules: []string{"allow typing,react_2 chat:*"},
			queries: []query{
				{"typing", "chat:a", Allow},
				{"react_2", "chat:a", Allow},
				{"Typing", "chat:a", Deny},
				{"subscribe", "chat:a", Deny},
				{"typing,react_2", "chat:a", Deny},
			},
		},
		{
			name:  "an action named * only matches star rules",
			rules: []string{"allow subscribe **"},
			queries: []query{
				{"*", "a", Deny},
			},
		},
		{
			name:  "a missing claim skips the rule and a later rule decides",
			rules: []string{"allow * chat:{claims.team}:*", "allow * chat:public:*"},
			queries: []query{
				{"subscribe", "chat:acme:x", Deny},
				{"subscribe", "chat:public:x", Allow},
			},
		},
		{
			name:  "a deny with a missing claim does not match",
			rules: []string{"deny * chat:{claims.banned}", "allow * chat:*"},
			queries: []query{
				{"subscribe", "chat:x", Allow},
			},
		},
		{
			name:  "a missing claim falls through to a later deny",
			rules: []string{"allow * org:{claims.team}", "deny * org:*", "allow * **"},
			queries: []query{
				{"subscribe", "org:acme", Deny},
				{"subscribe", "other", Allow},
			},
		},
		{
			name:   "realistic chat policy",
			claims: claims,
			rules: []string{
				"deny publish chat:*:announcements",
				"allow subscribe chat:{claims.org}:*",
				"allow publish chat:{claims.org}:{claims.sub}",
				"allow subscribe user:{claims.sub}:**",
				"allow subscribe,publish room:{claims.rooms[*]}",
			},
			queries: []query{
				{"subscribe", "chat:acme:general", Allow},
				{"subscribe", "chat:other:general", Deny},
				{"publish", "chat:acme:general", Deny},
				{"publish", "chat:acme:alice", Allow},
				{"publish", "chat:acme:bob", Deny},
				{"publish", "chat:acme:announcements", Deny},
				{"subscribe", "chat:acme:announcements", Allow},
				{"subscribe", "user:alice", Allow},
				{"subscribe", "user:alice:inbox:x", Allow},
				{"subscribe", "user:bob", Deny},
				{"publish", "user:alice", Deny},
				{"publish", "room:r1", Allow},
				{"publish", "room:r2", Deny},
			},
		},
		{
			name:  "invalid channels are denied even by allow **",
			rules: []string{"allow * **"},
			queries: []query{
				{"subscribe", "", Deny},
				{"subscribe", ":", Deny},
				{"subscribe", "a:", Deny},
				{"subscribe", ":a", Deny},
				{"subscribe", "a::b", Deny},
				{"subscribe", "a b", Deny},
				{"subscribe", "a:*", Deny},
				{"subscribe", "a:**", Deny},
				{"subscribe", "{claims.org}", Deny},
				{"subscribe", strings.Repeat("a", MaxSegmentLen+1), Deny},
				{"subscribe", strings.Repeat("a:", 128) + "a", Deny},
				{"subscribe", "a", Allow},
			},
		},
		{
			name:  "an action that is not UTF-8 is denied",
			rules: []string{"allow * **"},
			queries: []query{
				{"\xff", "a", Deny},
				{"sub\x00", "a", Allow}, // any action string: the star rule takes it
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rules := chRules(t, tt.rules...)
			p, err := CompileChannelPolicy(rules)
			if err != nil {
				t.Fatal(err)
			}
			if p.Len() != len(rules) {
				t.Errorf("Len = %d, want %d", p.Len(), len(rules))
			}
			for _, q := range tt.queries {
				if got := p.Decide(q.action, q.channel, tt.claims); got != q.want {
					t.Errorf("%s %q: %v, want %v", q.action, q.channel, got, q.want)
				}
				if ref := chRefDecide(rules, q.action, q.channel, tt.claims); ref != q.want {
					t.Errorf("reference for %s %q: %v, want %v", q.action, q.channel, ref, q.want)
				}
			}
		})
	}
}

// TestChannelPolicyCompileErrors checks that every bad rule is refused with
// its number and the byte where the trouble is.
func TestChannelPolicyCompileErrors(t *testing.T) {
	long := strings.Repeat("a", MaxSegmentLen+1)
	tests := []struct {
		name    string
		rules   []Rule
		rule    int // 1-based
		pos     int // 1-based
		message string
	}{
		{"empty pattern", []Rule{{Allow, []string{"*"}, ""}}, 1, 1, "empty pattern"},
		{"empty segment", []Rule{{Allow, []string{"*"}, "a::b"}}, 1, 3, "empty segment"},
		{"leading separator", []Rule{{Allow, []string{"*"}, ":a"}}, 1, 1, "empty segment"},
		{"trailing separator", []Rule{{Allow, []string{"*"}, "a:"}}, 1, 3, "empty segment"},
		{"only a separator", []Rule{{Allow, []string{"*"}, ":"}}, 1, 1, "empty segment"},
		{"** first", []Rule{{Allow, []string{"*"}, "**:a"}}, 1, 1, "** may only be the last segment"},
		{"** in the middle", []Rule{{Allow, []string{"*"}, "a:**:b"}}, 1, 3, "** may only be the last segment"},
		{"** twice", []Rule{{Allow, []string{"*"}, "**:**"}}, 1, 1, "** may only be the last segment"},
		{"* after text", []Rule{{Allow, []string{"*"}, "a*"}}, 1, 2, "* must be a whole segment"},
		{"* inside text", []Rule{{Allow, []string{"*"}, "chat:b*c"}}, 1, 7, "* must be a whole segment"},
		{"* before text", []Rule{{Allow, []string{"*"}, "*a"}}, 1, 1, "* must be a whole segment"},
		{"***", []Rule{{Allow, []string{"*"}, "a:***"}}, 1, 3, "* must be a whole segment"},
		{"* after a claim", []Rule{{Allow, []string{"*"}, "{claims.org}*"}}, 1, 13, "bad text"},
		{"* before a claim", []Rule{{Allow, []string{"*"}, "a:x*{claims.org}"}}, 1, 3, "bad text"},
		{"unclosed {", []Rule{{Allow, []string{"*"}, "a:{claims.org"}}, 1, 3, "unclosed {"},
		{"unclosed { after text", []Rule{{Allow, []string{"*"}, "a:b{claims.org"}}, 1, 4, "unclosed {"},
		{"unclosed { swallows the rest", []Rule{{Allow, []string{"*"}, "{claims.org:*"}}, 1, 1, "unclosed {"},
		{"claim name with ':'", []Rule{{Allow, []string{"*"}, "x:{claims.https://x/role}"}}, 1, 4, "bad claim name"},
		{"stray }", []Rule{{Allow, []string{"*"}, "a:b}c"}}, 1, 3, "bad text"},
		{"stray } after a claim", []Rule{{Allow, []string{"*"}, "{claims.a}}"}}, 1, 11, "bad text"},
		{"{} ", []Rule{{Allow, []string{"*"}, "a:{}"}}, 1, 4, "a placeholder must be"},
		{"{foo}", []Rule{{Allow, []string{"*"}, "{foo}"}}, 1, 2, "a placeholder must be"},
		{"{claims}", []Rule{{Allow, []string{"*"}, "{claims}"}}, 1, 2, "a placeholder must be"},
		{"{Claims.org}", []Rule{{Allow, []string{"*"}, "{Claims.org}"}}, 1, 2, "a placeholder must be"},
		{"{claims.}", []Rule{{Allow, []string{"*"}, "x:{claims.}"}}, 1, 4, "bad claim name"},
		{"{claims.a..b}", []Rule{{Allow, []string{"*"}, "{claims.a..b}"}}, 1, 2, "bad claim name"},
		{"{claims.a.}", []Rule{{Allow, []string{"*"}, "{claims.a.}"}}, 1, 2, "bad claim name"},
		{"{claims.[*]}", []Rule{{Allow, []string{"*"}, "{claims.[*]}"}}, 1, 2, "bad claim name"},
		{"{claims.a[*][*]}", []Rule{{Allow, []string{"*"}, "{claims.a[*][*]}"}}, 1, 2, "bad claim name"},
		{"{claims.a[*].b}", []Rule{{Allow, []string{"*"}, "{claims.a[*].b}"}}, 1, 2, "bad claim name"},
		{"{claims.a[0]}", []Rule{{Allow, []string{"*"}, "{claims.a[0]}"}}, 1, 2, "bad claim name"},
		{"{claims.a*}", []Rule{{Allow, []string{"*"}, "{claims.a*}"}}, 1, 2, "bad claim name"},
		{"{claims.a b}", []Rule{{Allow, []string{"*"}, "{claims.a b}"}}, 1, 2, "bad claim name"},
		{"nested braces", []Rule{{Allow, []string{"*"}, "{{claims.a}}"}}, 1, 2, "a placeholder must be"},
		{"two claims side by side", []Rule{{Allow, []string{"*"}, "x:{claims.a}{claims.b}"}}, 1, 13, "side by side"},
		{"two claims side by side after text", []Rule{{Allow, []string{"*"}, "u-{claims.a}{claims.b[*]}"}}, 1, 13, "side by side"},
		{"space", []Rule{{Allow, []string{"*"}, "chat:a b"}}, 1, 6, "characters a channel cannot have"},
		{"slash", []Rule{{Allow, []string{"*"}, "chat:a/b"}}, 1, 6, "characters a channel cannot have"},
		{"percent", []Rule{{Allow, []string{"*"}, "%2a"}}, 1, 1, "characters a channel cannot have"},
		{"NUL", []Rule{{Allow, []string{"*"}, "chat:\x00"}}, 1, 6, "characters a channel cannot have"},
		{"non-ASCII", []Rule{{Allow, []string{"*"}, "chat:caf\u00e9"}}, 1, 6, "characters a channel cannot have"},
		{"non-ASCII around a claim", []Rule{{Allow, []string{"*"}, "chat:\u00e9{claims.a}"}}, 1, 6, "bad text"},
		{"invalid UTF-8", []Rule{{Allow, []string{"*"}, "chat:\xff"}}, 1, 6, "characters a channel cannot have"},
		{"literal segment too long", []Rule{{Allow, []string{"*"}, "a:" + long}}, 1, 3, "characters a channel cannot have"},
		{"text around a claim too long", []Rule{{Allow, []string{"*"}, long + "{claims.a}"}}, 1, 1, "bad text"},
		{"pattern too long", []Rule{{Allow, []string{"*"}, strings.Repeat("a:", 2*MaxChannelLen) + "a"}}, 1, 1, "pattern too long"},
		{"no action", []Rule{{Allow, nil, "a"}}, 1, 1, "no action"},
		{"empty action", []Rule{{Allow, []string{""}, "a"}}, 1, 1, `bad action ""`},
		{"action with a space", []Rule{{Allow, []string{"sub scribe"}, "a"}}, 1, 1, "bad action"},
		{"action with a comma", []Rule{{Allow, []string{"sub,pub"}, "a"}}, 1, 1, "bad action"},
		{"non-ASCII action", []Rule{{Allow, []string{"subscribe", "\u00e9"}, "a"}}, 1, 1, "bad action"},
		{"action too long", []Rule{{Allow, []string{strings.Repeat("a", 65)}, "a"}}, 1, 1, "bad action"},
		{"action **", []Rule{{Allow, []string{"**"}, "a"}}, 1, 1, "bad action"},
		{
			name: "the third rule is named",
			rules: []Rule{
				{Allow, []string{"subscribe"}, "a:*"},
				{Deny, []string{"publish"}, "b:**"},
				{Allow, []string{"subscribe"}, "chat::x"},
				{Allow, []string{"subscribe"}, "::"},
			},
			rule: 3, pos: 6, message: "empty segment",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := CompileChannelPolicy(tt.rules)
			if err == nil {
				t.Fatalf("compiled (%d rules)", p.Len())
			}
			var pe *PolicyError
			if !errors.As(err, &pe) {
				t.Fatalf("error %v (%T) is not a *PolicyError", err, err)
			}
			if pe.Rule != tt.rule || pe.Pos != tt.pos {
				t.Errorf("error %q names rule %d position %d, want rule %d position %d", err, pe.Rule, pe.Pos, tt.rule, tt.pos)
			}
			if want := tt.rules[tt.rule-1].Pattern; pe.Pattern != want {
				t.Errorf("error names pattern %q, want %q", pe.Pattern, want)
			}
			if !strings.Contains(pe.Message, tt.message) {
				t.Errorf("message %q does not contain %q", pe.Message, tt.message)
			}
			msg := err.Error()
			for _, part := range []string{fmt.Sprintf("channel rule %d ", tt.rule), fmt.Sprintf("position %d:", tt.pos)} {
				if !strings.Contains(msg, part) {
					t.Errorf("error %q does not contain %q", msg, part)
				}
			}
			if !utf8.ValidString(msg) {
				t.Errorf("error %q is not UTF-8", msg)
			}
		})
	}
}

// TestChannelPolicyCompileAccepts lists unusual rules that are fine.
func TestChannelPolicyCompileAccepts(t *testing.T) {
	for _, r := range []Rule{
		{Allow, []string{"*"}, "**"},
		{Allow, []string{"*"}, "*"},
		{Allow, []string{"*"}, "*:*:**"},
		{Deny, []string{"subscribe", "publish", "x-y_Z9"}, "a"},
		{Allow, []string{strings.Repeat("a", 64)}, "a"},
		{Allow, []string{"*"}, strings.Repeat("a", MaxSegmentLen)},
		{Allow, []string{"*"}, "{claims.a}"},
		{Allow, []string{"*"}, "{claims.a-b_c}"}, // claim names are not channel text
		{Allow, []string{"*"}, "{claims.\u00e9/x}"},
		{Allow, []string{"*"}, "{claims.a.b.c.d}"},
		{Allow, []string{"*"}, "{claims.r[*]}-{claims.r[*]}"},
		{Allow, []string{"*"}, "a{claims.x}b{claims.y}c"},
		{Allow, []string{"*"}, "(x)~!$&'=+@,.:y"},
	} {
		if _, err := CompileChannelPolicy([]Rule{r}); err != nil {
			t.Errorf("%v: %v", r, err)
		}
	}
}

// chHostile are claim values and channel texts crafted to confuse a
// matcher that substitutes claims as text.
var chHostile = []string{
	"", ":", "*", "**", "{", "}", "{}", "{claims.org}", "{claims.sub}",
	"acme:*", "acme:**", "acme:other", "acme:", ":acme", "acme::x", "*:*",
	"acme*", "acme{", "acme}", "ac{claims.org}me",
	"..", ".", "../other", "..:other", "%2e%2e", "a/b", "acme/../other", "acme\\other",
	"other", "acme", "acme-other", "acme,other", "acme.other",
	"acme\x00", "\x00", "acme\n", "acme ", " acme", "acme\t", "\x7f",
	"\u0430cme", // Cyrillic а
	"acm\u0435", // Cyrillic е
	"\uff41cme", // fullwidth a
	"acme\u200b", "acme\u0301", "\ufeffacme", "\xffacme", "acme\xc0\xaf",
	strings.Repeat("a", 10000), strings.Repeat("a", MaxSegmentLen), strings.Repeat("a", MaxSegmentLen+1),
	strings.Repeat("a:", 5000), strings.Repeat("*", 10000),
	"true", "false", "null", "42",
}

// chSegmentText is the text of one channel segment.
var chSegmentText = regexp.MustCompile(`^[A-Za-z0-9\-_.@=+~!$&'(),]{1,128}$`)

// TestChannelPolicyInjection crafts claims and channel names out of pattern
// syntax, separators, look-alikes and huge values, and checks that nothing
// is allowed that the policy read literally would not allow.
func TestChannelPolicyInjection(t *testing.T) {
	rules := chRules(t,
		"deny * chat:other:**",
		"allow subscribe chat:{claims.org}:*",
		"allow publish chat:{claims.org}:{claims.sub}",
		"allow * user-{claims.sub}:**",
		"allow * room:{claims.rooms[*]}",
		"allow * org:{claims.org}-x",
		"allow * t:{claims.tenant.id}",
	)
	p, err := CompileChannelPolicy(rules)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range chHostile {
		claims := Claims{"org": v, "sub": v, "rooms": []any{v}, "tenant": map[string]any{"id": v}}
		var channels []string
		for _, w := range chHostile {
			channels = append(channels,
				w, "chat:"+w, "chat:"+w+":x", "chat:"+v+":"+w, "user-"+w, "user-"+w+":x",
				"room:"+w, "org:"+w+"-x", "t:"+w)
		}
		channels = append(channels,
			"chat:"+v+":x", "chat:"+v, "user-"+v, "user-"+v+":x:y", "room:"+v, "org:"+v+"-x", "t:"+v,
			"chat:acme:x", "chat:other:x", "chat:acme:other:x", "chat:..:x", "chat:.:x")
		ref := chRefCompile(rules, claims)
		for _, ch := range channels {
			for _, action := range []string{"subscribe", "publish"} {
				got := p.Decide(action, ch, claims)
				if want := ref.decide(action, ch); got != want {
					t.Errorf("claims %.40q: %s %.60q = %v, literal reading says %v", v, action, ch, got, want)
				}
				if got == Allow && ValidateChannel(ch) != nil {
					t.Errorf("claims %.40q: %s %.60q allowed but the channel is not valid", v, action, ch)
				}
				// a value that cannot be a segment's text can only make its
				// rules fail: the answer is the one without the claims
				if !chSegmentText.MatchString(v) && got != p.Decide(action, ch, nil) {
					t.Errorf("claims %.40q: %s %.60q = %v, but without claims %v", v, action, ch, got, p.Decide(action, ch, nil))
				}
			}
		}
	}

	// spelled out, the cases a textual substitution would get wrong
	for _, tc := range []struct {
		org, sub string
		action   string
		channel  string
		want     Effect
	}{
		{"acme", "alice", "subscribe", "chat:acme:x", Allow},
		{"acme:other", "alice", "subscribe", "chat:acme:other:x", Deny},
		{"acme:other", "alice", "subscribe", "chat:acme:other", Deny},
		{"acme:other", "alice", "subscribe", "chat:acme:x", Deny},
		{"acme:*", "alice", "subscribe", "chat:acme:x:y", Deny},
		{"*", "alice", "subscribe", "chat:anyone:x", Deny},
		{"**", "alice", "subscribe", "chat:anyone:x", Deny},
		{"acme", "*", "publish", "chat:acme:bob", Deny},
		{"acme", "alice:**", "subscribe", "user-alice:x", Deny},
		{"acme", "alice:x", "subscribe", "user-alice:x", Deny},
		{"acme", "{claims.org}", "publish", "chat:acme:acme", Deny},
		{"{claims.sub}", "alice", "subscribe", "chat:alice:x", Deny},
		{"..", "alice", "subscribe", "chat:..:x", Allow}, // ".." is plain text
		{"../other", "alice", "subscribe", "chat:other:x", Deny},
		{"acme\x00", "alice", "subscribe", "chat:acme:x", Deny},
		{"\u0430cme", "alice", "subscribe", "chat:acme:x", Deny},
		{"", "alice", "subscribe", "org:-x", Deny},
		{"acme", "", "subscribe", "user-:x", Deny},
		{strings.Repeat("a", 10000), "alice", "subscribe", "chat:" + strings.Repeat("a", 10000) + ":x", Deny},
		{strings.Repeat("a", 10000), "alice", "subscribe", "chat:" + strings.Repeat("a", 128) + ":x", Deny},
		{"other", "alice", "subscribe", "chat:other:x", Deny}, // the earlier deny
	} {
		claims := Claims{"org": tc.org, "sub": tc.sub}
		if got := p.Decide(tc.action, tc.channel, claims); got != tc.want {
			t.Errorf("org %.40q sub %.40q: %s %.60q = %v, want %v", tc.org, tc.sub, tc.action, tc.channel, got, tc.want)
		}
	}

	// channel names made of pattern syntax are never allowed, whatever
	// the policy
	all := chPolicy(t, "allow * **", "allow * *", "allow * {claims.org}")
	for _, ch := range []string{"*", "**", "a:*", "a:**", "{claims.org}", "{", "}", "a:{claims.org}", "*:*"} {
		if all.Decide("subscribe", ch, Claims{"org": ch}) != Deny {
			t.Errorf("channel %q allowed", ch)
		}
	}
}

// TestValidateChannel checks the channel name rules.
func TestValidateChannel(t *testing.T) {
	seg := func(n int) string { return strings.Repeat("a", n) }
	tests := []struct {
		channel string
		ok      bool
	}{
		{"a", true},
		{"chat:acme:general", true},
		{"a-_.@=+~!$&'(),z", true},
		{"A:Z:0:9", true},
		{"..", true},
		{seg(MaxSegmentLen), true},
		{seg(MaxSegmentLen + 1), false},
		{seg(MaxSegmentLen) + ":" + seg(MaxSegmentLen-2), true}, // 255 bytes
		{seg(MaxSegmentLen) + ":" + seg(MaxSegmentLen-1), false},
		{seg(1) + ":" + seg(MaxSegmentLen+1), false},
		{strings.Repeat("a:", 127) + "a", true}, // 255 bytes in 128 segments
		{strings.Repeat("a:", 128) + "a", false},
		{"", false},
		{":", false},
		{"::", false},
		{":a", false},
		{"a:", false},
		{"a::b", false},
		{"a b", false},
		{" a", false},
		{"a\n", false},
		{"a/b", false},
		{"a#b", false},
		{"a?b", false},
		{"a%20b", false},
		{"a*", false},
		{"*", false},
		{"a:**", false},
		{"{a}", false},
		{"a\"b", false},
		{"a\\b", false},
		{"a;b", false},
		{"a[0]", false},
		{"a\x00", false},
		{"a\x7f", false},
		{"caf\u00e9", false},
		{"\u0430", false},
		{"\xff", false},
	}
	for _, tt := range tests {
		err := ValidateChannel(tt.channel)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateChannel(%.60q) = %v, want ok=%v", tt.channel, err, tt.ok)
		}
		if err != nil && !errors.Is(err, ErrChannelName) {
			t.Errorf("ValidateChannel(%.60q) = %v, want ErrChannelName", tt.channel, err)
		}
		if (err == nil) != chRefValidChannel(tt.channel) {
			t.Errorf("reference disagrees on %.60q", tt.channel)
		}
	}
	// every byte, alone and as a segment between others
	const allowed = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@=+~!$&'(),"
	for c := 0; c < 256; c++ {
		want := strings.IndexByte(allowed, byte(c)) >= 0
		for _, ch := range []string{string([]byte{byte(c)}), "a:" + string([]byte{byte(c)}) + ":b", "ab" + string([]byte{byte(c)})} {
			if got := ValidateChannel(ch) == nil; got != want {
				t.Errorf("ValidateChannel(%q) ok = %v, want %v", ch, got, want)
			}
		}
	}
}

// ---- reference matcher ----

// chRefChannel is the channel grammar as one regular expression.
var chRefChannel = regexp.MustCompile(`^[A-Za-z0-9\-_.@=+~!$&'(),]{1,128}(?::[A-Za-z0-9\-_.@=+~!$&'(),]{1,128})*$`)

func chRefValidChannel(ch string) bool {
	return len(ch) <= MaxChannelLen && chRefChannel.MatchString(ch)
}

// chRefDecide is the policy read literally and slowly: each rule, for the
// given claims, becomes a regular expression in which every claim value is
// quoted, and the rules are tried in order. The rules must compile.
func chRefDecide(rules []Rule, action, channel string, claims Claims) Effect {
	return chRefCompile(rules, claims).decide(action, channel)
}

// chRefPolicy is rules turned into regular expressions for one set of
// claims (nil where a rule cannot match).
type chRefPolicy struct {
	rules []Rule
	res   []*regexp.Regexp
}

func chRefCompile(rules []Rule, claims Claims) chRefPolicy {
	rp := chRefPolicy{rules: rules}
	for _, r := range rules {
		rp.res = append(rp.res, chRefRegexp(r.Pattern, claims))
	}
	return rp
}

func (rp chRefPolicy) decide(action, channel string) Effect {
	if !chRefValidChannel(channel) || !utf8.ValidString(action) {
		return Deny
	}
	for i, r := range rp.rules {
		if !slices.Contains(r.Actions, action) && !slices.Contains(r.Actions, "*") {
			continue
		}
		if re := rp.res[i]; re != nil && re.MatchString(channel) {
			return r.Effect
		}
	}
	return Deny
}

// chRefRegexp turns a pattern into a regular expression for claims, or nil
// when a claim it names has no usable value.
func chRefRegexp(pattern string, claims Claims) *regexp.Regexp {
	const seg = `[^:]+`
	segs := strings.Split(pattern, ":") // a valid pattern has no ':' inside {…}
	tail := segs[len(segs)-1] == "**"
	if tail {
		segs = segs[:len(segs)-1]
	}
	var pieces []string
	for _, s := range segs {
		if s == "*" {
			pieces = append(pieces, seg)
			continue
		}
		var b strings.Builder
		for s != "" {
			open := strings.IndexByte(s, '{')
			if open < 0 {
				b.WriteString(regexp.QuoteMeta(s))
				break
			}
			b.WriteString(regexp.QuoteMeta(s[:open]))
			end := strings.IndexByte(s, '}')
			alts := chRefValues(s[open+1:end], claims)
			if len(alts) == 0 {
				return nil
			}
			for i := range alts {
				alts[i] = regexp.QuoteMeta(alts[i])
			}
			b.WriteString("(?:" + strings.Join(alts, "|") + ")")
			s = s[end+1:]
		}
		pieces = append(pieces, b.String())
	}
	body := strings.Join(pieces, ":")
	if tail {
		if len(pieces) == 0 {
			body = seg + `(?::` + seg + `)*`
		} else {
			body += `(?::` + seg + `)*`
		}
	}
	return regexp.MustCompile("^(?:" + body + ")$")
}

// chRefValues lists the texts a placeholder ("claims.a.b" or
// "claims.a[*]") stands for. A value is text inside one segment, so one
// that is empty or holds ':' can stand for nothing. Nor can one that is not
// UTF-8 (regexp cannot quote it, and a valid channel is ASCII).
func chRefValues(ref string, claims Claims) []string {
	each := strings.HasSuffix(ref, "[*]")
	ref = strings.TrimSuffix(strings.TrimPrefix(ref, "claims."), "[*]")
	var v any = map[string]any(claims)
	for _, name := range strings.Split(ref, ".") {
		m, ok := v.(map[string]any)
		if !ok {
			return nil
		}
		if v, ok = m[name]; !ok {
			return nil
		}
	}
	vals := []any{v}
	if each {
		arr, ok := v.([]any)
		if !ok {
			return nil
		}
		vals = arr
	}
	var out []string
	for _, v := range vals {
		var s string
		switch t := v.(type) {
		case string:
			s = t
		case float64:
			s = strconv.FormatFloat(t, 'f', -1, 64)
		case bool:
			s = strconv.FormatBool(t)
		}
		if s != "" && !strings.Contains(s, ":") && utf8.ValidString(s) {
			out = append(out, s)
		}
	}
	return out
}

// ---- fuzzing ----

// chFuzzTokens build patterns; a byte picks a token (b % 10) or ends a
// rule (b % 10 == 9), the rest of the byte then choosing its effect and
// actions.
var chFuzzTokens = []string{"a", "b", ":", "*", "-", "{claims.org}", "{claims.rooms[*]}", "{claims.n}", "{claims.x.y}"}

var chFuzzActions = [][]string{{"subscribe"}, {"publish"}, {"*"}, {"subscribe", "typing"}}

// chFuzzRule is a generated rule as tokens, so the test knows its shape.
type chFuzzRule struct {
	rule   Rule
	tokens []string
}

func chFuzzRules(prog []byte) []chFuzzRule {
	var rules []chFuzzRule
	var cur []string
	for _, b := range prog {
		if len(rules) == 16 {
			break
		}
		if b%10 != 9 {
			cur = append(cur, chFuzzTokens[b%10])
			continue
		}
		eff := Effect((b / 10) % 2)
		rules = append(rules, chFuzzRule{Rule{eff, chFuzzActions[(b/20)%4], strings.Join(cur, "")}, cur})
		cur = nil
	}
	if len(cur) > 0 && len(rules) < 16 {
		rules = append(rules, chFuzzRule{Rule{Allow, []string{"subscribe"}, strings.Join(cur, "")}, cur})
	}
	return rules
}

// chFuzzValid says whether a generated rule should compile, from its
// tokens.
func chFuzzValid(tokens []string) bool {
	pat := strings.Join(tokens, "")
	if pat == "" || len(pat) > 4*MaxChannelLen {
		return false
	}
	var segs [][]string
	cur := []string{}
	for _, tok := range tokens {
		if tok == ":" {
			segs = append(segs, cur)
			cur = []string{}
			continue
		}
		cur = append(cur, tok)
	}
	segs = append(segs, cur)
	for i, s := range segs {
		text := strings.Join(s, "")
		switch {
		case len(s) == 0:
			return false
		case text == "**":
			if i != len(segs)-1 {
				return false
			}
			continue
		case text == "*":
			continue
		case slices.Contains(s, "*"):
			return false
		}
		run := 0 // bytes of text since the last claim
		prevClaim := false
		for _, tok := range s {
			if strings.HasPrefix(tok, "{") {
				if prevClaim {
					return false
				}
				prevClaim, run = true, 0
				continue
			}
			prevClaim = false
			if run += len(tok); run > MaxSegmentLen {
				return false
			}
		}
	}
	return true
}

// chFuzzChannel builds a channel: a byte picks a piece (b % 11), piece 10
// taking the next byte raw.
func chFuzzChannel(prog []byte, org string, rooms []string, n float64) string {
	var b strings.Builder
	for i := 0; i < len(prog); i++ {
		switch prog[i] % 11 {
		case 0:
			b.WriteString("a")
		case 1:
			b.WriteString("b")
		case 2, 3:
			b.WriteString(":")
		case 4:
			b.WriteString("-")
		case 5:
			b.WriteString(org)
		case 6:
			b.WriteString(rooms[0])
		case 7:
			b.WriteString(rooms[len(rooms)-1])
		case 8:
			b.WriteString(strconv.FormatFloat(n, 'f', -1, 64))
		case 9:
			b.WriteString("ab")
		case 10:
			if i+1 < len(prog) {
				i++
				b.WriteByte(prog[i])
			}
		}
	}
	return b.String()
}

// FuzzChannelPolicy compares Decide with chRefDecide on generated rules,
// claims that may hold separators and wildcards, and channels built from
// the same pieces. Seeds are in testdata/fuzz/FuzzChannelPolicy.
func FuzzChannelPolicy(f *testing.F) {
	f.Fuzz(func(t *testing.T, prog []byte, org, rooms string, chprog []byte, n float64, flags uint8) {
		gen := chFuzzRules(prog)
		rules := make([]Rule, len(gen))
		firstBad := 0
		for i, g := range gen {
			rules[i] = g.rule
			if firstBad == 0 && !chFuzzValid(g.tokens) {
				firstBad = i + 1
			}
		}
		p, err := CompileChannelPolicy(rules)
		if firstBad > 0 {
			var pe *PolicyError
			if !errors.As(err, &pe) {
				t.Fatalf("rules %q: error %v, want rule %d refused", rules, err, firstBad)
			}
			if pe.Rule != firstBad {
				t.Fatalf("rules %q: %v, want rule %d refused", rules, err, firstBad)
			}
			if pe.Pos < 1 || pe.Pos > len(rules[firstBad-1].Pattern)+1 {
				t.Fatalf("rules %q: %v: position out of the pattern", rules, err)
			}
			return
		}
		if err != nil {
			t.Fatalf("rules %q: %v", rules, err)
		}

		roomList := strings.Split(rooms, ",")
		arr := make([]any, 0, len(roomList)+1)
		for _, r := range roomList {
			arr = append(arr, r)
		}
		if flags&2 != 0 {
			arr = append(arr, n)
		}
		claims := Claims{"n": n}
		if flags&1 == 0 {
			claims["org"] = org
		}
		if flags&4 == 0 {
			claims["rooms"] = arr
		} else if flags&16 != 0 {
			claims["rooms"] = org // not an array
		}
		if flags&8 == 0 {
			claims["x"] = map[string]any{"y": org}
		}
		if flags&32 != 0 {
			delete(claims, "n")
		}

		channel := chFuzzChannel(chprog, org, roomList, n)
		ref := chRefCompile(rules, claims)
		for _, action := range []string{"subscribe", "publish", "typing", ""} {
			got := p.Decide(action, channel, claims)
			if want := ref.decide(action, channel); got != want {
				t.Fatalf("rules %q\nclaims %v\n%s %q: %v, reference says %v", rules, claims, action, channel, got, want)
			}
		}
	})
}

func TestUsesClaims(t *testing.T) {
	tests := []struct {
		pattern string
		want    bool
	}{
		{"chat:*", false},
		{"chat:**", false},
		{"org:{claims.org}:*", true},
		{"room:{claims.rooms[*]}", true},
		{"user-{claims.sub}", true},
	}
	for _, tt := range tests {
		t.Run(tt.pattern, func(t *testing.T) {
			p, err := CompileChannelPolicy([]Rule{{Effect: Allow, Actions: []string{"*"}, Pattern: "lobby"}, {Effect: Allow, Actions: []string{"*"}, Pattern: tt.pattern}})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.UsesClaims(); got != tt.want {
				t.Errorf("UsesClaims() = %v, want %v", got, tt.want)
			}
		})
	}
}
