package caddymodule

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// JWT configures token verification at the upgrade.
type JWT struct {
	// Issuers that may sign tokens, each with its own keys. A token's iss
	// selects the issuer; its kid is looked up only among that issuer's keys.
	Issuers []JWTIssuer `json:"issuers,omitempty"`
	// Leeway tolerates clock skew on exp/nbf/iat. Default: 0.
	Leeway caddy.Duration `json:"leeway,omitempty"`
	// RequiredClaims must be present in every token. Default: none.
	RequiredClaims []string `json:"required_claims,omitempty"`
	// AllowMissingExp accepts tokens without exp (they never expire).
	// Default: false (exp is required).
	AllowMissingExp bool `json:"allow_missing_exp,omitempty"`
	// MaxTokenSize bounds a token's length in bytes. Default: 8192.
	MaxTokenSize int `json:"max_token_size,omitempty"`
	// From lists where the token is looked for, in order. Default: the
	// Authorization header (Bearer).
	From []TokenSource `json:"from,omitempty"`
}

// JWTIssuer is one token issuer and its keys.
type JWTIssuer struct {
	// Issuer is the exact iss claim. May be empty only when it is the sole
	// issuer (iss is then not checked).
	Issuer string `json:"issuer,omitempty"`
	// Audience, if set, must intersect the token's aud.
	Audience []string `json:"audience,omitempty"`
	// Keys are static keys.
	Keys []JWTKey `json:"keys,omitempty"`
	// JWKSURL is fetched for keys; refreshed every JWKSRefresh (default 1h)
	// and on an unknown kid (at most once a minute). The last good set is
	// kept while the URL is unreachable.
	JWKSURL string `json:"jwks_url,omitempty"`
	// JWKSRefresh is the JWKS refresh interval. Default: 1h.
	JWKSRefresh caddy.Duration `json:"jwks_refresh,omitempty"`
	// JWKSAlgorithms limits the algorithms accepted with JWKS keys.
	// Default: every algorithm that fits the key's type.
	JWKSAlgorithms []string `json:"jwks_algorithms,omitempty"`
}

// JWTKey is one static key: an HMAC secret or a PEM public key file.
type JWTKey struct {
	// ID is matched with the token's kid. Default: none (matches tokens
	// without kid).
	ID string `json:"id,omitempty"`
	// Secret is an HMAC secret of at least 32 bytes; placeholders such as
	// {env.JWT_SECRET} are expanded.
	Secret string `json:"secret,omitempty"`
	// PublicKeyFile is a PEM public key or certificate (RSA, ECDSA, Ed25519).
	PublicKeyFile string `json:"public_key_file,omitempty"`
	// Algorithms accepted with this key. Default: HS256 for secrets, RS256
	// for RSA keys, ES256/ES384 by curve, EdDSA.
	Algorithms []string `json:"algorithms,omitempty"`
}

// TokenSource is where a token may be found: kind "header" (name default
// Authorization, Bearer scheme), "query" (parameter name), "cookie" (cookie
// name) or "protocol" (the Sec-WebSocket-Protocol entry after the marker
// name, default "bearer").
type TokenSource struct {
	Kind string `json:"kind"`
	Name string `json:"name,omitempty"`
}

// ForwardAuth asks an auth endpoint about the client's credentials.
type ForwardAuth struct {
	// URL is called with GET and the CopyHeaders. 2xx allows, 3xx/4xx
	// refuses with 401, and no answer (timeout, refused, 5xx) refuses with
	// 503.
	URL string `json:"url"`
	// CopyHeaders are sent to the auth endpoint. Default: Cookie,
	// Authorization.
	CopyHeaders []string `json:"copy_headers,omitempty"`
	// Timeout bounds the call. Default: 5s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// CacheTTL caches allowed answers per credential. Default: 0 (no cache).
	CacheTTL caddy.Duration `json:"cache_ttl,omitempty"`
	// ClaimsFromBody reads claims from the JSON object the endpoint returns.
	ClaimsFromBody bool `json:"claims_from_body,omitempty"`
	// ClaimHeaders maps reply header names to claim names.
	ClaimHeaders map[string]string `json:"claim_headers,omitempty"`
}

// ConnectionLimits caps open connections; 429 before the upgrade when a cap
// is reached.
type ConnectionLimits struct {
	// Total caps connections through this handler. Default: no cap.
	Total int `json:"total,omitempty"`
	// PerIP caps connections per client IP (after Caddy's trusted_proxies).
	PerIP int `json:"per_ip,omitempty"`
	// PerSubject caps connections per token subject (sub claim).
	PerSubject int `json:"per_subject,omitempty"`
	// Zone names the counters; handlers with the same zone share them, and
	// counts survive config reloads. Default: the upstream list.
	Zone string `json:"zone,omitempty"`
}

// counters are connection counters shared across config reloads.
var counters = caddy.NewUsagePool()

type authState struct {
	origin   *policy.OriginPolicy
	verifier *policy.Verifier
	sources  []policy.TokenSource
	forward  *policy.ForwardAuth
	counter  *policy.ConnCounter
	zone     string
	strip    []string
	logger   *zap.Logger
}

func (h *Handler) provisionAuth(ctx caddy.Context) error {
	a := &h.auth
	a.logger = ctx.Logger()
	var err error
	if a.origin, err = policy.NewOriginPolicy(h.Origins, h.AllowMissingOrigin); err != nil {
		return err
	}
	if err := h.provisionJWT(ctx); err != nil {
		return err
	}
	if f := h.ForwardAuth; f != nil {
		if a.forward, err = policy.NewForwardAuth(policy.ForwardAuthConfig{
			URL: f.URL, CopyHeaders: f.CopyHeaders, Timeout: time.Duration(f.Timeout),
			CacheTTL: time.Duration(f.CacheTTL), ClaimsFromBody: f.ClaimsFromBody, ClaimHeaders: f.ClaimHeaders,
		}); err != nil {
			return err
		}
	}
	// Two claims setting one header (in any spelling) would make the
	// header depend on map order; the Caddyfile refuses it, and so does
	// JSON config.
	headerOf := map[string]string{}
	for claim, name := range h.ClaimsHeaders {
		norm := strings.ReplaceAll(strings.ToLower(name), "_", "-")
		if other, dup := headerOf[norm]; dup {
			return fmt.Errorf("claims_headers: claims %q and %q both set header %s", other, claim, name)
		}
		headerOf[norm] = claim
		a.strip = append(a.strip, name)
	}
	if f := h.ForwardAuth; f != nil {
		claimOf := map[string]string{}
		for hdr, claim := range f.ClaimHeaders {
			if other, dup := claimOf[claim]; dup {
				return fmt.Errorf("forward_auth claim_headers: headers %q and %q both set claim %s", other, hdr, claim)
			}
			claimOf[claim] = hdr
		}
	}
	if l := h.ConnectionLimits; l != nil {
		if l.Total < 0 || l.PerIP < 0 || l.PerSubject < 0 {
			return errors.New("connection limits must not be negative")
		}
		a.zone = l.Zone
		if a.zone == "" {
			a.zone = "upstreams:" + strings.Join(h.Upstreams, " ")
		}
		limits := policy.ConnLimits{Total: l.Total, PerIP: l.PerIP, PerSubject: l.PerSubject}
		v, _, err := counters.LoadOrNew(a.zone, func() (caddy.Destructor, error) {
			return counterHolder{policy.NewConnCounter(limits)}, nil
		})
		if err != nil {
			return err
		}
		a.counter = v.(counterHolder).ConnCounter
		a.counter.SetLimits(limits)
	}
	return nil
}

type counterHolder struct{ *policy.ConnCounter }

func (counterHolder) Destruct() error { return nil }

func (h *Handler) cleanupAuth() {
	if h.auth.counter != nil {
		counters.Delete(h.auth.zone)
	}
}

// authorize runs the upgrade-time checks. It fills info, or writes the
// refusal and names its reason (the upgrades counter's result label).
func (h *Handler) authorize(w http.ResponseWriter, r *http.Request, info *proxy.RequestInfo) (claims policy.Claims, refused string) {
	a := &h.auth
	// Caddy's access log prints the query string and headers other than
	// Authorization and Cookie: when they hold a token, whichever check
	// refuses the request, wsgate skips that line and logs the request
	// itself, redacted.
	red := policy.Redact(r, a.sources)
	if red.Hidden {
		caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
	}
	policy.StripHeaders(r.Header, a.strip)
	if err := a.origin.Check(r.Header.Values("Origin"), r.Host); err != nil {
		msg := "origin not allowed"
		if errors.Is(err, policy.ErrNoOrigin) {
			// the one refusal a setting may be meant to lift: say which
			msg = "origin not allowed: no Origin header (see allow_missing_origin)"
		}
		h.refuse(w, r, http.StatusForbidden, msg, err)
		return nil, "origin"
	}

	var tokenSrc *policy.TokenSource
	switch {
	case a.verifier != nil:
		ex, found := policy.ExtractToken(r, a.sources)
		if found {
			tokenSrc = &ex.Source
			c, err := a.verifier.Verify(r.Context(), ex.Token)
			countToken(err)
			if err != nil {
				h.unauthorized(w, r, err)
				return nil, "token"
			}
			claims = c
			break
		}
		if a.forward == nil {
			err := fmt.Errorf("%w: no token", policy.ErrToken)
			countToken(err)
			h.unauthorized(w, r, err)
			return nil, "token"
		}
		fallthrough
	case a.forward != nil:
		c, err := a.forward.Check(r.Context(), r)
		if errors.Is(err, policy.ErrAuthUnavailable) {
			h.refuse(w, r, http.StatusServiceUnavailable, "authentication unavailable", err)
			return nil, "forward_auth"
		}
		if err != nil {
			h.unauthorized(w, r, err)
			return nil, "forward_auth"
		}
		claims = c
	}

	if a.counter != nil {
		release, err := a.counter.Acquire(info.ClientIP, claims.Subject())
		if err != nil {
			w.Header().Set("Retry-After", "5")
			h.refuse(w, r, http.StatusTooManyRequests, "too many connections", err)
			return nil, "limit"
		}
		info.OnClose = release
	}

	if claims != nil {
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		if repl != nil {
			for _, kv := range claims.Flatten() {
				repl.Set("http.wsgate.claims."+kv[0], kv[1])
			}
		}
		for path, header := range h.ClaimsHeaders {
			if v, ok := claims.Lookup(path); ok {
				if s, ok := policy.ClaimString(v); ok {
					if info.Header == nil {
						info.Header = http.Header{}
					}
					info.Header.Set(header, s)
				}
			}
		}
		if exp, ok := expiry(claims); ok && a.verifier != nil {
			info.Expiry = exp
		}
		if a.verifier != nil {
			sub := claims.Subject()
			verifier := a.verifier
			info.RefreshField = h.RefreshField
			info.Refresh = func(token string) (time.Time, error) {
				c, err := verifier.Verify(context.Background(), token)
				countToken(err)
				if err != nil {
					return time.Time{}, err
				}
				if c.Subject() != sub {
					return time.Time{}, errors.New("refresh token is for another subject")
				}
				exp, _ := expiry(c)
				return exp, nil
			}
		}
	}
	if red.Hidden {
		h.auth.logger.Info("websocket request (token redacted; not in the access log)",
			zap.String("remote", r.RemoteAddr), zap.String("host", r.Host),
			zap.String("uri", red.URI), zap.Strings("protocols", red.Protocols))
	}
	if tokenSrc != nil && tokenSrc.Kind == policy.FromProtocol {
		info.Protocols = policy.StripProtocolToken(r.Header.Values("Sec-Websocket-Protocol"), tokenSrc.Name)
		if info.Protocols == nil {
			info.Protocols = []string{}
		}
		info.AcceptProtocol = tokenSrc.Name
	}
	return claims, ""
}

// countToken counts a token verification by its result.
func countToken(err error) {
	tokenVerifications.WithLabelValues(policy.TokenResult(err)).Inc()
}

func expiry(c policy.Claims) (time.Time, bool) {
	switch v := c["exp"].(type) {
	case float64:
		return time.Unix(int64(v), 0), true
	case int64:
		return time.Unix(v, 0), true
	}
	return time.Time{}, false
}

func (h *Handler) unauthorized(w http.ResponseWriter, r *http.Request, err error) {
	desc := strings.TrimPrefix(err.Error(), policy.ErrToken.Error()+": ")
	w.Header().Set("WWW-Authenticate", fmt.Sprintf(`Bearer realm="wsgate", error="invalid_token", error_description=%q`, desc))
	h.refuse(w, r, http.StatusUnauthorized, "unauthorized: "+desc, err)
}

func (h *Handler) refuse(w http.ResponseWriter, r *http.Request, status int, msg string, err error) {
	red := policy.Redact(r, h.auth.sources)
	h.auth.logger.Info("websocket refused",
		zap.Int("status", status),
		zap.String("reason", err.Error()),
		zap.String("remote", r.RemoteAddr),
		zap.String("host", r.Host),
		zap.String("uri", red.URI),
		zap.Strings("protocols", red.Protocols))
	proxy.WriteError(w, status, msg, nil)
}

// provisionJWT builds the verifier and token sources from h.JWT.
func (h *Handler) provisionJWT(ctx caddy.Context) error {
	a := &h.auth
	var err error
	repl := caddy.NewReplacer()
	if j := h.JWT; j != nil {
		cfg := policy.JWTConfig{
			Leeway:          time.Duration(j.Leeway),
			RequiredClaims:  j.RequiredClaims,
			AllowMissingExp: j.AllowMissingExp,
			MaxTokenSize:    j.MaxTokenSize,
			CacheHits:       &tokenCacheHits,
		}
		for _, is := range j.Issuers {
			ic := policy.IssuerConfig{
				Issuer: is.Issuer, Audience: is.Audience,
				JWKSURL: is.JWKSURL, JWKSRefresh: time.Duration(is.JWKSRefresh), JWKSAlgorithms: is.JWKSAlgorithms,
			}
			for _, k := range is.Keys {
				kc := policy.KeyConfig{ID: k.ID, Algorithms: k.Algorithms}
				if k.Secret != "" {
					kc.Secret = []byte(repl.ReplaceKnown(k.Secret, ""))
					if len(kc.Secret) == 0 {
						return fmt.Errorf("jwt key %q: secret is empty (unset environment variable?)", k.ID)
					}
				}
				if k.PublicKeyFile != "" {
					if kc.PEM, err = os.ReadFile(k.PublicKeyFile); err != nil {
						return fmt.Errorf("jwt key: %w", err)
					}
				}
				ic.Keys = append(ic.Keys, kc)
			}
			cfg.Issuers = append(cfg.Issuers, ic)
		}
		if a.verifier, err = policy.NewVerifier(ctx, cfg); err != nil {
			return err
		}
		for _, s := range j.From {
			src, err := policy.ParseSource(s.Kind, s.Name)
			if err != nil {
				return err
			}
			a.sources = append(a.sources, src)
		}
	}
	return nil
}
