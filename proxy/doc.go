// Package proxy is the wsgate connection engine: it checks and upgrades a
// client's WebSocket handshake, dials the upstream first, and relays frames
// both ways with per-connection limits (message size, message and byte rate,
// UTF-8, idle time, heartbeats).
//
// The engine is built on github.com/gobwas/ws and keeps idle connections
// cheap: after the hijack a connection holds no bufio or payload buffer
// while it waits for data (read buffers come from a pool when bytes arrive
// and go back when they have been forwarded), and exactly one goroutine per
// side.
//
// proxy may import the standard library, gobwas/ws and golang.org/x/time;
// it never imports Caddy. The caddymodule package adapts Caddy config into
// a Config.
package proxy
