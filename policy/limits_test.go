package policy

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

func TestConnCounter(t *testing.T) {
	type step struct {
		ip, sub string
		want    string // "" = allowed, else a substring of the refusal
	}
	tests := []struct {
		name   string
		limits ConnLimits
		steps  []step
	}{
		{"no limits", ConnLimits{}, []step{{"a", "u", ""}, {"a", "u", ""}, {"a", "u", ""}}},
		{"total", ConnLimits{Total: 2}, []step{{"a", "u", ""}, {"b", "v", ""}, {"c", "w", "gateway limit"}}},
		{"per IP", ConnLimits{PerIP: 2}, []step{
			{"a", "", ""}, {"a", "", ""}, {"a", "", "per-IP limit"}, {"b", "", ""}, {"b", "", ""}, {"b", "", "per-IP limit"},
		}},
		{"per subject", ConnLimits{PerSubject: 1}, []step{
			{"a", "u", ""}, {"b", "u", "per-subject limit"}, {"b", "v", ""}, {"a", "v", "per-subject limit"},
		}},
		{"no subject is not limited per subject", ConnLimits{PerSubject: 1}, []step{{"a", "", ""}, {"b", "", ""}, {"c", "", ""}}},
		{"total is checked first", ConnLimits{Total: 1, PerIP: 1, PerSubject: 1}, []step{{"a", "u", ""}, {"a", "u", "gateway limit"}}},
		{"per IP before per subject", ConnLimits{PerIP: 1, PerSubject: 1}, []step{{"a", "u", ""}, {"a", "u", "per-IP limit"}}},
		{"all three", ConnLimits{Total: 3, PerIP: 2, PerSubject: 2}, []step{
			{"a", "u", ""}, {"a", "v", ""}, {"a", "w", "per-IP limit"}, {"b", "u", ""}, {"c", "u", "gateway limit"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := NewConnCounter(tt.limits)
			open := 0
			for i, s := range tt.steps {
				release, err := c.Acquire(s.ip, s.sub)
				if s.want == "" {
					if err != nil {
						t.Fatalf("step %d (%s, %q): %v", i+1, s.ip, s.sub, err)
					}
					if release == nil {
						t.Fatalf("step %d: no release func", i+1)
					}
					open++
				} else {
					if !errors.Is(err, ErrTooMany) || !strings.Contains(err.Error(), s.want) {
						t.Fatalf("step %d (%s, %q): err = %v, want ErrTooMany with %q", i+1, s.ip, s.sub, err, s.want)
					}
					if release != nil {
						t.Fatalf("step %d: refused, but a release func was returned", i+1)
					}
				}
				if got := c.Open(); got != open {
					t.Fatalf("step %d: Open() = %d, want %d", i+1, got, open)
				}
			}
		})
	}
}

func TestConnCounterRelease(t *testing.T) {
	c := NewConnCounter(ConnLimits{Total: 2, PerIP: 2, PerSubject: 2})
	r1, err := c.Acquire("a", "u")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Acquire("a", "u"); err != nil {
		t.Fatal(err)
	}
	r1()
	r1() // a second call frees nothing more
	r1()
	if got := c.Open(); got != 1 {
		t.Fatalf("Open() = %d after releasing one connection three times, want 1", got)
	}
	if _, err := c.Acquire("a", "u"); err != nil {
		t.Fatalf("the released slot is not free: %v", err)
	}
	if _, err := c.Acquire("b", "v"); !errors.Is(err, ErrTooMany) {
		t.Fatalf("a third connection got in (err = %v): releasing twice freed two slots", err)
	}
}

// TestConnCounterReleaseFreesEveryCount checks that release gives back the
// per-IP and per-subject slots too, and drops empty entries.
func TestConnCounterReleaseFreesEveryCount(t *testing.T) {
	c := NewConnCounter(ConnLimits{PerIP: 1, PerSubject: 1})
	for i := range 3 {
		release, err := c.Acquire("a", "u")
		if err != nil {
			t.Fatalf("round %d: %v", i+1, err)
		}
		release()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.ip) != 0 || len(c.sub) != 0 || c.total != 0 {
		t.Errorf("after releasing everything: total %d, ip %v, sub %v", c.total, c.ip, c.sub)
	}
}

func TestConnCounterSetLimits(t *testing.T) {
	c := NewConnCounter(ConnLimits{})
	var releases []func()
	for range 3 {
		r, err := c.Acquire("a", "u")
		if err != nil {
			t.Fatal(err)
		}
		releases = append(releases, r)
	}
	// a reload lowers the limit under what is open: open connections stay,
	// new ones wait until enough have gone
	c.SetLimits(ConnLimits{Total: 2})
	if got := c.Open(); got != 3 {
		t.Fatalf("Open() = %d after SetLimits, want 3", got)
	}
	if _, err := c.Acquire("b", "v"); !errors.Is(err, ErrTooMany) {
		t.Fatalf("err = %v, want ErrTooMany over the new limit", err)
	}
	releases[0]()
	if _, err := c.Acquire("b", "v"); !errors.Is(err, ErrTooMany) {
		t.Fatalf("err = %v, want ErrTooMany at the new limit", err)
	}
	releases[1]()
	if _, err := c.Acquire("b", "v"); err != nil {
		t.Fatalf("under the new limit: %v", err)
	}

	// per-IP counts survive too
	c.SetLimits(ConnLimits{PerIP: 1})
	if _, err := c.Acquire("a", "x"); !errors.Is(err, ErrTooMany) {
		t.Fatalf("err = %v, want the per-IP limit for a, which has one open", err)
	}
	c.SetLimits(ConnLimits{})
	if _, err := c.Acquire("a", "x"); err != nil {
		t.Fatalf("without limits: %v", err)
	}
}

// TestConnCounterConcurrent hammers one counter from many goroutines (run
// it with -race): the limits hold at every moment and everything is given
// back.
func TestConnCounterConcurrent(t *testing.T) {
	const (
		workers = 16
		rounds  = 500
		total   = 8
		perIP   = 3
	)
	c := NewConnCounter(ConnLimits{Total: total, PerIP: perIP, PerSubject: 2})
	var holding atomic.Int32
	var ipHolding [4]atomic.Int32
	var maxSeen atomic.Int32
	var wg sync.WaitGroup
	errc := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ipIdx := w % len(ipHolding)
			ip := fmt.Sprintf("10.0.0.%d", ipIdx)
			for i := range rounds {
				sub := fmt.Sprintf("u-%d", (w+i)%5)
				release, err := c.Acquire(ip, sub)
				if err != nil {
					if !errors.Is(err, ErrTooMany) {
						errc <- err
						return
					}
					continue
				}
				n := holding.Add(1)
				for {
					m := maxSeen.Load()
					if n <= m || maxSeen.CompareAndSwap(m, n) {
						break
					}
				}
				if n > total {
					errc <- fmt.Errorf("%d connections held, limit %d", n, total)
				}
				if k := ipHolding[ipIdx].Add(1); k > perIP {
					errc <- fmt.Errorf("%d connections held from %s, limit %d", k, ip, perIP)
				}
				ipHolding[ipIdx].Add(-1)
				holding.Add(-1)
				release()
				if i%7 == 0 {
					release() // extra calls must change nothing
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Error(err)
	}
	if got := c.Open(); got != 0 {
		t.Errorf("Open() = %d after every connection ended, want 0", got)
	}
	if maxSeen.Load() == 0 {
		t.Error("no connection was ever admitted")
	}
}
