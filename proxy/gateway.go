package proxy

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
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
	next atomic.Uint32
}

// New makes a Gateway. cfg must have been prepared (Config.Prepare). reg
// tracks live connections (for shutdown); it may be shared by several
// Gateways. log may be nil.
func New(cfg Config, reg *Registry, log *slog.Logger) *Gateway {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if reg == nil {
		reg = NewRegistry()
	}
	return &Gateway{cfg: cfg, reg: reg, log: log}
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
	up, hs, err := g.dial(r.Context(), r, &info)
	if err != nil {
		g.log.Warn("upstream unavailable", "error", err.Error(), "remote", r.RemoteAddr)
		WriteError(w, http.StatusBadGateway, "upstream unavailable", nil)
		return UpstreamFailed
	}
	accept := hs.protocol
	if accept == "" {
		accept = info.AcceptProtocol
	}
	protocol := pickProtocol(r, func(p string) bool { return accept != "" && p == accept })
	conn, rw, err := upgrade(w, r, protocol)
	if err != nil {
		up.conn.Close()
		up.putReader()
		if conn != nil {
			conn.Close()
		}
		g.log.Debug("client upgrade failed", "error", err.Error(), "remote", r.RemoteAddr)
		return BadHandshake
	}
	c := newRelay(g, conn, up.conn, &info)
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
	conn, rw, err := upgrade(w, r, subprotocol) // the client offered it (checked above)
	if err != nil {
		if conn != nil {
			conn.Close()
		}
		return BadHandshake
	}
	c := newRelay(g, conn, nil, &info)
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

type handshake struct{ protocol string }

// errUpstreamStatus is an upstream that answered the handshake with
// something other than 101.
type errUpstreamStatus int

func (e errUpstreamStatus) Error() string { return fmt.Sprintf("upstream answered HTTP %d", int(e)) }

// dial connects to the next upstream, trying each once.
func (g *Gateway) dial(ctx context.Context, r *http.Request, info *RequestInfo) (*dialed, handshake, error) {
	hdr := g.upstreamHeader(r, info)
	protocols := offeredProtocols(r)
	if info.Protocols != nil {
		protocols = info.Protocols
	}
	n := len(g.cfg.upstreamURLs)
	first := int(g.next.Add(1)-1) % n
	var errs []error
	for i := 0; i < n; i++ {
		u := g.cfg.upstreamURLs[(first+i)%n]
		target := *u
		target.Path, target.RawPath = joinPath(u, r)
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
			Host:          r.Host,
			TLSConfig:     g.cfg.TLS,
			OnStatusError: func(s int, _ []byte, _ io.Reader) { status = s },
		}
		t0 := time.Now()
		conn, br, hs, err := d.Dial(ctx, target.String())
		if s := g.cfg.Stats; s != nil && s.OnDial != nil {
			s.OnDial(time.Since(t0), err == nil)
		}
		if err == nil {
			return &dialed{conn: conn, br: br, idx: uint16((first + i) % n)}, handshake{protocol: hs.Protocol}, nil
		}
		if status != 0 {
			err = errUpstreamStatus(status)
		}
		errs = append(errs, fmt.Errorf("%s: %w", u.Redacted(), err))
	}
	return nil, handshake{}, errors.Join(errs...)
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
