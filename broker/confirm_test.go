package broker_test

import (
	"bytes"
	"context"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// heldRelay forwards TCP connections to a server; while held, what the
// clients send waits in the relay (what the server sends still passes).
type heldRelay struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	changed *sync.Cond
	held    bool
	waiting bytes.Buffer // bytes received while held, not yet forwarded
	conns   []net.Conn
	wg      sync.WaitGroup
}

func startHeldRelay(t *testing.T, target string) *heldRelay {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &heldRelay{ln: ln, target: target}
	r.changed = sync.NewCond(&r.mu)
	r.wg.Go(r.accept)
	t.Cleanup(func() {
		ln.Close()
		r.mu.Lock()
		r.held = false
		for _, c := range r.conns {
			c.Close()
		}
		r.changed.Broadcast()
		r.mu.Unlock()
		r.wg.Wait()
	})
	return r
}

func (r *heldRelay) accept() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, c, s)
		r.mu.Unlock()
		r.wg.Go(func() { io.Copy(c, s); c.Close() })
		r.wg.Go(func() { r.forward(s, c); s.Close() })
	}
}

// forward copies from c to s, holding each read while the relay is held.
func (r *heldRelay) forward(s, c net.Conn) {
	buf := make([]byte, 32<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			r.mu.Lock()
			if r.held {
				r.waiting.Write(buf[:n])
				r.changed.Broadcast()
			}
			for r.held {
				r.changed.Wait()
			}
			r.mu.Unlock()
			if _, err := s.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (r *heldRelay) hold(on bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.held = on
	r.waiting.Reset()
	r.changed.Broadcast()
}

func (r *heldRelay) holding(b []byte) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return bytes.Contains(r.waiting.Bytes(), b)
}

// TestRedisConfirmWaitsForRedis: a SUBSCRIBE that Redis has not run yet is
// not confirmed. The node's connections pass through a relay that holds
// them: the SUBSCRIBE is written (Subscribe returns) but waits in the
// relay, a publication then reaches no one, and Confirm returns only once
// the relay lets the SUBSCRIBE through; a publication after it is
// delivered.
func TestRedisConfirmWaitsForRedis(t *testing.T) {
	srv := startRedis(t)
	relay := startHeldRelay(t, srv.addr())
	rec := newRecorder()
	prefix := newPrefix()
	r := openRedis(t, broker.RedisOptions{URL: "redis://" + relay.ln.Addr().String(), Prefix: prefix}, rec.handle)

	// The subscription stream is connected and live before anything is
	// held (seen from Redis, not from Confirm).
	if err := r.Subscribe(ctxT(t), "warm"); err != nil {
		t.Fatal(err)
	}
	eventually(t, waitLong, "the first subscription", func() bool { return numsub(t, srv.addr(), "NUMSUB", prefix+"warm") == 1 })

	for i := range 3 {
		ch := "held-" + strconv.Itoa(i)
		relay.hold(true)
		if err := r.Subscribe(ctxT(t), ch); err != nil {
			t.Fatal(err)
		}
		confirmed := make(chan error, 1)
		go func() { confirmed <- r.Confirm(context.Background(), ch) }()
		eventually(t, waitLong, "the SUBSCRIBE held in the relay", func() bool { return relay.holding([]byte(prefix + ch)) })
		if n := rawPublish(t, srv.addr(), "PUBLISH", prefix+ch, []byte(`"before"`)); n != 0 {
			t.Fatalf("%d receivers before Redis ran the SUBSCRIBE", n)
		}
		select {
		case err := <-confirmed:
			t.Fatalf("Confirm returned (%v) while Redis had not run the SUBSCRIBE", err)
		default:
		}
		relay.hold(false)
		select {
		case err := <-confirmed:
			if err != nil {
				t.Fatalf("Confirm: %v", err)
			}
		case <-time.After(waitLong):
			t.Fatal("Confirm did not return after the relay let the SUBSCRIBE through")
		}
		if n := rawPublish(t, srv.addr(), "PUBLISH", prefix+ch, []byte(`"after"`)); n != 1 {
			t.Fatalf("%d receivers after Confirm, want 1", n)
		}
		if got := rec.waitN(t, ch, 1); len(got) != 1 || string(got[0]) != `"after"` {
			t.Fatalf("got %q, want only the publication made after Confirm", got)
		}
	}
}
