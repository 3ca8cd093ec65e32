package policy

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"
)

// ErrAuthUnavailable means the auth service could not give an answer
// (timeout, connection refused, 5xx, unreadable reply). The gateway fails
// closed: the client is refused with 503.
var ErrAuthUnavailable = errors.New("auth service unavailable")

// ForwardAuthConfig configures forward auth: the gateway asks the app's own
// auth endpoint whether the client's credentials (usually its session
// cookie) are good.
type ForwardAuthConfig struct {
	// URL is called with GET (http or https).
	URL string
	// CopyHeaders are the client request headers sent along; default
	// Cookie and Authorization.
	CopyHeaders []string
	// Timeout bounds the call; default 5s.
	Timeout time.Duration
	// CacheTTL caches allowed answers per credential; 0 disables caching.
	CacheTTL time.Duration
	// ClaimsFromBody reads claims from a JSON object in a 2xx reply.
	ClaimsFromBody bool
	// ClaimHeaders maps reply headers to claim names (X-User-Id → sub).
	ClaimHeaders map[string]string
	// Client makes the calls; default a new client with Timeout.
	Client *http.Client
	// Now is the clock for the cache; nil means time.Now.
	Now func() time.Time
}

// maxCacheEntries bounds the forward-auth cache.
const maxCacheEntries = 10000

// ForwardAuth checks credentials against an auth endpoint.
type ForwardAuth struct {
	cfg   ForwardAuthConfig
	mu    sync.Mutex
	cache map[[32]byte]cacheEntry
}

type cacheEntry struct {
	claims  Claims
	expires time.Time
}

// CheckForwardAuthURL checks the URL of an auth endpoint: http or https,
// with a host.
func CheckForwardAuthURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("forward_auth: URL %q must be http(s)://host/…", s)
	}
	return nil
}

// NewForwardAuth validates cfg.
func NewForwardAuth(cfg ForwardAuthConfig) (*ForwardAuth, error) {
	if err := CheckForwardAuthURL(cfg.URL); err != nil {
		return nil, err
	}
	if len(cfg.CopyHeaders) == 0 {
		cfg.CopyHeaders = []string{"Cookie", "Authorization"}
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	if cfg.Client == nil {
		cfg.Client = &http.Client{
			Timeout: cfg.Timeout,
			// A redirect is an answer, not something to follow.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		}
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &ForwardAuth{cfg: cfg, cache: map[[32]byte]cacheEntry{}}, nil
}

// Check asks the auth endpoint about r's credentials. It returns the claims
// on 2xx, an ErrToken error on 401/403 (or other 4xx/3xx), and
// ErrAuthUnavailable when no answer could be had.
func (f *ForwardAuth) Check(ctx context.Context, r *http.Request) (Claims, error) {
	hdr := http.Header{}
	h := sha256.New()
	for _, name := range f.cfg.CopyHeaders {
		for _, v := range r.Header.Values(name) {
			hdr.Add(name, v)
			io.WriteString(h, name+"\x00"+v+"\x00")
		}
	}
	if len(hdr) == 0 {
		return nil, fmt.Errorf("%w: no credentials", ErrToken)
	}
	var key [32]byte
	h.Sum(key[:0])
	now := f.cfg.Now()
	if f.cfg.CacheTTL > 0 {
		f.mu.Lock()
		e, ok := f.cache[key]
		f.mu.Unlock()
		if ok && now.Before(e.expires) {
			return e.claims, nil
		}
	}

	ctx, cancel := context.WithTimeout(ctx, f.cfg.Timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.cfg.URL, nil)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAuthUnavailable, err)
	}
	req.Header = hdr
	resp, err := f.cfg.Client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrAuthUnavailable, errors.Unwrap(err))
	}
	defer resp.Body.Close()
	switch {
	case resp.StatusCode >= 500:
		return nil, fmt.Errorf("%w: HTTP %d", ErrAuthUnavailable, resp.StatusCode)
	case resp.StatusCode < 200 || resp.StatusCode > 299:
		return nil, fmt.Errorf("%w: auth service answered HTTP %d", ErrToken, resp.StatusCode)
	}
	claims := Claims{}
	if f.cfg.ClaimsFromBody {
		body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if err != nil {
			return nil, fmt.Errorf("%w: reading reply: %v", ErrAuthUnavailable, err)
		}
		if len(body) > 0 {
			if err := json.Unmarshal(body, &claims); err != nil {
				return nil, fmt.Errorf("%w: reply is not a JSON object", ErrAuthUnavailable)
			}
			if claims == nil { // the body was null
				claims = Claims{}
			}
		}
	}
	for hname, claim := range f.cfg.ClaimHeaders {
		if v := resp.Header.Get(hname); v != "" {
			claims[claim] = v
		}
	}
	if f.cfg.CacheTTL > 0 {
		f.mu.Lock()
		if len(f.cache) >= maxCacheEntries {
			for k, e := range f.cache {
				if !now.Before(e.expires) || len(f.cache) >= maxCacheEntries {
					delete(f.cache, k)
				}
			}
		}
		f.cache[key] = cacheEntry{claims: claims, expires: now.Add(f.cfg.CacheTTL)}
		f.mu.Unlock()
	}
	return claims, nil
}
