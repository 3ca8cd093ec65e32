package rooms_test

import (
	"context"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/internal/fakeclock"
	"github.com/wsgate/wsgate/rooms"
)

// frame is a decoded server message of any op.
type frame struct {
	ID        *int64          `json:"id"`
	Op        string          `json:"op"`
	Code      string          `json:"code"`
	Channel   string          `json:"channel"`
	Data      json.RawMessage `json:"data"`
	Epoch     string          `json:"epoch"`
	Offset    *uint64         `json:"offset"`
	Recovered *bool           `json:"recovered"`
	Conn      string          `json:"conn"`
	Count     *int            `json:"count"`
	Presence  []struct {
		Conn string `json:"conn"`
	} `json:"presence"`
	Publications []struct {
		Offset uint64          `json:"offset"`
		Data   json.RawMessage `json:"data"`
	} `json:"publications"`
}

// frames decodes everything queued for the client since the last call.
func (c *client) frames(seen *int) []frame {
	c.t.Helper()
	all := c.messages()
	var out []frame
	for _, m := range all[*seen:] {
		var f frame
		if err := json.Unmarshal([]byte(m), &f); err != nil {
			c.t.Fatalf("frame %q: %v", m, err)
		}
		out = append(out, f)
	}
	*seen = len(all)
	return out
}

// request sends msg and returns its reply, whether Handle returned it or
// queued it ahead of deliveries, and the frames queued after it.
func (c *client) request(msg string) (frame, []frame) {
	c.t.Helper()
	before := len(c.sess.queued())
	_, out := c.conn.Handle([]byte(msg), true)
	if out != nil {
		var f frame
		if err := json.Unmarshal(out, &f); err != nil {
			c.t.Fatalf("%s: reply %q: %v", msg, out, err)
		}
		return f, nil
	}
	fs := c.frames(&before)
	if len(fs) == 0 || (fs[0].Op != "ok" && fs[0].Op != "error") {
		c.t.Fatalf("%s: no reply ahead of %+v", msg, fs)
	}
	return fs[0], fs[1:]
}

func historyHub(t *testing.T, opt rooms.ChannelOptions) (*rooms.Hub, *broker.Memory) {
	t.Helper()
	h := rooms.NewHub()
	b := broker.NewMemory(h.Handle)
	h.SetBroker(b)
	h.SetChannelOptions(func(ch string) rooms.ChannelOptions {
		if strings.HasPrefix(ch, "h:") {
			return opt
		}
		return rooms.ChannelOptions{}
	})
	t.Cleanup(func() { b.Close() })
	return h, b
}

func hist(size int) *broker.HistoryOptions {
	return &broker.HistoryOptions{Size: size, TTL: time.Hour}
}

// offsets lists the offsets of the message frames, and fails on any other
// frame.
func offsets(t testing.TB, fs []frame) []uint64 {
	t.Helper()
	var out []uint64
	for _, f := range fs {
		if f.Op != "message" || f.Offset == nil {
			t.Fatalf("frame %+v, want a message with an offset", f)
		}
		out = append(out, *f.Offset)
	}
	return out
}

func seq(from, to uint64) []uint64 {
	var out []uint64
	for i := from; i <= to; i++ {
		out = append(out, i)
	}
	return out
}

func sinceMsg(channel, epoch string, off uint64) string {
	return fmt.Sprintf(`{"id":1,"op":"subscribe","channel":%q,"since":{"epoch":%q,"offset":%d}}`, channel, epoch, off)
}

func TestHistoryRecovery(t *testing.T) {
	h, _ := historyHub(t, rooms.ChannelOptions{History: hist(10)})
	a := newClient(t, h, rooms.ConnConfig{})
	r, after := a.request(`{"id":1,"op":"subscribe","channel":"h:1"}`)
	if r.Op != "ok" || r.Epoch == "" || r.Offset == nil || *r.Offset != 0 || r.Recovered != nil || len(after) != 0 {
		t.Fatalf("first subscribe: %+v then %+v; want ok with an epoch and offset 0, no recovered", r, after)
	}
	epoch := r.Epoch
	pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
	for i := 1; i <= 5; i++ {
		pub.ok(`{"op":"publish","channel":"h:1","data":` + strconv.Itoa(i) + `}`)
	}
	seen := 1
	if got := offsets(t, a.frames(&seen)); fmt.Sprint(got) != fmt.Sprint(seq(1, 5)) {
		t.Fatalf("live offsets %v, want 1..5", got)
	}

	for _, tc := range []struct {
		name      string
		epoch     string
		since     uint64
		recovered bool
		want      []uint64
	}{
		{"missed three", epoch, 2, true, seq(3, 5)},
		{"missed none", epoch, 5, true, nil},
		{"from the start", epoch, 0, true, seq(1, 5)},
		{"another epoch", "zzzzzzzzzz", 2, false, nil},
		{"an offset not reached yet", epoch, 9, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := newClient(t, h, rooms.ConnConfig{})
			r, after := b.request(sinceMsg("h:1", tc.epoch, tc.since))
			if r.Op != "ok" || r.Recovered == nil || *r.Recovered != tc.recovered || r.Epoch != epoch || *r.Offset != 5 {
				t.Fatalf("reply %+v; want ok, recovered %v, epoch %s, offset 5", r, tc.recovered, epoch)
			}
			if got := offsets(t, after); fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Fatalf("recovered offsets %v, want %v", got, tc.want)
			}
		})
	}
	// Whoever stays subscribed goes on from there with the live stream.
	pub.ok(`{"op":"publish","channel":"h:1","data":6}`)
	if got := offsets(t, a.frames(&seen)); fmt.Sprint(got) != "[6]" {
		t.Fatalf("live after recoveries: %v", got)
	}
}

func TestHistoryRecoveryBound(t *testing.T) {
	h, _ := historyHub(t, rooms.ChannelOptions{History: hist(5), RecoverMax: 3})
	pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
	for i := 1; i <= 10; i++ {
		pub.ok(`{"op":"publish","channel":"h:b","data":` + strconv.Itoa(i) + `}`)
	}
	first, _ := newClient(t, h, rooms.ConnConfig{}).request(`{"op":"subscribe","channel":"h:b"}`)
	for _, tc := range []struct {
		since     uint64
		recovered bool
		want      []uint64
	}{
		{7, true, seq(8, 10)},
		{6, false, nil}, // four missed: more than RecoverMax
		{1, false, nil}, // trimmed: only the last five are kept
	} {
		c := newClient(t, h, rooms.ConnConfig{})
		r, after := c.request(sinceMsg("h:b", first.Epoch, tc.since))
		if *r.Recovered != tc.recovered || fmt.Sprint(offsets(t, after)) != fmt.Sprint(tc.want) {
			t.Errorf("since %d: recovered %v with %v; want %v with %v", tc.since, *r.Recovered, offsets(t, after), tc.recovered, tc.want)
		}
	}
	c := newClient(t, h, rooms.ConnConfig{})
	r, _ := c.request(`{"id":2,"op":"history","channel":"h:b","limit":2}`)
	if r.Op != "ok" || len(r.Publications) != 2 || r.Publications[0].Offset != 9 || string(r.Publications[1].Data) != "10" || *r.Offset != 10 {
		t.Fatalf("history limit 2: %+v", r)
	}
	r, _ = c.request(`{"id":3,"op":"history","channel":"h:b"}`)
	if len(r.Publications) != 3 || r.Publications[0].Offset != 8 {
		t.Fatalf("history without limit: %d publications from %d; want the recovery bound, 3 from 8", len(r.Publications), r.Publications[0].Offset)
	}
	if r, _ := c.request(`{"id":4,"op":"history","channel":"plain"}`); r.Code != rooms.CodeNotFound {
		t.Fatalf("history of a channel without: %+v", r)
	}
	if r, _ := c.request(sinceMsg("plain", "e", 1)); r.Code != rooms.CodeNotFound {
		t.Fatalf("since on a channel without history: %+v", r)
	}
}

// pausingHistorian holds History calls until the test lets them go, so
// publications can land while a subscriber recovers.
type pausingHistorian struct {
	*broker.Memory
	before     bool // pause before reading (else after)
	reading    chan struct{}
	proceed    chan struct{}
	pauseCalls int
}

func (p *pausingHistorian) History(ctx context.Context, ch string, q broker.HistoryQuery) (broker.HistoryResult, error) {
	if p.pauseCalls == 0 {
		return p.Memory.History(ctx, ch, q)
	}
	p.pauseCalls--
	if p.before {
		p.reading <- struct{}{}
		<-p.proceed
	}
	res, err := p.Memory.History(ctx, ch, q)
	if !p.before {
		p.reading <- struct{}{}
		<-p.proceed
	}
	return res, err
}

// TestRecoveryWhilePublishing: publications that land while a subscriber
// reads history reach it once, in order, after what it recovered,
// whether they are in what it read or came after.
func TestRecoveryWhilePublishing(t *testing.T) {
	for _, before := range []bool{true, false} {
		t.Run(fmt.Sprintf("pause before the read %v", before), func(t *testing.T) {
			h := rooms.NewHub()
			b := &pausingHistorian{Memory: broker.NewMemory(h.Handle), before: before, reading: make(chan struct{}), proceed: make(chan struct{})}
			h.SetBroker(b)
			h.SetChannelOptions(func(string) rooms.ChannelOptions { return rooms.ChannelOptions{History: hist(100)} })
			pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
			publish := func(from, to int) {
				for i := from; i <= to; i++ {
					pub.ok(`{"op":"publish","channel":"race","data":` + strconv.Itoa(i) + `}`)
				}
			}
			watcher := newClient(t, h, rooms.ConnConfig{})
			first, _ := watcher.request(`{"op":"subscribe","channel":"race"}`)
			publish(1, 3)

			b.pauseCalls = 1
			c := newClient(t, h, rooms.ConnConfig{})
			type result struct {
				reply frame
				after []frame
			}
			done := make(chan result)
			go func() {
				r, after := c.request(sinceMsg("race", first.Epoch, 1))
				done <- result{r, after}
			}()
			<-b.reading
			publish(4, 6) // held for c, and (when the read comes after) in what it reads
			b.proceed <- struct{}{}
			res := <-done
			publish(7, 8)
			seen := 0
			c.frames(&seen) // everything so far: reply, recovered, held
			all := res.after
			more := c.messages()
			for _, m := range more[1+len(res.after):] {
				var f frame
				json.Unmarshal([]byte(m), &f)
				all = append(all, f)
			}
			if !*res.reply.Recovered {
				t.Fatalf("reply %+v, want recovered", res.reply)
			}
			if got := offsets(t, all); fmt.Sprint(got) != fmt.Sprint(seq(2, 8)) {
				t.Fatalf("offsets after since 1: %v, want 2..8 once each in order", got)
			}
		})
	}
}

// droppingHandler loses the broker deliveries it is told to, as Redis
// pub/sub does while a subscriber reconnects.
type droppingHandler struct {
	h    *rooms.Hub
	mu   sync.Mutex
	drop map[uint64]bool
}

func (d *droppingHandler) handle(ch string, m broker.Message) {
	d.mu.Lock()
	lost := d.drop[m.Pos.Offset]
	d.mu.Unlock()
	if !lost {
		d.h.Handle(ch, m)
	}
}

// TestLiveGapFilledFromHistory: publications the live stream lost (3 and
// 4) reach subscribers before the one that shows the gap, read from
// history, or, when history no longer has them, after a reset; when the
// stream lost its last publications (the channel fell silent), they come
// when the broker says it is back (Resync).
func TestLiveGapFilledFromHistory(t *testing.T) {
	for _, tc := range []struct {
		name   string
		size   int
		pubs   int
		resync bool
		want   string
	}{
		{"in history", 10, 5, false, "m1 m2 m3 m4 m5"},
		{"trimmed", 1, 5, false, "m1 m2 reset@4 m5"}, // 3 and 4 are gone by the time 5 shows the gap
		{"silent, in history", 10, 4, true, "m1 m2 m3 m4"},
		{"silent, trimmed", 1, 4, true, "m1 m2 reset@4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := rooms.NewHub()
			d := &droppingHandler{h: h, drop: map[uint64]bool{3: true, 4: true}}
			b := broker.NewMemory(d.handle)
			h.SetBroker(b)
			h.SetChannelOptions(func(string) rooms.ChannelOptions { return rooms.ChannelOptions{History: hist(tc.size)} })
			c := newClient(t, h, rooms.ConnConfig{})
			r, _ := c.request(`{"op":"subscribe","channel":"gap"}`)
			pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
			for i := 1; i <= tc.pubs; i++ {
				pub.ok(`{"op":"publish","channel":"gap","data":` + strconv.Itoa(i) + `}`)
			}
			if tc.resync {
				h.Resync()
				h.Resync() // nothing more to do
			}
			seen := 1
			var got []string
			for _, f := range c.frames(&seen) {
				switch {
				case f.Op == "message":
					got = append(got, fmt.Sprintf("m%d", *f.Offset))
				case f.Op == "reset" && f.Epoch == r.Epoch:
					got = append(got, fmt.Sprintf("reset@%d", *f.Offset))
				default:
					t.Fatalf("frame %+v", f)
				}
			}
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("got %v, want %s", got, tc.want)
			}
		})
	}
}

// TestEpochChangeResets: when a channel's history is lost, live
// subscribers get a reset naming the new epoch before its publications,
// and a subscriber that comes back with the old epoch is told it did not
// recover.
func TestEpochChangeResets(t *testing.T) {
	h, b := historyHub(t, rooms.ChannelOptions{History: &broker.HistoryOptions{Size: 10, TTL: time.Minute, MetaTTL: time.Hour}})
	clock := fakeclock.New(time.Unix(1_700_000_000, 0))
	b.SetClock(clock.Now)
	c := newClient(t, h, rooms.ConnConfig{})
	r, _ := c.request(`{"op":"subscribe","channel":"h:e"}`)
	pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
	pub.ok(`{"op":"publish","channel":"h:e","data":1}`)
	clock.Advance(2 * time.Hour)
	pub.ok(`{"op":"publish","channel":"h:e","data":2}`)
	seen := 1
	fs := c.frames(&seen)
	if len(fs) != 3 || fs[0].Op != "message" || fs[1].Op != "reset" || fs[1].Epoch == r.Epoch || *fs[1].Offset != 0 ||
		fs[2].Op != "message" || *fs[2].Offset != 1 {
		t.Fatalf("frames %+v; want message 1, a reset to a new epoch at 0, message 1 of it", fs)
	}
	back := newClient(t, h, rooms.ConnConfig{})
	r2, after := back.request(sinceMsg("h:e", r.Epoch, 1))
	if *r2.Recovered || r2.Epoch != fs[1].Epoch || len(after) != 0 {
		t.Fatalf("since the old epoch: %+v then %+v; want not recovered, the new epoch", r2, after)
	}
}

func TestPresence(t *testing.T) {
	h, _ := historyHub(t, rooms.ChannelOptions{Presence: &broker.PresenceOptions{Events: true}})
	deny := map[string]bool{}
	authorize := func(action, ch string) bool { return !deny[action] }
	info := func(id string) []byte { return []byte(`{"conn":"` + id + `","subject":"u-` + id + `"}`) }
	a := newClient(t, h, rooms.ConnConfig{ID: "a", PresenceInfo: info("a"), Authorize: authorize})
	b := newClient(t, h, rooms.ConnConfig{ID: "b", PresenceInfo: info("b"), Authorize: authorize})
	a.ok(`{"op":"subscribe","channel":"h:p"}`)
	b.ok(`{"op":"subscribe","channel":"h:p"}`)
	r, _ := a.request(`{"id":5,"op":"presence","channel":"h:p"}`)
	if len(r.Presence) != 2 || r.Presence[0].Conn != "a" || r.Presence[1].Conn != "b" {
		t.Fatalf("presence %+v, want a and b", r)
	}
	if r, _ := a.request(`{"op":"presence_count","channel":"h:p"}`); *r.Count != 2 {
		t.Fatalf("presence_count %+v", r)
	}
	b.ok(`{"op":"unsubscribe","channel":"h:p"}`)
	b.conn.Close()
	a.wantMessages(
		`{"op":"join","channel":"h:p","conn":"a","subject":"u-a"}`,
		`{"op":"join","channel":"h:p","conn":"b","subject":"u-b"}`,
		`{"op":"leave","channel":"h:p","conn":"b","subject":"u-b"}`,
	)
	if r, _ := a.request(`{"op":"presence_count","channel":"h:p"}`); *r.Count != 1 {
		t.Fatalf("presence_count after b left: %+v", r)
	}
	if r, _ := a.request(`{"op":"presence","channel":"plain"}`); r.Code != rooms.CodeNotFound {
		t.Fatalf("presence of a channel without: %+v", r)
	}
	deny["presence"] = true
	if r, _ := a.request(`{"op":"presence","channel":"h:p"}`); r.Code != rooms.CodeForbidden {
		t.Fatalf("presence denied by policy: %+v", r)
	}
	// A raw-format subscriber (a relayed app's connection, which has no
	// id) gets no presence events and is not listed.
	raw := newClient(t, h, rooms.ConnConfig{Format: rooms.FormatRaw})
	raw.conn.Subscribe(context.Background(), "h:p")
	newClient(t, h, rooms.ConnConfig{ID: "c"}).ok(`{"op":"subscribe","channel":"h:p"}`)
	raw.wantMessages()
	deny["presence"] = false
	if r, _ := a.request(`{"op":"presence_count","channel":"h:p"}`); *r.Count != 2 {
		t.Fatalf("presence_count with a relayed connection subscribed: %+v, want a and c", r)
	}
}

// TestRecoveryNeedsHistoryAction: since reveals what was published before
// the subscriber came, so the policy must allow history too.
func TestRecoveryNeedsHistoryAction(t *testing.T) {
	h, _ := historyHub(t, rooms.ChannelOptions{History: hist(10)})
	c := newClient(t, h, rooms.ConnConfig{Authorize: func(action, _ string) bool { return action == "subscribe" }})
	if r, _ := c.request(sinceMsg("h:x", "e", 0)); r.Code != rooms.CodeForbidden {
		t.Fatalf("since without the history action: %+v", r)
	}
	if r, _ := c.request(`{"op":"history","channel":"h:x"}`); r.Code != rooms.CodeForbidden {
		t.Fatalf("history without the history action: %+v", r)
	}
	if r, _ := c.request(`{"op":"subscribe","channel":"h:x"}`); r.Op != "ok" || r.Epoch == "" {
		t.Fatalf("plain subscribe: %+v", r)
	}
}

// unavailableHistorian fails every history publication.
type unavailableHistorian struct{ *broker.Memory }

func (unavailableHistorian) PublishHistory(context.Context, []broker.HistoryPub) ([]broker.Position, error) {
	return nil, fmt.Errorf("%w: down", broker.ErrUnavailable)
}

// TestHistoryPublishDuringOutage: a publication that cannot enter history
// is not delivered anywhere (not even on this node), and the publisher is
// told so.
func TestHistoryPublishDuringOutage(t *testing.T) {
	h := rooms.NewHub()
	b := unavailableHistorian{broker.NewMemory(h.Handle)}
	h.SetBroker(b)
	h.SetChannelOptions(func(string) rooms.ChannelOptions { return rooms.ChannelOptions{History: hist(10)} })
	sub := newClient(t, h, rooms.ConnConfig{})
	sub.request(`{"op":"subscribe","channel":"o"}`)
	pub := newClient(t, h, rooms.ConnConfig{})
	r := pub.refused(`{"op":"publish","channel":"o","data":1}`, rooms.CodeUnavailable)
	if !strings.Contains(r.Message, "not delivered") {
		t.Fatalf("reply %+v", r)
	}
	if err := h.PublishBatch(context.Background(), []string{"o"}, [][]byte{[]byte("2")}); err == nil {
		t.Fatal("a batch to a history channel during the outage: no error")
	}
	seen := 1
	if fs := sub.frames(&seen); len(fs) != 0 {
		t.Fatalf("delivered during the outage: %+v", fs)
	}
}

// delayingHandler holds the broker's deliveries while told to, as the
// pub/sub stream does with publications in flight.
type delayingHandler struct {
	h    *rooms.Hub
	mu   sync.Mutex
	hold bool
	held []func()
}

func (d *delayingHandler) handle(ch string, m broker.Message) {
	d.mu.Lock()
	if d.hold {
		d.held = append(d.held, func() { d.h.Handle(ch, m) })
		d.mu.Unlock()
		return
	}
	d.mu.Unlock()
	d.h.Handle(ch, m)
}

func (d *delayingHandler) release() {
	d.mu.Lock()
	held := d.held
	d.held, d.hold = nil, false
	d.mu.Unlock()
	for _, f := range held {
		f()
	}
}

// TestRecoveryAheadOfLiveStream: a subscriber that read history further
// than the live stream has reached on this node does not get those
// publications again when they arrive.
func TestRecoveryAheadOfLiveStream(t *testing.T) {
	h := rooms.NewHub()
	d := &delayingHandler{h: h}
	b := broker.NewMemory(d.handle)
	h.SetBroker(b)
	h.SetChannelOptions(func(string) rooms.ChannelOptions { return rooms.ChannelOptions{History: hist(100)} })
	watcher := newClient(t, h, rooms.ConnConfig{})
	first, _ := watcher.request(`{"op":"subscribe","channel":"ahead"}`)
	pub := newClient(t, h, rooms.ConnConfig{PublishRate: -1})
	publish := func(from, to int) {
		for i := from; i <= to; i++ {
			pub.ok(`{"op":"publish","channel":"ahead","data":` + strconv.Itoa(i) + `}`)
		}
	}
	publish(1, 3)
	d.mu.Lock()
	d.hold = true
	d.mu.Unlock()
	publish(4, 5) // in history, not yet delivered here
	c := newClient(t, h, rooms.ConnConfig{})
	r, after := c.request(sinceMsg("ahead", first.Epoch, 1))
	if !*r.Recovered || *r.Offset != 5 {
		t.Fatalf("reply %+v", r)
	}
	d.release()
	publish(6, 6)
	seen := 1 + len(after)
	all := append(after, c.frames(&seen)...)
	if got := offsets(t, all); fmt.Sprint(got) != fmt.Sprint(seq(2, 6)) {
		t.Fatalf("offsets %v, want 2..6 once each", got)
	}
	seen = 1
	if got := offsets(t, watcher.frames(&seen)); fmt.Sprint(got) != fmt.Sprint(seq(1, 6)) {
		t.Fatalf("watcher offsets %v, want 1..6", got)
	}
}
