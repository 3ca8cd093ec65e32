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
	"time"
	"unicode/utf8"

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
// {"channel":"…","data":…,"idempotency_key":"…"} (the key is optional)
// or an array of them. It answers {"accepted":<n>,"duplicates":<n>} on
// success and a 4xx/5xx with {"error":…} otherwise; README.md says what
// each status means for delivery.
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
	// IdempotencyWindow is how long an idempotency key is remembered: a
	// publication with the channel and key of one accepted within the
	// window is answered as a duplicate and not delivered again. Between
	// 1s and 24h. Default: 5m.
	IdempotencyWindow caddy.Duration `json:"idempotency_window,omitempty"`

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
	if p.IdempotencyWindow == 0 {
		p.IdempotencyWindow = caddy.Duration(rooms.DefaultIdempotencyWindow)
	}
	if err := checkWindow(time.Duration(p.IdempotencyWindow)); err != nil {
		return fmt.Errorf("wsgate_publish: %w", err)
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
	msgs, err := p.parseBody(body, r.Header.Values("Idempotency-Key"))
	if err != nil {
		proxy.WriteError(w, http.StatusBadRequest, err.Error(), nil)
		return nil
	}
	dup, err := p.hub.PublishMessages(r.Context(), msgs, time.Duration(p.IdempotencyWindow))
	switch {
	case err == nil:
	case errors.Is(err, rooms.ErrKeyInProgress):
		proxy.WriteError(w, http.StatusConflict, err.Error()+": retry when it has been answered", nil)
		return nil
	case errors.Is(err, rooms.ErrInvalidData):
		proxy.WriteError(w, http.StatusBadRequest, err.Error(), nil)
		return nil
	case errors.Is(err, broker.ErrUnavailable):
		p.logger.Warn("publish failed", zap.Error(err))
		proxy.WriteError(w, http.StatusServiceUnavailable, "broker unavailable: delivered to this node's subscribers only", nil)
		return nil
	default:
		p.logger.Warn("publish failed", zap.Error(err))
		proxy.WriteError(w, http.StatusServiceUnavailable, "publish failed: not delivered", nil)
		return nil
	}
	duplicates := 0
	for _, d := range dup {
		if d {
			duplicates++
		}
	}
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, "{\"accepted\":%d,\"duplicates\":%d}\n", len(msgs)-duplicates, duplicates)
	return nil
}

// maxKeyLen bounds an idempotency key.
const maxKeyLen = 255

// parseBody checks the whole request before anything is published: one
// publication object or an array of them, each with a valid channel, data
// that is JSON in valid UTF-8, and an optional idempotency key (also
// given, for a single publication, by the Idempotency-Key header). Its
// errors are the 400 messages; in a batch they name the publication.
func (p *Publish) parseBody(body []byte, header []string) ([]rooms.Message, error) {
	var raws []json.RawMessage
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	batch := len(trimmed) > 0 && trimmed[0] == '['
	switch {
	case batch:
		// Invalid UTF-8 inside strings passes here; each publication is
		// checked below, so that the error can name it.
		if err := json.Unmarshal(body, &raws); err != nil {
			return nil, fmt.Errorf("body is not a valid JSON array: %v", err)
		}
		if len(raws) == 0 || len(raws) > p.MaxBatch {
			return nil, fmt.Errorf("a batch holds 1 to %d publications, not %d", p.MaxBatch, len(raws))
		}
		if len(header) > 0 {
			return nil, errors.New("the Idempotency-Key header is for a single publication: give each publication of a batch its own idempotency_key")
		}
	case len(trimmed) > 0 && trimmed[0] == '{':
		raws = []json.RawMessage{body}
	default:
		return nil, errors.New(`body must be a JSON object {"channel":"…","data":…} or an array of them`)
	}
	var hk string
	switch len(header) {
	case 0:
	case 1:
		var err error
		if hk, err = headerKey(header[0]); err != nil {
			return nil, fmt.Errorf("Idempotency-Key header: %w", err)
		}
	default:
		return nil, errors.New("more than one Idempotency-Key header")
	}
	msgs := make([]rooms.Message, len(raws))
	for i, raw := range raws {
		m, err := parsePublication(raw)
		if err == nil && hk != "" {
			if m.Key != "" && m.Key != hk {
				err = errors.New("idempotency_key and the Idempotency-Key header differ")
			}
			m.Key = hk
		}
		if err != nil {
			if batch {
				return nil, fmt.Errorf("publication %d: %w", i, err)
			}
			return nil, err
		}
		msgs[i] = m
	}
	return msgs, nil
}

// parsePublication reads {"channel":…,"data":…,"idempotency_key":…}.
func parsePublication(raw []byte) (rooms.Message, error) {
	var m rooms.Message
	if !utf8.Valid(raw) {
		return m, errors.New("not valid UTF-8")
	}
	// Unmarshal checks the JSON syntax of the whole object, data included
	// (the hub checks data again, being the last word for every caller).
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(raw, &fields); err != nil {
		if !json.Valid(raw) {
			return m, errors.New("not valid JSON")
		}
		return m, errors.New(`must be a JSON object {"channel":"…","data":…}`)
	}
	for name := range fields {
		if name != "channel" && name != "data" && name != "idempotency_key" {
			return m, fmt.Errorf("unknown field %q (known: channel, data, idempotency_key)", name)
		}
	}
	ch, ok := fields["channel"]
	if !ok {
		return m, errors.New("missing channel")
	}
	if json.Unmarshal(ch, &m.Channel) != nil {
		return m, errors.New("channel must be a string")
	}
	if policy.ValidateChannel(m.Channel) != nil {
		return m, fmt.Errorf("invalid channel name: at most %d bytes of segments separated by ':', each 1 to %d characters of A-Z a-z 0-9 -_.@=+~!$&'(),",
			policy.MaxChannelLen, policy.MaxSegmentLen)
	}
	data, ok := fields["data"]
	if !ok {
		return m, errors.New("missing data")
	}
	m.Data = data
	if k, ok := fields["idempotency_key"]; ok {
		var key string
		if json.Unmarshal(k, &key) != nil {
			return m, errors.New("idempotency_key must be a string")
		}
		var err error
		if m.Key, err = checkKey(key); err != nil {
			return m, fmt.Errorf("idempotency_key: %w", err)
		}
	}
	return m, nil
}

// headerKey reads an Idempotency-Key header: a bare key, or a quoted
// string as the IETF draft writes it ("…", with \" and \\ escapes).
func headerKey(v string) (string, error) {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		u, err := strconv.Unquote(v)
		if err != nil {
			return "", errors.New("bad quoted string")
		}
		v = u
	}
	return checkKey(v)
}

// checkKey accepts 1 to maxKeyLen printable ASCII characters (what an
// Idempotency-Key header can carry as well as a JSON string).
func checkKey(k string) (string, error) {
	if k == "" || len(k) > maxKeyLen {
		return "", fmt.Errorf("must be 1 to %d characters", maxKeyLen)
	}
	for i := 0; i < len(k); i++ {
		if k[i] < 0x20 || k[i] > 0x7e {
			return "", errors.New("must be printable ASCII")
		}
	}
	return k, nil
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
//	    key                <key>
//	    jwt { … }                     (as in wsgate)
//	    max_body           <size>
//	    max_batch          <n>
//	    idempotency_window <duration>
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
		case "idempotency_window":
			dur, err := parseDuration(d)
			if err != nil {
				return err
			}
			if err := checkWindow(time.Duration(dur)); err != nil {
				return d.Err(err.Error())
			}
			p.IdempotencyWindow = dur
		default:
			return unknownName(d, "subdirective", []string{"key", "jwt", "max_body", "max_batch", "idempotency_window"})
		}
	}
	if len(p.Keys) == 0 && p.JWT == nil {
		return d.Err("wsgate_publish needs a key or jwt")
	}
	return nil
}

// checkWindow bounds the idempotency window: shorter than a second is
// shorter than a retry; longer than a day holds keys in memory and in
// Redis for longer than any retry needs.
func checkWindow(w time.Duration) error {
	if w < time.Second || w > 24*time.Hour {
		return fmt.Errorf("idempotency_window must be between 1s and 24h, not %v", w)
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Publish)(nil)
	_ caddyhttp.MiddlewareHandler = (*Publish)(nil)
	_ caddyfile.Unmarshaler       = (*Publish)(nil)
)
