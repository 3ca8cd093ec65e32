package ttlmap

import (
	"strconv"
	"testing"
	"time"
)

func TestMapExpiry(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	var m Map[int]
	m.Set("a", 1, t0.Add(time.Minute), t0)
	for _, tc := range []struct {
		name   string
		at     time.Duration
		wantOK bool
	}{
		{"at once", 0, true},
		{"just before expiry", time.Minute - time.Nanosecond, true},
		{"at expiry", time.Minute, false},
		{"after", time.Hour, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, ok := m.Get("a", t0.Add(tc.at))
			if ok != tc.wantOK || (ok && v != 1) {
				t.Fatalf("Get = %v, %v; want ok %v", v, ok, tc.wantOK)
			}
		})
	}
	if m.SetIfAbsent("a", 2, t0.Add(2*time.Minute), t0.Add(time.Second)) {
		t.Fatal("SetIfAbsent replaced a live entry")
	}
	if !m.SetIfAbsent("a", 3, t0.Add(2*time.Minute), t0.Add(time.Minute)) {
		t.Fatal("SetIfAbsent kept an expired entry")
	}
	if v, _ := m.Get("a", t0.Add(time.Minute)); v != 3 {
		t.Fatalf("Get = %d, want 3", v)
	}
	m.Delete("a")
	if _, ok := m.Get("a", t0); ok {
		t.Fatal("Get after Delete found the entry")
	}
}

// TestMapSweeps: expired entries do not pile up; memory follows the live
// entries.
func TestMapSweeps(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	var m Map[struct{}]
	now := t0
	for i := 0; i < 100_000; i++ {
		now = t0.Add(time.Duration(i) * time.Millisecond)
		m.Set(strconv.Itoa(i), struct{}{}, now.Add(time.Second), now)
	}
	// 1,000 entries are live at the end (one per millisecond for a second).
	if n := m.Len(); n > 4*minSweep {
		t.Fatalf("%d entries held for 1,000 live ones", n)
	}
	for i := 99_000; i < 100_000; i++ {
		if _, ok := m.Get(strconv.Itoa(i), now); !ok {
			t.Fatalf("live entry %d swept", i)
		}
	}
}
