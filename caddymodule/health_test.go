package caddymodule

import (
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// TestHealthWithMemoryBroker: without a wsgate app the default memory
// broker is always reachable; HEAD has no body and other methods are
// refused. (Health following a Redis broker is an integration test.)
func TestHealthWithMemoryBroker(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	var h Health
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		method string
		status int
		body   string
	}{
		{"GET", 200, `{"status":"ok","broker":"memory","broker_reachable":true,"connections":0}` + "\n"},
		{"HEAD", 200, ""},
		{"POST", 405, ""},
	}
	for _, tt := range tests {
		t.Run(tt.method, func(t *testing.T) {
			w := httptest.NewRecorder()
			err := h.ServeHTTP(w, httptest.NewRequest(tt.method, "/healthz", nil), nil)
			if tt.status == 405 {
				var he caddyhttp.HandlerError
				if !errors.As(err, &he) || he.StatusCode != 405 || w.Header().Get("Allow") != "GET, HEAD" {
					t.Fatalf("%s: %v, Allow %q", tt.method, err, w.Header().Get("Allow"))
				}
				return
			}
			if err != nil || w.Code != tt.status || w.Body.String() != tt.body || w.Header().Get("Cache-Control") != "no-store" ||
				!strings.HasPrefix(w.Header().Get("Content-Type"), "application/json") {
				t.Fatalf("%s: %v, %d %q %v", tt.method, err, w.Code, w.Body.String(), w.Header())
			}
		})
	}
}
