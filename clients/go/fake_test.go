package wsgate

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/wsgate/wsgate/internal/poll"
)

// fakeClock fires timers only when the test advances it.
type fakeClock struct {
	mu     sync.Mutex
	now    time.Time
	timers []*fakeTimer
}

type fakeTimer struct {
	c  *fakeClock
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{now: time.Unix(1_800_000_000, 0)} }

func (f *fakeClock) Now() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *fakeClock) NewTimer(d time.Duration) Timer {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &fakeTimer{c: f, at: f.now.Add(d), ch: make(chan time.Time, 1)}
	if d <= 0 {
		t.ch <- f.now
	} else {
		f.timers = append(f.timers, t)
	}
	return t
}

func (t *fakeTimer) C() <-chan time.Time { return t.ch }

func (t *fakeTimer) Stop() bool {
	f := t.c
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, x := range f.timers {
		if x == t {
			f.timers = append(f.timers[:i], f.timers[i+1:]...)
			return true
		}
	}
	return false
}

// Advance moves the time on and fires the timers that are due.
func (f *fakeClock) Advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
	kept := f.timers[:0]
	for _, t := range f.timers {
		if !t.at.After(f.now) {
			t.ch <- f.now
		} else {
			kept = append(kept, t)
		}
	}
	f.timers = kept
}

// waitTimer waits until a timer is armed for the time at.
func (f *fakeClock) waitTimer(t *testing.T, at time.Time) {
	t.Helper()
	eventually(t, "a timer at "+at.String(), func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, x := range f.timers {
			if x.at.Equal(at) {
				return true
			}
		}
		return false
	})
}

// waitTimerWithin waits until a timer is armed no later than d from now.
func (f *fakeClock) waitTimerWithin(t *testing.T, d time.Duration) {
	t.Helper()
	eventually(t, "a timer within "+d.String(), func() bool {
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, x := range f.timers {
			if !x.at.After(f.now.Add(d)) {
				return true
			}
		}
		return false
	})
}

// eventually polls cond until it holds, or fails the test after 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, 5*time.Second, what, cond)
}

// noLeaks fails the test if goroutines started during it outlive it (its
// cleanups run first).
func noLeaks(t *testing.T) {
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Fatalf("%d goroutines, %d before the test:\n%s", runtime.NumGoroutine(), before, buf[:runtime.Stack(buf, true)])
			}
			<-tick.C
		}
	})
}

// fakeServer is a scripted wsgate.v1 gateway on coder/websocket.
type fakeServer struct {
	t     *testing.T
	srv   *httptest.Server
	conns chan *fakeConn
}

type fakeConn struct {
	t      *testing.T
	c      *websocket.Conn
	token  string
	in     chan map[string]any
	closed chan struct{}
	err    error
}

func newFakeServer(t *testing.T) *fakeServer {
	fs := &fakeServer{t: t, conns: make(chan *fakeConn, 16)}
	fs.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{Subprotocol}})
		if err != nil {
			return
		}
		fc := &fakeConn{t: t, c: c, in: make(chan map[string]any, 1024), closed: make(chan struct{})}
		protos := strings.Split(r.Header.Get("Sec-WebSocket-Protocol"), ",")
		for i, p := range protos {
			if strings.TrimSpace(p) == "bearer" && i+1 < len(protos) {
				fc.token = strings.TrimSpace(protos[i+1])
			}
		}
		go func() {
			defer close(fc.closed)
			for {
				_, b, err := c.Read(context.Background())
				if err != nil {
					fc.err = err
					return
				}
				var m map[string]any
				json.Unmarshal(b, &m)
				fc.in <- m
			}
		}()
		fs.conns <- fc
	}))
	t.Cleanup(func() {
		fs.srv.CloseClientConnections()
		fs.srv.Close()
	})
	return fs
}

func (fs *fakeServer) url() string { return "ws" + strings.TrimPrefix(fs.srv.URL, "http") }

// accept waits for the client's next connection.
func (fs *fakeServer) accept() *fakeConn {
	fs.t.Helper()
	select {
	case fc := <-fs.conns:
		fs.t.Cleanup(func() { fc.c.CloseNow() })
		return fc
	case <-time.After(5 * time.Second):
		fs.t.Fatal("no connection within 5 s")
		return nil
	}
}

// next is the client's next request.
func (fc *fakeConn) next() map[string]any {
	fc.t.Helper()
	select {
	case m := <-fc.in:
		return m
	case <-time.After(5 * time.Second):
		fc.t.Fatal("no request within 5 s")
		return nil
	}
}

// expect is next, checked for its op.
func (fc *fakeConn) expect(op string) map[string]any {
	fc.t.Helper()
	m := fc.next()
	if m["op"] != op {
		fc.t.Fatalf("got %v, want op %s", m, op)
	}
	return m
}

func (fc *fakeConn) send(v any) {
	fc.t.Helper()
	b, _ := json.Marshal(v)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := fc.c.Write(ctx, websocket.MessageText, b); err != nil {
		fc.t.Fatal(err)
	}
}

// reply answers req with ok and fields.
func (fc *fakeConn) reply(req map[string]any, kv ...any) {
	fc.t.Helper()
	m := map[string]any{"id": req["id"], "op": "ok"}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i].(string)] = kv[i+1]
	}
	fc.send(m)
}

func (fc *fakeConn) replyError(req map[string]any, code string) {
	fc.t.Helper()
	fc.send(map[string]any{"id": req["id"], "op": "error", "code": code, "message": code + " here"})
}

func (fc *fakeConn) message(ch string, offset int, data any) {
	fc.t.Helper()
	m := map[string]any{"op": "message", "channel": ch, "data": data}
	if offset > 0 {
		m["offset"] = offset
	}
	fc.send(m)
}

// events collects a client's events.
type events struct{ ch chan Event }

func (e *events) next(t *testing.T) Event {
	t.Helper()
	select {
	case ev := <-e.ch:
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no event within 5 s")
		return Event{}
	}
}

// until skips events up to the first of type typ.
func (e *events) until(t *testing.T, typ EventType) Event {
	t.Helper()
	for {
		if ev := e.next(t); ev.Type == typ {
			return ev
		}
	}
}

// newTestClient makes a client of fs on a fake clock, with half the cap
// as every reconnect delay; Close runs at cleanup.
func newTestClient(t *testing.T, fs *fakeServer, opts Options) (*Client, *fakeClock, *events) {
	clk := newFakeClock()
	ev := &events{ch: make(chan Event, 1000)}
	opts.Clock = clk
	if opts.Rand == nil {
		opts.Rand = func() float64 { return 0.5 }
	}
	if opts.LivenessInterval == 0 {
		opts.LivenessInterval = time.Hour
	}
	opts.OnEvent = func(e Event) { ev.ch <- e }
	c := New(fs.url(), opts)
	t.Cleanup(func() { c.Close() })
	return c, clk, ev
}

func sortedKeys(m map[string]any) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}
