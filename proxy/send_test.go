package proxy

import (
	"bytes"
	"encoding/binary"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// sendFrame is frame i of a send test: size bytes, numbered, and filled
// with a byte that depends on i, so that a cut or interleaved frame shows.
func sendFrame(i, size int) []byte {
	p := bytes.Repeat([]byte{byte(i % 251)}, size)
	binary.BigEndian.PutUint32(p, uint32(i))
	return p
}

// TestEnqueueUnderBackpressure: frames queued for a client that does not
// read for a while fill the socket (frames are cut mid-way by the kernel,
// and the rest waits in the queue); once it reads, every frame arrives
// whole and in order, and pings and a close from other goroutines never
// land inside one.
func TestEnqueueUnderBackpressure(t *testing.T) {
	const n, size = 300, 48 << 10 // ~14 MB: far more than the socket buffers
	tg, sessions := startSession(t, Config{PingInterval: -1, SendQueue: n + 10, ParkAfter: -1}, dropAll)
	rc := dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
	s := <-sessions
	c := onlyRelay(t, tg)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := range n {
			if !s.Enqueue(nil, NewMessage(ws.OpBinary, sendFrame(i, size))) {
				t.Errorf("Enqueue %d refused", i)
				return
			}
			if i%50 == 0 {
				// Another writer to the same client: a control frame.
				c.client.w.control(ws.OpPing, []byte{byte(i)})
			}
		}
	}()
	// The writer must be stuck on a full socket before the client reads:
	// its queue goroutine in a write that waits for room.
	poll(t, "the send queue to back up", func() bool {
		c.client.w.qmu.Lock()
		defer c.client.w.qmu.Unlock()
		return c.client.w.running && c.client.w.writing()
	})
	pings := 0
	for i := 0; i < n; {
		f, err := rc.read()
		if err != nil {
			t.Fatalf("frame %d: %v", i, err)
		}
		if f.op == opPing {
			pings++
			continue
		}
		if f.op != opBinary || !bytes.Equal(f.payload, sendFrame(i, size)) {
			t.Fatalf("frame %d: op %d, %d bytes, starts %x", i, f.op, len(f.payload), f.payload[:min(8, len(f.payload))])
		}
		i++
	}
	wg.Wait()
	s.Close(4000, "done")
	for {
		f, err := rc.read()
		if err != nil {
			t.Fatalf("waiting for the close: %v", err)
		}
		if f.op == opPing {
			pings++
			continue
		}
		if code, reason := closeOf(f.payload); f.op != opClose || code != 4000 || reason != "done" {
			t.Fatalf("got op %d %q, want close 4000", f.op, f.payload)
		}
		break
	}
	if pings != 6 {
		t.Fatalf("%d pings, want 6", pings)
	}
	rc.write(cf(opClose, closePayload(4000, "")))
	tg.waitLen(t, 0)
}

// TestEnqueueSlowConsumer: a client that never reads fills its queue;
// Enqueue then refuses and the connection is dropped (1013, or cut off
// after CloseTimeout when even the close frame does not fit).
func TestEnqueueSlowConsumer(t *testing.T) {
	for _, policy := range []SlowConsumer{SlowClose, SlowDrop} {
		t.Run(string(policy), func(t *testing.T) {
			stats := NewStats()
			tg, sessions := startSession(t, Config{PingInterval: -1, SendQueue: 8, CloseTimeout: 200 * time.Millisecond,
				SlowConsumer: policy, Stats: stats}, dropAll)
			rc := dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
			s := <-sessions
			frame := func(i int) *Message { return NewMessage(ws.OpBinary, sendFrame(i, 64<<10)) }
			queued := -1
			for i := range 10000 {
				if !s.Enqueue(nil, frame(i)) {
					queued = i
					break
				}
			}
			if queued < 0 {
				t.Fatal("10000 frames of 64 KiB queued for a client that does not read")
			}
			refused := 1
			for i := range 5 {
				if s.Enqueue(nil, frame(queued+1+i)) {
					if policy == SlowClose {
						t.Fatal("Enqueue accepted a frame after refusing one")
					}
					queued++
				} else {
					refused++
				}
			}
			snap := stats.Snapshot()
			if got := snap.Traffic.Messages[Fanout]; got != uint64(queued) {
				t.Errorf("fan-out messages counted %d, want the %d queued", got, queued)
			}
			if got := snap.Traffic.Bytes[Fanout]; got != uint64(queued)*(64<<10) {
				t.Errorf("fan-out bytes counted %d, want %d", got, queued*(64<<10))
			}
			switch policy {
			case SlowClose:
				if snap.SlowClosed != 1 || snap.SlowDropped != 0 {
					t.Errorf("slow consumers: %d closed, %d dropped; want 1, 0", snap.SlowClosed, snap.SlowDropped)
				}
				tg.waitLen(t, 0)
				if got := stats.Snapshot().Closes; got[CloseKey{"client", "1013"}] != 1 || len(got) != 1 {
					t.Errorf("closes %v, want one client 1013", got)
				}
			case SlowDrop:
				if snap.SlowClosed != 0 || snap.SlowDropped != uint64(refused) {
					t.Errorf("slow consumers: %d closed, %d dropped; want 0, %d", snap.SlowClosed, snap.SlowDropped, refused)
				}
				rc.conn.Close()
				tg.waitLen(t, 0)
			}
		})
	}
}

func dropAll([]byte, bool) (Verdict, []byte) { return Drop, nil }

// inlineSession is a session whose client is a raw plain-TCP client that
// never parks, with its relay and a look at the client writer's queue:
// whether its goroutine runs, and how many frames wait.
func inlineSession(t *testing.T) (Session, *rawClient, *relay, func() (bool, int)) {
	tg, sessions := startSession(t, Config{PingInterval: -1, SendQueue: 1000, ParkAfter: -1}, dropAll)
	rc := dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
	s := <-sessions
	c := onlyRelay(t, tg)
	w := &c.client.w
	return s, rc, c, func() (bool, int) {
		w.qmu.Lock()
		defer w.qmu.Unlock()
		return w.running, w.pending()
	}
}

// TestDeliverWritesInline: a fan-out frame for an idle plain-TCP client is
// written by Enqueue itself, before it returns: no queue goroutine starts.
// Once the client's socket is full, the rest of the frame it took in part
// is written by a goroutine, later frames wait in the queue, and all
// arrive whole and in order.
func TestDeliverWritesInline(t *testing.T) {
	s, rc, _, queued := inlineSession(t)
	for i := range 3 {
		if !s.Enqueue(nil, NewMessage(ws.OpBinary, sendFrame(i, 64))) {
			t.Fatalf("Enqueue %d refused", i)
		}
		if running, n := queued(); running || n != 0 {
			t.Fatalf("after Enqueue %d: queue goroutine %v, %d frames queued; want the frame written inline", i, running, n)
		}
		f, err := rc.read()
		if err != nil || f.op != opBinary || !bytes.Equal(f.payload, sendFrame(i, 64)) {
			t.Fatalf("frame %d: op %d %x, %v", i, f.op, f.payload, err)
		}
	}
	// The client stops reading: the socket fills and frames queue.
	const size = 48 << 10
	n := 3
	for ; n < 900; n++ {
		if !s.Enqueue(nil, NewMessage(ws.OpBinary, sendFrame(n, size))) {
			t.Fatalf("Enqueue %d refused", n)
		}
		if _, q := queued(); q > 4 {
			break
		}
	}
	if _, q := queued(); q == 0 {
		t.Fatalf("%d frames of %d bytes and nothing queued", n-3, size)
	}
	for i := 3; i <= n; i++ {
		f, err := rc.read()
		if err != nil || f.op != opBinary || !bytes.Equal(f.payload, sendFrame(i, size)) {
			t.Fatalf("frame %d: op %d, %d bytes, %v", i, f.op, len(f.payload), err)
		}
	}
}

// TestEnqueueAllWritesTogether: several fan-out frames for an idle
// plain-TCP client are written by EnqueueAll itself, before it returns;
// once the client's socket is full, the rest of a batch the socket took in
// part is written by a goroutine, later batches wait in the queue, and
// every frame arrives whole and in order.
func TestEnqueueAllWritesTogether(t *testing.T) {
	s, rc, c, queued := inlineSession(t)
	batch := func(from, k, size int) []*Message {
		ms := make([]*Message, k)
		for i := range ms {
			ms[i] = NewMessage(ws.OpBinary, sendFrame(from+i, size))
		}
		return ms
	}
	if !s.EnqueueAll(nil, batch(0, 5, 64)) {
		t.Fatal("EnqueueAll refused")
	}
	if running, n := queued(); running || n != 0 {
		t.Fatalf("after EnqueueAll: queue goroutine %v, %d frames queued; want the frames written inline", running, n)
	}
	for i := range 5 {
		f, err := rc.read()
		if err != nil || f.op != opBinary || !bytes.Equal(f.payload, sendFrame(i, 64)) {
			t.Fatalf("frame %d: op %d %x, %v", i, f.op, f.payload, err)
		}
	}
	// The client stops reading: the socket fills and frames queue.
	const size, k = 16 << 10, 4
	n := 5
	for ; n < 2000; n += k {
		if !s.EnqueueAll(nil, batch(n, k, size)) {
			t.Fatalf("EnqueueAll from %d refused", n)
		}
		if _, q := queued(); q > 4 {
			n += k
			break
		}
	}
	if _, q := queued(); q == 0 {
		t.Fatalf("%d frames of %d bytes and nothing queued", n-5, size)
	}
	for i := 5; i < n; i++ {
		f, err := rc.read()
		if err != nil || f.op != opBinary || !bytes.Equal(f.payload, sendFrame(i, size)) {
			t.Fatalf("frame %d: op %d, %d bytes, %v", i, f.op, len(f.payload), err)
		}
	}
	if got := c.fanout.msgs.Load(); got != uint64(n) {
		t.Fatalf("fan-out counted %d messages, want %d", got, n)
	}
}
