package proxy

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/gobwas/ws"
)

// testUpstreams makes upstream states ws://up<i>:80 with the given live
// counts.
func testUpstreams(live ...int64) []*Upstream {
	out := make([]*Upstream, len(live))
	for i, n := range live {
		u, _ := url.Parse(fmt.Sprintf("ws://up%d:80", i))
		out[i] = &Upstream{name: u.String(), url: u, refs: 1}
		out[i].live.Store(n)
	}
	return out
}

// seqRand returns the numbers of seq in turn (each modulo n), so that the
// random policies' choices are known in advance.
func seqRand(seq ...int) func(int) int {
	i := 0
	return func(n int) int {
		v := seq[i%len(seq)]
		i++
		return v % n
	}
}

func testQuery(remote string, hdr http.Header, info RequestInfo) *query {
	r := httptest.NewRequest(http.MethodGet, "/ws", nil)
	r.RemoteAddr = remote
	for k, v := range hdr {
		r.Header[k] = v
	}
	return &query{r: r, info: &info}
}

func TestPolicies(t *testing.T) {
	ups := testUpstreams(5, 2, 2, 7)
	// which upstream a key pins, computed the way every gateway does
	pinned := func(key string) int { return rendezvous(ups, key) }
	tests := []struct {
		name   string
		policy LBPolicy
		rand   []int
		q      *query
		picks  []int // successive picks
	}{
		{"round robin goes in turn", LBPolicy{}, nil, testQuery("1.2.3.4:5", nil, RequestInfo{}), []int{0, 1, 2, 3, 0}},
		{"least conn takes the fewest; ties at random", LBPolicy{Policy: LeastConn}, []int{0, 1}, testQuery("", nil, RequestInfo{}), []int{2, 1}},
		{"random", LBPolicy{Policy: Random}, []int{3, 1, 2}, testQuery("", nil, RequestInfo{}), []int{3, 1, 2}},
		// draws 0 then (1+2)=3 of the rest: 0 has 5, 3 has 7 -> 0
		{"random_choose 2 takes the lighter of two", LBPolicy{Policy: RandomChoose}, []int{0, 2}, testQuery("", nil, RequestInfo{}), []int{0}},
		// draws 3, then swaps in 1: 3 has 7, 1 has 2 -> 1
		{"random_choose 2, other draw", LBPolicy{Policy: RandomChoose}, []int{3, 0}, testQuery("", nil, RequestInfo{}), []int{1}},
		{"random_choose 4 sees all", LBPolicy{Policy: RandomChoose, Choose: 4}, []int{0}, testQuery("", nil, RequestInfo{}), []int{1}},
		{"first", LBPolicy{Policy: First}, nil, testQuery("", nil, RequestInfo{}), []int{0, 0}},
		{"ip_hash hashes the peer", LBPolicy{Policy: IPHash}, nil, testQuery("10.0.0.7:4000", nil, RequestInfo{ClientIP: "9.9.9.9"}),
			[]int{pinned("10.0.0.7"), pinned("10.0.0.7")}},
		{"client_ip_hash hashes the client", LBPolicy{Policy: ClientIPHash}, nil, testQuery("10.0.0.7:4000", nil, RequestInfo{ClientIP: "9.9.9.9"}),
			[]int{pinned("9.9.9.9")}},
		{"header", LBPolicy{Policy: HeaderHash, Field: "x-tenant"}, nil, testQuery("", http.Header{"X-Tenant": {"acme"}}, RequestInfo{}),
			[]int{pinned("acme"), pinned("acme")}},
		{"header missing: fallback", LBPolicy{Policy: HeaderHash, Field: "X-Tenant", Fallback: &LBPolicy{Policy: First}}, nil,
			testQuery("", nil, RequestInfo{}), []int{0}},
		{"header missing: random by default", LBPolicy{Policy: HeaderHash, Field: "X-Tenant"}, []int{2, 3},
			testQuery("", nil, RequestInfo{}), []int{2, 3}},
		{"key", LBPolicy{Policy: KeyHash}, nil, testQuery("", nil, RequestInfo{BalanceKey: "u-7"}), []int{pinned("u-7")}},
		{"key missing: fallback", LBPolicy{Policy: KeyHash, Fallback: &LBPolicy{Policy: LeastConn}}, []int{1},
			testQuery("", nil, RequestInfo{}), []int{1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := tt.policy
			rnd := seqRand(0)
			if tt.rand != nil {
				rnd = seqRand(tt.rand...)
			}
			s, err := p.prepare(rnd, false)
			if err != nil {
				t.Fatal(err)
			}
			for i, want := range tt.picks {
				if got := s.pick(ups, tt.q); got != want {
					t.Fatalf("pick %d: got upstream %d, want %d", i, got, want)
				}
			}
		})
	}
}

func TestPolicyErrors(t *testing.T) {
	for _, tt := range []struct {
		p    LBPolicy
		want string
	}{
		{LBPolicy{Policy: "weighted"}, `unknown lb_policy "weighted"`},
		{LBPolicy{Policy: RandomChoose, Choose: 1}, "at least 2"},
		{LBPolicy{Policy: HeaderHash}, "needs a header name"},
		{LBPolicy{Policy: LeastConn, Fallback: &LBPolicy{Policy: Random}}, "takes no fallback"},
		{LBPolicy{Policy: CookieHash, Fallback: &LBPolicy{Policy: KeyHash}}, "cannot be a fallback"},
	} {
		_, err := tt.p.prepare(seqRand(0), false)
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: got %v, want an error with %q", tt.p, err, tt.want)
		}
	}
}

// TestRendezvousMovesOnlyPinnedKeys: taking one upstream away moves the
// keys pinned to it and no other; the keys spread over all upstreams.
func TestRendezvousMovesOnlyPinnedKeys(t *testing.T) {
	ups := testUpstreams(0, 0, 0)
	const keys = 3000
	counts := make([]int, len(ups))
	for k := range keys {
		key := fmt.Sprintf("client-%d", k)
		was := rendezvous(ups, key)
		counts[was]++
		rest := append(append([]*Upstream{}, ups[:1]...), ups[2:]...) // without upstream 1
		now := rest[rendezvous(rest, key)]
		if was != 1 && now != ups[was] {
			t.Fatalf("%s moved from upstream %d although upstream 1 left", key, was)
		}
	}
	for i, n := range counts {
		if n < keys/3*8/10 || n > keys/3*12/10 {
			t.Errorf("upstream %d pins %d of %d keys, want about a third: %v", i, n, keys, counts)
		}
	}
}

func TestCookiePolicy(t *testing.T) {
	ups := testUpstreams(0, 0, 0)
	p := LBPolicy{Policy: CookieHash, Secret: "s3cret", MaxAge: time.Hour, Fallback: &LBPolicy{Policy: First}}
	s, err := p.prepare(seqRand(0), false)
	if err != nil {
		t.Fatal(err)
	}
	cp := s.(*cookiePick)
	// no cookie: the fallback picks, and the cookie names its choice
	q := testQuery("", nil, RequestInfo{})
	if got := cp.pick(ups, q); got != 0 {
		t.Fatalf("no cookie: picked %d, want the fallback's 0", got)
	}
	ck := cp.cookieFor(ups[0], q)
	if ck == nil || ck.Name != "lb" || ck.Value != cp.value(ups[0]) || ck.MaxAge != 3600 || !ck.HttpOnly || ck.Secure {
		t.Fatalf("cookie %+v", ck)
	}
	// the cookie pins upstream 2
	q = testQuery("", http.Header{"Cookie": {"lb=" + cp.value(ups[2])}}, RequestInfo{})
	if got := cp.pick(ups, q); got != 2 {
		t.Fatalf("cookie of upstream 2: picked %d", got)
	}
	if ck := cp.cookieFor(ups[2], q); ck != nil {
		t.Fatalf("a cookie that names the upstream is set again: %+v", ck)
	}
	// upstream 2 set aside: the fallback picks, and the cookie is replaced
	if got := cp.pick(ups[:2], q); got != 0 {
		t.Fatalf("cookie of a missing upstream: picked %d", got)
	}
	if ck := cp.cookieFor(ups[0], q); ck == nil || ck.Value != cp.value(ups[0]) {
		t.Fatalf("moved: cookie %+v", ck)
	}
	// the value shows neither the URL nor its password
	for _, raw := range []string{"ws://app:hunter2@10.0.0.5:9000/ws", "ws://10.0.0.5:9000"} {
		cfg := Config{Upstreams: []string{raw}, LB: LBPolicy{Policy: CookieHash}}
		if err := cfg.Prepare(); err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(raw)
		v := cfg.selector.(*cookiePick).value(&Upstream{name: u.Redacted(), url: u})
		for _, part := range []string{raw, u.Redacted(), u.Host, "hunter2"} {
			if v == part || strings.Contains(v, part) {
				t.Fatalf("cookie value %q shows %q", v, part)
			}
		}
		if v != (&cookiePick{}).hmac(u.Redacted()) {
			t.Fatalf("cookie value %q is not the HMAC of the redacted URL", v)
		}
	}
	// another secret makes other values
	other := &cookiePick{name: "lb", secret: []byte("x")}
	if other.value(ups[0]) == cp.value(ups[0]) {
		t.Fatal("the secret does not change the cookie value")
	}
	// behind TLS the cookie is Secure, SameSite=None
	q = testQuery("", nil, RequestInfo{})
	q.r.TLS = &tls.ConnectionState{}
	if ck := cp.cookieFor(ups[1], q); !ck.Secure || ck.SameSite != http.SameSiteNoneMode {
		t.Fatalf("over TLS: %+v", ck)
	}
}

func TestPassiveHealth(t *testing.T) {
	clock := newFakeClock()
	h := Health{FailDuration: 10 * time.Second, MaxFails: 2, UnhealthyCloses: []uint16{1006, 1011}}
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	u := testUpstreams(0)[0]
	dialFail := errors.New("connection refused")
	fail := func() {
		t.Helper()
		tok, ok := u.acquire(clock.Now(), &h, nil)
		if !ok {
			t.Fatal("not usable")
		}
		u.dialed(clock.Now(), &h, tok, dialFail)
	}

	fail()
	if !u.usable(clock.Now(), &h, nil) {
		t.Fatal("set aside after 1 of 2 failures")
	}
	clock.Advance(11 * time.Second) // the first failure leaves the window
	fail()
	if !u.usable(clock.Now(), &h, nil) {
		t.Fatal("failures in different windows add up")
	}
	clock.Advance(time.Second)
	fail()
	if u.usable(clock.Now(), &h, nil) {
		t.Fatal("usable after 2 failures within fail_duration")
	}
	if st := u.status(clock.Now()); st.Healthy || !st.PassiveDown || st.Live != 0 {
		t.Fatalf("status %+v", st)
	}
	clock.Advance(9 * time.Second)
	if u.usable(clock.Now(), &h, nil) {
		t.Fatal("usable before fail_duration passed")
	}
	clock.Advance(time.Second)
	// back: one trial dial at a time
	trial, ok := u.acquire(clock.Now(), &h, nil)
	if !ok || trial == 0 {
		t.Fatal("no trial after fail_duration")
	}
	if _, ok := u.acquire(clock.Now(), &h, nil); ok || u.usable(clock.Now(), &h, nil) {
		t.Fatal("a second dial while the trial is in flight")
	}
	if d := u.retryIn(clock.Now(), &h, nil); d != time.Second {
		t.Fatalf("retry in %v during a trial", d)
	}
	u.dialed(clock.Now(), &h, trial, dialFail) // the trial fails: aside again
	if u.usable(clock.Now(), &h, nil) {
		t.Fatal("usable after a failed trial")
	}
	if d := u.retryIn(clock.Now(), &h, nil); d != 10*time.Second {
		t.Fatalf("retry in %v after a failed trial", d)
	}
	clock.Advance(10 * time.Second)
	if trial, ok = u.acquire(clock.Now(), &h, nil); !ok {
		t.Fatal("no second trial")
	}
	u.dialed(clock.Now(), &h, trial, nil) // the trial succeeds: back for all
	if !u.usable(clock.Now(), &h, nil) || u.Live() != 1 {
		t.Fatalf("after a good trial: usable %v, live %d", u.usable(clock.Now(), &h, nil), u.Live())
	}

	// a 4xx answer judges the client, not the upstream
	for range 3 {
		tok, _ := u.acquire(clock.Now(), &h, nil)
		u.dialed(clock.Now(), &h, tok, errUpstreamStatus(403))
	}
	if !u.usable(clock.Now(), &h, nil) {
		t.Fatal("set aside by 403 answers")
	}
	// unexpected closes of live connections count, others not
	u.ended(clock.Now(), &h, ws.StatusNormalClosure)
	u.ended(clock.Now(), &h, 0)
	u.live.Store(2)
	u.ended(clock.Now(), &h, ws.StatusAbnormalClosure)
	u.ended(clock.Now(), &h, ws.StatusInternalServerError)
	if u.usable(clock.Now(), &h, nil) {
		t.Fatal("usable after two 1006/1011 closes")
	}
	// a trial answered with 403 found the upstream up
	clock.Advance(10 * time.Second)
	if trial, ok = u.acquire(clock.Now(), &h, nil); !ok {
		t.Fatal("no trial")
	}
	u.dialed(clock.Now(), &h, trial, errUpstreamStatus(403))
	if !u.usable(clock.Now(), &h, nil) {
		t.Fatal("set aside again by a trial answered with 403")
	}
}

// TestTrialBelongsToItsDial: a dial that started before the upstream was
// set aside, and ends during the trial, neither ends the trial (which
// would let a second one in) nor decides it (which would leave the
// upstream aside after a good trial).
func TestTrialBelongsToItsDial(t *testing.T) {
	clock := newFakeClock()
	h := Health{FailDuration: time.Minute}
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	dialFail := errors.New("connection refused")
	// setAside returns u, set aside by a failure, with an older dial
	// still in flight, fail_duration later: its trial may start.
	setAside := func() (u *Upstream, older trialToken) {
		u = testUpstreams(0)[0]
		older, _ = u.acquire(clock.Now(), &h, nil)
		tok, _ := u.acquire(clock.Now(), &h, nil)
		u.dialed(clock.Now(), &h, tok, dialFail)
		if u.usable(clock.Now(), &h, nil) {
			t.Fatal("usable after a failure")
		}
		clock.Advance(time.Minute)
		return u, older
	}

	t.Run("an older dial abandoned", func(t *testing.T) {
		u, older := setAside()
		trial, ok := u.acquire(clock.Now(), &h, nil)
		if !ok || trial == 0 {
			t.Fatal("no trial")
		}
		u.abandoned(older)
		if _, ok := u.acquire(clock.Now(), &h, nil); ok {
			t.Fatal("a second trial while the first is in flight")
		}
		u.abandoned(trial)
		if _, ok := u.acquire(clock.Now(), &h, nil); !ok {
			t.Fatal("no new trial after the trial was abandoned")
		}
	})
	t.Run("an older dial fails, then the trial succeeds", func(t *testing.T) {
		u, older := setAside()
		trial, ok := u.acquire(clock.Now(), &h, nil)
		if !ok || trial == 0 {
			t.Fatal("no trial")
		}
		u.dialed(clock.Now(), &h, older, dialFail)
		if _, ok := u.acquire(clock.Now(), &h, nil); ok {
			t.Fatal("a second trial while the first is in flight")
		}
		u.dialed(clock.Now(), &h, trial, nil)
		if !u.usable(clock.Now(), &h, nil) {
			t.Fatal("still set aside after a good trial")
		}
		if u.Live() != 1 {
			t.Fatalf("live %d, want 1 (the trial)", u.Live())
		}
	})
}

func TestActiveHealthTransitions(t *testing.T) {
	a := &ActiveHealth{URI: "/health", Passes: 2, Fails: 2}
	h := Health{Active: a}
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	u := testUpstreams(0)[0]
	p := &prober{a: a}
	bad := errors.New("status 500")
	steps := []struct {
		err           error
		changed, down bool
	}{
		{bad, false, false}, {nil, false, false}, {bad, false, false}, {bad, true, true},
		{bad, false, true}, {nil, false, true}, {bad, false, true}, {nil, false, true}, {nil, true, false},
	}
	for i, s := range steps {
		changed, down := u.probed(p, s.err)
		if changed != s.changed || down != s.down {
			t.Fatalf("probe %d: changed %v down %v, want %v %v", i, changed, down, s.changed, s.down)
		}
		if u.usable(time.Now(), &h, p) == down {
			t.Fatalf("probe %d: usable disagrees with down", i)
		}
	}
}

// TestGoodProbeClearsPassivePenalty: an upstream set aside by a passive
// failure takes clients again after a good probe, without waiting out
// fail_duration; a trial dial in flight then decides nothing.
func TestGoodProbeClearsPassivePenalty(t *testing.T) {
	clock := newFakeClock()
	h := Health{FailDuration: time.Minute, Active: &ActiveHealth{URI: "/health"}}
	if err := h.prepare(); err != nil {
		t.Fatal(err)
	}
	u := testUpstreams(0)[0]
	p := &prober{a: h.Active}
	dialFail := errors.New("connection refused")
	tok, _ := u.acquire(clock.Now(), &h, p)
	u.dialed(clock.Now(), &h, tok, dialFail)
	if u.usable(clock.Now(), &h, p) {
		t.Fatal("usable after a passive failure")
	}
	if changed, down := u.probed(p, nil); changed || down {
		t.Fatalf("good probe: changed %v down %v", changed, down)
	}
	if !u.usable(clock.Now(), &h, p) {
		t.Fatal("still set aside after a good probe")
	}

	// set aside again, and its trial in flight when a probe passes
	tok, _ = u.acquire(clock.Now(), &h, p)
	u.dialed(clock.Now(), &h, tok, dialFail)
	clock.Advance(time.Minute)
	trial, ok := u.acquire(clock.Now(), &h, p)
	if !ok || trial == 0 {
		t.Fatal("no trial")
	}
	u.probed(p, nil)
	if !u.usable(clock.Now(), &h, p) {
		t.Fatal("still set aside after a good probe during the trial")
	}
	other, ok := u.acquire(clock.Now(), &h, p)
	if !ok || other != 0 {
		t.Fatalf("after the good probe: acquired %v, trial %d; want a plain dial", ok, other)
	}
	// the old trial's failure counts as any failure would
	u.dialed(clock.Now(), &h, trial, dialFail)
	if u.usable(clock.Now(), &h, p) {
		t.Fatal("a failed dial after the probe did not count")
	}
}

func TestHealthConfigErrors(t *testing.T) {
	for _, tt := range []struct {
		h    Health
		want string
	}{
		{Health{Active: &ActiveHealth{}}, "need health_uri or health_websocket"},
		{Health{Active: &ActiveHealth{URI: "/h", WebSocket: true}}, "exclude each other"},
		{Health{Active: &ActiveHealth{WebSocket: true, ExpectStatus: 200}}, "expects 101"},
		{Health{Active: &ActiveHealth{URI: "health"}}, "must start with /"},
		{Health{Active: &ActiveHealth{URI: "/h", ExpectStatus: 42}}, "want a status (100-599) or a class"},
		{Health{UnhealthyCloses: []uint16{999}}, "want 1000-4999"},
		{Health{FailDuration: -1}, "must not be negative"},
	} {
		err := tt.h.prepare()
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: got %v, want an error with %q", tt.h, err, tt.want)
		}
	}
}

func TestStatusMatches(t *testing.T) {
	for _, tt := range []struct {
		got, want int
		ok        bool
	}{{200, 0, true}, {204, 0, true}, {301, 0, false}, {302, 3, true}, {404, 4, true}, {200, 200, true}, {201, 200, false}} {
		if statusMatches(tt.got, tt.want) != tt.ok {
			t.Errorf("status %d against %d: want %v", tt.got, tt.want, tt.ok)
		}
	}
}
