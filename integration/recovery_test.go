package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// The chaos tests run a steady numbered publish stream through two
// gateways (one for the memory broker) to one channel that keeps history,
// and 100 subscribers that check every offset they are given, across
// dropped connections, a gateway killed with -9 and a Redis restarted
// without persistence.

const chaosChannel = "chaos:room"

// historyGlobal is the wsgate app config of the chaos tests: history on
// chaos:**, presence on room:** (entries of a dead node gone within 2s).
func historyGlobal(broker string) string {
	return "\twsgate {\n" + broker + "\n\t\thistory chaos:** {\n\t\t\tsize 100000\n\t\t\tttl 10m\n\t\t\trecover_max 100000\n\t\t}\n" +
		"\t\tpresence room:** {\n\t\t\tttl 2s\n\t\t\tevents\n\t\t}\n\t}"
}

// frameMsg is any gateway message of the wsgate.v1 protocol.
type frameMsg struct {
	ID        *int     `json:"id"`
	Op        string   `json:"op"`
	Code      string   `json:"code"`
	Message   string   `json:"message"`
	Epoch     string   `json:"epoch"`
	Offset    *uint64  `json:"offset"`
	Recovered *bool    `json:"recovered"`
	Data      chaosPub `json:"data"`
}

type chaosPub struct {
	P   string `json:"p"`
	Seq int    `json:"seq"`
}

// tracker is one subscriber across its reconnects: it checks that the
// offsets it is given, within an epoch, are each the one after the last,
// and that every change of epoch is announced (a reset event, or a reply
// that says recovery failed).
type tracker struct {
	id       int
	rng      *rand.Rand
	drops    bool // drop the connection every 20–80 messages
	gateways func() []*gateway

	mu           sync.Mutex
	epoch        string
	last         uint64
	got          int
	lastSeq      map[string]int
	errs         []string
	conns        int
	recovered    int
	notRecovered int
	resets       int
}

func (tr *tracker) fail(format string, args ...any) {
	tr.errs = append(tr.errs, fmt.Sprintf("subscriber %d: ", tr.id)+fmt.Sprintf(format, args...))
}

// position is where the tracker stands.
func (tr *tracker) position() (string, uint64) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.epoch, tr.last
}

// run connects, subscribes (with since after the first time) and reads,
// reconnecting after every drop or lost connection, until ctx ends.
func (tr *tracker) run(ctx context.Context) {
	for ctx.Err() == nil {
		gs := tr.gateways()
		g := gs[tr.rng.IntN(len(gs))]
		tr.session(ctx, g)
	}
}

// session is one connection: it returns when the connection ends.
func (tr *tracker) session(ctx context.Context, g *gateway) {
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	c, _, err := websocket.Dial(dctx, g.url("/ws"), &websocket.DialOptions{Subprotocols: []string{"wsgate.v1"},
		HTTPHeader: http.Header{"Origin": {g.origin()}}})
	cancel()
	if err != nil {
		pollPause() // the node is gone or not back yet: try again
		return
	}
	defer c.CloseNow()
	c.SetReadLimit(-1)
	tr.mu.Lock()
	tr.conns++
	req := map[string]any{"id": 1, "op": "subscribe", "channel": chaosChannel}
	if tr.epoch != "" {
		req["since"] = map[string]any{"epoch": tr.epoch, "offset": tr.last}
	}
	tr.mu.Unlock()
	b, _ := json.Marshal(req)
	if c.Write(ctx, websocket.MessageText, b) != nil {
		return
	}
	dropAfter := 1 << 62
	if tr.drops {
		dropAfter = 20 + tr.rng.IntN(61)
	}
	n := 0
	for {
		_, b, err := c.Read(ctx)
		if err != nil {
			return
		}
		var m frameMsg
		if err := json.Unmarshal(b, &m); err != nil {
			tr.mu.Lock()
			tr.fail("undecodable %q", b)
			tr.mu.Unlock()
			return
		}
		tr.mu.Lock()
		ok := tr.take(m, req["since"] != nil, b)
		tr.mu.Unlock()
		if !ok {
			pollPause() // refused (Redis down): subscribe again shortly
			return
		}
		if m.Op == "message" {
			if n++; n >= dropAfter {
				return // CloseNow: the TCP connection goes without a close frame
			}
		}
	}
}

// take checks one message; false ends the session.
func (tr *tracker) take(m frameMsg, since bool, raw []byte) bool {
	switch m.Op {
	case "ok":
		if m.Offset == nil || m.Epoch == "" {
			tr.fail("subscribe reply without a position: %s", raw)
			return false
		}
		switch {
		case !since:
			tr.epoch, tr.last = m.Epoch, *m.Offset
		case m.Recovered == nil:
			tr.fail("reply to since without recovered: %s", raw)
		case *m.Recovered:
			if m.Epoch != tr.epoch {
				tr.fail("recovered into another epoch: %s (had %s)", raw, tr.epoch)
			}
			tr.recovered++
		default:
			tr.notRecovered++
			tr.epoch, tr.last = m.Epoch, *m.Offset
		}
	case "error":
		if m.Code != "unavailable" {
			tr.fail("error reply %s", raw)
		}
		return false
	case "reset":
		tr.resets++
		tr.epoch, tr.last = m.Epoch, *m.Offset
	case "message":
		switch {
		case m.Offset == nil:
			tr.fail("message without offset: %s", raw)
		case *m.Offset == tr.last+1:
			tr.last++
			tr.got++
			if m.Data.Seq <= tr.lastSeq[m.Data.P] {
				tr.fail("publisher %s: seq %d after %d", m.Data.P, m.Data.Seq, tr.lastSeq[m.Data.P])
			}
			tr.lastSeq[m.Data.P] = m.Data.Seq
		case *m.Offset <= tr.last:
			tr.fail("duplicate: offset %d after %d (epoch %s)", *m.Offset, tr.last, tr.epoch)
		default:
			tr.fail("gap: offset %d after %d (epoch %s)", *m.Offset, tr.last, tr.epoch)
			tr.last = *m.Offset
		}
	default:
		tr.fail("unexpected %s", raw)
	}
	return true
}

// chaosPublisher publishes a numbered stream through POST /publish, every
// 4 ms, on the gateways it is given (the first that answers), counting
// what was accepted. Each publication carries an idempotency key: one
// that reached Redis through a gateway killed before it answered is
// retried on the next without being published twice.
type chaosPublisher struct {
	name     string
	gateways func() []*gateway
	seq      int
	accepted atomic.Int64
	refused  atomic.Int64
}

func (p *chaosPublisher) run(ctx context.Context, total int) {
	tick := time.NewTicker(4 * time.Millisecond)
	defer tick.Stop()
	for p.seq < total {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		p.seq++
		body := fmt.Sprintf(`{"channel":%q,"data":{"p":%q,"seq":%d},"idempotency_key":"%s-%d"}`, chaosChannel, p.name, p.seq, p.name, p.seq)
		sent := false
		for _, g := range p.gateways() {
			if status, _, err := httpPost(g, body); err == nil {
				sent = status == http.StatusOK || status == http.StatusAccepted
				break
			}
		}
		if sent {
			p.accepted.Add(1)
		} else {
			p.refused.Add(1)
		}
	}
}

// chaos is one run: gateways, publishers, trackers.
type chaos struct {
	t        *testing.T
	mu       sync.Mutex
	alive    []*gateway
	trackers []*tracker
	pubs     []*chaosPublisher
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	pubWG    sync.WaitGroup
}

func (c *chaos) gateways() []*gateway {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*gateway(nil), c.alive...)
}

func (c *chaos) kill(g *gateway) {
	c.mu.Lock()
	for i, a := range c.alive {
		if a == g {
			c.alive = append(c.alive[:i], c.alive[i+1:]...)
			break
		}
	}
	c.mu.Unlock()
	g.terminate(syscall.SIGKILL, 10*time.Second)
}

// startChaos starts 100 trackers spread over gateways, then one publisher
// per gateway sending total messages each.
func startChaos(t *testing.T, gws []*gateway, drops bool, total int) *chaos {
	c := &chaos{t: t, alive: gws}
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	t.Cleanup(func() { cancel(); c.wg.Wait(); c.pubWG.Wait() })
	for i := range 100 {
		tr := &tracker{id: i, rng: rand.New(rand.NewPCG(uint64(i), 7)), drops: drops, lastSeq: map[string]int{}}
		tr.gateways = func() []*gateway {
			gs := c.gateways()
			// each starts on its own node, and moves when it is gone
			if len(gs) == len(gws) {
				return gs[i%len(gs) : i%len(gs)+1]
			}
			return gs
		}
		c.trackers = append(c.trackers, tr)
		c.wg.Go(func() { tr.run(ctx) })
	}
	eventually(t, 30*time.Second, "100 subscribers subscribed", func() bool {
		for _, tr := range c.trackers {
			if e, _ := tr.position(); e == "" {
				return false
			}
		}
		return true
	})
	for i := range gws {
		p := &chaosPublisher{name: string(rune('A' + i))}
		p.gateways = func() []*gateway {
			gs := c.gateways()
			for _, g := range gs { // its own node first
				if g == gws[i] {
					return append([]*gateway{g}, gs...)
				}
			}
			return gs
		}
		c.pubs = append(c.pubs, p)
		c.pubWG.Go(func() { p.run(ctx, total) })
	}
	return c
}

// published is how many messages the publishers got accepted.
func (c *chaos) published() int64 {
	var n int64
	for _, p := range c.pubs {
		n += p.accepted.Load()
	}
	return n
}

// finish waits for the publishers, then for every tracker to reach the
// channel's last offset, stops them and checks what they saw.
func (c *chaos) finish(top func() (string, uint64)) {
	t := c.t
	c.pubWG.Wait()
	epoch, last := top()
	eventually(t, 60*time.Second, fmt.Sprintf("every subscriber at %s/%d", epoch, last), func() bool {
		for _, tr := range c.trackers {
			if e, l := tr.position(); e != epoch || l != last {
				return false
			}
		}
		return true
	})
	c.cancel()
	c.wg.Wait()
	var errs []string
	var conns, rec, notRec, resets, got int
	for _, tr := range c.trackers {
		errs = append(errs, tr.errs...)
		conns += tr.conns
		rec += tr.recovered
		notRec += tr.notRecovered
		resets += tr.resets
		got += tr.got
	}
	var refused int64
	for _, p := range c.pubs {
		refused += p.refused.Load()
	}
	t.Logf("%d published (%d refused), last offset %d in epoch %s; 100 subscribers: %d connections, %d recoveries complete, %d not, %d resets, %d messages taken",
		c.published(), refused, last, epoch, conns, rec, notRec, resets, got)
	if len(errs) > 0 {
		t.Fatalf("%d errors, first ones:\n%s", len(errs), strings.Join(errs[:min(len(errs), 20)], "\n"))
	}
}

// topOf asks a gateway for the channel's position.
func topOf(t *testing.T, g *gateway) func() (string, uint64) {
	return func() (string, uint64) {
		rc := dialRooms(t, g)
		r := rc.call(map[string]any{"op": "history", "channel": chaosChannel, "limit": 1})
		if r["op"] != "ok" {
			t.Fatalf("history: %v", r)
		}
		return r["epoch"].(string), uint64(r["offset"].(float64))
	}
}

// historyNodes starts Redis and two gateways on it with historyGlobal.
func historyNodes(t *testing.T) (*redisServer, *gateway, *gateway) {
	t.Helper()
	rs := startRedis(t)
	global := historyGlobal("\t\tbroker redis " + rs.url())
	return rs, startGatewayWith(t, global, nil, roomsSite("")), startGatewayWith(t, global, nil, roomsSite(""))
}

// wantAllRecovered insists that no recovery was incomplete and no reset
// was sent.
func (c *chaos) wantAllRecovered() {
	c.t.Helper()
	for _, tr := range c.trackers {
		if tr.notRecovered > 0 || tr.resets > 0 {
			c.t.Fatalf("subscriber %d: %d recoveries incomplete, %d resets; want none", tr.id, tr.notRecovered, tr.resets)
		}
	}
}

// TestRecoveryDroppedConnections: subscribers drop their TCP connections
// every 20–80 messages and resubscribe with since, on either node: no
// gap, no duplicate, order kept, every recovery complete.
func TestRecoveryDroppedConnections(t *testing.T) {
	_, a, b := historyNodes(t)
	c := startChaos(t, []*gateway{a, b}, true, 600)
	c.finish(topOf(t, a))
	c.wantAllRecovered()
}

// TestRecoveryMemoryBroker is the same on one node with the memory broker.
func TestRecoveryMemoryBroker(t *testing.T) {
	a := startGatewayWith(t, historyGlobal("\t\tbroker memory"), nil, roomsSite(""))
	c := startChaos(t, []*gateway{a}, true, 1200)
	c.finish(topOf(t, a))
	c.wantAllRecovered()
}

// TestRecoveryGatewayKilled: one gateway is killed with -9 mid-stream; its
// subscribers reconnect to the other with since and miss nothing.
func TestRecoveryGatewayKilled(t *testing.T) {
	_, a, b := historyNodes(t)
	c := startChaos(t, []*gateway{a, b}, false, 600)
	eventually(t, 30*time.Second, "half the stream published", func() bool { return c.published() >= 600 })
	c.kill(b)
	c.finish(topOf(t, a))
	c.wantAllRecovered()
	moved := 0
	for _, tr := range c.trackers {
		if tr.conns > 1 {
			moved++
		}
	}
	if moved < 50 {
		t.Fatalf("%d subscribers reconnected, want the 50 of the killed node at least", moved)
	}
}

// TestRecoveryRedisRestarted: Redis restarts without persistence
// mid-stream: its history is gone, and every subscriber is told (a reset,
// or recovered false with the new epoch), never left with a silent gap.
func TestRecoveryRedisRestarted(t *testing.T) {
	rs, a, b := historyNodes(t)
	c := startChaos(t, []*gateway{a, b}, true, 900)
	epoch0, _ := c.trackers[0].position()
	eventually(t, 30*time.Second, "a third of the stream published", func() bool { return c.published() >= 600 })
	rs.kill()
	rs.start()
	c.finish(topOf(t, a))
	epoch, _ := topOf(t, a)()
	if epoch == epoch0 {
		t.Fatalf("epoch %s kept across a restart without persistence", epoch)
	}
	told := 0
	for _, tr := range c.trackers {
		if tr.resets+tr.notRecovered > 0 {
			told++
		}
	}
	if told != 100 {
		t.Fatalf("%d of 100 subscribers were told history was lost", told)
	}
}

// TestResetWithoutNextPublication: a channel that falls silent across a
// Redis restart without persistence still tells its subscribers their
// history is gone, as soon as each node is back on Redis.
func TestResetWithoutNextPublication(t *testing.T) {
	rs, a, b := historyNodes(t)
	var clients []*presenceClient
	for _, g := range []*gateway{a, b} {
		pc := dialPresence(t, g)
		r := pc.call(map[string]any{"op": "subscribe", "channel": "chaos:quiet"})
		if r["epoch"] == nil {
			t.Fatalf("subscribe reply %v", r)
		}
		clients = append(clients, pc)
	}
	for i := range 3 {
		if status, body := httpPublish(t, a, fmt.Sprintf(`{"channel":"chaos:quiet","data":%d}`, i)); status != http.StatusOK {
			t.Fatalf("publish: %d %s", status, body)
		}
	}
	epoch := clients[0].call(map[string]any{"op": "history", "channel": "chaos:quiet", "limit": 0})["epoch"]
	restarted := time.Now()
	rs.kill()
	rs.start()
	for i, pc := range clients {
		select {
		case r := <-pc.replies:
			if r["op"] != "reset" || r["epoch"] == epoch {
				t.Fatalf("node %d: %v, want a reset to a new epoch", i, r)
			}
			t.Logf("node %d: reset to epoch %v %v after the restart", i, r["epoch"], time.Since(restarted).Round(time.Millisecond))
		case <-time.After(10 * time.Second):
			t.Fatalf("node %d: no reset within 10s of the restart", i)
		}
	}
}
