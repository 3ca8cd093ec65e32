package broker_test

import (
	"bytes"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/internal/poll"
	"github.com/wsgate/wsgate/internal/testports"
)

// delivery is one call of a broker's handler.
type delivery struct {
	channel string
	data    []byte
	kind    broker.Kind
	pos     broker.Position
}

// recorder is a broker.Handler that keeps what it is given. Probes (data
// starting with "probe:") prove a subscription is live and fences (data
// starting with "fence:") mark that earlier messages have arrived; both are
// kept apart, so one that arrives late never disturbs a test's messages.
type recorder struct {
	mu     sync.Mutex
	got    []delivery
	probes map[string]int
	fences map[string]bool
	wake   chan struct{}
}

func newRecorder() *recorder {
	return &recorder{probes: map[string]int{}, fences: map[string]bool{}, wake: make(chan struct{}, 1)}
}

func (r *recorder) handle(channel string, m broker.Message) {
	// The broker may reuse nothing it hands over, but a copy makes the
	// byte-for-byte checks independent of that promise.
	d := bytes.Clone(m.Data)
	r.mu.Lock()
	switch {
	case bytes.HasPrefix(d, []byte(`"probe:`)):
		r.probes[channel]++
	case bytes.HasPrefix(d, []byte(`"fence:`)):
		r.fences[string(d)] = true
	default:
		r.got = append(r.got, delivery{channel, d, m.Kind, m.Pos})
	}
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// on is what arrived on channel, in order (probes excluded).
func (r *recorder) on(channel string) [][]byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out [][]byte
	for _, d := range r.got {
		if d.channel == channel {
			out = append(out, d.data)
		}
	}
	return out
}

// msgs is what arrived on channel, in order (probes excluded), as the
// broker handed it over.
func (r *recorder) msgs(channel string) []broker.Message {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []broker.Message
	for _, d := range r.got {
		if d.channel == channel {
			out = append(out, broker.Message{Kind: d.kind, Data: d.data, Pos: d.pos})
		}
	}
	return out
}

func (r *recorder) all() []delivery {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]delivery(nil), r.got...)
}

func (r *recorder) sawFence(data string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.fences[data]
}

func (r *recorder) probesOn(channel string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.probes[channel]
}

// waitFor waits until cond holds, waking on every delivery.
func (r *recorder) waitFor(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for !cond() {
		select {
		case <-r.wake:
		case <-deadline.C:
			t.Fatalf("timed out after %v waiting for %s", within, what)
		}
	}
}

// waitN waits until n messages arrived on channel and returns them.
func (r *recorder) waitN(t testing.TB, channel string, n int) [][]byte {
	t.Helper()
	r.waitFor(t, waitLong, strconv.Itoa(n)+" messages on "+channel, func() bool { return len(r.on(channel)) >= n })
	return r.on(channel)
}

// waitLong bounds every wait for a delivery that should happen.
const waitLong = 15 * time.Second

// eventually polls cond until it holds or within has passed.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, within, what, cond)
}

// pollPause is the interval between two polls of a condition.
func pollPause() { <-time.After(10 * time.Millisecond) }

var (
	portMu    sync.Mutex
	usedPorts = map[int]bool{}
)

// freePort returns a port of the tests' range (testports) that is free
// now, and whose cluster bus port (port+10000) is free too, never the same
// twice in a process.
func freePort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for i := 0; i < 500; i++ {
		p, err := testports.Random()
		if err != nil {
			t.Fatal(err)
		}
		if usedPorts[p] || !portFree(p) || !portFree(p+10000) {
			continue
		}
		usedPorts[p] = true
		return p
	}
	t.Fatal("no free port")
	return 0
}

func portFree(p int) bool {
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
	if err != nil {
		return false
	}
	ln.Close()
	return true
}
