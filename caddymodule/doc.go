// Package caddymodule adapts wsgate to Caddy: the http.handlers.wsgate
// handler, its Caddyfile directive, and the wiring from Caddy config into
// the proxy engine. It is the only wsgate package that imports Caddy.
package caddymodule
