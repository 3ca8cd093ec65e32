// Package wsgate is a client for the wsgate.v1 rooms protocol of the wsgate
// gateway.
//
// A Client keeps one WebSocket connection to the gateway (github.com/gobwas/ws),
// reconnects with exponential backoff and full jitter after everything but a
// terminal close, checks the connection's liveness with the protocol's ping,
// refreshes its token in band before the token expires, and makes its
// subscriptions again after every reconnect. Subscriptions to channels that
// keep history resume where they left off: each message is delivered once and
// in order across reconnects, and the app is told when that was not possible
// (a reset, or a resubscribe that was not recovered).
//
// Every handler and event callback of a Client runs on one goroutine of that
// client, in the order the gateway's messages arrived. They may call the
// client's methods (Publish, History, …), but must not call Close; a handler
// that blocks holds up every later callback.
//
// Files: client.go (Client, options, the connection loop), conn.go (one
// connection: reader, writer, liveness, refresh), subscription.go,
// backoff.go, token.go, clock.go, dispatch.go.
package wsgate
