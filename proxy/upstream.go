package proxy

import (
	"math"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Health says when an upstream is set aside. The zero value sets none
// aside: every upstream is always tried, as a plain list would be.
type Health struct {
	// FailDuration turns passive checks on: an upstream whose dials or
	// handshakes fail MaxFails times within FailDuration is skipped for
	// FailDuration. After that one dial at a time tries it again (the
	// others skip it meanwhile); success brings it back, failure sets it
	// aside for FailDuration again. 0: no passive checks.
	FailDuration time.Duration
	// MaxFails is how many failures within FailDuration set an upstream
	// aside. Default 1.
	MaxFails int
	// UnhealthyCloses are the close codes that, when the upstream ends a
	// live connection with them, count as failures too (1006: it went
	// away without a close frame). Default: none.
	UnhealthyCloses []uint16

	// Active, if set, probes every upstream periodically.
	Active *ActiveHealth

	// Now is the clock of passive checks; nil means time.Now.
	Now func() time.Time
}

// ActiveHealth configures the periodic probe of each upstream.
type ActiveHealth struct {
	// URI is the path (and query) an HTTP GET is sent to, over http:// for
	// a ws:// upstream and https:// for wss://. Exactly one of URI and
	// WebSocket is set.
	URI string
	// WebSocket probes with a WebSocket handshake, closed at once with
	// 1000 "health check", at WebSocketURI (default: the upstream URL's
	// own path, or /).
	WebSocket    bool
	WebSocketURI string
	// Interval between two probes of an upstream. Default 30s.
	Interval time.Duration
	// Timeout bounds a probe. Default 5s.
	Timeout time.Duration
	// ExpectStatus is the HTTP status a healthy upstream answers: 0 for
	// any 2xx, 1 to 5 for any status of that class, else that status.
	// WebSocket probes expect 101.
	ExpectStatus int
	// Passes and Fails are how many probes in a row bring an upstream
	// back or set it aside. Default 1 each.
	Passes, Fails int
	// NewTicker makes the probe timer; nil means time.NewTicker.
	NewTicker func(time.Duration) Ticker
}

// Ticker delivers the times of the probes.
type Ticker interface {
	C() <-chan time.Time
	Stop()
}

type realTicker struct{ t *time.Ticker }

func (r realTicker) C() <-chan time.Time { return r.t.C }
func (r realTicker) Stop()               { r.t.Stop() }

// Defaults of ActiveHealth, as reverse_proxy's.
const (
	DefaultHealthInterval = 30 * time.Second
	DefaultHealthTimeout  = 5 * time.Second
)

// Pool holds the state of upstreams, by URL: their live connections and
// health. The Gateways of successive configurations share one, so that a
// reload keeps what is known of each upstream, and an upstream that no
// configuration holds any more can be drained.
type Pool struct {
	mu  sync.Mutex
	ups map[string]*Upstream
	// of the newest Gateway: a reload that removes an upstream drains
	// it as the new configuration says
	drainTimeout time.Duration
	afterFunc    func(time.Duration, func()) (stop func() bool)
}

// configured takes the drain settings of the newest Gateway.
func (p *Pool) configured(cfg *Config) {
	p.mu.Lock()
	p.drainTimeout, p.afterFunc = cfg.DrainTimeout, cfg.AfterFunc
	p.mu.Unlock()
}

// drainSettings are the drain settings of the newest Gateway.
func (p *Pool) drainSettings() (time.Duration, func(time.Duration, func()) func() bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.drainTimeout, p.afterFunc
}

// NewPool makes an empty Pool.
func NewPool() *Pool { return &Pool{ups: map[string]*Upstream{}} }

// retain finds or makes the state of u, and counts one more Gateway
// holding it.
func (p *Pool) retain(u *url.URL) *Upstream {
	p.mu.Lock()
	defer p.mu.Unlock()
	key := u.String()
	up := p.ups[key]
	if up == nil {
		up = &Upstream{name: u.Redacted(), url: u}
		p.ups[key] = up
	}
	up.mu.Lock()
	up.refs++
	if up.stopDrain != nil {
		// configured again before its connections were drained
		up.stopDrain()
		up.stopDrain = nil
	}
	up.mu.Unlock()
	return up
}

// release counts one Gateway fewer holding up, and reports whether none
// does any more. An upstream without Gateways nor connections is
// forgotten.
func (p *Pool) release(up *Upstream) (removed bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	up.mu.Lock()
	up.refs--
	removed = up.refs == 0
	up.mu.Unlock()
	if removed {
		p.forget(up)
	}
	return removed
}

// forget drops up from the pool when nothing holds it (p.mu held).
func (p *Pool) forget(up *Upstream) {
	up.mu.Lock()
	idle := up.refs == 0 && up.live.Load() == 0
	up.mu.Unlock()
	if idle && p.ups[up.url.String()] == up {
		delete(p.ups, up.url.String())
	}
}

// connEnded forgets up if it was removed and this was its last
// connection.
func (p *Pool) connEnded(up *Upstream) {
	p.mu.Lock()
	p.forget(up)
	p.mu.Unlock()
}

// UpstreamStatus is what is known of an upstream at one moment.
type UpstreamStatus struct {
	URL string // password redacted
	// Live counts its relayed connections, and those being dialled.
	Live int64
	// Healthy is false while the upstream is set aside (by either check).
	Healthy bool
	// PassiveDown: set aside by passive checks until DownUntil.
	PassiveDown bool
	DownUntil   time.Time
	// ActiveDown: the last probes failed.
	ActiveDown bool
	// Removed: no configuration holds it any more; its connections live on
	// (or drain).
	Removed bool
	// LastError is the last failure seen (a dial, a probe, a close).
	LastError string
}

// TakesConnections reports whether the upstream is sent new connections:
// configured, and not set aside.
func (s UpstreamStatus) TakesConnections() bool { return s.Healthy && !s.Removed }

// Status lists the upstreams the pool knows, sorted by URL.
func (p *Pool) Status(now time.Time) []UpstreamStatus {
	p.mu.Lock()
	ups := make([]*Upstream, 0, len(p.ups))
	for _, u := range p.ups {
		ups = append(ups, u)
	}
	p.mu.Unlock()
	out := make([]UpstreamStatus, 0, len(ups))
	for _, u := range ups {
		out = append(out, u.status(now))
	}
	slices.SortFunc(out, func(a, b UpstreamStatus) int { return strings.Compare(a.URL, b.URL) })
	return out
}

// Upstream is the state of one upstream, shared by every Gateway of a
// Pool that relays to it.
type Upstream struct {
	name string // URL, password redacted
	url  *url.URL
	live atomic.Int64

	mu        sync.Mutex
	refs      int         // Gateways holding it
	stopDrain func() bool // cancels the drain of its connections, once removed
	fails     []time.Time // passive failures within FailDuration
	downUntil time.Time   // passive: skipped until then; zero: up
	trial     trialToken  // after downUntil, the one dial that tries it (0: none in flight)
	trials    trialToken  // the last token handed out
	probers   []*prober   // one per distinct active check configured for it
	lastErr   string
}

// URL is the upstream's URL, password redacted.
func (u *Upstream) URL() string { return u.name }

// Live counts the upstream's relayed connections and those being dialled.
func (u *Upstream) Live() int64 { return u.live.Load() }

func (u *Upstream) status(now time.Time) UpstreamStatus {
	u.mu.Lock()
	defer u.mu.Unlock()
	s := UpstreamStatus{URL: u.name, Live: u.live.Load(), Removed: u.refs == 0, LastError: u.lastErr}
	for _, p := range u.probers {
		s.ActiveDown = s.ActiveDown || p.down
	}
	if !u.downUntil.IsZero() {
		s.PassiveDown, s.DownUntil = now.Before(u.downUntil) || u.trial != 0, u.downUntil
	}
	s.Healthy = !s.ActiveDown && !s.PassiveDown
	return s
}

// usable reports whether a Gateway with health checks h, and p its
// active check of u (nil: none), may send a dial to u now. Each Gateway
// heeds only the checks it has: one without passive checks ignores the
// penalties that others' failures set, and one without active checks
// ignores the probes of others.
func (u *Upstream) usable(now time.Time, h *Health, p *prober) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.usableLocked(now, h, p)
}

func (u *Upstream) usableLocked(now time.Time, h *Health, p *prober) bool {
	if p != nil && p.down {
		return false
	}
	if h.FailDuration <= 0 {
		return true
	}
	return u.downUntil.IsZero() || !now.Before(u.downUntil) && u.trial == 0
}

// trialToken names the one dial that tries an upstream back from being
// set aside; 0 is any other dial. Only that dial's outcome ends the
// trial: a dial started before the upstream was set aside may end
// meanwhile, and says nothing of its return.
type trialToken uint64

// acquire takes u for a dial, or reports that it stopped being usable
// since it was chosen, or that no configuration holds it any more. An upstream back from being set aside lets one
// dial through at a time, so that its return is tried by one client, not
// by every client waiting: that dial gets a token, which it hands back to
// dialed or abandoned.
func (u *Upstream) acquire(now time.Time, h *Health, p *prober) (tok trialToken, ok bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.refs == 0 || !u.usableLocked(now, h, p) {
		// (no refs: the Gateway that chose it is closed, and a connection
		// now would escape the metrics, the admin API and the drain)
		return 0, false
	}
	if h.FailDuration > 0 && !u.downUntil.IsZero() {
		u.trials++
		u.trial, tok = u.trials, u.trials
	}
	u.live.Add(1)
	return tok, true
}

// dialed records how a dial acquired from u (with tok) went. A failed
// dial no longer counts as a connection.
func (u *Upstream) dialed(now time.Time, h *Health, tok trialToken, err error) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err != nil {
		u.live.Add(-1)
		u.lastErr = err.Error()
	}
	if tok != 0 && tok == u.trial {
		u.trial = 0
		if err == nil || !countsAsFailure(err) {
			// it answered: it is up
			u.downUntil, u.fails = time.Time{}, u.fails[:0]
		} else {
			u.downUntil = now.Add(h.FailDuration)
		}
		return
	}
	if err != nil && countsAsFailure(err) {
		u.failLocked(now, h)
	}
}

// abandoned records a dial (acquired with tok) given up because the
// client went away, which says nothing of the upstream: if it was the
// trial, the next dial tries instead.
func (u *Upstream) abandoned(tok trialToken) {
	u.mu.Lock()
	if tok != 0 && tok == u.trial {
		u.trial = 0
	}
	u.mu.Unlock()
	u.live.Add(-1)
}

// countsAsFailure tells failures of the upstream from refusals of the
// client: an upstream that answers the handshake with a 4xx has judged
// this request, and is up.
func countsAsFailure(err error) bool {
	if s, ok := err.(errUpstreamStatus); ok {
		return s >= 500
	}
	return true
}

// failLocked counts a passive failure at now (u.mu held).
func (u *Upstream) failLocked(now time.Time, h *Health) {
	if h.FailDuration <= 0 {
		return
	}
	cut := now.Add(-h.FailDuration)
	keep := u.fails[:0]
	for _, t := range u.fails {
		if t.After(cut) {
			keep = append(keep, t)
		}
	}
	u.fails = append(keep, now)
	if len(u.fails) >= h.MaxFails && !now.Before(u.downUntil) {
		u.downUntil, u.fails = now.Add(h.FailDuration), u.fails[:0]
	}
}

// ended records the end of a live connection: code is the upstream's
// close when it closed first (1006 when it went away without a close
// frame), 0 otherwise.
func (u *Upstream) ended(now time.Time, h *Health, code ws.StatusCode) {
	u.live.Add(-1)
	if code == 0 || h.FailDuration <= 0 || !slices.Contains(h.UnhealthyCloses, uint16(code)) {
		return
	}
	u.mu.Lock()
	u.lastErr = "connection closed with " + strconv.Itoa(int(code))
	u.failLocked(now, h)
	u.mu.Unlock()
}

// probed records a probe's result from p, and reports whether it changed
// the upstream's health in p's eyes (to down when down).
func (u *Upstream) probed(p *prober, err error) (changed, down bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if err != nil {
		u.lastErr = "health check: " + err.Error()
		p.passes, p.failures = 0, p.failures+1
		if !p.down && p.failures >= p.a.Fails {
			p.down = true
			return true, true
		}
		return false, p.down
	}
	p.failures, p.passes = 0, p.passes+1
	if p.down && p.passes >= p.a.Passes {
		p.down, changed = false, true
	}
	if !p.down {
		// The probe has just reached it: no need to wait out a passive
		// penalty too. A trial in flight no longer decides anything.
		u.downUntil, u.fails, u.trial = time.Time{}, u.fails[:0], 0
	}
	return changed, p.down
}

// retryIn is how long, at the least, until u may be tried again.
func (u *Upstream) retryIn(now time.Time, h *Health, p *prober) time.Duration {
	u.mu.Lock()
	defer u.mu.Unlock()
	d := time.Duration(math.MaxInt64)
	if p != nil && p.down {
		d = p.a.Interval
	}
	if h.FailDuration > 0 && !u.downUntil.IsZero() {
		switch {
		case now.Before(u.downUntil):
			d = min(d, u.downUntil.Sub(now))
		case u.trial != 0:
			d = min(d, time.Second)
		}
	}
	return d
}
