package broker_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// answering opens a Redis broker whose control answers are name+":"+req.
func answering(t *testing.T, url, prefix, name string) *broker.Redis {
	t.Helper()
	return openRedis(t, broker.RedisOptions{URL: url, Prefix: prefix, Answer: func(req []byte) []byte {
		return []byte(name + ":" + string(req))
	}}, func(string, broker.Message) {})
}

// TestRedisGather: a control request reaches every node sharing the Redis
// (the asker included) and each answer comes back; a node that is closed
// is no longer waited for; a listener that never answers holds the asker
// only until its context ends; a Redis that is down is ErrUnavailable; and
// control messages never reach the publication handler.
func TestRedisGather(t *testing.T) {
	srv := startRedis(t)
	prefix := newPrefix()
	rec := newRecorder()
	a := openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: prefix, Answer: func(req []byte) []byte {
		return []byte("a:" + string(req))
	}}, rec.handle)
	b := answering(t, srv.url(), prefix, "b")
	c := answering(t, srv.url(), prefix, "c")
	eventually(t, waitLong, "three nodes on the control channel", func() bool {
		return numsub(t, srv.addr(), "NUMSUB", prefix+"#control") == 3
	})

	gather := func(b *broker.Redis, req string, within time.Duration) ([]string, int, error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), within)
		defer cancel()
		answers, n, err := b.Gather(ctx, []byte(req))
		var got []string
		for _, a := range answers {
			got = append(got, string(a))
		}
		slices.Sort(got)
		return got, n, err
	}
	tests := []struct {
		name string
		from *broker.Redis
		req  string
	}{
		{"from a", a, "list"},
		{"from c", c, "with\nnewlines and spaces"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			start := time.Now()
			got, n, err := gather(tt.from, tt.req, 10*time.Second)
			want := []string{"a:" + tt.req, "b:" + tt.req, "c:" + tt.req}
			if err != nil || n != 3 || !slices.Equal(got, want) {
				t.Fatalf("Gather = %q, %d, %v; want %q, 3", got, n, err, want)
			}
			t.Logf("three answers in %v", time.Since(start).Round(time.Microsecond))
		})
	}

	c.Close()
	eventually(t, waitLong, "the closed node to leave", func() bool {
		return numsub(t, srv.addr(), "NUMSUB", prefix+"#control") == 2
	})
	if got, n, err := gather(b, "x", 10*time.Second); err != nil || n != 2 || !slices.Equal(got, []string{"a:x", "b:x"}) {
		t.Fatalf("after a node left: Gather = %q, %d, %v; want 2 answers", got, n, err)
	}

	// Something else listening on the control channel counts as a node
	// but never answers: the asker waits until its context ends and
	// returns the answers it has.
	mute := dialRESP(t, srv.addr())
	defer mute.c.Close()
	mute.do(t, "SUBSCRIBE", prefix+"#control")
	start := time.Now()
	got, n, err := gather(a, "y", 300*time.Millisecond)
	if waited := time.Since(start); err != nil || n != 3 || !slices.Equal(got, []string{"a:y", "b:y"}) || waited < 300*time.Millisecond {
		t.Fatalf("with a silent listener: Gather = %q, %d, %v after %v; want 2 answers of 3 after the 300ms context", got, n, err, waited)
	}

	if d := rec.all(); len(d) != 0 {
		t.Fatalf("control messages reached the publication handler: %v", d)
	}

	srv.kill()
	eventually(t, waitLong, "the broker to see Redis down", func() bool { return !a.Reachable() })
	if _, _, err := gather(a, "z", 10*time.Second); !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("Gather with Redis down = %v, want ErrUnavailable", err)
	}
}

// TestGatherNeedsAnswer: a broker without an Answer function does not
// gather (it would not hear its own request).
func TestGatherNeedsAnswer(t *testing.T) {
	srv := startRedis(t)
	r := openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: newPrefix()}, func(string, broker.Message) {})
	if _, _, err := r.Gather(ctxT(t), []byte("x")); err == nil || !strings.Contains(err.Error(), "not enabled") {
		t.Fatalf("Gather without Answer = %v, want an error saying it is not enabled", err)
	}
}

// TestRedisClusterGather: on a Redis Cluster the control channels are
// sharded (SSUBSCRIBE, SPUBLISH), and every node still answers.
func TestRedisClusterGather(t *testing.T) {
	c := startCluster(t)
	prefix := newPrefix()
	var nodes []*broker.Redis
	for _, name := range []string{"a", "b", "c"} {
		nodes = append(nodes, openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix, Answer: func(req []byte) []byte {
			return []byte(name + ":" + string(req))
		}}, func(string, broker.Message) {}))
	}
	control := prefix + "#control"
	eventually(t, waitLong, "three nodes on the sharded control channel", func() bool {
		return numsub(t, c.owner[broker.Slot(control)], "SHARDNUMSUB", control) == 3
	})
	// Each node subscribes to its reply channel after the control channel:
	// answers sent before it is in effect would be lost.
	for _, n := range nodes {
		reply := prefix + broker.ReplyChannel(n)
		eventually(t, waitLong, "a node on its reply channel", func() bool {
			return numsub(t, c.owner[broker.Slot(reply)], "SHARDNUMSUB", reply) == 1
		})
	}
	for i, from := range nodes {
		answers, n, err := from.Gather(ctxT(t), []byte("ping"))
		var got []string
		for _, a := range answers {
			got = append(got, string(a))
		}
		slices.Sort(got)
		if want := []string{"a:ping", "b:ping", "c:ping"}; err != nil || n != 3 || !slices.Equal(got, want) {
			t.Fatalf("Gather from node %d = %q, %d, %v; want %q, 3", i, got, n, err, want)
		}
	}
}
