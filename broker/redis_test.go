package broker_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

func TestSlot(t *testing.T) {
	for _, tc := range []struct {
		key  string
		want int
	}{
		{"123456789", 12739}, // CRC-16/XMODEM check value 0x31C3
		{"foo", 12182},       // redis.io CLUSTER KEYSLOT example
		{"", 0},
	} {
		if got := broker.Slot(tc.key); got != tc.want {
			t.Errorf("Slot(%q) = %d, want %d", tc.key, got, tc.want)
		}
	}
	// Hash tags, as the Redis Cluster specification describes them.
	for _, tc := range []struct{ key, hashed string }{
		{"{user1000}.following", "user1000"},
		{"{user1000}.followers", "user1000"},
		{"foo{}{bar}", "foo{}{bar}"},
		{"foo{{bar}}zap", "{bar"},
		{"foo{bar}{zap}", "bar"},
		{"{}", "{}"},
		{"a{b", "a{b"},
		{"a}b{c}", "c"},
	} {
		if got, want := broker.Slot(tc.key), broker.Slot(tc.hashed); got != want {
			t.Errorf("Slot(%q) = %d, want Slot(%q) = %d", tc.key, got, tc.hashed, want)
		}
	}
}

func TestNewRedisOptions(t *testing.T) {
	h := func(string, broker.Message) {}
	for name, opt := range map[string]broker.RedisOptions{
		"nothing":          {},
		"cluster no addrs": {Cluster: true},
		"bad url":          {URL: "http://127.0.0.1:1"},
	} {
		if r, err := broker.NewRedis(opt, h); err == nil {
			r.Close()
			t.Errorf("%s: NewRedis accepted %+v", name, opt)
		}
	}

	// An unreachable Redis at start is not an error; using it is
	// ErrUnavailable. (A refused dial fails at once; the short deadline
	// only bounds the test if it did not.)
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}
	r, err := broker.NewRedis(broker.RedisOptions{URL: "redis://127.0.0.1:" + strconv.Itoa(freePort(t))}, h)
	if err != nil {
		t.Fatalf("NewRedis with an unreachable server: %v", err)
	}
	defer r.Close()
	if err := r.Publish(short(), "c", []byte(`1`)); !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Publish to an unreachable server = %v, want ErrUnavailable", err)
	}
	if err := r.PublishBatch(short(), []string{"c"}, [][]byte{[]byte(`1`)}); !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("PublishBatch to an unreachable server = %v, want ErrUnavailable", err)
	}
	if err := r.Subscribe(short(), "c"); err != nil && !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Subscribe with an unreachable server = %v, want nil or ErrUnavailable", err)
	}
	if err := r.Ping(short()); err == nil {
		t.Error("Ping of an unreachable server succeeded")
	}
}

// TestRedisReconnect kills redis-server under a subscribed broker and
// starts it again on the same port: go-redis resubscribes by itself, and
// a subscription made while Redis was down is made when it comes back.
func TestRedisReconnect(t *testing.T) {
	srv := startRedis(t)
	prefix := newPrefix()
	rec := newRecorder()
	n := &node{b: openRedis(t, broker.RedisOptions{URL: srv.url(), Prefix: prefix}, rec.handle), rec: rec, prefix: prefix}
	n.subscribe(t, "before")
	n.settle(t, "before")

	srv.kill()
	if err := n.b.Publish(ctxT(t), "before", []byte(`"down"`)); !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Publish while Redis is down = %v, want ErrUnavailable", err)
	}
	if err := n.b.Subscribe(ctxT(t), "during"); err != nil && !errors.Is(err, broker.ErrUnavailable) {
		t.Errorf("Subscribe while Redis is down = %v, want nil or ErrUnavailable", err)
	}

	srv.start()
	restarted := time.Now()
	eventually(t, 30*time.Second, "the broker to resubscribe", func() bool {
		return numsub(t, srv.addr(), "NUMSUB", prefix+"before") == 1 && numsub(t, srv.addr(), "NUMSUB", prefix+"during") == 1
	})
	t.Logf("resubscribed %v after the restart", time.Since(restarted).Round(time.Millisecond))

	// No Subscribe was called again: both channels deliver, from an
	// application's PUBLISH and from the broker's own.
	for _, ch := range []string{"before", "during"} {
		if got := rawPublish(t, srv.addr(), "PUBLISH", prefix+ch, []byte(`"raw"`)); got != 1 {
			t.Fatalf("PUBLISH %s: %d receivers", prefix+ch, got)
		}
		eventually(t, 30*time.Second, "the broker's publish client to reconnect", func() bool {
			return n.b.Publish(ctxT(t), ch, []byte(`"own"`)) == nil
		})
		got := rec.waitN(t, ch, 2)
		if string(got[0]) != `"raw"` || string(got[1]) != `"own"` {
			t.Fatalf("%s after the restart: got %q", ch, got)
		}
	}
}

// requireShardSubscribed checks that a sharded subscription to name is on
// the master of its slot.
func (c *redisCluster) requireShardSubscribed(t testing.TB, name string) {
	t.Helper()
	owner := c.owner[broker.Slot(name)]
	deadline := time.Now().Add(3 * time.Second)
	for numsub(t, owner, "SHARDNUMSUB", name) < 1 {
		if time.Now().After(deadline) {
			t.Fatalf("%q (slot %d) is not subscribed on its master %s: a subscriber connection that connected "+
				"before its first SSUBSCRIBE, or to another master, misses it", name, broker.Slot(name), owner)
		}
		pollPause()
	}
}

// clusterSpecific are the Redis Cluster checks beyond the conformance suite.
func clusterSpecific(t *testing.T, c *redisCluster) {
	t.Run("SlotMatchesClusterKeyslot", func(t *testing.T) {
		conn := dialRESP(t, c.nodes[0].addr())
		keys := []string{"", "foo", "{user1000}.following", "foo{}{bar}", "foo{{bar}}zap", "a}b{c}", "wsgate:chat:acme:42"}
		const alphabet = "ab{}:-_"
		for i := 0; i < 500; i++ {
			b := make([]byte, rand.IntN(12))
			for j := range b {
				b[j] = alphabet[rand.IntN(len(alphabet))]
			}
			keys = append(keys, string(b))
		}
		for _, k := range keys {
			want, ok := conn.do(t, "CLUSTER", "KEYSLOT", k).(int64)
			if !ok {
				t.Fatalf("CLUSTER KEYSLOT %q: unexpected reply", k)
			}
			if got := broker.Slot(k); int64(got) != want {
				t.Errorf("Slot(%q) = %d, CLUSTER KEYSLOT says %d", k, got, want)
			}
		}
	})

	t.Run("ChannelsOnEveryMasterUseShardedPubSub", func(t *testing.T) {
		prefix := newPrefix()
		rec := newRecorder()
		n := &node{b: openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix}, rec.handle),
			rec: rec, prefix: prefix, check: c.requireShardSubscribed}
		// Two channels in different slots on each master.
		perMaster := map[string][]string{}
		slots := map[int]bool{}
		for i := 0; len(perMaster) < len(c.nodes) || !enough(perMaster, 2); i++ {
			ch := "spread:" + strconv.Itoa(i)
			slot := broker.Slot(prefix + ch)
			owner := c.owner[slot]
			if slots[slot] || len(perMaster[owner]) >= 2 {
				continue
			}
			slots[slot] = true
			perMaster[owner] = append(perMaster[owner], ch)
		}
		var chans []string
		for _, cs := range perMaster {
			chans = append(chans, cs...)
		}
		n.subscribe(t, chans...)
		n.settle(t, chans...)
		for owner, cs := range perMaster {
			for _, ch := range cs {
				for _, node := range c.nodes {
					if got := numsub(t, node.addr(), "NUMSUB", prefix+ch); got != 0 {
						t.Errorf("%s has %d classic subscribers on %s; want sharded only", prefix+ch, got, node.addr())
					}
					if node.addr() == owner {
						continue
					}
					if got := numsub(t, node.addr(), "SHARDNUMSUB", prefix+ch); got != 0 {
						t.Errorf("%s has %d sharded subscribers on %s, which does not own slot %d", prefix+ch, got, node.addr(), broker.Slot(prefix+ch))
					}
				}
			}
		}

		spublish, publish := map[string]int64{}, map[string]int64{}
		for _, node := range c.nodes {
			spublish[node.addr()] = commandCalls(t, node.addr(), "spublish")
			publish[node.addr()] = commandCalls(t, node.addr(), "publish")
		}
		bp := n.b.(batchPublisher)
		var names []string
		var data [][]byte
		for _, ch := range chans {
			n.publish(t, ch, []byte(`"single"`))
			names = append(names, ch)
			data = append(data, []byte(`"batched"`))
		}
		if err := bp.PublishBatch(ctxT(t), names, data); err != nil {
			t.Fatal(err)
		}
		for _, ch := range chans {
			assertMessages(t, ch, rec.waitN(t, ch, 2), []string{`"single"`, `"batched"`})
		}
		for _, node := range c.nodes {
			a := node.addr()
			if d := commandCalls(t, a, "publish") - publish[a]; d != 0 {
				t.Errorf("%s ran PUBLISH %d times; the cluster broker must use SPUBLISH", a, d)
			}
			// Each master ran SPUBLISH for its own two channels, once alone
			// and once in the batch.
			if d := commandCalls(t, a, "spublish") - spublish[a]; d != 4 {
				t.Errorf("%s ran SPUBLISH %d times, want 4 (2 channels × Publish and PublishBatch)", a, d)
			}
		}
	})

	t.Run("UnsubscribeReleasesShardSubscription", func(t *testing.T) {
		prefix := newPrefix()
		rec := newRecorder()
		n := &node{b: openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix}, rec.handle),
			rec: rec, prefix: prefix, check: c.requireShardSubscribed}
		a, b := tagged("same", "a"), tagged("same", "b")
		owner := c.owner[broker.Slot(prefix+a)]
		n.subscribe(t, a, b)
		n.settle(t, a, b)
		if err := n.b.Unsubscribe(ctxT(t), a); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "SUNSUBSCRIBE of "+prefix+a, func() bool {
			return numsub(t, owner, "SHARDNUMSUB", prefix+a) == 0
		})
		// The other channel of the slot keeps its subscription.
		if got := numsub(t, owner, "SHARDNUMSUB", prefix+b); got != 1 {
			t.Fatalf("%s lost its subscription when %s left: SHARDNUMSUB %d", prefix+b, prefix+a, got)
		}
		n.publish(t, b, []byte(`"still"`))
		assertMessages(t, b, rec.waitN(t, b, 1), []string{`"still"`})
		if err := n.b.Unsubscribe(ctxT(t), b); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "the last channel of the slot to leave", func() bool {
			return numsub(t, owner, "SHARDNUMSUB", prefix+b) == 0
		})
	})

	t.Run("SubscribeReachesSlotOwner", func(t *testing.T) {
		// Many first subscriptions in distinct slots: each starts a shard.
		prefix := newPrefix()
		r := openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix}, newRecorder().handle)
		var names []string
		for i := 0; i < 200; i++ {
			ch := "owner:" + strconv.Itoa(i)
			if err := r.Subscribe(context.Background(), ch); err != nil {
				t.Fatalf("Subscribe(%q): %v", ch, err)
			}
			names = append(names, prefix+ch)
		}
		for _, name := range names {
			c.requireShardSubscribed(t, name)
		}
	})
}

func enough(m map[string][]string, n int) bool {
	for _, v := range m {
		if len(v) < n {
			return false
		}
	}
	return true
}

// TestCheckRedisURLHidesPassword: a URL that does not parse is refused
// without quoting it, since it may hold a password.
func TestCheckRedisURLHidesPassword(t *testing.T) {
	for _, u := range []string{
		"redis://user:s3cret-pass@127.0.0.1:notaport",
		"redis://:s3cret-pass@[::1",
		"redis://user:s3cret-pass@127.0.0.1:6379/x",
		"rediss://user:s3cret-pass@127.0.0.1:6379/99999999999999999999",
	} {
		err := broker.CheckRedisURL(u)
		if err == nil {
			t.Fatalf("%s: accepted", u)
		}
		if strings.Contains(err.Error(), "s3cret") {
			t.Errorf("the error shows the password: %v", err)
		}
	}
	if err := broker.CheckRedisURL("redis://user:s3cret-pass@127.0.0.1:6379/2"); err != nil {
		t.Errorf("a good URL: %v", err)
	}
}
