package caddymodule

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

func init() {
	caddy.RegisterModule(Publish{})
	httpcaddyfile.RegisterHandlerDirective("wsgate_publish", parsePublish)
	httpcaddyfile.RegisterDirectiveOrder("wsgate_publish", httpcaddyfile.Before, "reverse_proxy")
}

// Publish lets backends publish to channels with an HTTP POST of
// {"channel":"…","data":…} or an array of them. It answers
// {"accepted":<n>} on success and a 4xx/5xx with {"error":…} otherwise.
type Publish struct {
	// Keys are bearer keys allowed to publish (Authorization: Bearer <key>);
	// placeholders such as {env.PUBLISH_KEY} are expanded.
	Keys []string `json:"keys,omitempty"`
	// JWT accepts tokens verified like the wsgate handler's instead of (or
	// besides) keys.
	JWT *JWT `json:"jwt,omitempty"`
	// MaxBody bounds the request body in bytes. Default: 1 MiB.
	MaxBody int64 `json:"max_body,omitempty"`
	// MaxBatch bounds the publications in one request. Default: 1000.
	MaxBatch int `json:"max_batch,omitempty"`

	keys     [][]byte
	verifier *policy.Verifier
	hub      *rooms.Hub
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (Publish) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.wsgate_publish", New: func() caddy.Module { return new(Publish) }}
}

// Provision resolves keys and the hub.
func (p *Publish) Provision(ctx caddy.Context) error {
	p.logger = ctx.Logger()
	repl := caddy.NewReplacer()
	for _, k := range p.Keys {
		v := repl.ReplaceKnown(k, "")
		if err := checkPublishKey(v); err != nil {
			return err
		}
		p.keys = append(p.keys, []byte(v))
	}
	if p.JWT != nil {
		h := Handler{JWT: p.JWT}
		if err := h.provisionJWT(ctx); err != nil {
			return fmt.Errorf("wsgate_publish: %w", err)
		}
		p.verifier = h.auth.verifier
	}
	if len(p.keys) == 0 && p.verifier == nil {
		return errors.New("wsgate_publish needs a key or jwt: publishing is never open")
	}
	if p.MaxBody <= 0 {
		p.MaxBody = 1 << 20
	}
	if p.MaxBatch <= 0 {
		p.MaxBatch = 1000
	}
	var err error
	p.hub, _, err = hubFor(ctx)
	return err
}

// checkPublishKey checks a key's length (after placeholders).
func checkPublishKey(k string) error {
	if len(k) < 16 {
		return errors.New("wsgate_publish: a key needs at least 16 characters (unset environment variable?)")
	}
	return nil
}

type publication struct {
	Channel *string         `json:"channel"`
	Data    json.RawMessage `json:"data"`
}

// ServeHTTP publishes.
func (p *Publish) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method != http.MethodPost {
		proxy.WriteError(w, http.StatusMethodNotAllowed, "use POST", http.Header{"Allow": {"POST"}})
		return nil
	}
	if !p.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="wsgate_publish"`)
		proxy.WriteError(w, http.StatusUnauthorized, "unauthorized", nil)
		return nil
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, p.MaxBody+1))
	if err != nil {
		proxy.WriteError(w, http.StatusBadRequest, "reading body failed", nil)
		return nil
	}
	if int64(len(body)) > p.MaxBody {
		proxy.WriteError(w, http.StatusRequestEntityTooLarge, "body larger than "+strconv.FormatInt(p.MaxBody, 10)+" bytes", nil)
		return nil
	}
	var items []publication
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	switch {
	case len(trimmed) > 0 && trimmed[0] == '[':
		err = json.Unmarshal(body, &items)
	case len(trimmed) > 0 && trimmed[0] == '{':
		var one publication
		err = json.Unmarshal(body, &one)
		items = []publication{one}
	default:
		err = errors.New("not JSON")
	}
	if err != nil {
		proxy.WriteError(w, http.StatusBadRequest, `body must be {"channel":"…","data":…} or an array of them`, nil)
		return nil
	}
	if len(items) == 0 || len(items) > p.MaxBatch {
		proxy.WriteError(w, http.StatusBadRequest, "a batch holds 1 to "+strconv.Itoa(p.MaxBatch)+" publications", nil)
		return nil
	}
	chans := make([]string, len(items))
	data := make([][]byte, len(items))
	for i, it := range items {
		if it.Channel == nil || policy.ValidateChannel(*it.Channel) != nil {
			proxy.WriteError(w, http.StatusBadRequest, fmt.Sprintf("publication %d: missing or invalid channel", i), nil)
			return nil
		}
		if len(it.Data) == 0 {
			proxy.WriteError(w, http.StatusBadRequest, fmt.Sprintf("publication %d: missing data", i), nil)
			return nil
		}
		chans[i], data[i] = *it.Channel, it.Data
	}
	if err := p.hub.PublishBatch(r.Context(), chans, data); err != nil {
		p.logger.Warn("publish failed", zap.Error(err))
		status := http.StatusServiceUnavailable
		msg := "broker unavailable"
		if !errors.Is(err, broker.ErrUnavailable) {
			msg = "publish failed"
		}
		proxy.WriteError(w, status, msg, nil)
		return nil
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"accepted\":%d}\n", len(items))
	return nil
}

func (p *Publish) authorized(r *http.Request) bool {
	ex, ok := policy.ExtractToken(r, []policy.TokenSource{{Kind: policy.FromHeader, Name: "Authorization"}})
	if !ok {
		return false
	}
	for _, k := range p.keys {
		if subtle.ConstantTimeCompare([]byte(ex.Token), k) == 1 {
			return true
		}
	}
	if p.verifier != nil {
		if _, err := p.verifier.Verify(r.Context(), ex.Token); err == nil {
			return true
		}
	}
	return false
}

func parsePublish(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var p Publish
	err := p.UnmarshalCaddyfile(h.Dispenser)
	return &p, err
}

// UnmarshalCaddyfile reads:
//
//	wsgate_publish [<matcher>] {
//	    key       <key>
//	    jwt { … }          (as in wsgate)
//	    max_body  <size>
//	    max_batch <n>
//	}
func (p *Publish) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		name := d.Val()
		if name != "key" {
			if seen[name] {
				return d.Errf("duplicate subdirective %q", name)
			}
			seen[name] = true
		}
		switch name {
		case "key":
			var k string
			if !d.AllArgs(&k) {
				return d.ArgErr()
			}
			if !hasPlaceholder(k) {
				if err := checkPublishKey(k); err != nil {
					return d.Err(err.Error())
				}
			}
			p.Keys = append(p.Keys, k)
		case "jwt":
			j, err := parseJWT(d)
			if err != nil {
				return err
			}
			p.JWT = j
		case "max_body":
			n, err := parseSize(d, false)
			if err != nil {
				return err
			}
			p.MaxBody = n
		case "max_batch":
			n, err := parsePositiveInt(d, name)
			if err != nil {
				return err
			}
			p.MaxBatch = n
		default:
			return unknownName(d, "subdirective", []string{"key", "jwt", "max_body", "max_batch"})
		}
	}
	if len(p.Keys) == 0 && p.JWT == nil {
		return d.Err("wsgate_publish needs a key or jwt")
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Publish)(nil)
	_ caddyhttp.MiddlewareHandler = (*Publish)(nil)
	_ caddyfile.Unmarshaler       = (*Publish)(nil)
)
