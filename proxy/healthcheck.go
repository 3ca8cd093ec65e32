package proxy

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"

	"github.com/gobwas/ws"
)

// Active health checks: one goroutine per upstream of a Gateway probes it
// every Interval, from the moment the Gateway is made until it is closed.
// A probe is an HTTP GET or a WebSocket handshake (closed at once), never
// a client's dial: an upstream set aside comes back by a probe alone.

// startChecks starts the active health checks, if configured.
func (g *Gateway) startChecks() {
	a := g.cfg.Health.Active
	if a == nil || len(g.ups) == 0 {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	g.stopChecks = cancel
	var client *http.Client
	if !a.WebSocket {
		client = &http.Client{
			Transport: &http.Transport{TLSClientConfig: g.cfg.TLS, DisableKeepAlives: true},
			Timeout:   a.Timeout,
			// a redirect is an answer: its status is what is checked
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	seen := map[*Upstream]bool{}
	for _, u := range g.ups {
		if seen[u] {
			continue
		}
		seen[u] = true
		g.checks.Go(func() { g.checkLoop(ctx, u, a, client) })
	}
}

func (g *Gateway) checkLoop(ctx context.Context, u *Upstream, a *ActiveHealth, client *http.Client) {
	t := a.NewTicker(a.Interval)
	defer t.Stop()
	for {
		var err error
		if a.WebSocket {
			err = g.probeWebSocket(ctx, u, a)
		} else {
			err = probeHTTP(ctx, client, u, a)
		}
		if ctx.Err() != nil {
			return
		}
		if changed, down := u.probed(a, err); changed && down {
			g.log.Warn("upstream unhealthy", "upstream", u.name, "error", err.Error())
		} else if changed {
			g.log.Info("upstream healthy", "upstream", u.name)
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

func probeHTTP(ctx context.Context, client *http.Client, u *Upstream, a *ActiveHealth) error {
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

func (g *Gateway) probeWebSocket(ctx context.Context, u *Upstream, a *ActiveHealth) error {
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
		TLSConfig:     g.cfg.TLS,
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
