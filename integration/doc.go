// Package integration holds wsgate's end-to-end tests: they build cmd/caddy
// once, start it from Caddyfiles on free loopback ports, and drive it with
// upstreams and clients written with github.com/coder/websocket (and raw
// frames), never with the library the gateway is built on.
package integration
