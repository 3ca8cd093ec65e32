package proxy

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/http"
	"os"
	"sync"
	"testing"

	"github.com/gobwas/ws"
)

// batchClients starts n sessions whose clients are raw plain-TCP clients
// that never park, on one gateway.
func batchClients(t *testing.T, n int) (*testGateway, []Session, []*rawClient) {
	tg, started := startSession(t, Config{PingInterval: -1, SendQueue: 1000, ParkAfter: -1}, dropAll)
	sessions := make([]Session, n)
	clients := make([]*rawClient, n)
	for i := range n {
		clients[i] = dialRaw(t, tg.addr(), http.Header{"Sec-WebSocket-Protocol": {"test.v1"}})
		sessions[i] = <-started
	}
	return tg, sessions, clients
}

// useRings turns batched writes through io_uring on or off for a test.
// Under CI, a kernel that refuses io_uring fails the test.
func useRings(t *testing.T, on bool) {
	rings.setOff(!on)
	t.Cleanup(func() { rings.setOff(false) })
	if !on {
		return
	}
	r := rings.get()
	if r == nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("io_uring is not available")
		}
		t.Skip("io_uring is not available")
	}
	rings.put(r, false)
}

// readFrames reads want's frames from rc and checks each.
func readFrames(t *testing.T, rc *rawClient, who int, want ...[]byte) {
	t.Helper()
	for k, p := range want {
		f, err := rc.read()
		if err != nil || f.op != opBinary || !bytes.Equal(f.payload, p) {
			t.Fatalf("client %d, frame %d: op %d, %d bytes (want %d), %v", who, k, f.op, len(f.payload), len(p), err)
		}
	}
}

// TestBatchWritesTogether: a batch takes fan-out frames for many idle
// clients and writes them once it holds batchMax and when it ends, in one
// io_uring submission each time (or, with io_uring off, one write per
// client); every client gets its frames whole and in order, before what
// is sent to it after the batch.
func TestBatchWritesTogether(t *testing.T) {
	for _, on := range []bool{true, false} {
		name := map[bool]string{true: "io_uring", false: "one write each"}[on]
		t.Run(name, func(t *testing.T) {
			useRings(t, on)
			const n = batchMax + 6
			_, sessions, clients := batchClients(t, n)
			msg := func(i, size int) *Message { return NewMessage(ws.OpBinary, sendFrame(i, size)) }
			before := rings.submissions.Load()
			b := NewBatch()
			for i, s := range sessions {
				ok := true
				if i%3 == 0 {
					ok = s.EnqueueAll(b, []*Message{msg(i, 64), msg(i+1000, 200)})
				} else {
					ok = s.Enqueue(b, msg(i, 64))
				}
				if !ok {
					t.Fatalf("client %d: refused", i)
				}
			}
			b.End()
			for i, s := range sessions {
				if !s.Enqueue(nil, msg(i+2000, 10)) {
					t.Fatalf("client %d: refused after the batch", i)
				}
			}
			for i, rc := range clients {
				if i%3 == 0 {
					readFrames(t, rc, i, sendFrame(i, 64), sendFrame(i+1000, 200), sendFrame(i+2000, 10))
				} else {
					readFrames(t, rc, i, sendFrame(i, 64), sendFrame(i+2000, 10))
				}
			}
			got, want := rings.submissions.Load()-before, int64(2)
			if !on {
				want = 0
			}
			if got != want {
				t.Fatalf("%d io_uring submissions, want %d", got, want)
			}
		})
	}
}

// TestBatchFullSocket: a client whose socket takes only part of its frame
// in a batch gets the rest from a goroutine, and what is sent to it after
// comes after; the batch's other clients are not held up by it.
func TestBatchFullSocket(t *testing.T) {
	useRings(t, true)
	_, sessions, clients := batchClients(t, 3)
	const big = 8 << 20 // more than the socket buffers take
	b := NewBatch()
	for i, s := range sessions {
		size := 64
		if i == 1 {
			size = big
		}
		if !s.Enqueue(b, NewMessage(ws.OpBinary, sendFrame(i, size))) {
			t.Fatalf("client %d: refused", i)
		}
	}
	b.End()
	poll(t, "a goroutine writing the rest of the large frame", sessions[1].(*relay).client.w.writing)
	for i, s := range sessions {
		if !s.Enqueue(nil, NewMessage(ws.OpBinary, sendFrame(i+10, 64))) {
			t.Fatalf("client %d: refused after the batch", i)
		}
	}
	readFrames(t, clients[0], 0, sendFrame(0, 64), sendFrame(10, 64))
	readFrames(t, clients[2], 2, sendFrame(2, 64), sendFrame(12, 64))
	readFrames(t, clients[1], 1, sendFrame(1, big), sendFrame(11, 64))
}

// TestBatchClosedSocket: a client whose connection was closed while a
// batch held its writer is written nothing and its connection ends; the
// batch's other clients get their frames.
func TestBatchClosedSocket(t *testing.T) {
	useRings(t, true)
	tg, sessions, clients := batchClients(t, 3)
	gone := sessions[1].(*relay)
	b := NewBatch()
	for i, s := range sessions {
		if !s.Enqueue(b, NewMessage(ws.OpBinary, sendFrame(i, 64))) {
			t.Fatalf("client %d: refused", i)
		}
	}
	gone.client.rd.conn.Close()
	b.End()
	readFrames(t, clients[0], 0, sendFrame(0, 64))
	readFrames(t, clients[2], 2, sendFrame(2, 64))
	tg.waitLen(t, 2)
	if f, err := clients[1].read(); err == nil {
		t.Fatalf("the closed client read a frame: op %d, %d bytes", f.op, len(f.payload))
	}
}

// TestBatchStress: several goroutines fan out through batches to the same
// clients at once, while pings are written to them and some are closed;
// every client reads well-formed frames, each producer's in order and
// none twice, and a client left open gets every one. With io_uring and
// without.
func TestBatchStress(t *testing.T) {
	t.Run("io_uring", func(t *testing.T) { useRings(t, true); batchStress(t) })
	t.Run("one write each", func(t *testing.T) { useRings(t, false); batchStress(t) })
}

func batchStress(t *testing.T) {
	const clients, producers, rounds = 40, 4, 200
	_, sessions, rcs := batchClients(t, clients)
	frame := func(p, r int) []byte {
		b := make([]byte, 8+r%97)
		binary.BigEndian.PutUint32(b, uint32(p))
		binary.BigEndian.PutUint32(b[4:], uint32(r))
		return b
	}
	closed := func(i int) bool { return i%7 == 3 }
	var wg sync.WaitGroup
	for p := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				b := NewBatch()
				for i, s := range sessions {
					if r == rounds/2 && p == 0 && closed(i) {
						s.Close(1000, "done")
					}
					s.Enqueue(b, NewMessage(ws.OpBinary, frame(p, r)))
				}
				b.End()
			}
		}()
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for r := range rounds {
			for _, s := range sessions {
				s.(*relay).client.w.control(ws.OpPing, []byte{byte(r)})
			}
		}
	}()
	errs := make(chan error, clients)
	for i, rc := range rcs {
		go func() {
			next := make([]int, producers)
			got := 0
			for got < producers*rounds {
				f, err := rc.read()
				if err != nil {
					errs <- fmt.Errorf("client %d after %d frames: %v", i, got, err)
					return
				}
				switch f.op {
				case opPing:
					continue
				case opClose:
					if !closed(i) {
						errs <- fmt.Errorf("client %d closed after %d frames", i, got)
					} else {
						errs <- nil
					}
					return
				}
				if f.op != opBinary || len(f.payload) < 8 {
					errs <- fmt.Errorf("client %d: frame op %d, %d bytes", i, f.op, len(f.payload))
					return
				}
				p, r := int(binary.BigEndian.Uint32(f.payload)), int(binary.BigEndian.Uint32(f.payload[4:]))
				if p >= producers || r != next[p] || !bytes.Equal(f.payload, frame(p, r)) {
					errs <- fmt.Errorf("client %d: producer %d frame %d (%d bytes), want frame %d", i, p, r, len(f.payload), next[min(p, producers-1)])
					return
				}
				next[p]++
				got++
			}
			if closed(i) {
				errs <- fmt.Errorf("client %d got every frame though it was closed half way", i)
				return
			}
			errs <- nil
		}()
	}
	wg.Wait()
	for range clients {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
}
