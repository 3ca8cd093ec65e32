package integration

import (
	"encoding/json"
	"fmt"
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
