// Package bench is the side-by-side benchmark of wsgate against stock
// Caddy's reverse_proxy and against the upstream reached directly: the
// harness behind cmd/wsbench.
//
// It measures the gateway from the outside, as a user would: it runs a
// prebuilt cmd/caddy binary from a generated Caddyfile, an in-process echo
// upstream and load-generating clients (both on gobwas/ws, so the load
// generator's own footprint stays small), and reads the Caddy process's
// /proc entries and admin endpoint. The idle scenario (a) also measures
// TLS: Caddy serving HTTPS with `tls internal` (its CA kept in the run's
// temporary directory, never in the system trust store) and the echo
// upstream served over TLS with a certificate made at start. The fan-out
// scenarios (d, and h: the same with history on and off in turns) also
// start a redis-server (from PATH) and two rooms-mode gateways sharing it,
// and read Redis's INFO commandstats. Scenario r (refusals with every
// upstream down) runs gateways with Caddy's metrics on and reads their
// request histogram before and after each window; with -gateway-cpus it
// pins every Caddy to other cores than the load generator's. Scenario z
// (compression) runs a Caddy with the wsgate route without and with
// `compression` and a rooms route with it; its clients do their own
// handshakes (net/http reads the answer) and compress and inflate with the
// standard library's compress/flate, never with the gateway's compressor,
// and count the bytes at their sockets. Scenario k (capacity) starts a
// redis-server and rooms gateways on it: one to measure the capacity
// model's inputs, then three to check what it predicts for each. Scenario p
// (peers) runs wsgate beside Centrifugo and Nchan
// (nginx), each started from a configuration the harness writes and
// skipped when it is not installed, and drives all three with the same
// clients. It imports no
// Caddy or wsgate package, so it can never share a bug with the code it
// measures.
//
// Everything it starts is stopped before Main returns, on success, error
// or cancellation; a Caddy left behind by a killed harness dies with it
// (Pdeathsig).
package bench
