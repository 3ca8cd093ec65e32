package caddymodule

import (
	"encoding/json"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/wsgate/wsgate/broker"
)

func init() {
	caddy.RegisterModule(Health{})
	httpcaddyfile.RegisterHandlerDirective("wsgate_health", parseHealth)
	httpcaddyfile.RegisterDirectiveOrder("wsgate_health", httpcaddyfile.Before, "respond")
}

// Health answers load balancers and readiness probes: 200 when the wsgate
// app's broker is reachable, 503 when it is not, with a JSON body that says
// so and how many connections this node holds. It answers GET and HEAD;
// the request goes no further. It has no options.
//
// The memory broker is always reachable. A Redis broker is unreachable
// from its first failure to reach Redis until its background probe (every
// 100 ms) finds it back; a Redis Cluster is always reported reachable (its
// masters fail one at a time).
type Health struct {
	reachable func() bool
	kind      string
}

// CaddyModule returns the Caddy module information.
func (Health) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.wsgate_health", New: func() caddy.Module { return new(Health) }}
}

// Provision finds the wsgate app's broker (or the default memory one).
func (h *Health) Provision(ctx caddy.Context) error {
	_, b, err := hubFor(ctx)
	if err != nil {
		return err
	}
	h.kind, h.reachable = "memory", func() bool { return true }
	if r, ok := b.(*broker.Redis); ok {
		h.kind, h.reachable = "redis", r.Reachable
	}
	return nil
}

// healthBody is what Health answers.
type healthBody struct {
	Status          string `json:"status"` // ok, or broker_unreachable
	Broker          string `json:"broker"` // memory or redis
	BrokerReachable bool   `json:"broker_reachable"`
	Connections     int    `json:"connections"` // open on this node
}

// ServeHTTP answers the probe.
func (h *Health) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, nil)
	}
	body := healthBody{Status: "ok", Broker: h.kind, BrokerReachable: h.reachable(), Connections: registry.Len()}
	status := http.StatusOK
	if !body.BrokerReachable {
		body.Status, status = "broker_unreachable", http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method == http.MethodHead {
		return nil
	}
	return json.NewEncoder(w).Encode(body)
}

func parseHealth(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var m Health
	err := m.UnmarshalCaddyfile(h.Dispenser)
	return &m, err
}

// UnmarshalCaddyfile reads:
//
//	wsgate_health [<matcher>]
func (h *Health) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	if d.NextBlock(0) {
		return d.Errf("wsgate_health takes no options, not %q", d.Val())
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Health)(nil)
	_ caddyhttp.MiddlewareHandler = (*Health)(nil)
	_ caddyfile.Unmarshaler       = (*Health)(nil)
)
