package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Gateway relays upgraded client connections to upstreams. One Gateway
// serves one configuration; connections keep the Gateway they started with,
// so a new configuration never disturbs live connections.
type Gateway struct {
	cfg  Config
	reg  *Registry
	log  *slog.Logger
	pool *Pool
	ups  []*Upstream // the state of each of cfg.Upstreams, in order
	// probers are the active checks of ups, in the same order (nil
	// without active checks)
	probers []*prober

	closed atomic.Bool
}

// New makes a Gateway. cfg must have been prepared (Config.Prepare). reg
// tracks live connections (for shutdown); it may be shared by several
// Gateways. log may be nil. With active health checks configured, they
// start now, unless a Gateway of the same Pool runs the same checks
// already: then the two share them.
func New(cfg Config, reg *Registry, log *slog.Logger) *Gateway {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if reg == nil {
		reg = NewRegistry()
	}
	g := &Gateway{cfg: cfg, reg: reg, log: log, pool: cfg.Pool}
	if g.pool == nil {
		g.pool = NewPool()
	}
	g.pool.configured(&g.cfg)
	g.ups = make([]*Upstream, len(cfg.upstreamURLs))
	g.probers = make([]*prober, len(cfg.upstreamURLs))
	for i, u := range cfg.upstreamURLs {
		g.ups[i] = g.pool.retain(u)
		if a := cfg.Health.Active; a != nil {
			g.probers[i] = g.retainProber(g.ups[i], a)
		}
	}
	return g
}

// Close lets go of the gateway's upstreams and their active health checks
// (which stop with the last Gateway that holds them): upstreams no Gateway
// of the Pool holds any more are drained after DrainTimeout, when set. Its live connections go on. Later calls do
// nothing.
func (g *Gateway) Close() {
	if !g.closed.CompareAndSwap(false, true) {
		return
	}
	for i, p := range g.probers {
		if p != nil {
			releaseProber(g.ups[i], p)
		}
	}
	for _, u := range g.ups {
		if g.pool.release(u) {
			level := slog.LevelDebug
			if u.live.Load() > 0 {
				level = slog.LevelInfo
			}
			g.log.Log(context.Background(), level, "upstream removed", "upstream", u.name, "live", u.live.Load())
			// the newest configuration's drain_timeout: the one that
			// removed the upstream (this one's has been replaced)
			if d, after := g.pool.drainSettings(); d > 0 {
				g.scheduleDrain(u, d, after)
			}
		}
	}
}

// UpstreamReason is the close reason sent (with 1001) to the clients of an
// upstream that was removed from the configuration, when they are drained.
const UpstreamReason = "upstream removed"

// scheduleDrain closes u's connections after d, unless a configuration
// holds it again by then.
func (g *Gateway) scheduleDrain(u *Upstream, d time.Duration, after func(time.Duration, func()) func() bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.refs > 0 || u.stopDrain != nil {
		return
	}
	u.stopDrain = after(d, func() {
		u.mu.Lock()
		held := u.refs > 0
		u.stopDrain = nil
		u.mu.Unlock()
		if held {
			return
		}
		n := g.reg.disconnectWhere(func(c *relay) bool { return !c.solo && c.g.ups[c.upstream.upIdx] == u },
			ws.StatusGoingAway, UpstreamReason)
		if n > 0 {
			g.log.Info("upstream drained", "upstream", u.name, "closed", n)
		}
	})
}

// Registry returns the registry the gateway's connections are tracked in.
func (g *Gateway) Registry() *Registry { return g.reg }

// WriteError answers a refused request with a status and a short JSON body.
func WriteError(w http.ResponseWriter, status int, msg string, hdr http.Header) {
	for k, v := range hdr {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	b, _ := json.Marshal(struct {
		Error string `json:"error"`
	}{msg})
	w.Write(append(b, '\n'))
}

// Outcome is how an upgrade request ended.
type Outcome string

// Outcomes.
const (
	Upgraded       Outcome = "ok"        // the connection is live
	BadHandshake   Outcome = "handshake" // refused: not a valid upgrade, or the upgrade failed
	UpstreamFailed Outcome = "upstream"  // refused with 502: no upstream could be dialled
	ShuttingDown   Outcome = "shutdown"  // refused with 503: the gateway is shutting down
	NotConfigured  Outcome = "config"    // refused with 500: nothing to serve it with
)

// ServeHTTP checks the handshake, dials an upstream, upgrades the client
// and starts relaying. It returns once the relay has started (the relay
// runs on its own goroutines) or after it has written an HTTP error, and
// says which.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request, info RequestInfo) Outcome {
	started := false
	defer func() {
		if !started && info.OnClose != nil {
			info.OnClose()
		}
	}()
	if o := g.admit(w, r); o != Upgraded {
		return o
	}
	if len(g.cfg.upstreamURLs) == 0 {
		WriteError(w, http.StatusInternalServerError, "no upstream configured", nil)
		return NotConfigured
	}
	q := query{r: r, info: &info}
	up, hs, err := g.dial(r.Context(), &q)
	if _, closed := err.(errGatewayClosed); closed {
		// a request that reached this configuration just as a reload
		// replaced it: its client retries on the new one
		WriteError(w, http.StatusBadGateway, "upstream unavailable", nil)
		return UpstreamFailed
	}
	if err != nil {
		var hdr http.Header
		if _, open := err.(errCircuitOpen); !open {
			// (a refusal without a dial is not worth a line per request)
			g.log.Warn("upstream unavailable", "error", err.Error(), "remote", r.RemoteAddr)
		}
		// Every upstream is set aside: say when one may be tried. An
		// upstream whose time aside ended while this request was being
		// refused may be tried by the next one: retry in a second.
		after, _ := g.retryAfter()
		hdr = http.Header{"Retry-After": {strconv.Itoa(max(after, 1))}}
		WriteError(w, http.StatusBadGateway, "upstream unavailable", hdr)
		return UpstreamFailed
	}
	u := g.ups[up.idx]
	if cp, ok := g.cfg.selector.(*cookiePick); ok {
		if ck := cp.cookieFor(u, &q); ck != nil {
			http.SetCookie(w, ck)
		}
	}
	accept := hs.protocol
	if accept == "" {
		accept = info.AcceptProtocol
	}
	protocol := pickProtocol(r, func(p string) bool { return accept != "" && p == accept })
	ext, z := g.cfg.Compression.accept(r)
	conn, rw, err := upgrade(w, r, protocol, ext)
	if err != nil {
		up.conn.Close()
		up.putReader()
		// as a connection that ended at once, its upstream not to blame
		u.ended(g.cfg.Health.Now(), &g.cfg.Health, 0)
		g.pool.connEnded(u)
		if conn != nil {
			conn.Close()
		}
		g.log.Debug("client upgrade failed", "error", err.Error(), "remote", r.RemoteAddr)
		return BadHandshake
	}
	info.Meta.Upstream = u.name
	c := newRelay(g, conn, up.conn, &info)
	c.client.z, c.upstream.z = z, hs.z
	c.upstream.upIdx = up.idx
	if rw != nil && rw.Reader.Buffered() > 0 {
		b, _ := rw.Reader.Peek(rw.Reader.Buffered())
		c.client.rd.prime(b)
	}
	if up.br != nil && up.br.Buffered() > 0 {
		b, _ := up.br.Peek(up.br.Buffered())
		c.upstream.rd.prime(b)
	}
	up.putReader()
	started = true
	c.start(info.OnStart)
	return Upgraded
}

// ServeSession upgrades the client with subprotocol (when the client
// offered it; refused with 400 otherwise) and serves it without an
// upstream: every client message goes to info.Inspect, and info.OnStart
// gets the Session used to send to the client.
func (g *Gateway) ServeSession(w http.ResponseWriter, r *http.Request, info RequestInfo, subprotocol string) Outcome {
	started := false
	defer func() {
		if !started && info.OnClose != nil {
			info.OnClose()
		}
	}()
	if o := g.admit(w, r); o != Upgraded {
		return o
	}
	offered := false
	for _, p := range offeredProtocols(r) {
		offered = offered || p == subprotocol
	}
	if !offered {
		WriteError(w, http.StatusBadRequest, "this endpoint speaks the "+subprotocol+" subprotocol; offer it in Sec-WebSocket-Protocol", nil)
		return BadHandshake
	}
	if info.Inspect == nil {
		WriteError(w, http.StatusInternalServerError, "no session handler", nil)
		return NotConfigured
	}
	ext, z := g.cfg.Compression.accept(r)
	conn, rw, err := upgrade(w, r, subprotocol, ext) // the client offered it (checked above)
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		return BadHandshake
	}
	c := newRelay(g, conn, nil, &info)
	c.client.z = z
	if rw != nil && rw.Reader.Buffered() > 0 {
		b, _ := rw.Reader.Peek(rw.Reader.Buffered())
		c.client.rd.prime(b)
	}
	started = true
	c.start(info.OnStart)
	return Upgraded
}

// admit answers a request that cannot be upgraded (bad handshake, or the
// gateway is shutting down) and says why, or Upgraded when it may go on.
func (g *Gateway) admit(w http.ResponseWriter, r *http.Request) Outcome {
	if herr := CheckHandshake(r); herr != nil {
		WriteError(w, herr.Status, herr.Message, herr.Header)
		return BadHandshake
	}
	if g.reg.closed() {
		WriteError(w, http.StatusServiceUnavailable, "server shutting down", nil)
		return ShuttingDown
	}
	return Upgraded
}

type dialed struct {
	conn net.Conn
	br   *bufio.Reader
	idx  uint16 // the upstream it was dialled from, in Config.Upstreams
}

func (d *dialed) putReader() {
	if d.br != nil {
		ws.PutReader(d.br)
		d.br = nil
	}
}

type handshake struct {
	protocol string
	z        *deflate // the compression agreed with the upstream
}

// errUpstreamStatus is an upstream that answered the handshake with
// something other than 101.
type errUpstreamStatus int

func (e errUpstreamStatus) Error() string { return fmt.Sprintf("upstream answered HTTP %d", int(e)) }

// errCircuitOpen is the refusal of a request when every upstream is set
// aside: no dial is made.
type errCircuitOpen struct{}

func (errCircuitOpen) Error() string { return "every upstream is set aside" }

// errGatewayClosed refuses a request that reaches a Gateway after Close.
type errGatewayClosed struct{}

func (errGatewayClosed) Error() string { return "the configuration was replaced" }

// dial connects to an upstream the policy chooses among the usable ones;
// when the dial fails it chooses again among the others, trying each at
// most once.
func (g *Gateway) dial(ctx context.Context, q *query) (*dialed, handshake, error) {
	r, info := q.r, q.info
	hdr := g.upstreamHeader(r, info)
	protocols := offeredProtocols(r)
	if info.Protocols != nil {
		protocols = info.Protocols
	}
	n := len(g.ups)
	var triedBuf [8]bool
	var candBuf [8]*Upstream
	var idxBuf [8]uint16
	tried, cands, idxs := triedBuf[:0], candBuf[:0], idxBuf[:0]
	if n > len(triedBuf) {
		tried, cands, idxs = make([]bool, 0, n), make([]*Upstream, 0, n), make([]uint16, 0, n)
	}
	tried = tried[:n]
	var errs []error
	for range n {
		if g.closed.Load() {
			return nil, handshake{}, errGatewayClosed{}
		}
		now := g.cfg.Health.Now()
		cands, idxs = cands[:0], idxs[:0]
		for i, u := range g.ups {
			if !tried[i] && u.usable(now, &g.cfg.Health, g.probers[i]) {
				cands, idxs = append(cands, u), append(idxs, uint16(i))
			}
		}
		if len(cands) == 0 {
			break
		}
		k := g.cfg.selector.pick(cands, q)
		u, idx := cands[k], idxs[k]
		tried[idx] = true
		tok, ok := u.acquire(now, &g.cfg.Health, g.probers[idx])
		if !ok {
			continue // set aside, or its one trial dial taken, meanwhile
		}
		target := *u.url
		target.Path, target.RawPath = joinPath(u.url, r)
		if target.RawQuery == "" {
			target.RawQuery = r.URL.RawQuery
		} else if r.URL.RawQuery != "" {
			target.RawQuery += "&" + r.URL.RawQuery
		}
		var status int
		d := ws.Dialer{
			Timeout:       g.cfg.DialTimeout,
			Protocols:     protocols,
			Header:        ws.HandshakeHeaderHTTP(hdr),
			Extensions:    g.cfg.Compression.offer(),
			Host:          r.Host,
			TLSConfig:     g.cfg.TLS,
			OnStatusError: func(s int, _ []byte, _ io.Reader) { status = s },
		}
		t0 := time.Now()
		conn, br, hs, err := d.Dial(ctx, target.String())
		if s := g.cfg.Stats; s != nil && s.OnDial != nil {
			s.OnDial(time.Since(t0), err == nil)
		}
		if err != nil && status != 0 {
			err = errUpstreamStatus(status)
		}
		var z *deflate
		if err == nil {
			if z, err = g.cfg.Compression.accepted(hs.Extensions); err != nil {
				conn.Close()
				if br != nil {
					ws.PutReader(br)
				}
			}
		}
		if err != nil && ctx.Err() != nil {
			// the client went away: that says nothing of the upstream
			u.abandoned(tok)
			return nil, handshake{}, errors.Join(append(errs, fmt.Errorf("%s: %w", u.name, err))...)
		}
		u.dialed(g.cfg.Health.Now(), &g.cfg.Health, tok, err)
		if err == nil {
			return &dialed{conn: conn, br: br, idx: idx}, handshake{protocol: hs.Protocol, z: z}, nil
		}
		if down := !u.usable(g.cfg.Health.Now(), &g.cfg.Health, g.probers[idx]); down {
			g.log.Debug("upstream set aside", "upstream", u.name, "error", err.Error())
		}
		errs = append(errs, fmt.Errorf("%s: %w", u.name, err))
	}
	if len(errs) == 0 {
		return nil, handshake{}, errCircuitOpen{}
	}
	return nil, handshake{}, errors.Join(errs...)
}

// retryAfter is, when every upstream is set aside, the Retry-After of a
// refusal in whole seconds (at least 1): until the first may be tried.
func (g *Gateway) retryAfter() (int, bool) {
	now := g.cfg.Health.Now()
	d := time.Duration(math.MaxInt64)
	for i, u := range g.ups {
		if u.usable(now, &g.cfg.Health, g.probers[i]) {
			return 0, false
		}
		d = min(d, u.retryIn(now, &g.cfg.Health, g.probers[i]))
	}
	if d == math.MaxInt64 {
		d = time.Second
	}
	return max(1, int((d+time.Second-1)/time.Second)), true
}

// connEnded accounts for the end of a relayed connection to the upstream
// of c.
func (g *Gateway) connEnded(c *relay) {
	u := g.ups[c.upstream.upIdx]
	var code ws.StatusCode
	c.cmu.Lock()
	if r := c.rec; r != nil && r.first == upstreamSide {
		code = r.firstCode
		if code == 0 {
			code = ws.StatusAbnormalClosure
		}
	}
	c.cmu.Unlock()
	u.ended(g.cfg.Health.Now(), &g.cfg.Health, code)
	g.pool.connEnded(u)
}

// joinPath picks the upstream request path: the upstream URL's own path
// when it has one, otherwise the client's (possibly rewritten) path.
func joinPath(u *url.URL, r *http.Request) (path, raw string) {
	if u.Path != "" && u.Path != "/" {
		return u.Path, u.RawPath
	}
	if r.URL.Path == "" {
		return "/", ""
	}
	return r.URL.Path, r.URL.RawPath
}
