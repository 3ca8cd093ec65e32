package integration

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/wsgate/wsgate/internal/dashboard"
)

// scrape returns the names of the samples on the gateway's /metrics.
func (g *gateway) scrape() map[string]bool {
	g.t.Helper()
	resp, err := http.Get("http://" + g.addr() + "/metrics")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		g.t.Fatalf("/metrics: HTTP %d", resp.StatusCode)
	}
	names := map[string]bool{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		if i := strings.IndexAny(line, "{ "); i > 0 {
			names[line[:i]] = true
		}
	}
	if err := sc.Err(); err != nil {
		g.t.Fatal(err)
	}
	return names
}

// TestDashboardMetricsExist: every metric the Grafana dashboard queries is
// on the /metrics of a real Caddy (Caddy's own metrics handler, as the
// README sets it up) after a session that touches them: refusals of each
// kind, relayed messages, a token served from the cache, a client that
// stops reading, a parked connection, rooms publishes from every source, a
// policy denial, a publish over the rate, an invalid Redis publication
// and a slow consumer.
func TestDashboardMetricsExist(t *testing.T) {
	b, err := os.ReadFile("../examples/grafana/wsgate.json")
	if err != nil {
		t.Fatal(err)
	}
	want, err := dashboard.MetricNames(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(want) == 0 {
		t.Fatal("the dashboard queries no metric")
	}

	rs := startRedis(t)
	up := startRawUpstream(t)
	secret := "0123456789abcdef0123456789abcdef-dashboard"
	site := fmt.Sprintf(`	route {
		metrics /metrics
		wsgate /relay* {
			upstream %[1]s
			write_timeout 1s
			ping_interval off
			jwt {
				secret %[2]s
				from query access_token
			}
		}
		wsgate /limited* {
			upstream %[1]s
			limit_connections {
				total 1
				zone dashboard-limited
			}
		}
		wsgate /dead* {
			upstream ws://127.0.0.1:%[3]d
		}
		wsgate /ws {
			rooms {
				publish_rate 1/s burst 1
			}
			send_queue 1
			slow_consumer drop
			channels {
				allow subscribe,publish room:*
			}
		}
		wsgate_publish /publish {
			key %[4]s
		}
		respond 404
	}`, up.URL, secret, freePort(t), publishKey)
	g := startGatewayWith(t, redisGlobal(rs.url())+"\n\tmetrics", nil, site)
	tok := hmacWith([]byte(secret), "", claims("", "u-dash"))

	// Refusals of each kind that needs no other service.
	for _, tc := range []struct {
		name, path string
		header     http.Header
		want       int
	}{
		{"origin", "/relay?access_token=" + tok, http.Header{"Origin": {"https://evil.example"}}, 403},
		{"token", "/relay", nil, 401},
		{"upstream", "/dead", nil, 502},
	} {
		if got, _ := status(t, g, tc.path, tc.header); got != tc.want {
			t.Fatalf("%s refusal: HTTP %d, want %d", tc.name, got, tc.want)
		}
	}
	req, _ := http.NewRequest("GET", "http://"+g.addr()+"/relay?access_token="+tok, nil)
	req.Header = http.Header{"Upgrade": {"websocket"}, "Connection": {"Upgrade"}, "Sec-Websocket-Version": {"12"},
		"Sec-Websocket-Key": {"dGhlIHNhbXBsZSBub25jZQ=="}, "Origin": {g.origin()}}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("handshake refusal: HTTP %d, want 426", resp.StatusCode)
	}
	first := dial(t, g, "/limited", nil)
	if got, _ := status(t, g, "/limited", nil); got != 429 {
		t.Fatalf("limit refusal: HTTP %d, want 429", got)
	}
	first.CloseNow()

	// Relayed messages, a normal close, and the same token again (from
	// the verifier's cache).
	for i := 0; i < 2; i++ {
		c := dial(t, g, "/relay?access_token="+tok, nil)
		if err := c.Write(ctxT(t, 5*time.Second), websocket.MessageText, []byte("hello")); err != nil {
			t.Fatal(err)
		}
		c.Close(websocket.StatusNormalClosure, "bye")
	}
	// A client that stops reading while the upstream floods it: dropped
	// after write_timeout.
	rawDialBuf(t, g, "/relay/flood?access_token="+tok, nil, 4096)

	// Rooms: a reader that stays idle (and parks), a publisher over its
	// rate and denied a channel, publications from HTTP and Redis, and an
	// invalid one.
	reader := dialRooms(t, g)
	reader.subscribe("room:a")
	pub := dialRooms(t, g)
	var codes []any
	for i := 0; i < 3; i++ {
		r := pub.call(map[string]any{"op": "publish", "channel": "room:a", "data": i})
		codes = append(codes, r["code"])
	}
	if !slices.Contains(codes, "rate_limited") {
		t.Fatalf("three publishes at publish_rate 1/s burst 1: replies %v, want one rate_limited", codes)
	}
	if r := pub.call(map[string]any{"op": "subscribe", "channel": "secret:a"}); r["code"] != "forbidden" {
		t.Fatalf("subscribe outside the policy: %v, want forbidden", r)
	}
	if st, body := httpPublish(t, g, `{"channel":"room:a","data":"http"}`); st != 200 {
		t.Fatalf("HTTP publish: %d %s", st, body)
	}
	rs.publish(t, "wsgate:room:a", `"redis"`)
	rs.publish(t, "wsgate:room:a", "not JSON")
	reader.messagesUntil("room:a", `"redis"`, 10*time.Second)

	// A slow consumer: subscribed, never reading, with a small receive
	// buffer; publications to its channel overflow its send queue of 1.
	slow := rawDialBuf(t, g, "/ws", http.Header{"Sec-WebSocket-Protocol": {"wsgate.v1"}}, 4096)
	slow.write(frame(true, opText, []byte(`{"id":1,"op":"subscribe","channel":"room:fill"}`)))
	if f, err := slow.read(5 * time.Second); err != nil || !strings.Contains(string(f.payload), `"ok"`) {
		t.Fatalf("slow subscribe: %v %s", err, f.payload)
	}
	fill := fmt.Sprintf(`{"channel":"room:fill","data":%q}`, strings.Repeat("f", 16<<10))

	// Counters and gauges with labels appear once touched; the write
	// timeout, the parking and the overflow come within seconds.
	var missing []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		got := g.scrape()
		if !got["go_goroutines"] {
			t.Fatal("/metrics has no go_goroutines: not Caddy's metrics, or not read right")
		}
		missing = missing[:0]
		for _, name := range want {
			if !got[name] {
				missing = append(missing, name)
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		if st, body := httpPublish(t, g, fill); st != 200 {
			t.Fatalf("HTTP publish: %d %s", st, body)
		}
		pollPause()
	}
	for _, name := range missing {
		t.Errorf("the dashboard queries %s, which is not on /metrics", name)
	}
	t.Logf("%d metric names queried by the dashboard, %d found on /metrics", len(want), len(want)-len(missing))
}
