package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

// fakeConns is a node's connections, made up.
type fakeConns struct {
	mu     sync.Mutex
	list   []*proxy.ConnInfo
	closed []string // "<id> <code> <reason>"
}

func (f *fakeConns) Conns() []*proxy.ConnInfo {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.list)
}

func (f *fakeConns) Disconnect(match func(*proxy.ConnInfo) bool, code uint16, reason string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, m := range f.list {
		if match(m) {
			f.closed = append(f.closed, fmt.Sprintf("%s %d %s", m.ID, code, reason))
			n++
		}
	}
	return n
}

// fakeNode is one node of a made-up cluster.
type fakeNode struct {
	conns *fakeConns
	hub   *rooms.Hub
	mute  bool // receives requests but never answers
}

// fakeCluster is a broker that links fake nodes the way Redis does: every
// node answers a request, through JSON.
type fakeCluster struct {
	*broker.Memory
	nodes []*fakeNode
	down  bool
}

func (c *fakeCluster) Gather(_ context.Context, body []byte) ([][]byte, int, error) {
	if c.down {
		return nil, 0, fmt.Errorf("%w: test", broker.ErrUnavailable)
	}
	var out [][]byte
	for _, n := range c.nodes {
		if n.mute {
			continue
		}
		var req adminRequest
		if err := json.Unmarshal(body, &req); err != nil || req.check() != nil {
			return nil, 0, fmt.Errorf("a node could not read %s", body)
		}
		b, _ := json.Marshal(answerLocal(n.conns, n.hub, req))
		out = append(out, b)
	}
	return out, len(c.nodes), nil
}

// newFakeNode makes a node with the given connections; a connection's
// channels are subscribed on the node's hub.
func newFakeNode(t *testing.T, conns ...*proxy.ConnInfo) *fakeNode {
	t.Helper()
	h := rooms.NewHub()
	h.SetBroker(broker.NewMemory(h.Handle))
	n := &fakeNode{conns: &fakeConns{list: conns}, hub: h}
	for _, m := range conns {
		if m.Channels == nil {
			continue
		}
		rc := rooms.NewConn(h, rooms.ConnConfig{})
		for _, ch := range m.Channels() {
			if err := rc.Subscribe(context.Background(), ch); err != nil {
				t.Fatal(err)
			}
		}
	}
	return n
}

func conn(id, subject, remote, handler, mode string, channels ...string) *proxy.ConnInfo {
	m := &proxy.ConnInfo{ID: id, Subject: subject, Remote: remote, Handler: handler, Mode: mode, Started: time.Unix(1_700_000_000, 0)}
	if channels != nil {
		m.Channels = func() []string { return channels }
	}
	return m
}

// newAdmin serves the API over the nodes (the first is "this" node).
func newAdmin(nodes ...*fakeNode) (*adminServer, *fakeCluster) {
	c := &fakeCluster{Memory: broker.NewMemory(func(string, broker.Message) {}), nodes: nodes}
	sh := &sharedHub{hub: nodes[0].hub, broker: c}
	return &adminServer{conns: nodes[0].conns, hub: func() *sharedHub { return sh }}, c
}

// call runs one request; it returns the status and decoded body, or the
// status of the API error (Caddy writes those as {"error": …}).
func call(t *testing.T, h caddy.AdminHandlerFunc, method, target, body string) (int, map[string]any, error) {
	t.Helper()
	w := httptest.NewRecorder()
	r := httptest.NewRequest(method, target, strings.NewReader(body))
	if err := h(w, r); err != nil {
		var ae caddy.APIError
		if !errors.As(err, &ae) {
			t.Fatalf("%s %s: error %v is not an APIError", method, target, err)
		}
		return ae.HTTPStatus, nil, err
	}
	var got map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
		t.Fatalf("%s %s: body %q: %v", method, target, w.Body.String(), err)
	}
	if ct := w.Header().Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s %s: Content-Type %q", method, target, ct)
	}
	return w.Code, got, nil
}

func ids(t *testing.T, body map[string]any) []string {
	t.Helper()
	var out []string
	for _, c := range body["connections"].([]any) {
		out = append(out, c.(map[string]any)["id"].(string))
	}
	return out
}

func twoNodes(t *testing.T) (*adminServer, *fakeCluster) {
	a := newFakeNode(t,
		conn("a1", "u-1", "10.0.0.1", "chat", "rooms", "room:1", "room:2"),
		conn("a2", "u-2", "10.0.0.2", "chat", "rooms", "room:2"),
		conn("a3", "", "192.168.1.9", "legacy", "relay"),
		conn("a4", "u-3", "2001:db8::7", "legacy", "relay", "news"),
	)
	b := newFakeNode(t,
		conn("b1", "u-1", "10.0.1.1", "chat", "rooms", "room:2"),
		conn("b2", "u-4", "10.0.1.2", "chat", "rooms", "room:3"),
		conn("b3", "u-1", "192.168.1.10", "legacy", "relay"),
	)
	return newAdmin(a, b)
}

// TestAdminConnectionFilters: every filter selects across both nodes.
func TestAdminConnectionFilters(t *testing.T) {
	s, _ := twoNodes(t)
	tests := []struct {
		query string
		want  []string
	}{
		{"", []string{"a1", "a2", "a3", "a4", "b1", "b2", "b3"}},
		{"subject=u-1", []string{"a1", "b1", "b3"}},
		{"remote=10.0.0.2", []string{"a2"}},
		{"remote=10.0.0.0/16", []string{"a1", "a2", "b1", "b2"}},
		{"remote=2001:db8::/32", []string{"a4"}},
		{"handler=legacy", []string{"a3", "a4", "b3"}},
		{"mode=rooms", []string{"a1", "a2", "b1", "b2"}},
		{"channel=room:2", []string{"a1", "a2", "b1"}},
		{"channel=room:2&subject=u-1", []string{"a1", "b1"}},
		{"id=b2", []string{"b2"}},
		{"subject=nobody", nil},
	}
	for _, tt := range tests {
		t.Run(tt.query, func(t *testing.T) {
			code, body, err := call(t, s.handleConnections, "GET", "/wsgate/connections?"+tt.query, "")
			if err != nil || code != 200 {
				t.Fatalf("status %d, %v", code, err)
			}
			if got := ids(t, body); !slices.Equal(got, tt.want) {
				t.Fatalf("ids %v, want %v", got, tt.want)
			}
			if body["nodes"] != 2.0 || body["answered"] != 2.0 || body["partial"] != nil || body["next_cursor"] != nil {
				t.Fatalf("status fields: %v", body)
			}
			code, body, err = call(t, s.handleConnections, "GET", "/wsgate/connections?count&"+tt.query, "")
			if err != nil || code != 200 || body["count"] != float64(len(tt.want)) || body["connections"] != nil {
				t.Fatalf("count: status %d, %v, body %v; want count %d", code, err, body, len(tt.want))
			}
		})
	}
	_, body, _ := call(t, s.handleConnections, "GET", "/wsgate/connections?id=a1", "")
	got := body["connections"].([]any)[0].(map[string]any)
	want := map[string]any{"id": "a1", "node": nodeName, "subject": "u-1", "remote": "10.0.0.1", "handler": "chat",
		"mode": "rooms", "started": time.Unix(1_700_000_000, 0).Format(time.RFC3339), "channels": []any{"room:1", "room:2"}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("entry %v, want %v", got, want)
	}
}

// TestAdminConnectionPages: pages follow the cursor in id order across the
// nodes, with no connection twice or missed, and the last has no cursor.
func TestAdminConnectionPages(t *testing.T) {
	s, _ := twoNodes(t)
	for _, limit := range []int{1, 2, 3, 6, 7, 8} {
		t.Run(fmt.Sprint(limit), func(t *testing.T) {
			var all []string
			target := fmt.Sprintf("/wsgate/connections?limit=%d", limit)
			for pages := 0; ; pages++ {
				if pages > 7 {
					t.Fatalf("more than 7 pages: %v", all)
				}
				code, body, err := call(t, s.handleConnections, "GET", target, "")
				if err != nil || code != 200 {
					t.Fatalf("status %d, %v", code, err)
				}
				page := ids(t, body)
				if len(page) > limit {
					t.Fatalf("page of %d with limit %d", len(page), limit)
				}
				all = append(all, page...)
				next, _ := body["next_cursor"].(string)
				if next == "" {
					break
				}
				target = fmt.Sprintf("/wsgate/connections?limit=%d&cursor=%s", limit, next)
			}
			if want := []string{"a1", "a2", "a3", "a4", "b1", "b2", "b3"}; !slices.Equal(all, want) {
				t.Fatalf("pages gave %v, want %v", all, want)
			}
		})
	}
}

// TestAdminChannels: channels are listed with their subscribers summed
// over the nodes, paged, and filtered by prefix.
func TestAdminChannels(t *testing.T) {
	s, _ := twoNodes(t)
	list := func(query string) ([]string, string) {
		t.Helper()
		code, body, err := call(t, s.handleChannels, "GET", "/wsgate/channels?"+query, "")
		if err != nil || code != 200 {
			t.Fatalf("%s: status %d, %v", query, code, err)
		}
		var out []string
		for _, c := range body["channels"].([]any) {
			m := c.(map[string]any)
			out = append(out, fmt.Sprintf("%s=%v", m["channel"], m["subscribers"]))
		}
		next, _ := body["next_cursor"].(string)
		return out, next
	}
	if got, next := list(""); !slices.Equal(got, []string{"news=1", "room:1=1", "room:2=3", "room:3=1"}) || next != "" {
		t.Fatalf("all channels: %v (cursor %q)", got, next)
	}
	if got, _ := list("prefix=room:"); !slices.Equal(got, []string{"room:1=1", "room:2=3", "room:3=1"}) {
		t.Fatalf("prefix room: %v", got)
	}
	var pages []string
	q := "limit=1"
	for range 5 {
		got, next := list(q)
		pages = append(pages, got...)
		if next == "" {
			break
		}
		q = "limit=1&cursor=" + next
	}
	if !slices.Equal(pages, []string{"news=1", "room:1=1", "room:2=3", "room:3=1"}) {
		t.Fatalf("pages of one: %v", pages)
	}
}

// TestAdminDisconnect: a subject or an id is closed on every node with
// the code and reason given; the default code is 1000.
func TestAdminDisconnect(t *testing.T) {
	tests := []struct {
		body       string
		disc       float64
		wantA      []string
		wantB      []string
		wantStatus int
	}{
		{`{"subject":"u-1","code":4001,"reason":"account disabled"}`, 3,
			[]string{"a1 4001 account disabled"}, []string{"b1 4001 account disabled", "b3 4001 account disabled"}, 200},
		{`{"id":"b2"}`, 1, nil, []string{"b2 1000 "}, 200},
		{`{"id":"zz","code":3000,"reason":"x"}`, 0, nil, nil, 200},
	}
	for _, tt := range tests {
		t.Run(tt.body, func(t *testing.T) {
			s, c := twoNodes(t)
			code, body, err := call(t, s.handleDisconnect, "POST", "/wsgate/disconnect", tt.body)
			if err != nil || code != tt.wantStatus || body["disconnected"] != tt.disc || body["partial"] != nil {
				t.Fatalf("status %d, %v, body %v", code, err, body)
			}
			if a, b := c.nodes[0].conns.closed, c.nodes[1].conns.closed; !slices.Equal(a, tt.wantA) || !slices.Equal(b, tt.wantB) {
				t.Fatalf("closed %q and %q, want %q and %q", a, b, tt.wantA, tt.wantB)
			}
		})
	}
}

// TestAdminPartial: a node that does not answer, or a broker that is
// down, makes the answer partial and says why; a disconnect that may have
// missed a node is a 503 (it can be repeated).
func TestAdminPartial(t *testing.T) {
	s, c := twoNodes(t)
	c.nodes[1].mute = true
	code, body, _ := call(t, s.handleConnections, "GET", "/wsgate/connections", "")
	if code != 200 || body["partial"] != true || body["nodes"] != 2.0 || body["answered"] != 1.0 ||
		!strings.Contains(body["error"].(string), "1 of 2 nodes did not answer") || len(ids(t, body)) != 4 {
		t.Fatalf("with a mute node: %d %v", code, body)
	}
	code, body, _ = call(t, s.handleDisconnect, "POST", "/wsgate/disconnect", `{"subject":"u-1"}`)
	if code != 503 || body["partial"] != true || body["disconnected"] != 1.0 {
		t.Fatalf("disconnect with a mute node: %d %v", code, body)
	}

	c.nodes[1].mute, c.down = false, true
	code, body, _ = call(t, s.handleConnections, "GET", "/wsgate/connections?count", "")
	if code != 200 || body["partial"] != true || body["count"] != 4.0 || body["nodes"] != 1.0 ||
		!strings.Contains(body["error"].(string), "broker unavailable: this node only") {
		t.Fatalf("with the broker down: %d %v", code, body)
	}
}

// TestAdminBadInput: what the API refuses, with 400 (or 405) and a
// message that says why.
func TestAdminBadInput(t *testing.T) {
	s, c := twoNodes(t)
	long := strings.Repeat("é", 62) // 124 bytes
	tests := []struct {
		name   string
		h      caddy.AdminHandlerFunc
		method string
		target string
		body   string
		status int
		msg    string
	}{
		{"unknown parameter", s.handleConnections, "GET", "/wsgate/connections?subjet=u-1", "", 400, `unknown parameter "subjet"`},
		{"repeated parameter", s.handleConnections, "GET", "/wsgate/connections?subject=a&subject=b", "", 400, "given 2 times"},
		{"limit 0", s.handleConnections, "GET", "/wsgate/connections?limit=0", "", 400, "limit"},
		{"limit too big", s.handleConnections, "GET", "/wsgate/connections?limit=1001", "", 400, "from 1 to 1000"},
		{"limit not a number", s.handleChannels, "GET", "/wsgate/channels?limit=ten", "", 400, "limit"},
		{"bad cursor", s.handleConnections, "GET", "/wsgate/connections?cursor=%25%25", "", 400, "cursor"},
		{"bad timeout", s.handleConnections, "GET", "/wsgate/connections?timeout=forever", "", 400, "timeout"},
		{"timeout too long", s.handleChannels, "GET", "/wsgate/channels?timeout=1m", "", 400, "at most 10s"},
		{"bad CIDR", s.handleConnections, "GET", "/wsgate/connections?remote=10.0.0.0/99", "", 400, "CIDR"},
		{"count with a value", s.handleConnections, "GET", "/wsgate/connections?count=5", "", 400, "count takes no value"},
		{"count with limit", s.handleConnections, "GET", "/wsgate/connections?count&limit=5", "", 400, "count does not take"},
		{"list by POST", s.handleConnections, "POST", "/wsgate/connections", "", 405, "use GET"},
		{"disconnect by GET", s.handleDisconnect, "GET", "/wsgate/disconnect", "", 405, "use POST"},
		{"not JSON", s.handleDisconnect, "POST", "/wsgate/disconnect", `subject=u-1`, 400, "reading the body"},
		{"unknown field", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"subject":"u-1","cod":4000}`, 400, `unknown field "cod"`},
		{"two values", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"subject":"u-1"}{}`, 400, "more than one"},
		{"neither", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"code":4000}`, 400, "either id or subject"},
		{"both", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","subject":"u-1"}`, 400, "either id or subject"},
		{"code 1001", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":1001}`, 400, "want 1000 or 3000-4999"},
		{"code 2999", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":2999}`, 400, "want 1000 or 3000-4999"},
		{"code 5000", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":5000}`, 400, "want 1000 or 3000-4999"},
		{"code too big for 16 bits", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":70000}`, 400, "reading the body"},
		{"reason too long", s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":4000,"reason":"` + long + `"}`, 400, "124 bytes: at most 123"},
		{"bad disconnect timeout", s.handleDisconnect, "POST", "/wsgate/disconnect?timeout=0s", `{"id":"a1"}`, 400, "timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, err := call(t, tt.h, tt.method, tt.target, tt.body)
			if code != tt.status || err == nil || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("status %d, error %v; want %d with %q", code, err, tt.status, tt.msg)
			}
		})
	}
	for _, n := range c.nodes {
		if len(n.conns.closed) != 0 {
			t.Fatalf("a refused request closed %v", n.conns.closed)
		}
	}
	// JSON decoding makes every reason valid UTF-8; a request from another
	// node is checked again.
	if err := checkClose(4000, "\xff"); err == nil || !strings.Contains(err.Error(), "UTF-8") {
		t.Fatalf("checkClose of invalid UTF-8: %v", err)
	}
	// The longest reason that fits is accepted.
	if code, _, err := call(t, s.handleDisconnect, "POST", "/wsgate/disconnect", `{"id":"a1","code":4000,"reason":"`+long[:122]+`a"}`); code != 200 || err != nil {
		t.Fatalf("a 123-byte reason: %d %v", code, err)
	}
}

// TestAdminMemoryBrokerIsLocal: with a broker that links no nodes, the API
// answers for this node alone, and says so without calling it partial.
func TestAdminMemoryBrokerIsLocal(t *testing.T) {
	n := newFakeNode(t, conn("a1", "u-1", "10.0.0.1", "chat", "rooms", "room:1"))
	sh := &sharedHub{hub: n.hub, broker: broker.NewMemory(n.hub.Handle)}
	s := &adminServer{conns: n.conns, hub: func() *sharedHub { return sh }}
	code, body, err := call(t, s.handleConnections, "GET", "/wsgate/connections", "")
	if err != nil || code != 200 || !slices.Equal(ids(t, body), []string{"a1"}) || body["nodes"] != 1.0 || body["answered"] != 1.0 || body["partial"] != nil {
		t.Fatalf("listing: %d %v %v", code, err, body)
	}
	code, body, err = call(t, s.handleDisconnect, "POST", "/wsgate/disconnect", `{"subject":"u-1","code":4000,"reason":"bye"}`)
	if err != nil || code != 200 || body["disconnected"] != 1.0 || !slices.Equal(n.conns.closed, []string{"a1 4000 bye"}) {
		t.Fatalf("disconnect: %d %v %v, closed %v", code, err, body, n.conns.closed)
	}
}

// TestAdminAsksTheLastStartedHub: the API follows reloads, and falls back
// to the config still running when a new one is torn down.
func TestAdminAsksTheLastStartedHub(t *testing.T) {
	old, next := &sharedHub{}, &sharedHub{}
	t.Cleanup(func() { running.forget(old); running.forget(next) })
	steps := []struct {
		what string
		do   func()
		want *sharedHub
	}{
		{"nothing started", func() {}, defaultHub},
		{"first config", func() { running.started(old) }, old},
		{"reload with another broker", func() { running.started(next) }, next},
		{"that reload failed: its hub destroyed", func() { running.forget(next) }, old},
		{"reload with the same broker", func() { running.started(old) }, old},
		{"no wsgate app any more", func() { running.forget(old) }, defaultHub},
	}
	for _, s := range steps {
		s.do()
		if got := currentHub(); got != s.want {
			t.Fatalf("%s: the API asks %p, want %p", s.what, got, s.want)
		}
	}
	running.started(old)
	running.started(old)
	if n := len(running.hubs); n != 1 {
		t.Fatalf("a hub started twice is listed %d times", n)
	}
}
