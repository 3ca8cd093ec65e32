package policy

import (
	"fmt"
	"strings"
	"testing"
)

// benchClaims are a typical token's claims.
var benchClaims = Claims{
	"sub":    "alice",
	"org":    "acme",
	"rooms":  []any{"r1", "r2", "r3", "lobby"},
	"tenant": map[string]any{"id": "t-42"},
	"uid":    1234.0,
	"admin":  false,
}

// benchTail is a realistic policy; its last rule allows the query
// "subscribe chat:acme:general", so every rule before it is tried.
var benchTail = []string{
	"deny publish chat:*:announcements",
	"allow subscribe user:{claims.sub}:**",
	"allow publish user:{claims.sub}:inbox",
	"allow subscribe org:{claims.tenant.id}:status",
	"allow subscribe,publish room:{claims.rooms[*]}",
	"deny * admin:**",
	"allow subscribe feed:public:*",
	"allow typing,react chat:{claims.org}:*",
	"allow publish chat:{claims.org}:{claims.sub}",
	"allow subscribe chat:{claims.org}:*",
}

// benchFiller are rules that do not match the benchmark queries but make
// the matcher work: same first segment, claims to look up, ** tails.
func benchFiller(n int) []string {
	forms := []string{
		"allow subscribe chat:{claims.org}-%d:*",
		"deny publish svc%d:*:**",
		"allow subscribe chat:acme:general-%d",
		"allow * team-{claims.rooms[*]}-%d:**",
		"allow subscribe,publish chat:*:x%d",
		"allow subscribe u{claims.uid}-%d:*",
	}
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf(forms[i%len(forms)], i)
	}
	return out
}

func benchDecide(b *testing.B, rules []string, action, channel string) {
	p := chPolicy(b, rules...)
	if p.Decide(action, channel, benchClaims) != Allow {
		b.Fatalf("%s %s is not allowed", action, channel)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if p.Decide(action, channel, benchClaims) != Allow {
			b.Fatal("denied")
		}
	}
}

func benchDecideN(b *testing.B, n int) {
	late := append(benchFiller(n-len(benchTail)), benchTail...)
	// the deciding rule second: "subscribe user:alice:notifications"
	early := append([]string{benchTail[0], benchTail[1]}, benchFiller(n-len(benchTail))...)
	early = append(early, benchTail[2:]...)
	b.Run("last rule decides", func(b *testing.B) {
		benchDecide(b, late, "subscribe", "chat:acme:general")
	})
	b.Run("second rule decides", func(b *testing.B) {
		benchDecide(b, early, "subscribe", "user:alice:notifications")
	})
	b.Run("array claim decides", func(b *testing.B) {
		benchDecide(b, late, "publish", "room:lobby")
	})
	b.Run("every rule tried, allow ** decides", func(b *testing.B) {
		rules := append(late[:len(late):len(late)], "allow * **")
		benchDecide(b, rules, "subscribe", "nowhere:x:y")
	})
}

func BenchmarkDecide10Rules(b *testing.B)  { benchDecideN(b, 10) }
func BenchmarkDecide100Rules(b *testing.B) { benchDecideN(b, 100) }

// benchMessage is a typical 200-byte chat message.
var benchMessage = []byte(`{"type":"message","channel":"chat:acme:general","id":"c0ffee-42",` +
	`"payload":{"text":"deploy finished, dashboards look green","mentions":["bob","carol"],` +
	`"ts":1718000000123,"reply_to":null}}`)

func BenchmarkExtractJSONFields(b *testing.B) {
	paths := []FieldPath{{"channel"}, {"type"}}
	vals := make([]string, 2)
	found := make([]bool, 2)
	b.SetBytes(int64(len(benchMessage)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := ExtractJSONFields(benchMessage, paths, vals, found); err != nil || !found[0] || !found[1] {
			b.Fatal(err, found)
		}
	}
}

func BenchmarkExtractJSONFieldBytes(b *testing.B) {
	paths := []FieldPath{{"channel"}, {"type"}}
	vals := make([][]byte, 2)
	found := make([]bool, 2)
	b.SetBytes(int64(len(benchMessage)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := ExtractJSONFieldBytes(benchMessage, paths, vals, found); err != nil || !found[0] || !found[1] {
			b.Fatal(err, found)
		}
	}
}

// benchMessage4K is a 4 KiB message whose bulk is one long string, as in
// the throughput benchmark.
var benchMessage4K = []byte(`{"type":"say","room":"org:acme:1","p":"` + strings.Repeat("x", 4096-len(`{"type":"say","room":"org:acme:1","p":""}`)) + `"}`)

func BenchmarkExtractJSONFieldBytes4K(b *testing.B) {
	paths := []FieldPath{{"room"}, {"type"}}
	vals := make([][]byte, 2)
	found := make([]bool, 2)
	b.SetBytes(int64(len(benchMessage4K)))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		if err := ExtractJSONFieldBytes(benchMessage4K, paths, vals, found); err != nil || !found[0] || !found[1] {
			b.Fatal(err, found)
		}
	}
}

// BenchmarkMessageFieldsRead64 reads the channel and action of the relay
// throughput benchmark's 64 B message.
func BenchmarkMessageFieldsRead64(b *testing.B) {
	m, err := NewMessageFields("room", "type")
	if err != nil {
		b.Fatal(err)
	}
	msg := []byte(`{"type":"say","room":"org:acme:1","p":"0123456789abcdefxxxxxxxxx"}`)
	var sc FieldScratch
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		var ch []byte
		if err := m.Read(msg, false, &sc, func(c, _ []byte) { ch = c }); err != nil || string(ch) != "org:acme:1" {
			b.Fatal(err, string(ch))
		}
	}
}
