package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const presenceChannel = "room:lobby"

// presenceClient is a wsgate.v1 client on coder/websocket that keeps the
// join and leave events it is sent apart from the replies.
type presenceClient struct {
	t       *testing.T
	c       *websocket.Conn
	next    int
	events  chan presenceEvent
	replies chan map[string]any
}

type presenceEvent struct {
	Op   string `json:"op"`
	Conn string `json:"conn"`
}

func dialPresence(t *testing.T, g *gateway) *presenceClient {
	t.Helper()
	c := dial(t, g, "/ws", &websocket.DialOptions{Subprotocols: []string{"wsgate.v1"}, HTTPHeader: http.Header{}})
	pc := &presenceClient{t: t, c: c, events: make(chan presenceEvent, 256), replies: make(chan map[string]any, 16)}
	go func() {
		for {
			_, b, err := c.Read(context.Background())
			if err != nil {
				close(pc.replies)
				return
			}
			var m map[string]any
			json.Unmarshal(b, &m)
			switch m["op"] {
			case "join", "leave":
				var e presenceEvent
				json.Unmarshal(b, &e)
				pc.events <- e
			case "message":
			default:
				pc.replies <- m
			}
		}
	}()
	return pc
}

func (pc *presenceClient) call(req map[string]any) map[string]any {
	pc.t.Helper()
	pc.next++
	req["id"] = pc.next
	b, _ := json.Marshal(req)
	if err := pc.c.Write(ctxT(pc.t, 5*time.Second), websocket.MessageText, b); err != nil {
		pc.t.Fatal(err)
	}
	select {
	case r, ok := <-pc.replies:
		if !ok || r["op"] != "ok" {
			pc.t.Fatalf("%s: %v", b, r)
		}
		return r
	case <-time.After(5 * time.Second):
		pc.t.Fatalf("%s: no reply", b)
	}
	return nil
}

// members asks for the channel's presence and returns the connection ids.
func (pc *presenceClient) members() []string {
	pc.t.Helper()
	r := pc.call(map[string]any{"op": "presence", "channel": presenceChannel})
	var ids []string
	for _, e := range r["presence"].([]any) {
		ids = append(ids, e.(map[string]any)["conn"].(string))
	}
	slices.Sort(ids)
	return ids
}

// nextEvent waits for the observer's next join or leave.
func (pc *presenceClient) nextEvent() presenceEvent {
	pc.t.Helper()
	select {
	case e := <-pc.events:
		return e
	case <-time.After(5 * time.Second):
		pc.t.Fatal("no presence event within 5s")
	}
	return presenceEvent{}
}

// TestPresenceAcrossNodes: subscribers join and leave on two nodes; the
// presence list read on either node is exact within 1s of each change,
// the join and leave events reach a subscriber in the order of the
// changes, and the entries of a node killed with -9 are gone within the
// presence TTL (2s).
func TestPresenceAcrossNodes(t *testing.T) {
	_, a, b := historyNodes(t)
	obs := dialPresence(t, a)
	readerA, readerB := dialPresence(t, a), dialPresence(t, b)
	obs.call(map[string]any{"op": "subscribe", "channel": presenceChannel})
	self := obs.nextEvent()
	if self.Op != "join" {
		t.Fatalf("first event %+v, want the observer's own join", self)
	}
	want := []string{self.Conn}
	var slowest time.Duration
	exact := func(what string) {
		t.Helper()
		slices.Sort(want)
		start := time.Now()
		deadline := start.Add(time.Second)
		for {
			ga, gb := readerA.members(), readerB.members()
			if slices.Equal(ga, want) && slices.Equal(gb, want) {
				slowest = max(slowest, time.Since(start))
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: presence on A %v, on B %v; want %v", what, ga, gb, want)
			}
			pollPause()
		}
	}
	members := map[int]*presenceClient{}
	ids := map[int]string{}
	for i := range 6 {
		g := a
		if i%2 == 1 {
			g = b
		}
		m := dialPresence(t, g)
		m.call(map[string]any{"op": "subscribe", "channel": presenceChannel})
		e := obs.nextEvent()
		if e.Op != "join" || slices.Contains(want, e.Conn) {
			t.Fatalf("member %d joined: event %+v", i, e)
		}
		members[i], ids[i] = m, e.Conn
		want = append(want, e.Conn)
		exact(fmt.Sprintf("after member %d joined", i))
	}
	leave := func(i int, how func(*presenceClient)) {
		t.Helper()
		how(members[i])
		if e := obs.nextEvent(); e.Op != "leave" || e.Conn != ids[i] {
			t.Fatalf("member %d left: event %+v, want leave %s", i, e, ids[i])
		}
		want = slices.DeleteFunc(want, func(id string) bool { return id == ids[i] })
		exact(fmt.Sprintf("after member %d left", i))
	}
	leave(0, func(m *presenceClient) { m.call(map[string]any{"op": "unsubscribe", "channel": presenceChannel}) })
	leave(1, func(m *presenceClient) { m.call(map[string]any{"op": "unsubscribe", "channel": presenceChannel}) })
	leave(2, func(m *presenceClient) { m.c.CloseNow() })
	leave(3, func(m *presenceClient) { m.c.Close(websocket.StatusNormalClosure, "") })
	if r := readerB.call(map[string]any{"op": "presence_count", "channel": presenceChannel}); r["count"] != float64(len(want)) {
		t.Fatalf("presence_count %v, want %d", r["count"], len(want))
	}
	t.Logf("6 joins and 4 leaves on two nodes: every list exact on both nodes within %v", slowest.Round(time.Millisecond))

	// Member 5 is on B; killed with -9, B removes nothing: its entry
	// expires.
	killed := time.Now()
	b.terminate(syscall.SIGKILL, 10*time.Second)
	want = slices.DeleteFunc(want, func(id string) bool { return id == ids[5] })
	slices.Sort(want)
	for !slices.Equal(readerA.members(), want) {
		if time.Since(killed) > 5*time.Second {
			t.Fatalf("the killed node's entry still listed after 5s: %v", readerA.members())
		}
		pollPause()
	}
	gone := time.Since(killed)
	t.Logf("the killed node's entry gone %v after the kill (ttl 2s)", gone.Round(time.Millisecond))
	// Entries expire 2s after the node's last refresh, which came before
	// the kill; the slack is for seeing it here on a busy machine.
	if gone > 3*time.Second {
		t.Fatalf("gone after %v, want within the ttl of 2s", gone)
	}
	if got := strings.Join(readerA.members(), ","); strings.Contains(got, ids[5]) {
		t.Fatal("entry back")
	}
}
