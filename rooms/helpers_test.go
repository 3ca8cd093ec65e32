package rooms_test

import (
	"context"
	"encoding/binary"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

// fakeSession is a proxy.Session that records what the rooms code does
// with the connection.
type fakeSession struct {
	mu       sync.Mutex
	frames   [][]byte
	closes   []closeCall
	extended []time.Time
	refuse   bool  // Enqueue reports a full queue
	batches  []int // the size of each EnqueueAll
}

type closeCall struct {
	code   uint16
	reason string
}

func (s *fakeSession) Enqueue(_ *proxy.Batch, m *proxy.Message) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refuse {
		return false
	}
	s.frames = append(s.frames, m.Frame())
	return true
}

func (s *fakeSession) EnqueueAll(_ *proxy.Batch, ms []*proxy.Message) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.refuse {
		return false
	}
	for _, m := range ms {
		s.frames = append(s.frames, m.Frame())
	}
	s.batches = append(s.batches, len(ms))
	return true
}

func (s *fakeSession) batchSizes() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.batches...)
}

func (s *fakeSession) Reply(msg []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frames = append(s.frames, proxy.EncodeServerFrame(ws.OpText, msg))
	return nil
}

func (s *fakeSession) Close(code uint16, reason string) {
	s.mu.Lock()
	s.closes = append(s.closes, closeCall{code, reason})
	s.mu.Unlock()
}

// Extend records a refreshed token's expiry; like the relay, it refuses
// one that is not after now.
func (s *fakeSession) Extend(t time.Time) error {
	if !t.After(time.Now()) {
		return errors.New("expired")
	}
	s.mu.Lock()
	s.extended = append(s.extended, t)
	s.mu.Unlock()
	return nil
}

func (s *fakeSession) queued() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.frames...)
}

var _ proxy.Session = (*fakeSession)(nil)

// countingBroker is a Memory broker that counts what the hub asks of it
// and notes any Subscribe of a channel already subscribed (or Unsubscribe
// of one that is not): with the hub's reference counting there is none.
type countingBroker struct {
	*broker.Memory
	mu         sync.Mutex
	subs       map[string]int
	unsubs     map[string]int
	active     map[string]bool
	violations []string
}

func newCountingBroker(h broker.Handler) *countingBroker {
	return &countingBroker{Memory: broker.NewMemory(h), subs: map[string]int{}, unsubs: map[string]int{}, active: map[string]bool{}}
}

func (b *countingBroker) Subscribe(ctx context.Context, ch string) error {
	b.mu.Lock()
	b.subs[ch]++
	if b.active[ch] {
		b.violations = append(b.violations, "Subscribe("+ch+") while subscribed")
	}
	b.active[ch] = true
	b.mu.Unlock()
	return b.Memory.Subscribe(ctx, ch)
}

func (b *countingBroker) Unsubscribe(ctx context.Context, ch string) error {
	b.mu.Lock()
	b.unsubs[ch]++
	if !b.active[ch] {
		b.violations = append(b.violations, "Unsubscribe("+ch+") while not subscribed")
	}
	b.active[ch] = false
	b.mu.Unlock()
	return b.Memory.Unsubscribe(ctx, ch)
}

func (b *countingBroker) counts(ch string) (subs, unsubs int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.subs[ch], b.unsubs[ch]
}

// newMemoryHub is a hub on a counting Memory broker.
func newMemoryHub(t testing.TB) (*rooms.Hub, *countingBroker) {
	t.Helper()
	h := rooms.NewHub()
	b := newCountingBroker(h.Handle)
	h.SetBroker(b)
	t.Cleanup(func() { b.Close() })
	return h, b
}

// stubBroker is a broker whose calls fail as told.
type stubBroker struct {
	subErr, pubErr error
	mu             sync.Mutex
	published      []string
}

func (b *stubBroker) Publish(_ context.Context, ch string, _ []byte) error {
	b.mu.Lock()
	b.published = append(b.published, ch)
	b.mu.Unlock()
	return b.pubErr
}
func (b *stubBroker) Subscribe(context.Context, string) error   { return b.subErr }
func (b *stubBroker) Unsubscribe(context.Context, string) error { return nil }
func (b *stubBroker) Close() error                              { return nil }

// batchStub adds PublishBatch to stubBroker.
type batchStub struct {
	stubBroker
	batches int
}

func (b *batchStub) PublishBatch(context.Context, []string, [][]byte) error {
	b.batches++
	return b.pubErr
}

// recSub is a hub subscriber that keeps what it is given.
type recSub struct {
	mu  sync.Mutex
	got []*rooms.Publication
}

func (s *recSub) Deliver(p *rooms.Publication) {
	s.mu.Lock()
	s.got = append(s.got, p)
	s.mu.Unlock()
}

func (s *recSub) pubs() []*rooms.Publication {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]*rooms.Publication(nil), s.got...)
}

func (s *recSub) data() []string {
	var out []string
	for _, p := range s.pubs() {
		out = append(out, string(p.Data))
	}
	return out
}

// decodeFrame reads a server frame by hand (RFC 6455 §5.2), apart from
// gobwas/ws, and insists on a single unmasked final frame with the
// shortest length encoding and nothing after its payload.
func decodeFrame(t testing.TB, b []byte) (opcode byte, payload []byte) {
	t.Helper()
	if len(b) < 2 {
		t.Fatalf("frame of %d bytes", len(b))
	}
	if b[0]&0x80 == 0 {
		t.Fatal("FIN bit not set")
	}
	if b[0]&0x70 != 0 {
		t.Fatalf("RSV bits set: %08b", b[0])
	}
	if b[1]&0x80 != 0 {
		t.Fatal("server frame is masked")
	}
	n, rest := uint64(b[1]&0x7f), b[2:]
	switch n {
	case 126:
		if len(rest) < 2 {
			t.Fatal("truncated 16-bit length")
		}
		n, rest = uint64(binary.BigEndian.Uint16(rest)), rest[2:]
		if n < 126 {
			t.Fatalf("length %d in 16 bits; 7 bits was the rule", n)
		}
	case 127:
		if len(rest) < 8 {
			t.Fatal("truncated 64-bit length")
		}
		n, rest = binary.BigEndian.Uint64(rest), rest[8:]
		if n>>63 != 0 {
			t.Fatal("64-bit length with the top bit set")
		}
		if n <= 0xffff {
			t.Fatalf("length %d in 64 bits; 16 bits was the rule", n)
		}
	}
	if uint64(len(rest)) != n {
		t.Fatalf("header says %d payload bytes, frame has %d", n, len(rest))
	}
	return b[0] & 0x0f, rest
}

const opText = 1
