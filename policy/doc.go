// Package policy decides who may open a WebSocket and what it may do:
// Origin allow-lists, token extraction and verification (JWT with inline,
// PEM or JWKS keys; forward auth), connection limits and claims handling.
//
// policy imports the standard library, golang-jwt, keyfunc/jwkset and
// golang.org/x/time; never Caddy. Decisions are plain functions of their
// inputs plus an injectable clock, so they are tested without a server.
package policy
