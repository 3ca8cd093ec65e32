package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestChannelPolicyOnRelayedFrames: a legacy chat app with its own JSON
// protocol ({"type":"join"|"say","room":…}); two users from two orgs may
// join and speak only in their own org's rooms. Forbidden frames never
// reach the app, and the client gets the configured error.
func TestChannelPolicyOnRelayedFrames(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, fmt.Sprintf(`		jwt {
			secret %s
		}
		channels {
			deny  publish   org:*:announcements
			allow subscribe org:{claims.org}:**
			allow publish   org:{claims.org}:*
			allow publish   org:{claims.org}:announcements:{claims.sub}
		}
		relay_channels {
			action_field type
			channel_field room
			action subscribe join
			action publish say
			deny_reply `+"`"+`{"type":"error","code":"forbidden","room":{channel}}`+"`"+`
		}`, k.hmac)))

	type user struct {
		name, org string
		c         *websocket.Conn
	}
	users := []*user{{name: "alice", org: "acme"}, {name: "bob", org: "globex"}}
	for _, u := range users {
		u.c = dial(t, g, "/ws", &websocket.DialOptions{HTTPHeader: bearerH(k.sign(t, "HS256", "", claims("", u.name, "org", u.org)))})
	}
	ctx := ctxT(t, 30*time.Second)
	drainUpstream := func() {
		for len(up.received) > 0 {
			<-up.received
		}
	}
	drainUpstream()

	var want []string // what the app must receive, in order
	type step struct {
		msg     string
		allowed bool
	}
	for _, u := range users {
		other := "globex"
		if u.org == "globex" {
			other = "acme"
		}
		steps := []step{
			{fmt.Sprintf(`{"type":"join","room":"org:%s:general"}`, u.org), true},
			{fmt.Sprintf(`{"type":"join","room":"org:%s:general:threads:7"}`, u.org), true},
			{fmt.Sprintf(`{"type":"say","room":"org:%s:general","text":"hi"}`, u.org), true},
			{fmt.Sprintf(`{"type":"join","room":"org:%s:general"}`, other), false},
			{fmt.Sprintf(`{"type":"say","room":"org:%s:general","text":"hi"}`, other), false},
			{fmt.Sprintf(`{"type":"say","room":"org:%s:announcements"}`, u.org), false},
			{fmt.Sprintf(`{"type":"say","room":"org:%s:announcements:%s"}`, u.org, u.name), true},
			{fmt.Sprintf(`{"type":"join","room":"org:%s:general","room":"org:%s:general"}`, u.org, other), false}, // duplicate key
			{fmt.Sprintf(`{"type":"join","r\u006fom":"org:%s:general"}`, other), false},                           // escaped key
			{fmt.Sprintf(`{"type":"join","room":"org:%s:*"}`, other), false},                                      // wildcard in a channel
			{fmt.Sprintf(`{"type":"kick","room":"org:%s:general"}`, u.org), false},                                // an action no rule allows
			{`{"type":"typing"}`, true},       // names no channel: unmatched pass
			{`plain text frame`, true},        // not JSON: unmatched pass
			{`{"type":"join","room":`, false}, // broken JSON object: denied
		}
		for _, s := range steps {
			if err := u.c.Write(ctx, websocket.MessageText, []byte(s.msg)); err != nil {
				t.Fatal(err)
			}
			_, reply, err := u.c.Read(ctx)
			if err != nil {
				t.Fatalf("%s %s: %v", u.name, s.msg, err)
			}
			if s.allowed {
				want = append(want, s.msg)
				if string(reply) != s.msg {
					t.Fatalf("%s: %s was not relayed: got %s", u.name, s.msg, reply)
				}
				continue
			}
			var e struct{ Type, Code, Room string }
			if json.Unmarshal(reply, &e) != nil || e.Type != "error" || e.Code != "forbidden" {
				t.Fatalf("%s: %s: got %s, want the configured error", u.name, s.msg, reply)
			}
		}
		// A forbidden join sent in fragments is judged as a whole.
		w, _ := u.c.Writer(ctx, websocket.MessageText)
		w.Write([]byte(`{"type":"join",`))
		w.Write([]byte(fmt.Sprintf(`"room":"org:%s:secret"}`, other)))
		w.Close()
		if _, reply, err := u.c.Read(ctx); err != nil || !strings.Contains(string(reply), "forbidden") {
			t.Fatalf("%s: fragmented forbidden join: %v %s", u.name, err, reply)
		}
		// …and an allowed one arrives whole.
		w, _ = u.c.Writer(ctx, websocket.MessageText)
		w.Write([]byte(`{"type":"join",`))
		w.Write([]byte(fmt.Sprintf(`"room":"org:%s:frag"}`, u.org)))
		w.Close()
		whole := fmt.Sprintf(`{"type":"join","room":"org:%s:frag"}`, u.org)
		want = append(want, whole)
		if _, reply, err := u.c.Read(ctx); err != nil || string(reply) != whole {
			t.Fatalf("%s: fragmented allowed join: %v %s", u.name, err, reply)
		}
	}
	// The app received exactly the allowed frames, nothing forbidden.
	var got []string
	for len(up.received) > 0 {
		got = append(got, string(<-up.received))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("the upstream received:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// structUpstream is a Go app that decodes every message, text or binary,
// into a struct with encoding/json (case-insensitive keys, the last
// duplicate wins), as gorilla's ReadJSON does; a leading byte order mark
// is dropped, as a browser's TextDecoder does, and a top-level array is a
// batch. Every join it decodes is sent on joins; it answers each message
// with "ok".
type structUpstream struct {
	URL   string
	joins chan string
}

func startStructUpstream(t testing.TB) *structUpstream {
	t.Helper()
	u := &structUpstream{joins: make(chan string, 1024)}
	ln := listen(t)
	u.URL = "ws://" + ln.Addr().String()
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
		if err != nil {
			return
		}
		defer c.CloseNow()
		type msg struct{ Type, Channel string }
		for {
			_, b, err := c.Read(r.Context())
			if err != nil {
				return
			}
			b = bytes.TrimPrefix(b, []byte("\uFEFF"))
			var batch []msg
			if bytes.HasPrefix(b, []byte("[")) {
				json.Unmarshal(b, &batch)
			} else {
				var m msg
				json.Unmarshal(b, &m)
				batch = append(batch, m)
			}
			for _, m := range batch {
				if m.Type == "join" {
					u.joins <- m.Channel
				}
			}
			if c.Write(r.Context(), websocket.MessageText, []byte("ok")) != nil {
				return
			}
		}
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return u
}

// TestChannelPolicyAgreesWithJSONUpstream sends, through the built binary
// with the default "unmatched pass", messages in which a Go or a browser
// upstream reads another channel or action than the exact keys of a text
// object say: case variants of a key, binary frames, a byte order mark,
// batches. Each is refused, and the app joins only what the policy allows.
func TestChannelPolicyAgreesWithJSONUpstream(t *testing.T) {
	k := newKeys(t)
	up := startStructUpstream(t)
	g := startGateway(t, relaySite(up.URL, fmt.Sprintf(`		jwt {
			secret %s
		}
		channels {
			allow join  chat:{claims.org}:*
			allow leave chat:*:*
		}
		relay_channels {
			action_field type
			channel_field channel
		}`, k.hmac)))
	c := dial(t, g, "/ws", &websocket.DialOptions{HTTPHeader: bearerH(k.sign(t, "HS256", "", claims("", "alice", "org", "acme")))})
	ctx := ctxT(t, 30*time.Second)
	text, binary := websocket.MessageText, websocket.MessageBinary
	steps := []struct {
		name    string
		typ     websocket.MessageType
		msg     string
		allowed bool
	}{
		{"allowed join", text, `{"type":"join","channel":"chat:acme:1"}`, true},
		{"a second channel key in capitals", text, `{"type":"join","channel":"chat:acme:1","CHANNEL":"chat:evil:1"}`, false},
		{"a channel key in capitals first", text, `{"Channel":"chat:evil:1","type":"join","channel":"chat:acme:1"}`, false},
		{"an action smuggled in capitals", text, `{"type":"leave","TYPE":"join","channel":"chat:evil:1"}`, false},
		{"a forbidden join in a binary frame", binary, `{"type":"join","channel":"chat:evil:2"}`, false},
		{"an allowed join in a binary frame", binary, `{"type":"join","channel":"chat:acme:3"}`, true},
		{"a forbidden join after a byte order mark", text, "\uFEFF" + `{"type":"join","channel":"chat:evil:3"}`, false},
		{"a forbidden join in a batch", text, `[{"type":"join","channel":"chat:acme:4"},{"type":"join","channel":"chat:evil:4"}]`, false},
		{"an allowed batch", text, `[{"type":"join","channel":"chat:acme:5"},{"type":"leave","channel":"chat:evil:5"}]`, true},
		{"no channel: unmatched pass", text, `{"type":"typing"}`, true},
	}
	var want []string
	for _, s := range steps {
		if err := c.Write(ctx, s.typ, []byte(s.msg)); err != nil {
			t.Fatal(err)
		}
		_, reply, err := c.Read(ctx)
		if err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if s.allowed {
			if string(reply) != "ok" {
				t.Fatalf("%s: not relayed, got %s", s.name, reply)
			}
			var batch []struct{ Type, Channel string }
			if json.Unmarshal([]byte(s.msg), &batch) != nil {
				batch = batch[:0]
				var m struct{ Type, Channel string }
				json.Unmarshal([]byte(s.msg), &m)
				batch = append(batch, m)
			}
			for _, m := range batch {
				if m.Type == "join" {
					want = append(want, m.Channel)
				}
			}
			continue
		}
		if !strings.Contains(string(reply), "forbidden") {
			t.Fatalf("%s: got %s, want the deny reply", s.name, reply)
		}
	}
	var got []string
	for len(up.joins) > 0 {
		got = append(got, <-up.joins)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Fatalf("the app joined %q, want %q", got, want)
	}
}
