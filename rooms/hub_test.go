package rooms_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/internal/poll"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

func TestHubReferenceCounting(t *testing.T) {
	ctx := context.Background()
	h, b := newMemoryHub(t)
	const ch = "chat:acme:42"
	subs := make([]*recSub, 50)
	for i := range subs {
		subs[i] = &recSub{}
		if err := h.Subscribe(ctx, ch, subs[i]); err != nil {
			t.Fatal(err)
		}
	}
	// The same subscriber again changes nothing.
	if err := h.Subscribe(ctx, ch, subs[0]); err != nil {
		t.Fatal(err)
	}
	if s, u := b.counts(ch); s != 1 || u != 0 {
		t.Fatalf("50 local subscribers: broker saw %d Subscribe and %d Unsubscribe, want 1 and 0", s, u)
	}
	if got := h.Subscribers(ch); got != 50 {
		t.Fatalf("Subscribers = %d, want 50", got)
	}
	if got := h.Channels(); got != 1 {
		t.Fatalf("Channels = %d, want 1", got)
	}

	if err := h.Publish(ctx, ch, []byte(`{"n":1}`)); err != nil {
		t.Fatal(err)
	}
	first := subs[0].pubs()
	if len(first) != 1 {
		t.Fatalf("subscriber 0 got %d publications, want 1", len(first))
	}
	for i, s := range subs {
		got := s.pubs()
		if len(got) != 1 || got[0] != first[0] {
			t.Fatalf("subscriber %d did not get the one shared publication: %v", i, got)
		}
	}

	// Leaving: nothing reaches the broker until the last one goes.
	for _, s := range subs[1:] {
		h.Unsubscribe(ctx, ch, s)
	}
	h.Unsubscribe(ctx, ch, subs[1])          // already gone
	h.Unsubscribe(ctx, "elsewhere", subs[0]) // never there
	h.Unsubscribe(ctx, ch, &recSub{})        // a stranger
	if s, u := b.counts(ch); s != 1 || u != 0 {
		t.Fatalf("1 local subscriber left: broker saw %d Subscribe and %d Unsubscribe, want 1 and 0", s, u)
	}
	if _, u := b.counts("elsewhere"); u != 0 {
		t.Fatal("Unsubscribe of an unknown channel reached the broker")
	}
	h.Unsubscribe(ctx, ch, subs[0])
	if s, u := b.counts(ch); s != 1 || u != 1 {
		t.Fatalf("after the last left: broker saw %d Subscribe and %d Unsubscribe, want 1 and 1", s, u)
	}
	if h.Channels() != 0 || h.Subscribers(ch) != 0 {
		t.Fatalf("hub still holds %d channels, %d subscribers", h.Channels(), h.Subscribers(ch))
	}
	if err := h.Publish(ctx, ch, []byte(`{"n":2}`)); err != nil {
		t.Fatal(err)
	}
	if got := subs[0].pubs(); len(got) != 1 {
		t.Fatalf("delivered after everyone left: %d publications", len(got))
	}

	// And back.
	if err := h.Subscribe(ctx, ch, subs[3]); err != nil {
		t.Fatal(err)
	}
	if s, _ := b.counts(ch); s != 2 {
		t.Fatalf("resubscribe: broker saw %d Subscribe, want 2", s)
	}
	if len(b.violations) != 0 {
		t.Fatalf("broker misuse: %v", b.violations)
	}
}

func TestHubConcurrent(t *testing.T) {
	ctx := context.Background()
	h, b := newMemoryHub(t)
	chans := []string{"c:0", "c:1", "c:2", "c:3"}

	// A steady subscriber on every channel, present throughout: the churn
	// of others must never cost it a publication.
	steady := &recSub{}
	for _, ch := range chans {
		if err := h.Subscribe(ctx, ch, steady); err != nil {
			t.Fatal(err)
		}
	}

	const workers, rounds = 16, 300
	var wg sync.WaitGroup
	var pubMu sync.Mutex
	perChan := map[string]int{}
	for w := 0; w < workers; w++ {
		wg.Go(func() {
			mine := &recSub{}
			churn := "churn:" + strconv.Itoa(w%3)
			for i := 0; i < rounds; i++ {
				ch := chans[(w+i)%len(chans)]
				if err := h.Subscribe(ctx, ch, mine); err != nil {
					t.Error(err)
					return
				}
				if err := h.Subscribe(ctx, churn, mine); err != nil {
					t.Error(err)
					return
				}
				if err := h.Publish(ctx, ch, []byte(strconv.Itoa(i))); err != nil {
					t.Error(err)
					return
				}
				pubMu.Lock()
				perChan[ch]++
				pubMu.Unlock()
				h.Publish(ctx, churn, []byte(`"x"`))
				_ = h.Subscribers(ch) + h.Channels()
				h.Unsubscribe(ctx, ch, mine)
				h.Unsubscribe(ctx, churn, mine)
			}
		})
	}
	wg.Wait()

	got := map[string]int{}
	for _, p := range steady.pubs() {
		got[p.Channel]++
	}
	for _, ch := range chans {
		if got[ch] != perChan[ch] {
			t.Errorf("steady subscriber got %d of %d publications on %s", got[ch], perChan[ch], ch)
		}
	}
	for _, ch := range chans {
		h.Unsubscribe(ctx, ch, steady)
	}
	if n := h.Channels(); n != 0 {
		t.Fatalf("%d channels left after everyone left", n)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.violations) != 0 {
		t.Fatalf("broker misuse under concurrency (%d), first: %v", len(b.violations), b.violations[0])
	}
	for ch, on := range b.active {
		if on {
			t.Errorf("broker still subscribed to %s", ch)
		}
		if b.subs[ch] != b.unsubs[ch] {
			t.Errorf("%s: %d Subscribe, %d Unsubscribe", ch, b.subs[ch], b.unsubs[ch])
		}
	}
}

func TestPublicationFrame(t *testing.T) {
	sizes := []int{0, 1, 125, 126, 65535, 65536, 1 << 20}
	for _, size := range sizes {
		data := jsonOfSize(size)
		for _, ch := range []string{"chat:acme:42", "a&b:<x>"} {
			t.Run(fmt.Sprintf("%d bytes on %s", size, ch), func(t *testing.T) {
				p := &rooms.Publication{Channel: ch, Data: data}

				op, raw := decodeFrame(t, p.Frame(rooms.FormatRaw).Frame())
				if op != opText {
					t.Errorf("raw frame opcode %d, want text", op)
				}
				if !bytes.Equal(raw, data) {
					t.Errorf("raw payload differs from the data (%d vs %d bytes)", len(raw), len(data))
				}

				op, payload := decodeFrame(t, p.Frame(rooms.FormatProtocol).Frame())
				if op != opText {
					t.Errorf("protocol frame opcode %d, want text", op)
				}
				chJSON, _ := json.Marshal(ch)
				want := `{"op":"message","channel":` + string(chJSON) + `,"data":` + string(data) + `}`
				if string(payload) != want {
					t.Fatalf("protocol payload %.80q…, want %.80q…", payload, want)
				}
				if len(data) != size {
					t.Fatalf("test data is %d bytes, want %d", len(data), size)
				}
				if size == 0 {
					return // no data is not JSON; the codec never lets that through
				}
				if !json.Valid(payload) {
					t.Fatal("protocol payload is not JSON")
				}
				var msg struct {
					Op      string          `json:"op"`
					Channel string          `json:"channel"`
					Data    json.RawMessage `json:"data"`
				}
				if err := json.Unmarshal(payload, &msg); err != nil {
					t.Fatal(err)
				}
				if msg.Op != "message" || msg.Channel != ch || !bytes.Equal(msg.Data, data) {
					t.Fatalf("decoded %q on %q with %d bytes of data", msg.Op, msg.Channel, len(msg.Data))
				}
			})
		}
	}
}

// jsonOfSize is a JSON value of exactly size bytes (none for 0) whose
// bytes include what an encoder would be tempted to change.
func jsonOfSize(size int) []byte {
	switch size {
	case 0:
		return []byte{}
	case 1:
		return []byte(`0`)
	}
	const unit = `é<>&\u2028\" `
	var body []byte
	for len(body)+len(unit) <= size-2 {
		body = append(body, unit...)
	}
	for len(body) < size-2 {
		body = append(body, 'x')
	}
	return append(append([]byte(`"`), body...), '"')
}

func TestPublicationFrameEncodedOnce(t *testing.T) {
	p := &rooms.Publication{Channel: "c", Data: []byte(`{"a":1}`)}
	for _, f := range []rooms.Format{rooms.FormatProtocol, rooms.FormatRaw} {
		a := p.Frame(f)
		if allocs := testing.AllocsPerRun(100, func() { p.Frame(f) }); allocs != 0 {
			t.Errorf("format %d: Frame allocates %.0f times once encoded", f, allocs)
		}
		if b := p.Frame(f); a != b {
			t.Errorf("format %d: a second Frame encoded again", f)
		}
	}
	if &p.Frame(rooms.FormatRaw).Frame()[0] == &p.Frame(rooms.FormatProtocol).Frame()[0] {
		t.Error("the two formats share one buffer")
	}

	// Concurrent first use (subscribers on several goroutines) is safe and
	// every caller gets the same bytes.
	q := &rooms.Publication{Channel: "c", Data: []byte(`"x"`)}
	var wg sync.WaitGroup
	frames := make([]*proxy.Message, 16)
	for i := range frames {
		wg.Go(func() { frames[i] = q.Frame(rooms.Format(i % 2)) })
	}
	wg.Wait()
	for i, f := range frames {
		if f != q.Frame(rooms.Format(i%2)) {
			t.Fatalf("goroutine %d got another message", i)
		}
	}
}

func TestHubDeliversOneFrameToEveryone(t *testing.T) {
	ctx := context.Background()
	h, _ := newMemoryHub(t)
	var sessions []*fakeSession
	for i := 0; i < 5; i++ {
		s := &fakeSession{}
		c := rooms.NewConn(h, rooms.ConnConfig{})
		c.Attach(s)
		t.Cleanup(c.Close)
		if perr := c.Subscribe(ctx, "room"); perr != nil {
			t.Fatal(perr)
		}
		sessions = append(sessions, s)
	}
	if err := h.Publish(ctx, "room", []byte(`[1,2,3]`)); err != nil {
		t.Fatal(err)
	}
	first := sessions[0].queued()
	if len(first) != 1 {
		t.Fatalf("got %d frames, want 1", len(first))
	}
	for i, s := range sessions {
		got := s.queued()
		if len(got) != 1 || &got[0][0] != &first[0][0] {
			t.Fatalf("session %d was not given the same encoded frame", i)
		}
	}
}

func TestHubPublishFallsBackWhenUnavailable(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		err   error
		local bool
	}{
		{"unavailable", fmt.Errorf("%w: connection refused", broker.ErrUnavailable), true},
		{"closed", broker.ErrClosed, false},
		{"other", errors.New("boom"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := rooms.NewHub()
			b := &stubBroker{pubErr: tc.err}
			h.SetBroker(b)
			s := &recSub{}
			if err := h.Subscribe(ctx, "room", s); err != nil {
				t.Fatal(err)
			}
			err := h.Publish(ctx, "room", []byte(`"hi"`))
			if !errors.Is(err, tc.err) {
				t.Fatalf("Publish = %v, want %v", err, tc.err)
			}
			if len(b.published) != 1 {
				t.Fatalf("broker saw %d publishes, want 1", len(b.published))
			}
			got := s.data()
			if tc.local && (len(got) != 1 || got[0] != `"hi"`) {
				t.Fatalf("local subscriber got %q, want the publication", got)
			}
			if !tc.local && len(got) != 0 {
				t.Fatalf("local subscriber got %q on %v", got, tc.err)
			}
		})
	}
}

func TestHubSubscribeBrokerErrors(t *testing.T) {
	ctx := context.Background()
	// A broker that is down keeps the local subscription (it is made when
	// the broker comes back).
	h := rooms.NewHub()
	h.SetBroker(&stubBroker{subErr: fmt.Errorf("%w: down", broker.ErrUnavailable)})
	if err := h.Subscribe(ctx, "room", &recSub{}); err != nil {
		t.Fatalf("Subscribe with the broker down = %v, want nil", err)
	}
	if h.Subscribers("room") != 1 {
		t.Fatal("local subscription dropped")
	}
	// Any other error undoes it.
	h = rooms.NewHub()
	h.SetBroker(&stubBroker{subErr: broker.ErrClosed})
	if err := h.Subscribe(ctx, "room", &recSub{}); !errors.Is(err, broker.ErrClosed) {
		t.Fatalf("Subscribe = %v, want ErrClosed", err)
	}
	if h.Subscribers("room") != 0 || h.Channels() != 0 {
		t.Fatal("failed subscription left behind")
	}
}

// confirmBroker is a Memory broker that confirms a subscription only when
// the test says so, as Redis does after a round trip.
type confirmBroker struct {
	*broker.Memory
	mu      sync.Mutex
	asked   map[string]int           // Confirm calls waiting, by channel
	release map[string]chan struct{} // closed: the channel is confirmed
	err     error                    // what Confirm answers once released
}

func (b *confirmBroker) gate(ch string) chan struct{} {
	if b.release[ch] == nil {
		b.release[ch] = make(chan struct{})
	}
	return b.release[ch]
}

func (b *confirmBroker) Confirm(ctx context.Context, ch string) error {
	b.mu.Lock()
	b.asked[ch]++
	g := b.gate(ch)
	b.mu.Unlock()
	select {
	case <-g:
		return b.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (b *confirmBroker) waiting(ch string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.asked[ch]
}

func (b *confirmBroker) confirm(ch string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	close(b.gate(ch))
}

// TestHubSubscribeWaitsForConfirmation: a subscription returns once the
// broker confirms it, every subscriber of a room not yet confirmed waits
// for it, one channel's wait holds up no other channel, and a failed
// confirmation other than the broker being unavailable undoes the
// subscription.
func TestHubSubscribeWaitsForConfirmation(t *testing.T) {
	h := rooms.NewHub()
	b := &confirmBroker{Memory: broker.NewMemory(h.Handle), asked: map[string]int{}, release: map[string]chan struct{}{}}
	h.SetBroker(b)
	t.Cleanup(func() { b.Close() })
	ctx := context.Background()

	returned := make(chan string, 4)
	for _, name := range []string{"a1", "a2"} {
		go func() {
			if err := h.Subscribe(ctx, "a", &recSub{}); err != nil {
				t.Error(err)
			}
			returned <- name
		}()
	}
	poll.Until(t, 5*time.Second, "both subscribers of a waiting", func() bool { return b.waiting("a") == 2 })
	// Another channel subscribes and is confirmed while a waits.
	go func() {
		if err := h.Subscribe(ctx, "b", &recSub{}); err != nil {
			t.Error(err)
		}
		returned <- "b"
	}()
	poll.Until(t, 5*time.Second, "the subscriber of b waiting", func() bool { return b.waiting("b") == 1 })
	b.confirm("b")
	if got := <-returned; got != "b" {
		t.Fatalf("%s returned before its channel was confirmed", got)
	}
	b.confirm("a")
	for range 2 {
		if got := <-returned; got != "a1" && got != "a2" {
			t.Fatalf("unexpected %q", got)
		}
	}
	if h.Subscribers("a") != 2 || h.Subscribers("b") != 1 {
		t.Fatalf("subscribers: a %d, b %d", h.Subscribers("a"), h.Subscribers("b"))
	}

	// A confirmation the caller gave up on undoes the subscription; an
	// unavailable broker keeps it, to be made when the broker is back.
	cctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- h.Subscribe(cctx, "c", &recSub{}) }()
	poll.Until(t, 5*time.Second, "the subscriber of c waiting", func() bool { return b.waiting("c") == 1 })
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Subscribe = %v, want context.Canceled", err)
	}
	if h.Subscribers("c") != 0 {
		t.Fatal("a subscription given up on was kept")
	}
	b.err = fmt.Errorf("%w: not confirmed in time", broker.ErrUnavailable)
	b.confirm("d")
	if err := h.Subscribe(ctx, "d", &recSub{}); err != nil {
		t.Fatalf("Subscribe with the broker unavailable = %v, want nil", err)
	}
	if h.Subscribers("d") != 1 {
		t.Fatal("subscription dropped while the broker is unavailable")
	}
}

func TestHubPublishBatch(t *testing.T) {
	ctx := context.Background()
	names := []string{"a", "b", "a", "b", "a"}
	data := [][]byte{[]byte(`1`), []byte(`2`), []byte(`3`), []byte(`4`), []byte(`5`)}

	t.Run("memory", func(t *testing.T) {
		h, _ := newMemoryHub(t)
		a, b := &recSub{}, &recSub{}
		h.Subscribe(ctx, "a", a)
		h.Subscribe(ctx, "b", b)
		if err := h.PublishBatch(ctx, names, data); err != nil {
			t.Fatal(err)
		}
		if got := strings.Join(a.data(), ","); got != "1,3,5" {
			t.Errorf("a got %s, want 1,3,5", got)
		}
		if got := strings.Join(b.data(), ","); got != "2,4" {
			t.Errorf("b got %s, want 2,4", got)
		}
	})

	t.Run("batch broker unavailable", func(t *testing.T) {
		h := rooms.NewHub()
		bs := &batchStub{stubBroker: stubBroker{pubErr: fmt.Errorf("%w: down", broker.ErrUnavailable)}}
		h.SetBroker(bs)
		a := &recSub{}
		h.Subscribe(ctx, "a", a)
		if err := h.PublishBatch(ctx, names, data); !errors.Is(err, broker.ErrUnavailable) {
			t.Fatalf("PublishBatch = %v, want ErrUnavailable", err)
		}
		if bs.batches != 1 || len(bs.published) != 0 {
			t.Fatalf("broker saw %d batches and %d single publishes, want 1 and 0", bs.batches, len(bs.published))
		}
		if got := strings.Join(a.data(), ","); got != "1,3,5" {
			t.Errorf("local fallback delivered %s, want 1,3,5", got)
		}
	})

	t.Run("plain broker unavailable", func(t *testing.T) {
		h := rooms.NewHub()
		h.SetBroker(&stubBroker{pubErr: fmt.Errorf("%w: down", broker.ErrUnavailable)})
		a := &recSub{}
		h.Subscribe(ctx, "a", a)
		err := h.PublishBatch(ctx, names, data)
		if !errors.Is(err, broker.ErrUnavailable) {
			t.Fatalf("PublishBatch = %v, want ErrUnavailable", err)
		}
		if got := strings.Join(a.data(), ","); got != "1,3,5" {
			t.Fatalf("regression: rooms/hub.go:187-191 PublishBatch on a broker without PublishBatch returns at the first "+
				"ErrUnavailable without the local fallback Publish and the batch path have (local subscribers got %q, "+
				"want 1,3,5); fix: loop over h.Publish, or on ErrUnavailable Handle the remaining items locally", got)
		}
	})
}

func TestHubHandleDropsDataThatIsNotJSON(t *testing.T) {
	// A plain Redis PUBLISH reaches Hub.Handle without passing the codec.
	// Whatever a backend sends, subscribers must only ever be given valid
	// wsgate.v1 messages in valid UTF-8 text frames: a browser fails the
	// whole connection (1007) on invalid UTF-8.
	h, _ := newMemoryHub(t)
	proto := newClient(t, h, rooms.ConnConfig{})
	raw := newClient(t, h, rooms.ConnConfig{Format: rooms.FormatRaw})
	for _, c := range []*client{proto, raw} {
		if perr := c.conn.Subscribe(context.Background(), "room"); perr != nil {
			t.Fatal(perr)
		}
	}
	for _, data := range [][]byte{[]byte(`hello`), []byte("\"\xff\xfe\""), {}, []byte(`{"a":`)} {
		h.Handle("room", broker.Message{Data: data})
	}
	var bad []string
	for _, m := range proto.messages() {
		if !json.Valid([]byte(m)) || !utf8.ValidString(m) {
			bad = append(bad, "protocol "+strconv.Quote(m))
		}
	}
	for _, m := range raw.messages() {
		if !utf8.ValidString(m) {
			bad = append(bad, "raw "+strconv.Quote(m))
		}
	}
	if len(bad) > 0 {
		t.Fatalf("regression: rooms/hub.go:80 Hub.Handle frames whatever the broker delivers; a plain Redis PUBLISH of non-JSON "+
			"or non-UTF-8 data gives every subscriber an invalid text frame (%s); fix: in Handle (or broker.Redis.receive) "+
			"drop and log data for which !utf8.Valid(data) || !json.Valid(data)", strings.Join(bad, ", "))
	}
}

// TestHubLargeRoomInOrder: in a room of 1,000, every subscriber gets every
// publication once, in order, as the one frame encoded for it.
func TestHubLargeRoomInOrder(t *testing.T) {
	h, _ := newMemoryHub(t)
	const subs, msgs = 1000, 20
	sessions := subscribedSessions(t, h, "big", subs)
	for m := range msgs {
		h.Handle("big", broker.Message{Data: []byte(fmt.Sprintf(`{"n":%d}`, m))})
	}
	// A room this large is fanned out by a goroutine of its own.
	poll.Until(t, 10*time.Second, "the fan-out to every subscriber", func() bool {
		return h.Stats().Delivered >= subs*msgs
	})
	first := sessions[0].queued()
	if len(first) != msgs {
		t.Fatalf("subscriber 0 got %d frames, want %d", len(first), msgs)
	}
	for m, f := range first {
		if want := fmt.Sprintf(`{"n":%d}}`, m); !bytes.HasSuffix(f, []byte(want)) {
			t.Fatalf("frame %d is %q, want it to end in %s", m, f, want)
		}
	}
	for i, s := range sessions {
		got := s.queued()
		if len(got) != msgs {
			t.Fatalf("subscriber %d got %d frames, want %d", i, len(got), msgs)
		}
		for m := range got {
			if &got[m][0] != &first[m][0] {
				t.Fatalf("subscriber %d, message %d: not the shared frame (or out of order)", i, m)
			}
		}
	}
}

// TestHubPublishRefusesInvalidData: data that Handle would drop on every
// node is refused at Publish, so the publisher learns it; a batch with one
// such message sends nothing.
func TestHubPublishRefusesInvalidData(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name, data, want string
	}{
		{"not JSON", `hello`, "not valid JSON"},
		{"empty", ``, "not valid JSON"},
		{"two values", `1 2`, "not valid JSON"},
		{"invalid UTF-8", "\"\xff\"", "not valid UTF-8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, _ := newMemoryHub(t)
			s := &recSub{}
			h.Subscribe(ctx, "a", s)
			err := h.Publish(ctx, "a", []byte(tc.data))
			if !errors.Is(err, rooms.ErrInvalidData) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Publish = %v, want ErrInvalidData: %s", err, tc.want)
			}
			err = h.PublishBatch(ctx, []string{"a", "a"}, [][]byte{[]byte(`1`), []byte(tc.data)})
			if !errors.Is(err, rooms.ErrInvalidData) || !strings.Contains(err.Error(), "publication 1: ") {
				t.Fatalf("PublishBatch = %v, want publication 1: ErrInvalidData", err)
			}
			if got := s.data(); len(got) != 0 {
				t.Fatalf("delivered %q", got)
			}
			if h.Dropped() != 0 {
				t.Fatalf("%d dropped on receipt: the data was sent", h.Dropped())
			}
		})
	}
}

// TestChannelListings: the hub lists its channels sorted with their local
// subscriber counts, and a connection its own subscriptions, sorted; both
// follow unsubscribing and closing.
func TestChannelListings(t *testing.T) {
	ctx := context.Background()
	h, _ := newMemoryHub(t)
	a := rooms.NewConn(h, rooms.ConnConfig{})
	b := rooms.NewConn(h, rooms.ConnConfig{})
	for _, s := range []struct {
		c  *rooms.Conn
		ch string
	}{{a, "room:b"}, {a, "room:a"}, {b, "room:b"}, {b, "news"}} {
		if err := s.c.Subscribe(ctx, s.ch); err != nil {
			t.Fatal(err)
		}
	}
	want := []rooms.ChannelCount{{"news", 1}, {"room:a", 1}, {"room:b", 2}}
	if got := h.ChannelCounts(); !slices.Equal(got, want) {
		t.Fatalf("ChannelCounts = %v, want %v", got, want)
	}
	if got := a.Channels(); !slices.Equal(got, []string{"room:a", "room:b"}) {
		t.Fatalf("a.Channels = %v", got)
	}
	a.Unsubscribe(ctx, "room:b")
	b.Close()
	want = []rooms.ChannelCount{{"room:a", 1}}
	if got := h.ChannelCounts(); !slices.Equal(got, want) {
		t.Fatalf("after unsubscribe and close: ChannelCounts = %v, want %v", got, want)
	}
	if got := b.Channels(); len(got) != 0 {
		t.Fatalf("a closed connection lists %v", got)
	}
}

// gateSub is a subscriber whose deliveries wait until the gate opens,
// as a stand-in for a fan-out that takes long; it keeps what it got.
type gateSub struct {
	recSub
	gate    chan struct{}
	entered chan struct{} // closed at the first delivery
	once    sync.Once
}

func newGateSub() *gateSub {
	return &gateSub{gate: make(chan struct{}), entered: make(chan struct{})}
}

func (s *gateSub) Deliver(p *rooms.Publication) {
	s.once.Do(func() { close(s.entered) })
	<-s.gate
	s.recSub.Deliver(p)
}

// TestHubLargeRoomPublishReturnsQueued: with the memory broker, a publish
// to a room of more than FanInline local subscribers returns once its
// publication is queued, while the fan-out is still running; the queue
// holds FanQueue publications, a publisher that finds it full waits for
// the fan-out to take it, and every subscriber gets every publication in
// the order published.
func TestHubLargeRoomPublishReturnsQueued(t *testing.T) {
	ctx := context.Background()
	h, _ := newMemoryHub(t)
	slow := newGateSub()
	subs := []*recSub{&slow.recSub}
	if err := h.Subscribe(ctx, "big", slow); err != nil {
		t.Fatal(err)
	}
	for range rooms.FanInline {
		s := &recSub{}
		if err := h.Subscribe(ctx, "big", s); err != nil {
			t.Fatal(err)
		}
		subs = append(subs, s)
	}
	publish := func(n int) {
		if err := h.Publish(ctx, "big", []byte(strconv.Itoa(n))); err != nil {
			t.Error(err)
		}
	}
	publish(0)
	<-slow.entered // the fan-out of 0 runs, held by slow: Publish returned all the same
	for n := 1; n <= rooms.FanQueue; n++ {
		publish(n)
	}
	if q, waiting := h.FanQueue("big"); q != rooms.FanQueue || waiting {
		t.Fatalf("queue holds %d (a publisher waiting: %v), want %d and none waiting", q, waiting, rooms.FanQueue)
	}
	last := make(chan struct{})
	go func() {
		defer close(last)
		publish(rooms.FanQueue + 1)
	}()
	poll.Until(t, 10*time.Second, "the publisher to wait for room", func() bool {
		_, waiting := h.FanQueue("big")
		return waiting
	})
	if q, _ := h.FanQueue("big"); q != rooms.FanQueue {
		t.Fatalf("queue holds %d with a publisher waiting, want %d", q, rooms.FanQueue)
	}
	select {
	case <-last:
		t.Fatal("the publisher that waits for room returned")
	default:
	}
	close(slow.gate)
	<-last
	want := make([]string, rooms.FanQueue+2)
	for n := range want {
		want[n] = strconv.Itoa(n)
	}
	for i, s := range subs {
		poll.Until(t, 10*time.Second, fmt.Sprintf("subscriber %d's deliveries", i), func() bool {
			return len(s.pubs()) >= len(want)
		})
		if got := s.data(); !slices.Equal(got, want) {
			t.Fatalf("subscriber %d got %d publications, first %q, want 0…%d in order", i, len(got), got[:min(5, len(got))], len(want)-1)
		}
	}
	poll.Until(t, 10*time.Second, "the fan-out to end", func() bool {
		q, waiting := h.FanQueue("big")
		return q == 0 && !waiting
	})
}

// TestHubSmallRoomFansOutInline: a room of up to FanInline local
// subscribers is fanned out before Publish returns (no goroutine, no
// queue).
func TestHubSmallRoomFansOutInline(t *testing.T) {
	ctx := context.Background()
	h, _ := newMemoryHub(t)
	subs := make([]*recSub, rooms.FanInline)
	for i := range subs {
		subs[i] = &recSub{}
		if err := h.Subscribe(ctx, "small", subs[i]); err != nil {
			t.Fatal(err)
		}
	}
	for n := range 3 {
		if err := h.Publish(ctx, "small", []byte(strconv.Itoa(n))); err != nil {
			t.Fatal(err)
		}
		for i, s := range subs {
			if got := len(s.pubs()); got != n+1 {
				t.Fatalf("after publish %d subscriber %d has %d publications, want %d", n, i, got, n+1)
			}
		}
	}
}

// TestHubLargeRoomBatches: publications that queued while a large room was
// being fanned out reach each connection that follows the room live in
// batches of up to FanBatch, in order, one EnqueueAll each; a subscriber
// without DeliverAll gets them one by one, in the same order.
func TestHubLargeRoomBatches(t *testing.T) {
	ctx := context.Background()
	h, _ := newMemoryHub(t)
	gate := newGateSub()
	if err := h.Subscribe(ctx, "big", gate); err != nil {
		t.Fatal(err)
	}
	sessions := subscribedSessions(t, h, "big", rooms.FanInline)
	const later = rooms.FanBatch + 4
	h.Handle("big", broker.Message{Data: []byte(`{"n":0}`)})
	<-gate.entered // the fan-out of the first holds the room
	for m := 1; m <= later; m++ {
		h.Handle("big", broker.Message{Data: []byte(fmt.Sprintf(`{"n":%d}`, m))})
	}
	if q, _ := h.FanQueue("big"); q != later {
		t.Fatalf("%d publications queued, want %d", q, later)
	}
	close(gate.gate)
	poll.Until(t, 10*time.Second, "the fan-out to every subscriber", func() bool {
		return h.Stats().Delivered >= int64((len(sessions)+1)*(later+1))
	})
	for i, s := range sessions {
		got := s.queued()
		if len(got) != later+1 {
			t.Fatalf("subscriber %d got %d frames, want %d", i, len(got), later+1)
		}
		for m, f := range got {
			if want := fmt.Sprintf(`{"n":%d}}`, m); !bytes.HasSuffix(f, []byte(want)) {
				t.Fatalf("subscriber %d: frame %d is %q, want it to end in %s", i, m, f, want)
			}
		}
		if b := s.batchSizes(); !slices.Equal(b, []int{rooms.FanBatch, later - rooms.FanBatch}) {
			t.Fatalf("subscriber %d got batches %v, want [%d %d]", i, b, rooms.FanBatch, later-rooms.FanBatch)
		}
	}
	if got := gate.data(); len(got) != later+1 || got[0] != `{"n":0}` || got[later] != fmt.Sprintf(`{"n":%d}`, later) {
		t.Fatalf("the subscriber without DeliverAll got %q", got)
	}
}

// subscribedSessions makes n connections of h subscribed to channel, each
// on a fake session that keeps what it is sent.
func subscribedSessions(t *testing.T, h *rooms.Hub, channel string, n int) []*fakeSession {
	t.Helper()
	sessions := make([]*fakeSession, n)
	for i := range sessions {
		s := &fakeSession{}
		c := rooms.NewConn(h, rooms.ConnConfig{})
		c.Attach(s)
		t.Cleanup(c.Close)
		if perr := c.Subscribe(context.Background(), channel); perr != nil {
			t.Fatal(perr)
		}
		sessions[i] = s
	}
	return sessions
}
