package policy

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/fakeclock"
)

// authServer is an app's auth endpoint that counts its calls and records
// the headers of the last one.
type authServer struct {
	*httptest.Server
	hits atomic.Int32

	mu   sync.Mutex
	last http.Header
}

func newAuthServer(t *testing.T, h http.HandlerFunc) *authServer {
	t.Helper()
	s := &authServer{}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.hits.Add(1)
		s.mu.Lock()
		s.last = r.Header.Clone()
		s.mu.Unlock()
		h(w, r)
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *authServer) lastHeader() http.Header {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

func newTestForwardAuth(t *testing.T, cfg ForwardAuthConfig) *ForwardAuth {
	t.Helper()
	f, err := NewForwardAuth(cfg)
	if err != nil {
		t.Fatalf("NewForwardAuth: %v", err)
	}
	return f
}

// withCookie is an upgrade request carrying a session cookie.
func withCookie(t *testing.T, value string) *http.Request {
	return newTestRequest(t, "/ws", "Cookie: session="+value, "X-Other: not copied")
}

func TestForwardAuthAllowed(t *testing.T) {
	srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-User-Id", "u-8")
		w.Header().Set("X-Org", "acme")
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"sub":"u-7","org":{"id":"acme"},"roles":["a","b"]}`))
	})
	tests := []struct {
		name string
		cfg  ForwardAuthConfig
		want Claims
	}{
		{"no claims wanted", ForwardAuthConfig{}, Claims{}},
		{"claims from the body", ForwardAuthConfig{ClaimsFromBody: true},
			Claims{"sub": "u-7", "org": map[string]any{"id": "acme"}, "roles": []any{"a", "b"}}},
		{"claims from headers", ForwardAuthConfig{ClaimHeaders: map[string]string{"X-User-Id": "sub", "x-org": "org", "X-Missing": "m"}},
			Claims{"sub": "u-8", "org": "acme"}},
		{"headers override the body", ForwardAuthConfig{ClaimsFromBody: true, ClaimHeaders: map[string]string{"X-User-Id": "sub"}},
			Claims{"sub": "u-8", "org": map[string]any{"id": "acme"}, "roles": []any{"a", "b"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.cfg.URL = srv.URL + "/auth"
			f := newTestForwardAuth(t, tt.cfg)
			c, err := f.Check(context.Background(), withCookie(t, "s3cr3t"))
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if !reflect.DeepEqual(c, tt.want) {
				t.Errorf("claims = %#v, want %#v", c, tt.want)
			}
			h := srv.lastHeader()
			if got := h.Get("Cookie"); got != "session=s3cr3t" {
				t.Errorf("auth endpoint got Cookie %q", got)
			}
			if got := h.Get("X-Other"); got != "" {
				t.Errorf("auth endpoint got X-Other %q, which is not in CopyHeaders", got)
			}
		})
	}
}

func TestForwardAuthCopyHeaders(t *testing.T) {
	srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {})
	f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL, CopyHeaders: []string{"X-Api-Key", "Cookie"}})
	r := newTestRequest(t, "/", "X-Api-Key: k1", "X-Api-Key: k2", "Cookie: a=1", "Authorization: Bearer not-copied")
	if _, err := f.Check(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	h := srv.lastHeader()
	if got := h.Values("X-Api-Key"); !reflect.DeepEqual(got, []string{"k1", "k2"}) {
		t.Errorf("X-Api-Key = %q, want both values", got)
	}
	if got := h.Get("Authorization"); got != "" {
		t.Errorf("Authorization = %q, want it not copied", got)
	}

	// only headers that are not copied: no credentials
	_, err := f.Check(context.Background(), newTestRequest(t, "/", "Authorization: Bearer x"))
	if !errors.Is(err, ErrToken) {
		t.Errorf("err = %v, want ErrToken", err)
	}
	if n := srv.hits.Load(); n != 1 {
		t.Errorf("auth endpoint called %d times, want once", n)
	}
}

func TestForwardAuthRefusals(t *testing.T) {
	tests := []struct {
		name    string
		handler http.HandlerFunc
		cfg     ForwardAuthConfig
		want    error
	}{
		{"401", statusHandler(http.StatusUnauthorized), ForwardAuthConfig{}, ErrToken},
		{"403", statusHandler(http.StatusForbidden), ForwardAuthConfig{}, ErrToken},
		{"404", statusHandler(http.StatusNotFound), ForwardAuthConfig{}, ErrToken},
		{"302 to a login page is not followed", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/login" {
				w.WriteHeader(http.StatusOK) // following the redirect would allow
				return
			}
			http.Redirect(w, r, "/login", http.StatusFound)
		}, ForwardAuthConfig{}, ErrToken},
		{"304", statusHandler(http.StatusNotModified), ForwardAuthConfig{}, ErrToken},
		{"500", statusHandler(http.StatusInternalServerError), ForwardAuthConfig{}, ErrAuthUnavailable},
		{"502", statusHandler(http.StatusBadGateway), ForwardAuthConfig{}, ErrAuthUnavailable},
		{"503", statusHandler(http.StatusServiceUnavailable), ForwardAuthConfig{}, ErrAuthUnavailable},
		{"body not JSON", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("<html>ok</html>")) },
			ForwardAuthConfig{ClaimsFromBody: true}, ErrAuthUnavailable},
		{"body a JSON array", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte(`["u-7"]`)) },
			ForwardAuthConfig{ClaimsFromBody: true}, ErrAuthUnavailable},
		{"body too long to be read whole", func(w http.ResponseWriter, r *http.Request) {
			w.Write([]byte(`{"sub":"` + strings.Repeat("x", 70<<10) + `"}`))
		}, ForwardAuthConfig{ClaimsFromBody: true}, ErrAuthUnavailable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := newAuthServer(t, tt.handler)
			tt.cfg.URL = srv.URL + "/auth"
			f := newTestForwardAuth(t, tt.cfg)
			c, err := f.Check(context.Background(), withCookie(t, "s3cr3t"))
			if err == nil {
				t.Fatalf("allowed with claims %v", c)
			}
			if !errors.Is(err, tt.want) {
				t.Errorf("error %q is not %q", err, tt.want)
			}
			other := ErrAuthUnavailable
			if tt.want == ErrAuthUnavailable {
				other = ErrToken
			}
			if errors.Is(err, other) {
				t.Errorf("error %q is also %q", err, other)
			}
			if strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error %q repeats the credential", err)
			}
		})
	}
}

func statusHandler(code int) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(code) }
}

// TestForwardAuthNullBody checks a 2xx whose body is JSON null: no claims,
// and claim headers can still be added.
func TestForwardAuthNullBody(t *testing.T) {
	srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-User-Id", "u-8")
		w.Write([]byte("null"))
	})
	f := newTestForwardAuth(t, ForwardAuthConfig{
		URL: srv.URL, ClaimsFromBody: true, ClaimHeaders: map[string]string{"X-User-Id": "sub"},
	})
	c, err := f.Check(context.Background(), withCookie(t, "s"))
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if c.Subject() != "u-8" {
		t.Errorf("claims = %v, want sub u-8", c)
	}
}

func TestForwardAuthUnavailable(t *testing.T) {
	t.Run("timeout", func(t *testing.T) {
		release := make(chan struct{})
		srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		t.Cleanup(func() { close(release) }) // runs before srv.Close
		f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL, Timeout: 50 * time.Millisecond})
		_, err := f.Check(context.Background(), withCookie(t, "s"))
		if !errors.Is(err, ErrAuthUnavailable) {
			t.Fatalf("err = %v, want ErrAuthUnavailable", err)
		}
	})
	t.Run("caller gives up", func(t *testing.T) {
		release := make(chan struct{})
		arrived := make(chan struct{}, 1)
		srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
			arrived <- struct{}{}
			select {
			case <-release:
			case <-r.Context().Done():
			}
		})
		t.Cleanup(func() { close(release) })
		f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL, Timeout: time.Minute})
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := f.Check(ctx, withCookie(t, "s"))
			errc <- err
		}()
		select {
		case <-arrived:
		case err := <-errc:
			t.Fatalf("returned before the auth endpoint was called: %v", err)
		}
		cancel()
		if err := <-errc; !errors.Is(err, ErrAuthUnavailable) {
			t.Fatalf("err = %v, want ErrAuthUnavailable", err)
		}
	})
	t.Run("server closed", func(t *testing.T) {
		srv := newAuthServer(t, statusHandler(http.StatusOK))
		srv.Close()
		f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL})
		_, err := f.Check(context.Background(), withCookie(t, "s"))
		if !errors.Is(err, ErrAuthUnavailable) {
			t.Fatalf("err = %v, want ErrAuthUnavailable", err)
		}
		if strings.Contains(err.Error(), srv.URL) {
			t.Errorf("error %q names the auth URL", err)
		}
	})
}

func TestForwardAuthNoCredentials(t *testing.T) {
	srv := newAuthServer(t, statusHandler(http.StatusOK))
	f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL})
	_, err := f.Check(context.Background(), newTestRequest(t, "/ws", "X-Other: 1"))
	if !errors.Is(err, ErrToken) || !strings.Contains(err.Error(), "no credentials") {
		t.Errorf("err = %v, want ErrToken: no credentials", err)
	}
	if n := srv.hits.Load(); n != 0 {
		t.Errorf("auth endpoint called %d times without credentials", n)
	}
}

func TestForwardAuthCache(t *testing.T) {
	var answer atomic.Value // the sub the endpoint answers with
	answer.Store("u-1")
	srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Cookie") == "session=bad" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Write([]byte(`{"sub":"` + answer.Load().(string) + `"}`))
	})
	clk := fakeclock.New(verifyNow)
	f := newTestForwardAuth(t, ForwardAuthConfig{
		URL: srv.URL, CacheTTL: time.Minute, ClaimsFromBody: true, Now: clk.Now,
	})
	check := func(cookie, wantSub string, wantHits int32) {
		t.Helper()
		c, err := f.Check(context.Background(), withCookie(t, cookie))
		if wantSub == "" {
			if !errors.Is(err, ErrToken) {
				t.Fatalf("cookie %s: err = %v, want ErrToken", cookie, err)
			}
		} else if err != nil || c.Subject() != wantSub {
			t.Fatalf("cookie %s: claims %v, err %v; want sub %s", cookie, c, err, wantSub)
		}
		if n := srv.hits.Load(); n != wantHits {
			t.Fatalf("cookie %s: auth endpoint called %d times in all, want %d", cookie, n, wantHits)
		}
	}

	check("a", "u-1", 1)
	answer.Store("u-2")
	check("a", "u-1", 1) // cached
	clk.Advance(time.Minute - time.Nanosecond)
	check("a", "u-1", 1) // still within the TTL
	check("b", "u-2", 2) // another credential is another entry
	clk.Advance(time.Nanosecond)
	check("a", "u-2", 3) // exactly at the TTL: asked again
	check("a", "u-2", 3)
	check("b", "u-2", 3) // b was cached later
	clk.Advance(time.Hour)
	check("b", "u-2", 4)

	// refusals are not cached
	check("bad", "", 5)
	check("bad", "", 6)
}

func TestForwardAuthNoCache(t *testing.T) {
	srv := newAuthServer(t, statusHandler(http.StatusNoContent))
	f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL})
	for i := range 3 {
		if _, err := f.Check(context.Background(), withCookie(t, "a")); err != nil {
			t.Fatal(err)
		}
		if n := srv.hits.Load(); n != int32(i+1) {
			t.Fatalf("call %d: auth endpoint called %d times", i+1, n)
		}
	}
}

// TestForwardAuthCacheKey checks that the cache key covers every copied
// header, name and value, so one client never gets another's answer.
func TestForwardAuthCacheKey(t *testing.T) {
	srv := newAuthServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"sub":"` + r.Header.Get("Cookie") + "|" + r.Header.Get("Authorization") + `"}`))
	})
	f := newTestForwardAuth(t, ForwardAuthConfig{URL: srv.URL, CacheTTL: time.Hour, ClaimsFromBody: true, Now: fakeclock.New(verifyNow).Now})
	reqs := []struct {
		headers []string
		want    string
	}{
		{[]string{"Cookie: a"}, "a|"},
		{[]string{"Authorization: a"}, "|a"},
		{[]string{"Cookie: a", "Authorization: b"}, "a|b"},
		{[]string{"Cookie: ab"}, "ab|"},
		{[]string{"Cookie: a", "Authorization: "}, "a|"},
	}
	for _, r := range reqs {
		c, err := f.Check(context.Background(), newTestRequest(t, "/", r.headers...))
		if err != nil {
			t.Fatal(err)
		}
		if c.Subject() != r.want {
			t.Errorf("headers %q got the answer for %q", r.headers, c.Subject())
		}
	}
}

func TestNewForwardAuthErrors(t *testing.T) {
	for _, u := range []string{"", "ftp://auth.test/", "auth.test/check", "http://", "https:///x", "://x", "http://a b/"} {
		t.Run(u, func(t *testing.T) {
			if _, err := NewForwardAuth(ForwardAuthConfig{URL: u}); err == nil || !strings.Contains(err.Error(), "must be http(s)://host") {
				t.Errorf("err = %v, want a URL error", err)
			}
		})
	}
}
