package broker

import (
	"testing"
	"time"
)

// Crash closes r as a node killed with -9 stops: its presence entries are
// neither refreshed nor removed.
func Crash(r *Redis) error {
	r.crashed.Store(true)
	return r.Close()
}

// ChannelKey is the key of a channel's history or presence (suffix :s,
// :m, :p or :z) for a Redis pub/sub name.
func ChannelKey(name, suffix string) string { return keyOf(name, suffix) }

// ErrDown is what calls answer, without I/O, while Redis is known to be
// down.
var ErrDown = errDown

// SubscriberName is the CLIENT SETNAME of r's sharded subscriber
// connections on a Redis Cluster.
func SubscriberName(r *Redis) string { return r.subscriberName() }

// SetClusterCheckInterval sets how often cluster brokers made from now on
// check their slot table and subscriber connections, until the test ends.
func SetClusterCheckInterval(t testing.TB, d time.Duration) {
	saved := clusterCheckInterval
	clusterCheckInterval = d
	t.Cleanup(func() { clusterCheckInterval = saved })
}

// ReplyChannel is the channel, without the prefix, on which r receives
// the answers to its control requests.
func ReplyChannel(r *Redis) string { return replyChannel + r.node }
