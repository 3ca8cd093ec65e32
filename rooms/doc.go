// Package rooms is the wsgate.v1 rooms protocol and the node-local
// subscription hub that fans channel publications out to connections.
//
// The hub subscribes the node to a channel through a broker.Broker when
// the first local connection subscribes, and unsubscribes after the last
// leaves. A publication is encoded into a WebSocket frame once per format
// and the same bytes are queued to every subscriber.
//
// Publications with an idempotency key (PublishMessages) are delivered
// once per key and window, through a broker.Claimer and a node-local
// record of keys.
//
// rooms imports the standard library, golang.org/x/time/rate (the
// publish rate), broker, policy (channel names), proxy (frames and
// sessions) and internal/ttlmap; never Caddy.
package rooms
