package broker_test

import (
	"bytes"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/wsgate/wsgate/broker"
)

// clusterSubscribers are the cluster checks of the bounded sharded
// subscriber connections, on the cluster of TestRedisCluster.
func clusterSubscribers(t *testing.T, c *redisCluster) {
	t.Run("ManyChannelsShareFewConnections", func(t *testing.T) {
		const perMaster, channels = 2, 10_000
		prefix := newPrefix()
		rec := newRecorder()
		r := openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix, ClusterSubscribers: perMaster}, rec.handle)
		n := &node{b: r, rec: rec, prefix: prefix}
		name := broker.SubscriberName(r)

		start := time.Now()
		slots := map[int]bool{}
		sample := map[string][]string{} // master → channels to publish on
		for i := 0; i < channels; i++ {
			ch := "many:" + strconv.Itoa(i)
			if err := r.Subscribe(ctxT(t), ch); err != nil {
				t.Fatalf("Subscribe(%q): %v", ch, err)
			}
			slot := broker.Slot(prefix + ch)
			slots[slot] = true
			if owner := c.owner[slot]; len(sample[owner]) < 10 {
				sample[owner] = append(sample[owner], ch)
			}
		}
		var conns map[string]int
		eventually(t, 30*time.Second, "10,000 sharded subscriptions on the masters", func() bool {
			var ssub int
			conns, ssub = c.subscribers(t, name)
			return ssub == channels
		})
		total := 0
		for _, a := range c.addrs() {
			// 10,000 channels fill every slot parity of every master.
			if conns[a] != perMaster {
				t.Errorf("%s: %d subscriber connections from the node, want %d", a, conns[a], perMaster)
			}
			total += conns[a]
		}
		t.Logf("%d channels in %d hash slots subscribed in %v: %d connections (%d masters × %d); one per slot would be %d",
			channels, len(slots), time.Since(start).Round(time.Millisecond), total, len(c.nodes), perMaster, len(slots))

		if len(sample) != len(c.nodes) {
			t.Fatalf("sample covers %d masters, want %d", len(sample), len(c.nodes))
		}
		for owner, chans := range sample {
			for _, ch := range chans {
				if got := rawPublish(t, owner, "SPUBLISH", prefix+ch, []byte(`"raw"`)); got != 1 {
					t.Fatalf("SPUBLISH %s on %s: %d receivers, want 1", prefix+ch, owner, got)
				}
				n.publish(t, ch, []byte(`"own"`))
			}
		}
		for _, chans := range sample {
			for _, ch := range chans {
				assertMessages(t, ch, rec.waitN(t, ch, 2), []string{`"raw"`, `"own"`})
			}
		}
	})

	t.Run("UnsubscribeAnswerIsNotADrop", func(t *testing.T) {
		// A channel left and subscribed again at once: the answer to the
		// SUNSUBSCRIBE comes while it is subscribed again, and must not be
		// taken for the master dropping it (which would resubscribe it and
		// call Reconnected, and leave a later unsubscription unsent).
		prefix := newPrefix()
		rec := newRecorder()
		var calls atomic.Int64
		r := openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix,
			Reconnected: func() { calls.Add(1) }}, rec.handle)
		n := &node{b: r, rec: rec, prefix: prefix, check: c.requireShardSubscribed}
		a, b := tagged("churn", "a"), tagged("churn", "b")
		owner := c.owner[broker.Slot(prefix+a)]
		n.subscribe(t, a, b)
		n.settle(t, a, b)
		for i := 0; i < 1000; i++ {
			if err := r.Unsubscribe(ctxT(t), b); err != nil {
				t.Fatal(err)
			}
			if err := r.Subscribe(ctxT(t), b); err != nil {
				t.Fatal(err)
			}
		}
		if err := r.Unsubscribe(ctxT(t), b); err != nil {
			t.Fatal(err)
		}
		n.fence(t, a) // every answer above has been read
		if got := numsub(t, owner, "SHARDNUMSUB", prefix+b); got != 0 {
			t.Errorf("%s has %d subscribers after the last Unsubscribe, want 0", prefix+b, got)
		}
		// A real loss: Reconnected is called once, for it alone.
		name := broker.SubscriberName(r)
		id := clientID(t, owner, name)
		if v := dialRESP(t, owner).do(t, "CLIENT", "KILL", "ID", id); v != int64(1) {
			t.Fatalf("CLIENT KILL ID %q: %v", id, v)
		}
		eventually(t, 10*time.Second, prefix+a+" subscribed again on a new connection", func() bool {
			now := clientID(t, owner, name)
			return now != "" && now != id && numsub(t, owner, "SHARDNUMSUB", prefix+a) == 1
		})
		eventually(t, 10*time.Second, "Reconnected after the connection was killed", func() bool { return calls.Load() > 0 })
		n.fence(t, a)
		if got := calls.Load(); got != 1 {
			t.Errorf("Reconnected was called %d times, want 1 (for the killed connection)", got)
		}
		if got := numsub(t, owner, "SHARDNUMSUB", prefix+b); got != 0 {
			t.Errorf("%s has %d subscribers after the reconnection, want 0", prefix+b, got)
		}
	})

	t.Run("DefaultIsOneConnectionPerMaster", func(t *testing.T) {
		prefix := newPrefix()
		rec := newRecorder()
		r := openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix}, rec.handle)
		for i := 0; i < 300; i++ {
			if err := r.Subscribe(ctxT(t), "one:"+strconv.Itoa(i)); err != nil {
				t.Fatal(err)
			}
		}
		var conns map[string]int
		eventually(t, 10*time.Second, "300 sharded subscriptions", func() bool {
			var ssub int
			conns, ssub = c.subscribers(t, broker.SubscriberName(r))
			return ssub == 300
		})
		for _, a := range c.addrs() {
			if conns[a] != broker.DefaultClusterSubscribers {
				t.Errorf("%s: %d subscriber connections, want %d", a, conns[a], broker.DefaultClusterSubscribers)
			}
		}
	})
}

// clientID is the CLIENT ID, on the master at addr, of a connection named
// name that holds sharded subscriptions, or "".
func clientID(t testing.TB, addr, name string) string {
	t.Helper()
	list, _ := dialRESP(t, addr).do(t, "CLIENT", "LIST").(string)
	for _, line := range strings.Split(list, "\n") {
		fields := map[string]string{}
		for _, f := range strings.Fields(line) {
			k, v, _ := strings.Cut(f, "=")
			fields[k] = v
		}
		if fields["name"] == name && fields["ssub"] != "0" {
			return fields["id"]
		}
	}
	return ""
}

func TestRedisClusterSubscribersOption(t *testing.T) {
	for _, tc := range []struct {
		name string
		opt  broker.RedisOptions
		want string
	}{
		{"negative", broker.RedisOptions{Cluster: true, Addrs: []string{"127.0.0.1:1"}, ClusterSubscribers: -1}, "-1 is not between 1 and 256"},
		{"too many", broker.RedisOptions{Cluster: true, Addrs: []string{"127.0.0.1:1"}, ClusterSubscribers: broker.MaxClusterSubscribers + 1}, "257 is not between 1 and 256"},
		{"standalone", broker.RedisOptions{URL: "redis://127.0.0.1:1", ClusterSubscribers: 2}, "only a Redis Cluster has them"},
		{"sentinel", broker.RedisOptions{MasterName: "m", Addrs: []string{"127.0.0.1:1"}, ClusterSubscribers: 2}, "only a Redis Cluster has them"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := broker.NewRedis(tc.opt, func(string, broker.Message) {})
			if err == nil {
				r.Close()
				t.Fatal("NewRedis accepted it")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}

// TestRedisClusterResharding moves a subscribed channel's slot to another
// master, then restarts a master under subscribed channels: the node's
// subscriptions follow, and messages keep arriving, without Subscribe
// being called again.
func TestRedisClusterResharding(t *testing.T) {
	// Masters are not failed by the others while the test stops one: the
	// cluster would stop serving every slot.
	c := startCluster(t, "--cluster-node-timeout", "60000")
	broker.SetClusterCheckInterval(t, 200*time.Millisecond)
	const perMaster = 2
	prefix := newPrefix()
	rec := newRecorder()
	reconnected := make(chan struct{}, 1)
	r := openRedis(t, broker.RedisOptions{Cluster: true, Addrs: c.addrs(), Prefix: prefix, ClusterSubscribers: perMaster,
		Reconnected: func() {
			select {
			case reconnected <- struct{}{}:
			default:
			}
		}}, rec.handle)
	n := &node{b: r, rec: rec, prefix: prefix, check: c.requireShardSubscribed}
	name := broker.SubscriberName(r)
	// waitReconnected waits for a call of Reconnected since the last
	// drainReconnected.
	drainReconnected := func() {
		select {
		case <-reconnected:
		default:
		}
	}
	waitReconnected := func(t *testing.T) {
		t.Helper()
		select {
		case <-reconnected:
		case <-time.After(30 * time.Second):
			t.Fatal("Reconnected was not called within 30s")
		}
	}

	// Forty channels: several on every master, and on both connections of
	// each.
	var chans []string
	for i := 0; i < 40; i++ {
		chans = append(chans, "move:"+strconv.Itoa(i))
	}
	n.subscribe(t, chans...)
	n.settle(t, chans...)
	moving := chans[0]
	slot := broker.Slot(prefix + moving)
	from := c.owner[slot]
	to := c.addrs()[0]
	if to == from {
		to = c.addrs()[1]
	}
	// Another channel on the same connection, which stays.
	stays := ""
	for _, ch := range chans[1:] {
		if s := broker.Slot(prefix + ch); s != slot && c.owner[s] == from && s%perMaster == slot%perMaster {
			stays = ch
			break
		}
	}
	if stays == "" {
		t.Fatal("no other channel on the moving channel's connection")
	}

	delivered := map[string]int{}
	// deliver publishes on every channel, through the broker and from an
	// application sending SPUBLISH to the slot's master, and waits for both.
	deliver := func(t *testing.T) {
		t.Helper()
		for _, ch := range chans {
			delivered[ch] += 2
			owner := c.owner[broker.Slot(prefix+ch)]
			eventually(t, 10*time.Second, "SPUBLISH "+prefix+ch+" to reach the node", func() bool {
				return rawPublish(t, owner, "SPUBLISH", prefix+ch, []byte(`"raw"`)) == 1
			})
			eventually(t, 10*time.Second, "the broker's publish to "+ch, func() bool {
				return r.Publish(ctxT(t), ch, []byte(`"own"`)) == nil
			})
		}
		for _, ch := range chans {
			got := rec.waitN(t, ch, delivered[ch])
			if last := got[len(got)-1]; !bytes.Equal(last, []byte(`"own"`)) {
				t.Fatalf("%s: last message %s, want \"own\"", ch, last)
			}
		}
	}
	bounded := func(t *testing.T) {
		t.Helper()
		var conns map[string]int
		var ssub int
		defer func() {
			if t.Failed() {
				t.Logf("ssub %d, channels %d, conns %v", ssub, len(chans), conns)
				for _, ch := range chans {
					t.Logf("%s on %s: %d", ch, c.owner[broker.Slot(prefix+ch)], numsub(t, c.owner[broker.Slot(prefix+ch)], "SHARDNUMSUB", prefix+ch))
				}
			}
		}()
		eventually(t, 10*time.Second, "every channel subscribed once", func() bool {
			conns, ssub = c.subscribers(t, name)
			return ssub == len(chans)
		})
		for a, k := range conns {
			if k > perMaster {
				t.Errorf("%s: %d subscriber connections, want at most %d", a, k, perMaster)
			}
		}
		t.Logf("subscriber connections per master: %v", conns)
	}

	t.Run("SlotMigration", func(t *testing.T) {
		drainReconnected()
		c.migrateSlot(t, slot, to)
		moved := time.Now()
		eventually(t, 10*time.Second, prefix+moving+" subscribed on its new master "+to, func() bool {
			return numsub(t, to, "SHARDNUMSUB", prefix+moving) == 1
		})
		t.Logf("slot %d moved from %s to %s; subscribed there %v later", slot, from, to, time.Since(moved).Round(time.Microsecond))
		if got := numsub(t, from, "SHARDNUMSUB", prefix+stays); got != 1 {
			t.Errorf("%s, on the moving channel's connection, has %d subscribers on %s, want 1", prefix+stays, got, from)
		}
		// What was published during the move could have been missed.
		waitReconnected(t)
		deliver(t)
		bounded(t)
	})

	t.Run("MasterRestart", func(t *testing.T) {
		var victim *redisServer
		for _, s := range c.nodes {
			if s.addr() == from {
				victim = s
			}
		}
		var theirs []string
		for _, ch := range chans {
			if c.owner[broker.Slot(prefix+ch)] == from {
				theirs = append(theirs, ch)
			}
		}
		drainReconnected()
		victim.kill()
		// While the master is down: one of its channels is left, and a new
		// one is subscribed, which the node makes once the master is back.
		gone := theirs[len(theirs)-1]
		theirs = theirs[:len(theirs)-1]
		chans = slices.DeleteFunc(chans, func(ch string) bool { return ch == gone })
		if err := r.Unsubscribe(ctxT(t), gone); err != nil && !errors.Is(err, broker.ErrUnavailable) {
			t.Fatalf("Unsubscribe(%q) while its master is down: %v", gone, err)
		}
		during := ""
		for i := 0; during == ""; i++ {
			if ch := "during:" + strconv.Itoa(i); c.owner[broker.Slot(prefix+ch)] == from {
				during = ch
			}
		}
		if err := r.Subscribe(ctxT(t), during); err != nil && !errors.Is(err, broker.ErrUnavailable) {
			t.Fatalf("Subscribe(%q) while its master is down: %v", during, err)
		}
		theirs = append(theirs, during)
		chans = append(chans, during)
		victim.start()
		restarted := time.Now()
		c.waitOK(t, victim)
		ok := time.Now()
		// Reconnected comes once the subscriptions are in effect.
		waitReconnected(t)
		for _, ch := range theirs {
			if got := numsub(t, from, "SHARDNUMSUB", prefix+ch); got != 1 {
				t.Errorf("%s has %d subscribers on %s when Reconnected is called, want 1", prefix+ch, got, from)
			}
		}
		t.Logf("%d channels subscribed again on %s %v after its restart, %v after its cluster_state:ok", len(theirs), from,
			time.Since(restarted).Round(time.Millisecond), time.Since(ok).Round(time.Millisecond))
		if got := numsub(t, from, "SHARDNUMSUB", prefix+gone); got != 0 {
			t.Errorf("%s, left while its master was down, has %d subscribers after the restart", prefix+gone, got)
		}
		deliver(t)
		bounded(t)
	})

	t.Run("MasterHung", func(t *testing.T) {
		// The master goes away and something that accepts connections and
		// never answers takes its port: each attempt to subscribe there
		// costs the fixer a timeout, and must not hold up the node's
		// subscriptions on the other masters meanwhile.
		var victim *redisServer
		for _, s := range c.nodes {
			if s.addr() == to {
				victim = s
			}
		}
		var theirs []string
		conns := map[[2]any]bool{} // (master, slot mod perMaster) with a channel
		for _, ch := range chans {
			s := broker.Slot(prefix + ch)
			if c.owner[s] == to {
				theirs = append(theirs, ch)
			}
			conns[[2]any{c.owner[s], s % perMaster}] = true
		}
		// A channel of another master, on a connection that stays open
		// whether it is subscribed or not.
		other := ""
		for i := 0; other == ""; i++ {
			ch := "other:" + strconv.Itoa(i)
			s := broker.Slot(prefix + ch)
			if c.owner[s] != to && conns[[2]any{c.owner[s], s % perMaster}] {
				other = ch
			}
		}
		errorsBefore := r.Stats().Errors
		victim.kill()
		stop := silentServer(t, victim.addr())
		eventually(t, 10*time.Second, "the node to notice the lost connections", func() bool {
			return r.Stats().Errors > errorsBefore
		})
		var slowest time.Duration
		calls := 0
		for start := time.Now(); time.Since(start) < 3*time.Second; calls++ {
			began := time.Now()
			if err := r.Subscribe(ctxT(t), other); err != nil {
				t.Fatalf("Subscribe(%q) on a healthy master: %v", other, err)
			}
			if err := r.Unsubscribe(ctxT(t), other); err != nil {
				t.Fatalf("Unsubscribe(%q) on a healthy master: %v", other, err)
			}
			slowest = max(slowest, time.Since(began))
		}
		t.Logf("%d subscribe and unsubscribe pairs on a healthy master in 3s while %s hung; the slowest took %v", calls, to, slowest)
		// A dial or a read under the broker's lock would hold a pair for
		// about a second (ioTimeout).
		if slowest > 750*time.Millisecond {
			t.Errorf("a subscribe and unsubscribe pair on a healthy master took %v while another master hung", slowest)
		}

		stop()
		victim.start()
		c.waitOK(t, victim)
		eventually(t, 30*time.Second, "the master's channels subscribed again", func() bool {
			for _, ch := range theirs {
				if numsub(t, to, "SHARDNUMSUB", prefix+ch) != 1 {
					return false
				}
			}
			return true
		})
		deliver(t)
		bounded(t)
	})

	t.Run("SilentMasterReplaced", func(t *testing.T) {
		// A master stops answering without closing anything (a host that
		// lost power), and another takes over one of its slots, as a
		// promoted replica would: nothing tells the node, which finds it
		// in the slot table.
		third := ""
		for _, a := range c.addrs() {
			if a != from && a != to {
				third = a
			}
		}
		var victim *redisServer
		for _, s := range c.nodes {
			if s.addr() == third {
				victim = s
			}
		}
		var theirs []string
		for _, ch := range chans {
			if c.owner[broker.Slot(prefix+ch)] == third {
				theirs = append(theirs, ch)
			}
		}
		if len(theirs) < 2 {
			t.Fatalf("%s holds %d channels, want 2 or more", third, len(theirs))
		}
		taken := theirs[0]
		slot := broker.Slot(prefix + taken)
		ids := map[string]string{}
		for _, a := range c.addrs() {
			ids[a], _ = dialRESP(t, a).do(t, "CLUSTER", "MYID").(string)
		}
		errorsBefore := r.Stats().Errors
		victim.Freeze()
		t.Cleanup(victim.Thaw)
		frozen := time.Now()
		s := strconv.Itoa(slot)
		newOwner := dialRESP(t, to)
		for _, args := range [][]string{{"IMPORTING", ids[third]}, {"NODE", ids[to]}} {
			if v := newOwner.do(t, append([]string{"CLUSTER", "SETSLOT", s}, args...)...); v != "OK" {
				t.Fatalf("CLUSTER SETSLOT %s %v on %s: %v", s, args, to, v)
			}
		}
		if v := dialRESP(t, from).do(t, "CLUSTER", "SETSLOT", s, "NODE", ids[to]); v != "OK" {
			t.Fatalf("CLUSTER SETSLOT %s NODE on %s: %v", s, from, v)
		}
		c.owner[slot] = to
		eventually(t, 10*time.Second, prefix+taken+" subscribed on "+to+", which took its slot over", func() bool {
			return numsub(t, to, "SHARDNUMSUB", prefix+taken) == 1
		})
		t.Logf("slot %d taken from the frozen %s by %s; %s subscribed there %v after the freeze", slot, third, to, taken,
			time.Since(frozen).Round(time.Millisecond))
		// The connections to the frozen master answer no PING: the node
		// gives them up (and tries again until the master answers).
		eventually(t, 10*time.Second, "the frozen master's connections given up", func() bool {
			return r.Stats().Errors > errorsBefore
		})
		if got := rawPublish(t, to, "SPUBLISH", prefix+taken, []byte(`"taken"`)); got != 1 {
			t.Fatalf("SPUBLISH %s on %s: %d receivers, want 1", prefix+taken, to, got)
		}
		got := rec.waitN(t, taken, delivered[taken]+1)
		delivered[taken]++
		if last := got[len(got)-1]; string(last) != `"taken"` {
			t.Fatalf("%s: last message %s, want \"taken\"", taken, last)
		}

		victim.Thaw()
		c.waitOK(t, victim)
		eventually(t, 30*time.Second, "the thawed master's channels subscribed on it", func() bool {
			for _, ch := range theirs[1:] {
				if numsub(t, third, "SHARDNUMSUB", prefix+ch) != 1 {
					return false
				}
			}
			return numsub(t, third, "SHARDNUMSUB", prefix+taken) == 0
		})
		deliver(t)
		bounded(t)
	})
}
