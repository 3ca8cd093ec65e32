// Package broker carries channel publications between gateway nodes.
//
// A Broker has one subscription per channel per node (the rooms hub
// reference-counts local subscribers and subscribes the node once) and
// one publish per message per cluster. Memory serves a single node with
// nothing else; Redis shares channels between nodes through a standalone
// server, Sentinel, or a Redis Cluster with sharded pub/sub.
//
// broker imports the standard library and go-redis; never Caddy.
package broker
