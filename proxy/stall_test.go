package proxy

import (
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Peers that stop reading, and what the tests measure about them.

// stallWatch remembers when a flooding peer last got a write through. Once
// the gateway stops taking the flood's bytes (because its own writes to a
// peer that does not read are stuck), the flood stalls soon after, so the
// gateway's write deadline runs from about then.
type stallWatch struct {
	start time.Time
	last  atomic.Int64 // time since start of the last write that went through
}

func newStallWatch() *stallWatch { return &stallWatch{start: time.Now()} }

// progress records a write that went through.
func (w *stallWatch) progress() { w.last.Store(int64(time.Since(w.start))) }

// stalled is how long ago the last write went through.
func (w *stallWatch) stalled() time.Duration {
	return time.Since(w.start) - time.Duration(w.last.Load())
}

// until waits for cond. It fails the test if the flood has been stalled
// for longer than bound first, or if cond does not hold within waitFor.
func (w *stallWatch) until(t testing.TB, bound time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitFor)
	for !cond() {
		if s := w.stalled(); s > bound {
			t.Fatalf("timed out waiting for %s: the flood stalled %v ago (allowed: %v)", what, s.Round(time.Millisecond), bound)
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s: still not after %v (the flood stalled %v ago)", what, waitFor, w.stalled().Round(time.Millisecond))
		}
		timer := time.NewTimer(5 * time.Millisecond)
		<-timer.C
	}
}

// flood writes batch to conn over and over from a goroutine, recording in
// w each write that goes through, until a write fails. stop closes conn
// and waits for the goroutine; it also runs when the test ends.
func flood(t testing.TB, conn net.Conn, batch []byte, w *stallWatch) (stop func()) {
	t.Helper()
	done := make(chan struct{})
	w.progress()
	go func() {
		defer close(done)
		for {
			conn.SetWriteDeadline(time.Now().Add(waitFor))
			if _, err := conn.Write(batch); err != nil {
				return
			}
			w.progress()
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			conn.Close()
			<-done
		})
	}
	t.Cleanup(stop)
	return stop
}

// isDone reports whether ch is closed.
func isDone(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// openFDs counts the process's open file descriptors, leaving out
// anonymous inodes: epoll instances and the like are made once per
// process on first use (the runtime's netpoller, the gateway's poller),
// while what a connection holds is sockets. It returns -1 where /proc is
// not available.
func openFDs() int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return -1
	}
	n := 0
	for _, e := range entries {
		// The descriptor ReadDir used is listed too, and gone by now.
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && !strings.HasPrefix(target, "anon_inode:") {
			n++
		}
	}
	return n
}

// waitFDs waits until no more descriptors are open than before (-1: not
// checked).
func waitFDs(t testing.TB, before int) {
	t.Helper()
	if before < 0 {
		return
	}
	poll(t, fmt.Sprintf("open file descriptors to fall back to %d", before), func() bool { return openFDs() <= before })
}
