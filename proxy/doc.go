// Package proxy is the wsgate connection engine: it checks and upgrades a
// client's WebSocket handshake, dials the upstream first, and relays frames
// both ways with per-connection limits (message size, message and byte rate,
// UTF-8, idle time, heartbeats).
//
// The engine is built on github.com/gobwas/ws. Its files follow the life
// of a connection:
//
//   - gateway.go, handshake.go: the upgrade and the upstream dial;
//   - balance.go, upstream.go, healthcheck.go: which upstream a connection
//     is dialled to (load-balancing policies), what is known of each
//     upstream across configurations (Pool: live connections, passive
//     health, drain), and the active probes;
//   - conn.go: a connection's two sides, its start and its end;
//   - reader.go, frame.go: reading frames into pooled buffers, the header
//     codec;
//   - dispatch.go, forward.go: each frame to its handler, and data frames
//     checked, inspected and forwarded (rewritten in place, or streamed);
//   - writer.go: the one writer per side, which owns every write to a peer
//     (deadlines, message boundaries, the send queue);
//   - closing.go, errors.go: the closing handshake, and errors that carry
//     the side they belong to and the close code that follows;
//   - heartbeat.go, limits.go, session.go: pings, expiry and refresh; rate
//     limits; what fan-out may do with a connection;
//   - park.go, poller_*.go, registry.go: idle sides that give up their
//     goroutine, and the registry that sweeps and shuts down connections;
//   - stats.go: what connections do, counted for metrics (Stats) and
//     summed up when one ends (ConnEnd, for its log line).
//
// Idle connections are cheap: after the hijack a connection holds no bufio
// or payload buffer while it waits for data (read buffers come from a pool
// when bytes arrive and go back when they have been forwarded), and an idle
// side gives up its goroutine too (plain TCP and TLS, on Linux).
//
// proxy may import the standard library, gobwas/ws and golang.org/x/time;
// it never imports Caddy. The caddymodule package adapts Caddy config into
// a Config.
package proxy
