package broker_test

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// publishOps are the ways to publish, and the history and presence calls
// that need Redis, each returning the broker's error.
func publishOps(r *broker.Redis) map[string]func(ctx context.Context) error {
	hist := broker.HistoryOptions{Size: 10, TTL: time.Minute}
	pres := broker.PresenceOptions{TTL: time.Minute, Events: true}
	return map[string]func(ctx context.Context) error{
		"PublishHistory": func(ctx context.Context) error {
			_, err := r.PublishHistory(ctx, []broker.HistoryPub{{Channel: "room", Data: []byte(`1`), Opt: hist}, {Channel: "other", Data: []byte(`2`), Opt: hist}})
			return err
		},
		"History": func(ctx context.Context) error {
			_, err := r.History(ctx, "room", broker.HistoryQuery{Limit: 10, Opt: hist})
			return err
		},
		"Join": func(ctx context.Context) error { return r.Join(ctx, "room", "c", []byte(`{}`), pres) },
		"Presence": func(ctx context.Context) error {
			_, err := r.Presence(ctx, "room")
			return err
		},
		"PresenceCount": func(ctx context.Context) error {
			_, err := r.PresenceCount(ctx, "room")
			return err
		},
		"Publish": func(ctx context.Context) error { return r.Publish(ctx, "room", []byte(`"x"`)) },
		"PublishBatch": func(ctx context.Context) error {
			return r.PublishBatch(ctx, []string{"room", "other"}, [][]byte{[]byte(`1`), []byte(`2`)})
		},
	}
}

// requireNoIO calls each op n times and fails the test unless every call
// was answered from the broker's down mark (broker.ErrDown), without
// trying Redis: a call that tries fails otherwise (a dial refused, a
// timeout), and on a Redis that stops answering costs the caller the I/O
// timeout. The slowest call is logged; time is not asserted, since a
// loaded machine can stall any call for milliseconds.
func requireNoIO(t *testing.T, r *broker.Redis, n int) {
	t.Helper()
	for name, op := range publishOps(r) {
		t.Run(name, func(t *testing.T) {
			var slowest time.Duration
			for i := 0; i < n; i++ {
				start := time.Now()
				err := op(ctxT(t))
				slowest = max(slowest, time.Since(start))
				if !errors.Is(err, broker.ErrDown) {
					t.Fatalf("call %d while Redis is known to be down = %v, want the down mark's answer (no I/O)", i, err)
				}
			}
			t.Logf("slowest of %d calls: %v", n, slowest)
		})
	}
}

// TestRedisDownUpTransitions kills redis-server under a broker: the
// broker learns it from its subscription stream before any publish,
// answers every publish at once while Redis is down, and once Redis is back
// and the broker says so, publishing works again and its first publication
// reaches its own subscription (the stream resubscribed before the broker
// reported up).
func TestRedisDownUpTransitions(t *testing.T) {
	for _, tc := range []struct {
		name string
		subs []string
	}{
		{"subscribed", []string{"room"}},
		{"no subscriptions", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startRedis(t)
			prefix := newPrefix()
			rec := newRecorder()
			r := openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: prefix}, rec.handle)
			n := &node{b: r, rec: rec, prefix: prefix}
			n.subscribe(t, tc.subs...)
			n.settle(t, tc.subs...)
			n.publish(t, "room", []byte(`"warm-up"`))
			if tc.subs != nil {
				rec.waitN(t, "room", 1)
			}
			if !r.Reachable() {
				t.Fatal("a broker that just published says Redis is unreachable")
			}

			srv.kill()
			eventually(t, 2*time.Second, "the broker to notice that Redis is gone (no publish made)", func() bool { return !r.Reachable() })
			requireNoIO(t, r, 500)

			srv.start()
			restarted := time.Now()
			eventually(t, 2*time.Second, "the broker to find Redis back", r.Reachable)
			t.Logf("reachable %v after the restart", time.Since(restarted).Round(time.Millisecond))
			n.publish(t, "room", []byte(`"back"`))
			if tc.subs != nil {
				assertMessages(t, "the broker's own subscription", rec.waitN(t, "room", 2), []string{`"warm-up"`, `"back"`})
			}
		})
	}
}

// silentServer listens on addr, accepts connections and never answers,
// as a hung Redis, or one whose packets are dropped, seems to. The
// returned function stops it and closes its connections (the test's
// cleanup does too).
func silentServer(t testing.TB, addr string) (stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var conns sync.WaitGroup
	done := make(chan struct{})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Go(func() {
				go func() { <-done; c.Close() }()
				io.Copy(io.Discard, c)
			})
		}
	}()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			ln.Close()
			close(done)
			conns.Wait()
		})
	}
	t.Cleanup(stop)
	return stop
}

// TestRedisUnresponsive: a server that accepts connections and never
// answers (a hung or unreachable Redis whose packets are dropped) costs the
// first publish at most about a second; after that the broker answers at
// once, although the server would hold every command.
func TestRedisUnresponsive(t *testing.T) {
	addr := "127.0.0.1:" + strconv.Itoa(freePort(t))
	t.Cleanup(silentServer(t, addr))

	r := openRedis(t, broker.RedisOptions{URL: "redis://" + addr}, newRecorder().handle)
	start := time.Now()
	if err := r.Publish(context.Background(), "room", []byte(`1`)); !errors.Is(err, broker.ErrUnavailable) {
		t.Fatalf("Publish to a server that never answers = %v, want ErrUnavailable", err)
	}
	first := time.Since(start)
	t.Logf("first publish answered after %v", first.Round(time.Millisecond))
	if first > 2500*time.Millisecond {
		t.Fatalf("the first publish to a server that never answers took %v; want about a second", first)
	}
	if r.Reachable() {
		t.Fatal("the broker says Redis is reachable after a publish timed out")
	}
	requireNoIO(t, r, 200)
}

// TestRedisCallerGivingUpIsNotAnOutage: a publish whose context ended
// fails, and the broker does not take it for Redis being down.
func TestRedisCallerGivingUpIsNotAnOutage(t *testing.T) {
	srv := startRedis(t)
	r := openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: newPrefix()}, newRecorder().handle)
	for name, op := range publishOps(r) {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			if err := op(ctx); err == nil {
				t.Fatal("a publish with a cancelled context succeeded")
			}
			if !r.Reachable() {
				t.Fatal("a cancelled publish marked Redis down")
			}
			if err := op(ctxT(t)); err != nil {
				t.Fatalf("publish after a cancelled one: %v", err)
			}
		})
	}
}

// TestRedisLeaveDuringOutage: a Leave while Redis is down answers at once,
// and the broker removes the entry (publishing its leave event) when Redis
// is back with its data; the node's other entries are still there.
func TestRedisLeaveDuringOutage(t *testing.T) {
	srv := startRedis(t, "--appendonly", "yes", "--appendfsync", "always")
	prefix := newPrefix()
	rec := newRecorder()
	r := openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: prefix}, rec.handle)
	n := &node{b: r, rec: rec, prefix: prefix}
	ch := "room"
	n.subscribe(t, ch)
	n.settle(t, ch)
	opt := broker.PresenceOptions{TTL: time.Minute, Events: true}
	for _, id := range []string{"leaving", "staying"} {
		if err := r.Join(ctxT(t), ch, id, []byte(`{"id":"`+id+`"}`), opt); err != nil {
			t.Fatal(err)
		}
	}
	rec.waitN(t, ch, 2)

	srv.kill()
	eventually(t, 2*time.Second, "the broker to notice that Redis is gone", func() bool { return !r.Reachable() })
	start := time.Now()
	if err := r.Leave(ctxT(t), ch, "leaving", opt); err != nil {
		t.Fatalf("Leave while Redis is down = %v, want nil (done when it is back)", err)
	}
	if d := time.Since(start); d > 50*time.Millisecond {
		t.Fatalf("Leave while Redis is down took %v", d)
	}

	srv.start()
	eventually(t, waitLong, "the leave to be done", func() bool {
		m, err := r.Presence(ctxT(t), ch)
		return err == nil && samePresence(m, map[string]string{"staying": `{"id":"staying"}`})
	})
	rec.waitN(t, ch, 3)
	n.fence(t, ch)
	if got, want := msgString(rec.msgs(ch)), `join={"id":"leaving"} join={"id":"staying"} leave={"id":"leaving"}`; got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}
