// Package caddymodule adapts wsgate to Caddy: the http.handlers.wsgate
// handler, its Caddyfile directive, and the wiring from Caddy config into
// the proxy engine (upstreams.go: load balancing, health checks and drain);
// the wsgate metrics on Caddy's registry (metrics.go) and the line logged
// when a connection ends (connlog.go). It is the only
// wsgate package that imports Caddy.
package caddymodule
