package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const publishKey = "test-publish-key-0123456789"

// roomsSite serves wsgate.v1 on /ws and backend publishing on /publish;
// opts are more wsgate subdirectives.
func roomsSite(opts string) string { return roomsSiteWith("", opts) }

// roomsSiteWith is roomsSite with subdirectives of the rooms block.
func roomsSiteWith(roomsOpts, opts string) string {
	return fmt.Sprintf(`	route {
		wsgate /ws {
			rooms {
%s
			}
%s
		}
		wsgate_publish /publish {
			key %s
		}
		respond 404
	}`, roomsOpts, opts, publishKey)
}

func redisGlobal(url string) string {
	return fmt.Sprintf("\twsgate {\n\t\tbroker redis %s\n\t}", url)
}

// roomsClient is a wsgate.v1 client on coder/websocket.
type roomsClient struct {
	t       testing.TB
	c       *websocket.Conn
	nextID  int
	msgs    chan roomsMsg
	errs    chan error
	replies chan map[string]any
}

type roomsMsg struct {
	Op      string          `json:"op"`
	Channel string          `json:"channel"`
	Data    json.RawMessage `json:"data"`
	at      time.Time
}

func dialRooms(t testing.TB, g *gateway) *roomsClient {
	t.Helper()
	return dialRoomsWith(t, g, nil)
}

// dialRoomsWith is dialRooms with extra handshake headers (a token).
func dialRoomsWith(t testing.TB, g *gateway, hdr http.Header) *roomsClient {
	t.Helper()
	c := dial(t, g, "/ws", &websocket.DialOptions{Subprotocols: []string{"wsgate.v1"}, HTTPHeader: hdr})
	if c.Subprotocol() != "wsgate.v1" {
		t.Fatalf("subprotocol %q", c.Subprotocol())
	}
	rc := &roomsClient{t: t, c: c, msgs: make(chan roomsMsg, 4096), errs: make(chan error, 1), replies: make(chan map[string]any, 64)}
	go func() {
		for {
			_, b, err := c.Read(context.Background())
			if err != nil {
				rc.errs <- err
				close(rc.msgs)
				return
			}
			at := time.Now()
			var m roomsMsg
			if json.Unmarshal(b, &m) == nil && m.Op == "message" {
				m.at = at
				rc.msgs <- m
				continue
			}
			var r map[string]any
			json.Unmarshal(b, &r)
			rc.replies <- r
		}
	}()
	return rc
}

// call sends a request and waits for its reply.
func (rc *roomsClient) call(req map[string]any) map[string]any {
	rc.t.Helper()
	r, err := rc.request(req)
	if err != nil {
		rc.t.Fatal(err)
	}
	return r
}

// request is call for goroutines other than the test's: it returns an
// error instead of failing the test.
func (rc *roomsClient) request(req map[string]any) (map[string]any, error) {
	rc.nextID++
	req["id"] = rc.nextID
	b, _ := json.Marshal(req)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := rc.c.Write(ctx, websocket.MessageText, b); err != nil {
		return nil, fmt.Errorf("write: %v", err)
	}
	select {
	case r := <-rc.replies:
		if id, _ := r["id"].(float64); int(id) != rc.nextID {
			return nil, fmt.Errorf("reply %v to request %d", r, rc.nextID)
		}
		return r, nil
	case err := <-rc.errs:
		return nil, fmt.Errorf("connection ended: %v", err)
	case <-ctx.Done():
		return nil, fmt.Errorf("no reply to %s", b)
	}
}

func (rc *roomsClient) subscribe(ch string) {
	rc.t.Helper()
	if r := rc.call(map[string]any{"op": "subscribe", "channel": ch}); r["op"] != "ok" {
		rc.t.Fatalf("subscribe %s: %v", ch, r)
	}
}

func httpPublish(t testing.TB, g *gateway, body string) (int, string) {
	t.Helper()
	status, resp, err := httpPost(g, body)
	if err != nil {
		t.Fatal(err)
	}
	return status, resp
}

// httpPost is httpPublish for goroutines other than the test's.
func httpPost(g *gateway, body string) (int, string, error) { return postPublish(g.addr(), body) }

// postPublish sends body to POST /publish at addr with the test's key.
func postPublish(addr, body string) (int, string, error) {
	req, _ := http.NewRequest("POST", "http://"+addr+"/publish", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+publishKey)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String(), nil
}

type seqData struct {
	Src string  `json:"src"`
	Seq int     `json:"seq"`
	TS  float64 `json:"ts,omitempty"`
}

// TestFanOutAcrossTwoNodes: two gateways share one Redis; 200 clients on
// each subscribe to one room; 1,000 messages are published alternately
// through HTTP on node A, a client on node B and a plain Redis PUBLISH.
// Every client gets all 1,000, in per-publisher order, none twice.
func TestFanOutAcrossTwoNodes(t *testing.T) {
	rs := startRedis(t)
	// The client publisher sends a third of the messages back to back, far
	// over the default publish rate.
	site := roomsSiteWith("\t\t\t\tpublish_rate off", "")
	a := startGatewayWith(t, redisGlobal(rs.url()), nil, site)
	b := startGatewayWith(t, redisGlobal(rs.url()), nil, site)
	const perNode, total = 200, 1000
	var clients []*roomsClient
	for _, g := range []*gateway{a, b} {
		for i := 0; i < perNode; i++ {
			c := dialRooms(t, g)
			c.subscribe("room:lobby")
			clients = append(clients, c)
		}
	}
	pub := dialRooms(t, b)
	sent := map[string]int{}
	for i := 0; i < total; i++ {
		src := []string{"http", "client", "redis"}[i%3]
		data, _ := json.Marshal(seqData{Src: src, Seq: sent[src]})
		sent[src]++
		switch src {
		case "http":
			if st, body := httpPublish(t, a, fmt.Sprintf(`{"channel":"room:lobby","data":%s}`, data)); st != 200 || !strings.Contains(body, `"accepted":1`) {
				t.Fatalf("HTTP publish: %d %s", st, body)
			}
		case "client":
			if r := pub.call(map[string]any{"op": "publish", "channel": "room:lobby", "data": json.RawMessage(data)}); r["op"] != "ok" {
				t.Fatalf("client publish: %v", r)
			}
		case "redis":
			rs.publish(t, "wsgate:room:lobby", string(data))
		}
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(clients))
	for i, c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			next := map[string]int{}
			deadline := time.After(30 * time.Second)
			for n := 0; n < total; n++ {
				select {
				case m, ok := <-c.msgs:
					if !ok {
						errs <- fmt.Errorf("client %d: connection ended after %d messages", i, n)
						return
					}
					var d seqData
					if err := json.Unmarshal(m.Data, &d); err != nil || m.Channel != "room:lobby" {
						errs <- fmt.Errorf("client %d: bad message %+v", i, m)
						return
					}
					if d.Seq != next[d.Src] {
						errs <- fmt.Errorf("client %d: %s message %d arrived when %d was due (lost, reordered or doubled)", i, d.Src, d.Seq, next[d.Src])
						return
					}
					next[d.Src]++
				case <-deadline:
					errs <- fmt.Errorf("client %d: got %d of %d messages", i, n, total)
					return
				}
			}
			select {
			case m := <-c.msgs:
				errs <- fmt.Errorf("client %d: message beyond the %d sent: %s", i, total, m.Data)
			case <-time.After(50 * time.Millisecond):
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}

// TestRedisOutage: Redis is killed while clients are subscribed and comes
// back 3 s later. Local delivery keeps working meanwhile; cross-node
// delivery resumes by itself within 5 s; no gateway restarts.
func TestRedisOutage(t *testing.T) {
	rs := startRedis(t)
	a := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	b := startGatewayWith(t, redisGlobal(rs.url()), nil, roomsSite(""))
	onA, onB, pubA := dialRooms(t, a), dialRooms(t, b), dialRooms(t, a)
	onA.subscribe("room:x")
	onB.subscribe("room:x")
	recv := func(c *roomsClient, within time.Duration) (string, bool) {
		select {
		case m := <-c.msgs:
			return string(m.Data), true
		case <-time.After(within):
			return "", false
		}
	}
	pubA.call(map[string]any{"op": "publish", "channel": "room:x", "data": "before"})
	for _, c := range []*roomsClient{onA, onB} {
		if d, ok := recv(c, 5*time.Second); !ok || d != `"before"` {
			t.Fatalf("before the outage: %q %v", d, ok)
		}
	}
	rs.kill()
	killedAt := time.Now()
	// Local delivery keeps working; the publisher learns cross-node failed.
	r := pubA.call(map[string]any{"op": "publish", "channel": "room:x", "data": "during"})
	if r["op"] != "error" || r["code"] != "unavailable" {
		t.Fatalf("publish during the outage: %v, want error unavailable", r)
	}
	if d, ok := recv(onA, 5*time.Second); !ok || d != `"during"` {
		t.Fatalf("local delivery during the outage: %q %v", d, ok)
	}
	<-time.After(time.Until(killedAt.Add(3 * time.Second)))
	rs.start()
	restarted := time.Now()
	// Cross-node delivery resumes by itself.
	var resumed time.Duration
	for i := 0; ; i++ {
		pubA.call(map[string]any{"op": "publish", "channel": "room:x", "data": fmt.Sprint("after-", i)})
		if d, ok := recv(onB, 200*time.Millisecond); ok && strings.HasPrefix(d, `"after-`) {
			resumed = time.Since(restarted)
			break
		}
		if time.Since(restarted) > 5*time.Second {
			t.Fatalf("cross-node delivery did not resume within 5 s of the restart")
		}
	}
	t.Logf("cross-node delivery resumed %v after Redis came back", resumed)
	for _, g := range []*gateway{a, b} {
		select {
		case <-g.exited:
			t.Fatal("a gateway exited")
		default:
		}
	}
}

// TestSlowConsumer: a client that never reads does not delay delivery to
// 100 others, and is closed with 1013.
func TestSlowConsumer(t *testing.T) {
	// A close timeout longer than the default 5 s: the slow client starts
	// reading only once the gateway has logged that it gave up, and on a
	// busy machine may not reach the close frame (behind its backlog)
	// before a shorter one drops the socket.
	g := startGateway(t, roomsSite("\t\t\tsend_queue 64\n\t\t\tclose_timeout 15s"))
	var readers []*roomsClient
	for i := 0; i < 100; i++ {
		c := dialRooms(t, g)
		c.subscribe("room:fast")
		readers = append(readers, c)
	}
	run := func(n int, midway func()) []time.Duration {
		payload := strings.Repeat("x", 4<<10)
		var lat []time.Duration
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, c := range readers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for k := 0; k < n; k++ {
					select {
					case m := <-c.msgs:
						var d struct{ TS int64 }
						json.Unmarshal(m.Data, &d)
						mu.Lock()
						lat = append(lat, m.at.Sub(time.Unix(0, d.TS)))
						mu.Unlock()
					case <-time.After(30 * time.Second):
						t.Errorf("a reader got %d of %d", k, n)
						return
					}
				}
			}()
		}
		// Open loop: one publication every 4 ms, so latency measures delivery,
		// not a queue built up by the test itself.
		tick := time.NewTicker(4 * time.Millisecond)
		defer tick.Stop()
		for k := 0; k < n; k++ {
			<-tick.C
			if k == 0 && midway != nil {
				midway()
			}
			data := fmt.Sprintf(`{"ts":%d,"pad":%q}`, time.Now().UnixNano(), payload)
			if st, body := httpPublish(t, g, `{"channel":"room:fast","data":`+data+`}`); st != 200 {
				t.Fatalf("publish: %d %s", st, body)
			}
		}
		wg.Wait()
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		return lat
	}
	p99 := func(l []time.Duration) time.Duration { return l[len(l)*99/100] }
	median := func(d []time.Duration) time.Duration {
		sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
		return d[len(d)/2]
	}
	const n, rounds = 300, 3
	// Runs alternate without and with a slow consumer (a new one each
	// time); the medians of their p99s are compared.
	var base, with []time.Duration
	for round := 0; round < rounds; round++ {
		base = append(base, p99(run(n, nil)))

		// The slow consumer subscribes, then does not read. A small receive
		// buffer keeps the kernel from absorbing its backlog.
		slow := rawDialBuf(t, g, "/ws", http.Header{"Sec-WebSocket-Protocol": {"wsgate.v1"}}, 4096)
		for i, ch := range []string{"room:fast", "room:fill"} {
			slow.write(frame(true, opText, []byte(fmt.Sprintf(`{"id":%d,"op":"subscribe","channel":%q}`, i, ch))))
			if f, err := slow.read(5 * time.Second); err != nil || !strings.Contains(string(f.payload), `"ok"`) {
				t.Fatalf("slow subscribe: %v %s", err, f.payload)
			}
		}
		// Fill the kernel's buffers toward the slow client (its own channel,
		// watching the gateway socket's send queue in /proc/net/tcp) so that
		// it is stuck when the run starts and overflows during it.
		fill := fmt.Sprintf(`{"channel":"room:fill","data":%q}`, strings.Repeat("f", 16<<10))
		last, flat := -1, 0
		for flat < 3 {
			httpPublish(t, g, fill)
			q := sendQueueBytes(t, g.port, slow.conn.LocalAddr().(*net.TCPAddr).Port)
			if q <= last {
				flat++
			} else {
				flat = 0
			}
			last = max(last, q)
		}
		// The gateway's log line for this client, which names its address
		// (a reader starved by a busy machine may be closed as one too).
		gaveUp := regexp.MustCompile(`slow consumer[^\n]*"remote":"` + regexp.QuoteMeta(slow.conn.LocalAddr().String()) + `"`)
		closed := make(chan int, 1)
		with = append(with, p99(run(n, func() {
			go func() {
				// Once the gateway has given up on it (its log says so), the
				// client reads: its backlog, then the close frame (closing a
				// stuck client is bounded by the close timeout, 15 s here).
				deadline := time.Now().Add(20 * time.Second)
				for !gaveUp.MatchString(g.logs.String()) {
					if time.Now().After(deadline) {
						closed <- -2
						return
					}
					pollPause()
				}
				code, why := slow.readCloseNoFail(15 * time.Second)
				if code != 1013 {
					t.Logf("slow consumer: %d %s", code, why)
				}
				closed <- code
			}()
		})))
		if code := <-closed; code != 1013 {
			t.Fatalf("slow consumer: close %d, want 1013 (-2: the gateway never gave up on it)", code)
		}
	}
	t.Logf("readers' delivery p99 per run: %v without a slow consumer, %v with one", base, with)
	if mb, mw := median(base), median(with); mw > 2*mb {
		t.Fatalf("median p99 with a slow consumer %v, more than twice %v", mw, mb)
	}
}

// sendQueueBytes reads the send queue (bytes not yet acknowledged) of the
// socket from localPort to remotePort from /proc/net/tcp or tcp6.
func sendQueueBytes(t testing.TB, localPort, remotePort int) int {
	t.Helper()
	lp, rp := fmt.Sprintf(":%04X", localPort), fmt.Sprintf(":%04X", remotePort)
	for _, file := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) > 4 && strings.HasSuffix(f[1], lp) && strings.HasSuffix(f[2], rp) {
				q, _, _ := strings.Cut(f[4], ":")
				n, _ := strconv.ParseInt(q, 16, 64)
				return int(n)
			}
		}
	}
	t.Fatalf("no socket from port %d to %d in /proc/net/tcp*", localPort, remotePort)
	return 0
}
