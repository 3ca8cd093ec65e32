package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// Active health checks: one goroutine per upstream and distinct check
// settings probes it every Interval, from the moment the first Gateway
// of the Pool with those checks holds the upstream until the last lets
// go of it. Gateways of successive configurations (and handlers sharing a
// Pool) with the same checks thus share one prober, and its counts: a
// reload neither doubles the probes nor forgets what they found. A probe
// is an HTTP GET or a WebSocket handshake (closed at once), never a
// client's dial: an upstream set aside comes back by a probe alone.

// prober probes one upstream with one ActiveHealth. Its counts are
// guarded by the upstream's mu.
type prober struct {
	a                *ActiveHealth
	key              string // a's settings
	refs             int    // Gateways holding it
	stop             context.CancelFunc
	done             chan struct{}
	env              atomic.Pointer[probeEnv]
	down             bool
	passes, failures int // probes in a row that passed, failed
}

// probeEnv is what a prober takes from the newest Gateway holding it.
type probeEnv struct {
	tls *tls.Config
	log *slog.Logger
}

func activeKey(a *ActiveHealth) string {
	return fmt.Sprintf("%q %v %q %v %v %d %d %d", a.URI, a.WebSocket, a.WebSocketURI, a.Interval, a.Timeout,
		a.ExpectStatus, a.Passes, a.Fails)
}

// retainProber finds or starts u's prober with the settings of a.
func (g *Gateway) retainProber(u *Upstream, a *ActiveHealth) *prober {
	key := activeKey(a)
	env := &probeEnv{tls: g.cfg.TLS, log: g.log}
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, p := range u.probers {
		if p.key == key {
			p.refs++
			p.env.Store(env)
			return p
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	p := &prober{a: a, key: key, refs: 1, stop: cancel, done: make(chan struct{})}
	p.env.Store(env)
	u.probers = append(u.probers, p)
	go p.run(ctx, u, a.NewTicker(a.Interval))
	return p
}

// releaseProber lets go of p, and stops it if no Gateway holds it any
// more.
func releaseProber(u *Upstream, p *prober) {
	u.mu.Lock()
	p.refs--
	last := p.refs == 0
	if last {
		u.probers = slices.DeleteFunc(u.probers, func(q *prober) bool { return q == p })
	}
	u.mu.Unlock()
	if last {
		p.stop()
		<-p.done
	}
}

func (p *prober) run(ctx context.Context, u *Upstream, t Ticker) {
	defer close(p.done)
	defer t.Stop()
	a := p.a
	for {
		env := p.env.Load()
		var err error
		if a.WebSocket {
			err = probeWebSocket(ctx, u, a, env.tls)
		} else {
			err = probeHTTP(ctx, u, a, env.tls)
		}
		if ctx.Err() != nil {
			return
		}
		if changed, down := u.probed(p, err); changed && down {
			env.log.Warn("upstream unhealthy", "upstream", u.name, "error", err.Error())
		} else if changed {
			env.log.Info("upstream healthy", "upstream", u.name)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C():
		}
	}
}

// httpURL is the http(s) URL of uri on u's host.
func httpURL(u *url.URL, uri string) string {
	scheme := "http"
	if u.Scheme == "wss" {
		scheme = "https"
	}
	return scheme + "://" + u.Host + uri
}

func probeHTTP(ctx context.Context, u *Upstream, a *ActiveHealth, tc *tls.Config) error {
	// A client per probe: the TLS settings may change with a reload, and
	// there is no connection to keep between probes.
	client := &http.Client{
		Transport: &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true},
		Timeout:   a.Timeout,
		// a redirect is an answer: its status is what is checked
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, httpURL(u.url, a.URI), nil)
	if err != nil {
		return err
	}
	if u.url.User != nil {
		p, _ := u.url.User.Password()
		req.SetBasicAuth(u.url.User.Username(), p)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
	if !statusMatches(resp.StatusCode, a.ExpectStatus) {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// statusMatches reports whether got is the status want expects (0: any
// 2xx; 1-5: any of that class).
func statusMatches(got, want int) bool {
	switch {
	case want == 0:
		return got/100 == 2
	case want < 100:
		return got/100 == want
	}
	return got == want
}

func probeWebSocket(ctx context.Context, u *Upstream, a *ActiveHealth, tc *tls.Config) error {
	target := *u.url
	switch {
	case a.WebSocketURI != "":
		pu, err := url.Parse(a.WebSocketURI)
		if err != nil {
			return err
		}
		target.Path, target.RawPath, target.RawQuery = pu.Path, pu.RawPath, pu.RawQuery
	case target.Path == "":
		target.Path = "/"
	}
	var status int
	d := ws.Dialer{
		Timeout:       a.Timeout,
		TLSConfig:     tc,
		OnStatusError: func(s int, _ []byte, _ io.Reader) { status = s },
	}
	ctx, cancel := context.WithTimeout(ctx, a.Timeout)
	defer cancel()
	conn, br, _, err := d.Dial(ctx, target.String())
	if err != nil {
		if status != 0 {
			return errUpstreamStatus(status)
		}
		return err
	}
	if br != nil {
		ws.PutReader(br)
	}
	// A close frame, so that the app sees a clean close rather than a
	// dropped socket; its answer is not waited for.
	conn.SetWriteDeadline(time.Now().Add(a.Timeout))
	f := ws.MaskFrameInPlace(ws.NewCloseFrame(ws.NewCloseFrameBody(ws.StatusNormalClosure, "health check")))
	ws.WriteFrame(conn, f)
	return conn.Close()
}
