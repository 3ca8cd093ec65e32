package integration

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// messagesUntil reads c's messages on channel until one whose data is
// marker, and returns the data of those before it.
func (rc *roomsClient) messagesUntil(channel, marker string, within time.Duration) []string {
	rc.t.Helper()
	var got []string
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for {
		select {
		case m, ok := <-rc.msgs:
			if !ok {
				rc.t.Fatalf("connection ended before %s; got %q", marker, got)
			}
			if m.Channel != channel {
				continue
			}
			if string(m.Data) == marker {
				return got
			}
			got = append(got, string(m.Data))
		case <-deadline.C:
			rc.t.Fatalf("no %s within %v; got %q", marker, within, got)
		}
	}
}

// reachedBy publishes through g on channel, data prefix followed by a
// count, until one of them reaches rc (within 10 s).
func (rc *roomsClient) reachedBy(t testing.TB, g *gateway, channel, prefix string) bool {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n := 0; time.Now().Before(deadline); n++ {
		if st, body := httpPublish(t, g, fmt.Sprintf(`{"channel":%q,"data":%s%d"}`, channel, prefix, n)); st != 200 {
			t.Fatalf("warm-up publish: %d %s", st, body)
		}
		wait := time.NewTimer(100 * time.Millisecond)
		for waiting := true; waiting; {
			select {
			case m := <-rc.msgs:
				if strings.HasPrefix(string(m.Data), prefix) {
					wait.Stop()
					return true
				}
			case <-wait.C:
				waiting = false
			}
		}
	}
	return false
}

// TestPublishIdempotentAcrossNodes: two gateways share one Redis; a
// publication retried with the same idempotency_key, to the other node and
// then to the first again, reaches a subscriber on each node exactly once
// (a marker published afterwards proves no second copy is on its way),
// and bad data is refused with 400 and delivered nowhere.
func TestPublishIdempotentAcrossNodes(t *testing.T) {
	rs := startRedis(t)
	a := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	b := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	const ch = "room:orders"
	onA, onB := dialRooms(t, a), dialRooms(t, b)
	onA.subscribe(ch)
	onB.subscribe(ch)

	// Both nodes' Redis subscriptions are live once a publication made on
	// one node reaches the other's subscriber, and the other way round.
	for i, pair := range []struct {
		from *gateway
		to   *roomsClient
	}{{a, onB}, {b, onA}} {
		if !pair.to.reachedBy(t, pair.from, ch, fmt.Sprintf(`"warm-%d-`, i)) {
			t.Fatal("cross-node delivery never started")
		}
	}
	// Let both clients take everything published so far.
	for i, g := range []*gateway{a, b} {
		marker := fmt.Sprintf(`"drained-%d"`, i)
		httpPublish(t, g, `{"channel":"`+ch+`","data":`+marker+`}`)
		onA.messagesUntil(ch, marker, 10*time.Second)
		onB.messagesUntil(ch, marker, 10*time.Second)
	}

	order := `{"channel":"` + ch + `","data":{"order":42},"idempotency_key":"order-42"}`
	for _, step := range []struct {
		name   string
		g      *gateway
		body   string
		status int
		want   string
	}{
		{"first", a, order, 200, `{"accepted":1,"duplicates":0}`},
		{"retry to the other node", b, order, 200, `{"accepted":0,"duplicates":1}`},
		{"retry to the first node", a, order, 200, `{"accepted":0,"duplicates":1}`},
		{"batch with a new key and the old one", b,
			`[{"channel":"` + ch + `","data":{"order":43},"idempotency_key":"order-43"},` + order + `]`,
			200, `{"accepted":1,"duplicates":1}`},
		{"invalid UTF-8", a, "{\"channel\":\"" + ch + "\",\"data\":\"\xff\"}", 400, `{"error":"not valid UTF-8"}`},
		{"not JSON", b, `{"channel":"` + ch + `","data":hello}`, 400, `{"error":"not valid JSON"}`},
		{"a batch with one bad item", a,
			`[{"channel":"` + ch + `","data":{"order":44}},{"channel":"` + ch + `"}]`,
			400, `{"error":"publication 1: missing data"}`},
	} {
		st, body := httpPublish(t, step.g, step.body)
		if st != step.status || strings.TrimSpace(body) != step.want {
			t.Fatalf("%s: %d %s, want %d %s", step.name, st, body, step.status, step.want)
		}
	}

	// The marker is published after every request above was answered:
	// Redis hands publications to each node in the order it took them, so
	// a second copy of anything would arrive before the marker.
	if st, body := httpPublish(t, b, `{"channel":"`+ch+`","data":"marker"}`); st != 200 {
		t.Fatalf("marker: %d %s", st, body)
	}
	want := []string{`{"order":42}`, `{"order":43}`}
	for name, c := range map[string]*roomsClient{"node A": onA, "node B": onB} {
		if got := c.messagesUntil(ch, `"marker"`, 10*time.Second); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Errorf("subscriber on %s got %q before the marker, want %q", name, got, want)
		}
	}
}
