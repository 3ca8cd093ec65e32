package rooms_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

// client is a rooms.Conn on a fake session.
type client struct {
	t    testing.TB
	conn *rooms.Conn
	sess *fakeSession
}

func newClient(t testing.TB, h *rooms.Hub, cfg rooms.ConnConfig) *client {
	t.Helper()
	c := &client{t: t, conn: rooms.NewConn(h, cfg), sess: &fakeSession{}}
	c.conn.Attach(c.sess)
	t.Cleanup(c.conn.Close)
	return c
}

// reply is a decoded gateway reply.
type reply struct {
	ID      *int64 `json:"id"`
	Op      string `json:"op"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// send hands msg to Handle as a text message and decodes the reply.
func (c *client) send(msg string) reply {
	c.t.Helper()
	v, out := c.conn.Handle([]byte(msg), true)
	if v != proxy.Drop {
		c.t.Fatalf("%s: verdict %v; rooms requests are consumed", msg, v)
	}
	var r reply
	if err := json.Unmarshal(out, &r); err != nil {
		c.t.Fatalf("%s: reply %q: %v", msg, out, err)
	}
	return r
}

// ok sends msg and insists on {"id":…,"op":"ok"}.
func (c *client) ok(msg string) {
	c.t.Helper()
	if r := c.send(msg); r.Op != "ok" {
		c.t.Fatalf("%s: got %+v, want ok", msg, r)
	}
}

// refused sends msg and insists on an error with code, returning it.
func (c *client) refused(msg, code string) reply {
	c.t.Helper()
	r := c.send(msg)
	if r.Op != "error" || r.Code != code {
		c.t.Fatalf("%s: got %+v, want error %s", msg, r, code)
	}
	return r
}

// messages decodes the frames queued for the client.
func (c *client) messages() []string {
	c.t.Helper()
	var out []string
	for _, f := range c.sess.queued() {
		op, payload := decodeFrame(c.t, f)
		if op != opText {
			c.t.Fatalf("delivery opcode %d, want text", op)
		}
		out = append(out, string(payload))
	}
	return out
}

func (c *client) wantMessages(want ...string) {
	c.t.Helper()
	if got := c.messages(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		c.t.Fatalf("deliveries:\n got %q\nwant %q", got, want)
	}
}

func TestConnSubscribePublish(t *testing.T) {
	h, b := newMemoryHub(t)
	alice, bob := newClient(t, h, rooms.ConnConfig{}), newClient(t, h, rooms.ConnConfig{})

	if r := alice.send(`{"id":1,"op":"subscribe","channel":"chat:acme:42"}`); r.Op != "ok" || r.ID == nil || *r.ID != 1 {
		t.Fatalf("subscribe: got %+v, want ok with id 1", r)
	}
	alice.ok(`{"id":2,"op":"subscribe","channel":"chat:acme:42"}`) // again: still ok
	if h.Subscribers("chat:acme:42") != 1 {
		t.Fatalf("hub has %d subscribers", h.Subscribers("chat:acme:42"))
	}

	// Bob, not subscribed, publishes; Alice gets it byte for byte.
	if r := bob.send(`{"id":3,"op":"publish","channel":"chat:acme:42","data": {"text" : "hi \u00e9"} }`); r.Op != "ok" || *r.ID != 3 {
		t.Fatalf("publish: %+v", r)
	}
	alice.wantMessages(`{"op":"message","channel":"chat:acme:42","data":{"text" : "hi \u00e9"}}`)
	bob.wantMessages()

	// A publisher that is subscribed gets its own message too.
	bob.ok(`{"op":"subscribe","channel":"chat:acme:42"}`)
	alice.ok(`{"op":"publish","channel":"chat:acme:42","data":[1]}`)
	alice.wantMessages(`{"op":"message","channel":"chat:acme:42","data":{"text" : "hi \u00e9"}}`, `{"op":"message","channel":"chat:acme:42","data":[1]}`)
	bob.wantMessages(`{"op":"message","channel":"chat:acme:42","data":[1]}`)

	// Unsubscribe stops deliveries; the node keeps the channel for Bob.
	alice.ok(`{"id":4,"op":"unsubscribe","channel":"chat:acme:42"}`)
	alice.ok(`{"id":5,"op":"unsubscribe","channel":"chat:acme:42"}`) // not subscribed: still ok
	bob.ok(`{"op":"publish","channel":"chat:acme:42","data":2}`)
	if n := len(alice.messages()); n != 2 {
		t.Fatalf("delivered after unsubscribe: %d messages", n)
	}
	if s, u := b.counts("chat:acme:42"); s != 1 || u != 0 {
		t.Fatalf("broker saw %d Subscribe, %d Unsubscribe; want 1, 0", s, u)
	}

	// Closing Bob's connection releases the last subscription.
	bob.conn.Close()
	if s, u := b.counts("chat:acme:42"); s != 1 || u != 1 || h.Channels() != 0 {
		t.Fatalf("after close: broker saw %d Subscribe, %d Unsubscribe, hub holds %d channels", s, u, h.Channels())
	}
	if r := bob.refused(`{"id":6,"op":"subscribe","channel":"x"}`, rooms.CodeUnavailable); *r.ID != 6 {
		t.Fatalf("subscribe after close: %+v", r)
	}
	if h.Channels() != 0 {
		t.Fatal("a closed connection subscribed")
	}
	if len(alice.sess.closes)+len(bob.sess.closes) != 0 {
		t.Fatal("rooms closed a session")
	}
}

func TestConnRawFormat(t *testing.T) {
	h, _ := newMemoryHub(t)
	app := newClient(t, h, rooms.ConnConfig{Format: rooms.FormatRaw})
	if perr := app.conn.Subscribe(context.Background(), "feed"); perr != nil {
		t.Fatal(perr)
	}
	if err := h.Publish(context.Background(), "feed", []byte(` {"type":"tick"} `)); err != nil {
		t.Fatal(err)
	}
	app.wantMessages(` {"type":"tick"} `)
}

func TestConnAuthorize(t *testing.T) {
	h, _ := newMemoryHub(t)
	var mu sync.Mutex
	var asked []string
	cfg := rooms.ConnConfig{Authorize: func(action, channel string) bool {
		mu.Lock()
		asked = append(asked, action+" "+channel)
		mu.Unlock()
		return !strings.HasPrefix(channel, "secret:")
	}}
	c, listener := newClient(t, h, cfg), newClient(t, h, rooms.ConnConfig{})
	listener.ok(`{"op":"subscribe","channel":"secret:plans"}`)

	r := c.refused(`{"id":1,"op":"subscribe","channel":"secret:plans"}`, rooms.CodeForbidden)
	if r.ID == nil || *r.ID != 1 || !strings.Contains(r.Message, "secret:plans") {
		t.Fatalf("forbidden subscribe: %+v; want id 1 and the channel named", r)
	}
	if h.Subscribers("secret:plans") != 1 {
		t.Fatal("a denied subscribe reached the hub")
	}
	r = c.refused(`{"id":2,"op":"publish","channel":"secret:plans","data":1}`, rooms.CodeForbidden)
	if *r.ID != 2 || r.Message != "publish to secret:plans denied" {
		t.Fatalf("forbidden publish: %+v", r)
	}
	listener.wantMessages()

	c.ok(`{"op":"subscribe","channel":"open:1"}`)
	c.ok(`{"op":"publish","channel":"open:1","data":1}`)
	mu.Lock()
	defer mu.Unlock()
	want := []string{"subscribe secret:plans", "publish secret:plans", "subscribe open:1", "publish open:1"}
	if strings.Join(asked, ",") != strings.Join(want, ",") {
		t.Fatalf("Authorize asked %q, want %q", asked, want)
	}
}

func TestConnMaxSubscriptions(t *testing.T) {
	h, _ := newMemoryHub(t)
	c := newClient(t, h, rooms.ConnConfig{MaxSubscriptions: 2})
	c.ok(`{"op":"subscribe","channel":"a"}`)
	c.ok(`{"op":"subscribe","channel":"b"}`)
	r := c.refused(`{"id":3,"op":"subscribe","channel":"c"}`, rooms.CodeForbidden)
	if *r.ID != 3 || !strings.Contains(r.Message, "max 2") {
		t.Fatalf("over the limit: %+v", r)
	}
	if h.Subscribers("c") != 0 {
		t.Fatal("subscription over the limit reached the hub")
	}
	c.ok(`{"op":"subscribe","channel":"a"}`) // already held: not a new one
	c.ok(`{"op":"unsubscribe","channel":"a"}`)
	c.ok(`{"op":"subscribe","channel":"c"}`)

	// The default is 100.
	d := newClient(t, h, rooms.ConnConfig{})
	for i := 0; i < 100; i++ {
		d.ok(fmt.Sprintf(`{"op":"subscribe","channel":"ch:%d"}`, i))
	}
	d.refused(`{"op":"subscribe","channel":"ch:100"}`, rooms.CodeForbidden)
}

func TestConnInvalidChannel(t *testing.T) {
	h, _ := newMemoryHub(t)
	c := newClient(t, h, rooms.ConnConfig{})
	for _, ch := range []string{"", "a::b", ":a", "a:", "a b", "chat:*", "chat:**", "{x}", "é", strings.Repeat("a", 1000)} {
		for _, op := range []string{"subscribe", "unsubscribe", "publish"} {
			chJSON, _ := json.Marshal(ch)
			msg := `{"id":1,"op":"` + op + `","channel":` + string(chJSON) + `,"data":1}`
			if r := c.refused(msg, rooms.CodeBadRequest); *r.ID != 1 {
				t.Fatalf("%s: %+v", msg, r)
			}
		}
	}
	if h.Channels() != 0 {
		t.Fatalf("invalid channels reached the hub: %d", h.Channels())
	}
}

func TestConnOtherOps(t *testing.T) {
	h, _ := newMemoryHub(t)
	c := newClient(t, h, rooms.ConnConfig{MaxData: 16})

	c.ok(`{"id":1,"op":"ping"}`)
	if r := c.refused(`{"id":2,"op":"refresh","token":"t"}`, rooms.CodeNotFound); *r.ID != 2 {
		t.Fatalf("refresh without Refresh: %+v", r)
	}
	c.refused(`{"id":3,"op":"presence","channel":"c"}`, rooms.CodeNotFound)
	c.refused(`{"id":4,"op":"subscribe","channel":"c","since":{"epoch":"e","offset":0}}`, rooms.CodeNotFound)
	c.refused(`{"id":5,"op":"dance"}`, rooms.CodeNotFound)
	if r := c.refused(`{"id":6,"op":"publish","channel":"c","data":"0123456789abcdef"}`, rooms.CodeTooLarge); *r.ID != 6 {
		t.Fatalf("too large: %+v", r)
	}
	c.ok(`{"id":7,"op":"publish","channel":"c","data":"0123456789abcd"}`)
	c.refused(`{"id":8`, rooms.CodeBadRequest)

	// Binary messages are not requests.
	v, out := c.conn.Handle([]byte(`{"id":9,"op":"ping"}`), false)
	var r reply
	if err := json.Unmarshal(out, &r); err != nil || v != proxy.Drop || r.Code != rooms.CodeBadRequest || r.ID != nil {
		t.Fatalf("binary message: verdict %v, reply %s", v, out)
	}
}

func TestConnRefresh(t *testing.T) {
	h, _ := newMemoryHub(t)
	exp := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	c := newClient(t, h, rooms.ConnConfig{Refresh: func(token string) (time.Time, error) {
		if token != "good" {
			return time.Time{}, errors.New("bad signature")
		}
		return exp, nil
	}})
	c.ok(`{"id":1,"op":"refresh","token":"good"}`)
	if r := c.refused(`{"id":2,"op":"refresh","token":"forged"}`, rooms.CodeForbidden); r.Message != "invalid token" {
		t.Fatalf("bad token: %+v", r)
	}
	exp = time.Now().Add(-time.Second) // verified (within the verifier's leeway) but already expired
	if r := c.refused(`{"id":3,"op":"refresh","token":"good"}`, rooms.CodeForbidden); r.Message != "token expired" {
		t.Fatalf("expired token: %+v", r)
	}
	c.sess.mu.Lock()
	defer c.sess.mu.Unlock()
	if want := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC); len(c.sess.extended) != 1 || !c.sess.extended[0].Equal(want) {
		t.Fatalf("session extended to %v, want [%v]", c.sess.extended, want)
	}
}

func TestConnPublishBrokerUnavailable(t *testing.T) {
	h := rooms.NewHub()
	h.SetBroker(&stubBroker{pubErr: fmt.Errorf("%w: connection refused", broker.ErrUnavailable)})
	pub, sub := newClient(t, h, rooms.ConnConfig{}), newClient(t, h, rooms.ConnConfig{})
	sub.ok(`{"op":"subscribe","channel":"room"}`)
	r := pub.refused(`{"id":1,"op":"publish","channel":"room","data":"hi"}`, rooms.CodeUnavailable)
	if *r.ID != 1 || !strings.Contains(r.Message, "this node only") {
		t.Fatalf("publish with the broker down: %+v", r)
	}
	sub.wantMessages(`{"op":"message","channel":"room","data":"hi"}`)

	h = rooms.NewHub()
	h.SetBroker(&stubBroker{pubErr: errors.New("boom")})
	pub = newClient(t, h, rooms.ConnConfig{})
	pub.refused(`{"op":"publish","channel":"room","data":"hi"}`, rooms.CodeUnavailable)
}

func TestConnControl(t *testing.T) {
	h, _ := newMemoryHub(t)
	// The app's own control messages are trusted: no Authorize, but the
	// subscription limit holds.
	c := newClient(t, h, rooms.ConnConfig{
		Format:           rooms.FormatRaw,
		MaxSubscriptions: 2,
		Authorize:        func(string, string) bool { return false },
	})
	control := c.conn.Control([]byte("@wsgate "))
	for _, tc := range []struct {
		msg      string
		consumed bool
		subs     []string // channels the connection holds afterwards
	}{
		{`{"subscribe":"room:1"}`, false, nil},
		{`@wsgate{"subscribe":"room:1"}`, false, nil},
		{` @wsgate {"subscribe":"room:1"}`, false, nil},
		{`@wsgate {"subscribe":"room:1"}`, true, []string{"room:1"}},
		{`@wsgate not json`, true, []string{"room:1"}},
		{`@wsgate `, true, []string{"room:1"}},
		{`@wsgate {"subscribe":"bad channel"}`, true, []string{"room:1"}},
		{`@wsgate {"subscribe":7}`, true, []string{"room:1"}},
		{`@wsgate {"subscribe":"room:2"}`, true, []string{"room:1", "room:2"}},
		{`@wsgate {"subscribe":"room:3"}`, true, []string{"room:1", "room:2"}},
		{`@wsgate {"unsubscribe":"room:1"}`, true, []string{"room:2"}},
		{`@wsgate {"unsubscribe":"room:9"}`, true, []string{"room:2"}},
		{`@wsgate {"subscribe":"room:3","unsubscribe":"room:2"}`, true, []string{"room:3"}},
	} {
		if got := control([]byte(tc.msg)); got != tc.consumed {
			t.Fatalf("%s: consumed = %v, want %v", tc.msg, got, tc.consumed)
		}
		var held []string
		for _, ch := range []string{"room:1", "room:2", "room:3", "room:9", "bad channel"} {
			if h.Subscribers(ch) > 0 {
				held = append(held, ch)
			}
		}
		if strings.Join(held, ",") != strings.Join(tc.subs, ",") {
			t.Fatalf("after %s: subscribed to %v, want %v", tc.msg, held, tc.subs)
		}
	}
	if err := h.Publish(context.Background(), "room:3", []byte(`{"app":"frame"}`)); err != nil {
		t.Fatal(err)
	}
	c.wantMessages(`{"app":"frame"}`)
}

func TestConnConcurrentConnections(t *testing.T) {
	// Many connections subscribing, publishing and closing at once, with
	// -race: the hub and the connections share no unguarded state.
	h, b := newMemoryHub(t)
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Go(func() {
			c := rooms.NewConn(h, rooms.ConnConfig{})
			c.Attach(&fakeSession{})
			for j := 0; j < 100; j++ {
				ch := fmt.Sprintf("room:%d", (i+j)%4)
				c.Handle([]byte(`{"op":"subscribe","channel":"`+ch+`"}`), true)
				c.Handle([]byte(`{"op":"publish","channel":"`+ch+`","data":1}`), true)
				if j%3 == 0 {
					c.Handle([]byte(`{"op":"unsubscribe","channel":"`+ch+`"}`), true)
				}
			}
			c.Close()
		})
	}
	wg.Wait()
	if h.Channels() != 0 {
		t.Fatalf("%d channels left after every connection closed", h.Channels())
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.violations) != 0 {
		t.Fatalf("broker misuse: %v", b.violations[0])
	}
}

// TestConnPublishInvalidData: data the hub refuses (the relay closes a
// client that sends invalid UTF-8 before it gets here, but the hub is the
// last word) is a bad_request, and nobody gets it.
func TestConnPublishInvalidData(t *testing.T) {
	h, _ := newMemoryHub(t)
	c, listener := newClient(t, h, rooms.ConnConfig{}), newClient(t, h, rooms.ConnConfig{})
	listener.ok(`{"op":"subscribe","channel":"a"}`)
	r := c.refused("{\"id\":1,\"op\":\"publish\",\"channel\":\"a\",\"data\":\"\xff\"}", rooms.CodeBadRequest)
	if !strings.Contains(r.Message, "not valid UTF-8") {
		t.Fatalf("reply %+v, want the reason", r)
	}
	listener.wantMessages()
}
