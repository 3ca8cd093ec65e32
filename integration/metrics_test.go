package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape is one read of the gateway's /metrics (Caddy's admin endpoint).
type scrape map[string]*dto.MetricFamily

func (g *gateway) metrics() scrape {
	g.t.Helper()
	resp, err := http.Get("http://" + g.adminAddr + "/metrics")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(resp.Body)
	if err != nil {
		g.t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// value is the sum of the series of name that have the given label pairs
// (a histogram's sample count), or -1 when there is no such series.
func (s scrape) value(name string, labels ...string) float64 {
	f := s[name]
	if f == nil {
		return -1
	}
	sum, found := 0.0, false
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		found = true
		switch {
		case m.Counter != nil:
			sum += m.Counter.GetValue()
		case m.Gauge != nil:
			sum += m.Gauge.GetValue()
		case m.Histogram != nil:
			sum += float64(m.Histogram.GetSampleCount())
		}
	}
	if !found {
		return -1
	}
	return sum
}

// series is one expected value.
type series struct {
	name   string
	labels []string
	want   float64
}

func metric(name string, want float64, labels ...string) series { return series{name, labels, want} }

func (s scrape) check(t *testing.T, when string, want []series) {
	t.Helper()
	for _, w := range want {
		if got := s.value(w.name, w.labels...); got != w.want {
			t.Errorf("%s: %s%v = %v, want %v", when, w.name, w.labels, got, w.want)
		}
	}
}

// logLines are the gateway's JSON log lines with message msg.
func (g *gateway) logLines(msg string) []map[string]any {
	var out []map[string]any
	sc := bufio.NewScanner(strings.NewReader(g.logs.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

const connClosedMsg = "websocket connection closed"

// TestMetricsSession drives a scripted session through a gateway with
// metrics on (every kind of refusal, relayed messages, a policy denial, a
// rate-limit drop, fan-out with a slow consumer, a Redis outage), then
// checks the exact value of every series it touched on /metrics, the
// per-connection log lines, and that the access log shows upgrades as
// status 101.
func TestMetricsSession(t *testing.T) {
	k := newKeys(t)
	rd := startRedis(t)
	up := startUpstream(t)
	authLn := listen(t)
	authSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
	})}
	go authSrv.Serve(authLn)
	t.Cleanup(func() { authSrv.Close() })
	deadPort := freePort(t) // nothing listens there

	site := fmt.Sprintf(`	log
	route {
		wsgate /relay {
			upstream %s
			name relay
			jwt {
				secret %s
			}
			limit_connections {
				per_subject 1
			}
			rate_limit {
				messages 3/1h burst 3
				on_exceed drop
			}
			channels {
				allow publish room:open
			}
			relay_channels {
				action_field type
				channel_field room
				action publish say
			}
		}
		wsgate /fa {
			upstream %s
			name relay
			forward_auth http://%s/check
		}
		wsgate /down {
			upstream ws://127.0.0.1:%d
			name relay
		}
		wsgate /ws {
			rooms {
				publish_rate 1/1h burst 1
			}
			name rooms
			park_after 100ms
			channels {
				allow subscribe chat:*
				allow subscribe slow:*
				allow publish   chat:*
			}
		}
		wsgate /slow {
			rooms
			name rooms
			send_queue 4
		}
		wsgate_publish /publish {
			key %s
		}
		respond 404
	}`, up.URL, k.hmac, up.URL, authLn.Addr(), deadPort, publishKey)
	g := startGatewayWith(t, "\tmetrics\n"+redisGlobal(rd.url()), nil, site)
	ctx := ctxT(t, 60*time.Second)

	// Before any traffic every fixed series exists, at zero.
	g.metrics().check(t, "at start", []series{
		metric("wsgate_upgrades_total", 0, "handler", "relay", "mode", "relay", "result", "ok"),
		metric("wsgate_upgrades_total", 0, "handler", "rooms", "mode", "rooms", "result", "handshake"),
		metric("wsgate_connections_open", 0, "handler", "rooms", "mode", "rooms"),
		metric("wsgate_messages_total", 0, "handler", "relay", "direction", "fanout"),
		metric("wsgate_broker_up", 1),
		metric("wsgate_token_verifications_total", 0, "result", "valid"),
		metric("wsgate_policy_denials_total", 0, "handler", "relay", "action", "publish"),
		metric("wsgate_closes_total", 0, "handler", "relay", "side", "client", "code", "1000"),
	})

	// Refusals of every kind.
	alice := k.sign(t, "HS256", "", claims("", "alice"))
	bob := k.sign(t, "HS256", "", claims("", "bob"))
	expired := k.sign(t, "HS256", "", claims("", "carol", "exp", time.Now().Add(-time.Hour).Unix()))
	refuse := func(path string, h http.Header, want int) {
		t.Helper()
		if got, c := status(t, g, path, h); got != want {
			if c != nil {
				c.CloseNow()
			}
			t.Fatalf("%s %v: HTTP %d, want %d", path, h, got, want)
		}
	}
	refuse("/relay", http.Header{"Origin": {"https://evil.test"}, "Authorization": {"Bearer " + alice}}, 403)
	refuse("/relay", nil, 401)
	refuse("/relay", bearerH(expired), 401)
	a := dial(t, g, "/relay", &websocket.DialOptions{HTTPHeader: bearerH(alice)})
	// The access log line of an upgrade is written once the handler hands
	// the connection over, which can trail the client's 101; the order the
	// statuses are checked in below needs it written before the next request.
	eventually(t, 10*time.Second, "the access log line of alice's upgrade", func() bool {
		n := 0
		for _, l := range g.logLines("handled request") {
			if r, _ := l["request"].(map[string]any); r["uri"] == "/relay" {
				n++
			}
		}
		return n == 4
	})
	refuse("/relay", bearerH(alice), 429) // alice's token again: from the cache
	// A handshake the gateway cannot accept (bob's token is verified first).
	req, _ := http.NewRequest("GET", "http://"+g.addr()+"/relay", nil)
	req.Header = http.Header{"Connection": {"Upgrade"}, "Upgrade": {"websocket"}, "Sec-Websocket-Version": {"12"},
		"Sec-Websocket-Key": {"dGhlIHNhbXBsZSBub25jZQ=="}, "Origin": {g.origin()}, "Authorization": {"Bearer " + bob}}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUpgradeRequired {
		t.Fatalf("version 12: HTTP %d, want 426", resp.StatusCode)
	}
	refuse("/fa", nil, 401)
	refuse("/down", nil, 502)

	// Alice: two messages relayed, one denied by the policy, one over the
	// rate limit (dropped), then she closes.
	for _, m := range []string{"m1", "m2"} {
		if err := a.Write(ctx, websocket.MessageText, []byte(m)); err != nil {
			t.Fatal(err)
		}
		if _, b, err := a.Read(ctx); err != nil || string(b) != m {
			t.Fatalf("echo of %s: %q %v", m, b, err)
		}
	}
	if err := a.Write(ctx, websocket.MessageText, []byte(`{"type":"say","room":"secret"}`)); err != nil {
		t.Fatal(err)
	}
	if _, b, err := a.Read(ctx); err != nil || !strings.Contains(string(b), "forbidden") {
		t.Fatalf("denied message: reply %q %v", b, err)
	}
	if err := a.Write(ctx, websocket.MessageText, []byte("m4")); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(websocket.StatusNormalClosure, "bye"); err != nil {
		t.Fatalf("alice's close: %v", err)
	}
	// Bob: the upstream closes his connection with 4000.
	b := dial(t, g, "/relay", &websocket.DialOptions{HTTPHeader: bearerH(bob)})
	cmd := "cmd:close:4000:done"
	if err := b.Write(ctx, websocket.MessageText, []byte(cmd)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Read(ctx); func() websocket.StatusCode { c, _ := closeOf(err); return c }() != 4000 {
		t.Fatalf("bob: %v, want close 4000", err)
	}
	eventually(t, 10*time.Second, "both relayed connections to end", func() bool {
		return g.metrics().value("wsgate_connections_open", "handler", "relay", "mode", "relay") == 0
	})

	// Rooms: s1 subscribes and publishes (once within the publish rate,
	// once over it, once where the policy denies it).
	s1 := dialRooms(t, g)
	var s1Bytes int
	call := func(rc *roomsClient, req map[string]any, wantOp string) {
		t.Helper()
		r := rc.call(req)
		if r["op"] != wantOp {
			t.Fatalf("%v: %v, want %s", req, r, wantOp)
		}
		if rc == s1 {
			b, _ := json.Marshal(req) // what call sent, id included
			s1Bytes += len(b)
		}
	}
	call(s1, map[string]any{"op": "subscribe", "channel": "chat:1"}, "ok")
	call(s1, map[string]any{"op": "subscribe", "channel": "slow:1"}, "ok")
	call(s1, map[string]any{"op": "publish", "channel": "chat:1", "data": map[string]any{"n": 1}}, "ok")
	call(s1, map[string]any{"op": "publish", "channel": "chat:1", "data": map[string]any{"n": 2}}, "error")
	call(s1, map[string]any{"op": "publish", "channel": "secret:1", "data": 3}, "error")
	fanoutBytes := 0
	message := func(channel, data string) int {
		return len(`{"op":"message","channel":`) + len(strconv.Quote(channel)) + len(`,"data":`) + len(data) + 1
	}
	wantMsg := func(channel, data string) {
		t.Helper()
		select {
		case m, ok := <-s1.msgs:
			if !ok {
				t.Fatalf("s1's connection ended: %v", <-s1.errs)
			}
			if m.Channel != channel || string(m.Data) != data {
				t.Fatalf("s1 got %s %s, want %s %s", m.Channel, m.Data, channel, data)
			}
			fanoutBytes += message(channel, data)
		case <-ctx.Done():
			t.Fatalf("s1: no message on %s", channel)
		}
	}
	wantMsg("chat:1", `{"n":1}`)
	eventually(t, 10*time.Second, "s1 to park", func() bool {
		return g.metrics().value("wsgate_connections_parked", "handler", "rooms") == 1
	})

	// A slow consumer on slow:1 (through a handler with a short send queue,
	// counted with the first): it subscribes, then never reads.
	slow := rawDialBuf(t, g, "/slow", http.Header{"Sec-WebSocket-Protocol": {"wsgate.v1"}}, 4096)
	slowSub := `{"id":1,"op":"subscribe","channel":"slow:1"}`
	slow.write(frame(true, opText, []byte(slowSub)))
	if f, err := slow.read(5 * time.Second); err != nil || !strings.Contains(string(f.payload), `"ok"`) {
		t.Fatalf("slow subscribe: %v %s", err, f.payload)
	}
	g.metrics().check(t, "with three subscriptions", []series{
		metric("wsgate_rooms_channels", 2),
		metric("wsgate_rooms_subscriptions", 3),
		metric("wsgate_connections_open", 2, "handler", "rooms", "mode", "rooms"),
	})
	// Batches through wsgate_publish, more than the slow consumer's queue
	// and socket buffers hold (fan-out writes to an idle client at once:
	// its queue fills only once the socket's send buffer, up to 4 MiB
	// here, is full); s1 reads all of it.
	const batches, batch, total = 12, 50, 12 * 50
	data := `"` + strings.Repeat("x", 10000) + `"`
	var pubs []string
	for range batch {
		pubs = append(pubs, fmt.Sprintf(`{"channel":"slow:1","data":%s}`, data))
	}
	for range batches {
		if code, body := httpPublish(t, g, "["+strings.Join(pubs, ",")+"]"); code != 200 {
			t.Fatalf("publish batch: %d %s", code, body)
		}
	}
	for range total {
		wantMsg("slow:1", data)
	}
	if code, _ := slow.readClose(15 * time.Second); code != 1013 {
		t.Fatalf("slow consumer: close %d, want 1013", code)
	}
	slow.conn.Close()
	eventually(t, 15*time.Second, "the slow consumer's connection to end", func() bool {
		return g.metrics().value("wsgate_rooms_subscriptions") == 2
	})

	// A stray plain PUBLISH that is not JSON is dropped.
	rd.publish(t, "wsgate:chat:1", "not json")
	eventually(t, 10*time.Second, "the invalid publication to be counted", func() bool {
		return g.metrics().value("wsgate_publications_invalid_total") == 1
	})

	// Redis outage: a publication meanwhile reaches this node's clients.
	rd.kill()
	eventually(t, 10*time.Second, "wsgate_broker_up 0", func() bool { return g.metrics().value("wsgate_broker_up") == 0 })
	s2 := dialRooms(t, g)
	s2Req := map[string]any{"op": "publish", "channel": "chat:1", "data": map[string]any{"n": 4}}
	call(s2, s2Req, "error")
	s2Bytes, _ := json.Marshal(s2Req)
	wantMsg("chat:1", `{"n":4}`)
	rd.start()
	eventually(t, 15*time.Second, "wsgate_broker_up 1", func() bool { return g.metrics().value("wsgate_broker_up") == 1 })

	s2.c.Close(websocket.StatusNormalClosure, "")
	s1.c.Close(websocket.StatusNormalClosure, "")
	eventually(t, 10*time.Second, "every connection to end", func() bool {
		m := g.metrics()
		return m.value("wsgate_connections_open", "handler", "rooms", "mode", "rooms") == 0 && m.value("wsgate_rooms_subscriptions") == 0
	})

	// The per-connection log lines.
	lines := g.logLines(connClosedMsg)
	if len(lines) != 5 {
		t.Fatalf("%d %q lines, want 5 (alice, bob, s1, the slow consumer, s2)", len(lines), connClosedMsg)
	}
	find := func(what string, match func(m map[string]any) bool) map[string]any {
		t.Helper()
		for _, l := range lines {
			if match(l) {
				return l
			}
		}
		t.Fatalf("no connection log line for %s", what)
		return nil
	}
	bySubject := func(sub string) func(m map[string]any) bool {
		return func(m map[string]any) bool { return m["subject"] == sub }
	}
	slowLine := find("the slow consumer", func(m map[string]any) bool { return m["close_code"] == "1013" })
	slowFanout, _ := slowLine["fanout_messages"].(float64)
	slowFanoutBytes, _ := slowLine["fanout_bytes"].(float64)
	if slowFanout < 4 || slowFanout >= total || slowFanoutBytes != slowFanout*float64(message("slow:1", data)) {
		t.Errorf("slow consumer: %v messages (%v bytes) queued, want at least its queue (4) and fewer than %d", slowFanout, slowFanoutBytes, total)
	}
	closeFrame := func(code int, reason string) map[string]any {
		return map[string]any{"code": float64(code), "reason": reason}
	}
	for _, c := range []struct {
		what  string
		line  map[string]any
		want  map[string]any
		empty []string // fields that must be absent
	}{
		{"alice", find("alice", bySubject("alice")), map[string]any{
			"remote": "", "mode": "relay", "upstream": up.URL, "client_messages": 2.0, "client_bytes": 4.0,
			"upstream_messages": 2.0, "upstream_bytes": 4.0, "fanout_messages": 0.0, "closed_first": "client",
			"close_code": "1000", "close_from_client": closeFrame(1000, "bye"), "close_to_upstream": closeFrame(1000, "bye"),
			"close_from_upstream": closeFrame(1000, "bye"), "close_to_client": closeFrame(1000, "bye"),
		}, nil},
		{"bob", find("bob", bySubject("bob")), map[string]any{
			"mode": "relay", "client_messages": 1.0, "client_bytes": float64(len(cmd)), "upstream_messages": 0.0,
			"closed_first": "upstream", "close_code": "4000", "close_from_upstream": closeFrame(4000, "done"),
			"close_to_client": closeFrame(4000, "done"),
		}, nil},
		{"the slow consumer", slowLine, map[string]any{
			"mode": "rooms", "upstream": "", "subject": "", "client_messages": 1.0, "client_bytes": float64(len(slowSub)),
			"closed_first": "gateway", "close_to_client": closeFrame(1013, "slow consumer"),
		}, []string{"close_from_upstream", "close_to_upstream"}},
		{"s1", find("s1", func(m map[string]any) bool { return m["fanout_messages"] == float64(total+2) }), map[string]any{
			"mode": "rooms", "client_messages": 5.0, "client_bytes": float64(s1Bytes), "fanout_bytes": float64(fanoutBytes),
			"closed_first": "client", "close_code": "1000", "close_from_client": closeFrame(1000, ""),
		}, nil},
		{"s2", find("s2", func(m map[string]any) bool {
			return m["fanout_messages"] == 0.0 && m["mode"] == "rooms" && m["close_code"] == "1000"
		}),
			map[string]any{"client_messages": 1.0, "client_bytes": float64(len(s2Bytes))}, nil},
	} {
		for k, want := range c.want {
			got, ok := c.line[k]
			if k == "remote" {
				if s, _ := got.(string); !strings.HasPrefix(s, "127.0.0.1:") {
					t.Errorf("%s: remote %v", c.what, got)
				}
				continue
			}
			if !ok || fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("%s: %s = %v, want %v", c.what, k, got, want)
			}
		}
		for _, k := range c.empty {
			if v, ok := c.line[k]; ok {
				t.Errorf("%s: %s = %v, want none", c.what, k, v)
			}
		}
		if id, _ := c.line["request_id"].(string); len(id) != 36 {
			t.Errorf("%s: request_id %q, want a UUID", c.what, id)
		}
		if d, ok := c.line["duration"].(float64); !ok || d <= 0 {
			t.Errorf("%s: duration %v", c.what, c.line["duration"])
		}
		if c.line["level"] != "info" || c.line["logger"] != "http.handlers.wsgate" {
			t.Errorf("%s: level %v, logger %v, want info, http.handlers.wsgate", c.what, c.line["level"], c.line["logger"])
		}
	}

	// Every series the session touched, exactly.
	relay := func(name string, want float64, labels ...string) series {
		return metric(name, want, append([]string{"handler", "relay"}, labels...)...)
	}
	rooms := func(name string, want float64, labels ...string) series {
		return metric(name, want, append([]string{"handler", "rooms"}, labels...)...)
	}
	up2c, c2u := "upstream_to_client", "client_to_upstream"
	g.metrics().check(t, "at the end", []series{
		relay("wsgate_upgrades_total", 2, "mode", "relay", "result", "ok"),
		relay("wsgate_upgrades_total", 1, "mode", "relay", "result", "origin"),
		relay("wsgate_upgrades_total", 2, "mode", "relay", "result", "token"),
		relay("wsgate_upgrades_total", 1, "mode", "relay", "result", "limit"),
		relay("wsgate_upgrades_total", 1, "mode", "relay", "result", "handshake"),
		relay("wsgate_upgrades_total", 1, "mode", "relay", "result", "forward_auth"),
		relay("wsgate_upgrades_total", 1, "mode", "relay", "result", "upstream"),
		relay("wsgate_handshake_duration_seconds", 9, "mode", "relay"),
		relay("wsgate_upstream_dial_duration_seconds", 2, "result", "ok"),
		relay("wsgate_upstream_dial_duration_seconds", 1, "result", "error"),
		relay("wsgate_connections_open", 0, "mode", "relay"),
		relay("wsgate_messages_total", 3, "direction", c2u),
		relay("wsgate_bytes_total", float64(4+len(cmd)), "direction", c2u),
		relay("wsgate_messages_total", 2, "direction", up2c),
		relay("wsgate_bytes_total", 4, "direction", up2c),
		relay("wsgate_messages_total", 0, "direction", "fanout"),
		relay("wsgate_closes_total", 1, "side", "client", "code", "1000"),
		relay("wsgate_closes_total", 1, "side", "upstream", "code", "4000"),
		relay("wsgate_policy_denials_total", 1, "action", "publish"),
		relay("wsgate_rate_limited_total", 1, "direction", "client", "on_exceed", "drop"),
		relay("wsgate_rate_limited_total", 0, "direction", "client", "on_exceed", "close"),
		relay("wsgate_write_timeouts_total", 0, "side", "client"),
		relay("wsgate_slow_consumers_total", 0, "result", "close"),

		rooms("wsgate_upgrades_total", 3, "mode", "rooms", "result", "ok"),
		rooms("wsgate_handshake_duration_seconds", 3, "mode", "rooms"),
		rooms("wsgate_connections_open", 0, "mode", "rooms"),
		rooms("wsgate_connections_parked", 0),
		rooms("wsgate_messages_total", 7, "direction", c2u),
		rooms("wsgate_bytes_total", float64(s1Bytes+len(slowSub)+len(s2Bytes)), "direction", c2u),
		rooms("wsgate_messages_total", 0, "direction", up2c),
		rooms("wsgate_messages_total", float64(total+2)+slowFanout, "direction", "fanout"),
		rooms("wsgate_bytes_total", float64(fanoutBytes)+slowFanoutBytes, "direction", "fanout"),
		rooms("wsgate_closes_total", 2, "side", "client", "code", "1000"),
		rooms("wsgate_closes_total", 1, "side", "client", "code", "1013"),
		rooms("wsgate_slow_consumers_total", 1, "result", "close"),
		rooms("wsgate_slow_consumers_total", 0, "result", "drop"),
		rooms("wsgate_policy_denials_total", 1, "action", "publish"),
		rooms("wsgate_policy_denials_total", 0, "action", "subscribe"),
		rooms("wsgate_rate_limited_total", 1, "direction", "client", "on_exceed", "publish_rate"),

		metric("wsgate_token_verifications_total", 4, "result", "valid"),
		metric("wsgate_token_verifications_total", 1, "result", "expired"),
		metric("wsgate_token_verifications_total", 1, "result", "missing"),
		metric("wsgate_token_cache_hits_total", 2),
		metric("wsgate_publications_total", 2, "source", "ws"),
		metric("wsgate_publications_total", total, "source", "http"),
		metric("wsgate_publications_total", 1+total+1, "source", "redis"),
		metric("wsgate_deliveries_total", 1+2*total+1),
		metric("wsgate_publications_invalid_total", 1),
		metric("wsgate_rooms_channels", 0),
		metric("wsgate_rooms_subscriptions", 0),
		metric("wsgate_broker_up", 1),
		metric("wsgate_broker_reconnects_total", 1),
		metric("wsgate_broker_errors_total", 1),
		metric("wsgate_broker_publish_duration_seconds", batches+1), // each batch is one broker call
	})

	// The access log shows each upgrade as 101, and each refusal with its
	// status.
	statuses := map[string][]int{}
	for _, l := range g.logLines("handled request") {
		r, _ := l["request"].(map[string]any)
		uri, _ := r["uri"].(string)
		st, _ := l["status"].(float64)
		statuses[uri] = append(statuses[uri], int(st))
	}
	for uri, want := range map[string][]int{
		"/relay": {403, 401, 401, 101, 429, 426, 101},
		"/fa":    {401},
		"/down":  {502},
		"/ws":    {101, 101},
		"/slow":  {101},
	} {
		if fmt.Sprint(statuses[uri]) != fmt.Sprint(want) {
			t.Errorf("access log statuses for %s: %v, want %v", uri, statuses[uri], want)
		}
	}
	// Caddy's own request metrics count the upgrades as 101, not 200.
	if got := g.metrics().value("caddy_http_request_duration_seconds", "code", "101"); got != 5 {
		t.Errorf("caddy_http_request_duration_seconds{code=101} count %v, want 5", got)
	}
}
