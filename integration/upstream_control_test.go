package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestUpstreamDrivenSubscriptions: the app subscribes a relayed connection
// to a channel with a control message; later publications reach the
// client on the same socket. Control messages never reach the client, and
// a client cannot forge them toward the app or subscribe itself.
func TestUpstreamDrivenSubscriptions(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, fmt.Sprintf(`	route {
		wsgate /ws {
			upstream %s
			upstream_control wsgate:
		}
		wsgate_publish /publish {
			key %s
		}
	}`, up.URL, publishKey))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 20*time.Second)
	read := func() string {
		t.Helper()
		_, m, err := c.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return string(m)
	}
	send := func(s string) {
		t.Helper()
		if err := c.Write(ctx, websocket.MessageText, []byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	// The app subscribes this connection to chat:42…
	send(`cmd:send:wsgate:{"subscribe":"chat:42"}`)
	send("marker-1")
	if m := read(); m != "marker-1" {
		t.Fatalf("the client saw %q: the control message leaked (or was reordered)", m)
	}
	// …so a backend publication arrives, as the data itself.
	if st, body := httpPublish(t, g, `{"channel":"chat:42","data":{"text":"hello 42"}}`); st != 200 {
		t.Fatalf("publish: %d %s", st, body)
	}
	if m := read(); m != `{"text":"hello 42"}` {
		t.Fatalf("delivery: %q", m)
	}

	// A client forging the prefix: dropped, never at the app, no subscription.
	for len(up.received) > 0 {
		<-up.received
	}
	send(`wsgate:{"subscribe":"chat:99"}`)
	w, _ := c.Writer(ctx, websocket.MessageText) // also in fragments
	w.Write([]byte("wsga"))
	w.Write([]byte(`te:{"subscribe":"chat:99"}`))
	w.Close()
	send("marker-2")
	if m := read(); m != "marker-2" {
		t.Fatalf("after forged control messages the client saw %q", m)
	}
	for len(up.received) > 0 {
		if m := string(<-up.received); strings.HasPrefix(m, "wsgate:") {
			t.Fatalf("a forged control message reached the app: %q", m)
		}
	}
	httpPublish(t, g, `{"channel":"chat:99","data":"should not arrive"}`)
	httpPublish(t, g, `{"channel":"chat:42","data":"sentinel"}`)
	if m := read(); m != `"sentinel"` {
		t.Fatalf("the client got %q: a forged subscription took effect", m)
	}

	// The app unsubscribes it.
	send(`cmd:send:wsgate:{"unsubscribe":"chat:42"}`)
	send("marker-3")
	if m := read(); m != "marker-3" {
		t.Fatalf("got %q", m)
	}
	httpPublish(t, g, `{"channel":"chat:42","data":"after unsubscribe"}`)
	send("marker-4")
	if m := read(); m != "marker-4" {
		t.Fatalf("after unsubscribe the client got %q", m)
	}
}
