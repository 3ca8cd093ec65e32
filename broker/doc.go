// Package broker carries channel publications between gateway nodes.
//
// A Broker has one subscription per channel per node (the rooms hub
// reference-counts local subscribers and subscribes the node once) and
// one publish per message per cluster. Memory serves a single node with
// nothing else; Redis shares channels between nodes through a standalone
// server, Sentinel, or a Redis Cluster with sharded pub/sub.
//
// A broker may also be a Claimer: it claims idempotency keys for every
// node that shares it, so that a publication retried with the same key is
// delivered once across the cluster.
//
// A broker may also be a Gatherer: a request from one node reaches every
// node that shares it, and their answers come back (the admin API lists
// and closes connections across nodes so).
//
// A broker may also be a Historian, keeping the latest publications of a
// channel with their positions (epoch and offset) so that a subscriber can
// recover what it missed, and a Presencer, knowing who is subscribed to a
// channel across nodes. The Redis broker keeps both in keys next to the
// channel's pub/sub name (see channelKey), written by Lua scripts that also
// publish, so positions and join/leave events reach nodes in order.
//
// broker imports the standard library, go-redis and internal/ttlmap;
// never Caddy.
package broker
