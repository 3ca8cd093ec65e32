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
// count, until one of them reaches rc (within 10 s). A 503 is a Redis not
// back yet (g finds it back within a probe interval).
func (rc *roomsClient) reachedBy(t testing.TB, g *gateway, channel, prefix string) bool {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n := 0; time.Now().Before(deadline); n++ {
		if st, body := httpPublish(t, g, fmt.Sprintf(`{"channel":%q,"data":%s%d"}`, channel, prefix, n)); st != 200 && st != 503 {
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

// TestPublishDuringRedisOutage: with Redis down a keyed publication gets
// 503 and reaches the subscribers of the node that answered only; a retry
// to that node is not delivered there again. Once Redis is back the retry
// reaches every node (the first one's subscriber a second time, as
// documented), and later retries are duplicates.
func TestPublishDuringRedisOutage(t *testing.T) {
	rs := startRedis(t)
	a := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	b := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	const ch = "room:outage"
	onA, onB := dialRooms(t, a), dialRooms(t, b)
	onA.subscribe(ch)
	onB.subscribe(ch)
	if !onB.reachedBy(t, a, ch, `"warm-`) {
		t.Fatal("cross-node delivery never started")
	}
	httpPublish(t, a, `{"channel":"`+ch+`","data":"drained"}`)
	onA.messagesUntil(ch, `"drained"`, 10*time.Second)
	onB.messagesUntil(ch, `"drained"`, 10*time.Second)

	rs.kill()
	order := `{"channel":"` + ch + `","data":{"order":7},"idempotency_key":"order-7"}`
	const localOnly = `{"error":"broker unavailable: delivered to this node's subscribers only"}`
	for i := 0; i < 2; i++ {
		if st, body := httpPublish(t, a, order); st != 503 || strings.TrimSpace(body) != localOnly {
			t.Fatalf("attempt %d during the outage: %d %s, want 503 %s", i, st, body, localOnly)
		}
	}
	httpPublish(t, a, `{"channel":"`+ch+`","data":"marker-down"}`)
	if got := onA.messagesUntil(ch, `"marker-down"`, 10*time.Second); strings.Join(got, " ") != `{"order":7}` {
		t.Fatalf("subscriber on the answering node got %q during the outage, want the publication once", got)
	}

	rs.start()
	if !onB.reachedBy(t, a, ch, `"back-`) || !onA.reachedBy(t, b, ch, `"back-`) {
		t.Fatal("cross-node delivery did not resume")
	}
	for i, want := range []string{`{"accepted":1,"duplicates":0}`, `{"accepted":0,"duplicates":1}`} {
		g := []*gateway{a, b}[i]
		if st, body := httpPublish(t, g, order); st != 200 || strings.TrimSpace(body) != want {
			t.Fatalf("retry %d after the outage: %d %s, want 200 %s", i, st, body, want)
		}
	}
	httpPublish(t, b, `{"channel":"`+ch+`","data":"marker-up"}`)
	for name, c := range map[string]*roomsClient{"node A": onA, "node B": onB} {
		var got []string
		for _, d := range c.messagesUntil(ch, `"marker-up"`, 10*time.Second) {
			if !strings.HasPrefix(d, `"back-`) {
				got = append(got, d)
			}
		}
		if strings.Join(got, " ") != `{"order":7}` {
			t.Errorf("subscriber on %s got %q after the outage, want the publication once", name, got)
		}
	}
}
