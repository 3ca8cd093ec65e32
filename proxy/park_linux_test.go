package proxy

import (
	"context"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestPollerFailure: when the poller's wait fails, parked sides are woken
// and read by goroutines again, nothing parks any more, and connections
// keep working; an interrupted wait (EINTR) changes nothing.
func TestPollerFailure(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	pl, err := newPoller()
	if err != nil {
		t.Fatal(err)
	}
	failNow := make(chan struct{})
	waits := 0
	pl.wait = func(epfd int, events []syscall.EpollEvent, msec int) (int, error) {
		waits++
		if waits == 1 {
			return -1, syscall.EINTR
		}
		select {
		case <-failNow:
			return -1, syscall.EBADF
		default:
		}
		return syscall.EpollWait(epfd, events, min(msec, 10))
	}
	prev := getPoller()
	currentPoller.Store(pl)
	t.Cleanup(func() { currentPoller.Store(prev) })

	up, tg := startParkingGateway(t, 10*time.Millisecond, nil)
	ctx := context.Background()
	cl, _ := dialCoder(t, tg, "/", nil)
	up.next(t)
	c := onlyRelay(t, tg)
	waitParked(t, c) // parked after an EINTR: the loop went on
	if err := cl.Write(ctx, websocket.MessageText, []byte("after EINTR")); err != nil {
		t.Fatal(err)
	}
	if _, m, err := cl.Read(ctx); err != nil || string(m) != "after EINTR" {
		t.Fatalf("echo: %q %v", m, err)
	}
	waitParked(t, c)
	close(failNow)
	poll(t, "both sides to be woken", func() bool {
		return c.client.pstate.Load() == sideRunning && c.upstream.pstate.Load() == sideRunning && pumps() == 2
	})
	if err := cl.Write(ctx, websocket.MessageText, []byte("after the failure")); err != nil {
		t.Fatal(err)
	}
	if _, m, err := cl.Read(ctx); err != nil || string(m) != "after the failure" {
		t.Fatalf("echo: %q %v", m, err)
	}
	if pl.usable() || pumps() != 2 {
		t.Fatalf("after the failure: poller usable %v, %d reader goroutines (want 2, none parked)", pl.usable(), pumps())
	}
	cl.Close(websocket.StatusNormalClosure, "")
	tg.waitLen(t, 0)
}

// TestPollerWaitsInNetpoller: the goroutine that waits for parked sockets
// waits in the runtime's netpoller ("IO wait"), not in a blocking
// epoll_wait ("syscall"), which would hold a thread and keep the runtime's
// monitor polling.
func TestPollerWaitsInNetpoller(t *testing.T) {
	if !getPoller().usable() {
		t.Skip("no poller on this platform")
	}
	up, tg := startParkingGateway(t, 10*time.Millisecond, nil)
	cl, _ := dialCoder(t, tg, "/", nil)
	defer cl.Close(websocket.StatusNormalClosure, "")
	up.next(t)
	waitParked(t, onlyRelay(t, tg))
	var state string
	poll(t, "the poller's goroutine to wait", func() bool {
		state = pollerGoroutineState()
		return state != "" && state != "running" && state != "runnable"
	})
	if state != "IO wait" {
		t.Fatalf("the poller's goroutine waits in state %q, want IO wait", state)
	}
}

// pollerGoroutineState is the state in a goroutine dump of the goroutine
// running the poller's loop ("" when there is none).
func pollerGoroutineState() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	for _, g := range strings.Split(string(buf), "\n\n") {
		if !strings.Contains(g, "proxy.(*poller).loop") {
			continue
		}
		// "goroutine 42 [IO wait, 1 minutes]:"
		head, _, _ := strings.Cut(g, "\n")
		_, st, _ := strings.Cut(head, "[")
		st, _, _ = strings.Cut(st, "]")
		st, _, _ = strings.Cut(st, ",")
		return st
	}
	return ""
}
