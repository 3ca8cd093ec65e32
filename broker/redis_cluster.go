package broker

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Sharded pub/sub on a Redis Cluster. An SSUBSCRIBE may only name channels
// of one hash slot, and only on the master that owns the slot; a
// connection may still hold channels of many slots of its master, one
// SSUBSCRIBE each. The broker keeps a fixed number of subscriber
// connections per master (RedisOptions.ClusterSubscribers) and puts a
// channel on connection slot mod n of its slot's master, so a node uses at
// most masters × n connections however many channels it listens to.
//
// go-redis's PubSub resubscribes after a reconnect with one SSUBSCRIBE of
// every channel it holds, which a connection holding several slots has
// refused (CROSSSLOT), and it routes by the first channel's slot. So the
// broker does not let a connection reconnect by itself: a lost connection
// is closed, and its channels are placed again, from a fresh slot table,
// by a background fixer. The fixer also places again the channels that
// Redis dropped itself: a master that loses a slot (resharding, failover)
// sends sunsubscribe for each channel of it, and an SSUBSCRIBE that
// reached the wrong master is answered MOVED with the right one. What
// nothing reports (a master gone silent, a replica that took its slots
// over) a periodic check finds: see Redis.check.

// DefaultClusterSubscribers is the number of sharded subscriber
// connections per cluster master when RedisOptions.ClusterSubscribers is
// zero.
const DefaultClusterSubscribers = 1

// MaxClusterSubscribers bounds RedisOptions.ClusterSubscribers.
const MaxClusterSubscribers = 256

const numSlots = 16384

// clusterCheckInterval is how often the node reads the cluster's slot
// table and PINGs its subscriber connections (see Redis.check). A
// variable for tests.
var clusterCheckInterval = 5 * time.Second

// subKey names a subscriber connection: its master and its number there.
type subKey struct {
	addr string
	n    int
}

// subConn is one sharded subscriber connection. Its fields but heard are
// guarded by Redis.mu.
type subConn struct {
	key    subKey
	ps     *redis.PubSub
	names  map[string]struct{} // the prefixed channels subscribed on it
	unsubs map[string]int      // SUNSUBSCRIBEs sent on it and not yet answered, by channel
	up     bool                // a subscription was confirmed on it
	dead   bool                // closed; its channels were handed to the fixer
	pinged bool                // a check has PINGed it
	heard  atomic.Bool         // something arrived since the last check (set by its reader)
	pongs  chan string         // PONG payloads, for resynced
}

// clusterSubs is the cluster broker's subscription state, guarded by
// Redis.mu.
type clusterSubs struct {
	perMaster int
	every     time.Duration // clusterCheckInterval when the broker was made
	conns     map[subKey]*subConn
	placed    map[string]*subConn      // prefixed channel → its connection
	lost      map[string]struct{}      // prefixed channels waiting to be placed (again)
	owner     []string                 // slot → master address; nil until loaded
	moved     map[int]string           // slot → master, from MOVED replies since the last load
	down      map[string]bool          // masters the last connection attempt failed to reach
	nodes     map[string]*redis.Client // master address → client of its subscriber connections
	fix       chan struct{}            // wakes the fixer (capacity 1)
	resync    bool                     // live subscriptions were lost: call Reconnected once all are back
	pings     uint64                   // PINGs sent by resynced (the fixer's goroutine only)
}

func (c *clusterSubs) init(perMaster int) {
	c.perMaster = perMaster
	c.every = clusterCheckInterval
	c.conns = map[subKey]*subConn{}
	c.placed = map[string]*subConn{}
	c.lost = map[string]struct{}{}
	c.moved = map[int]string{}
	c.down = map[string]bool{}
	c.nodes = map[string]*redis.Client{}
	c.fix = make(chan struct{}, 1)
}

// subscriberName is the CLIENT SETNAME of the node's subscriber
// connections, so an operator can tell them apart in CLIENT LIST.
func (r *Redis) subscriberName() string { return "wsgate-sub-" + r.node }

// kick wakes the fixer.
func (r *Redis) kick() {
	select {
	case r.cs.fix <- struct{}{}:
	default:
	}
}

// shardSubscribe subscribes the node to a prefixed channel. Called with
// r.mu held. A channel it cannot subscribe now is left to the fixer.
func (r *Redis) shardSubscribe(ctx context.Context, name string) error {
	if r.cs.owner == nil {
		if err := r.loadSlots(ctx); err != nil {
			r.cs.lost[name] = struct{}{}
			r.kick()
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
	}
	if err := r.place(ctx, []string{name}, nil); err != nil {
		r.kick()
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// shardUnsubscribe drops the node's subscription to a prefixed channel.
// Called with r.mu held. The last channel of a connection closes it.
func (r *Redis) shardUnsubscribe(ctx context.Context, name string) error {
	delete(r.cs.lost, name)
	sc := r.cs.placed[name]
	if sc == nil {
		return nil
	}
	delete(r.cs.placed, name)
	delete(sc.names, name)
	if len(sc.names) == 0 {
		r.closeSub(sc)
		return nil
	}
	// Its answer must not be taken for the master dropping the channel,
	// should the channel be subscribed again before it comes.
	sc.unsubs[name]++
	if err := sc.ps.SUnsubscribe(ctx, name); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// loadSlots reads the slot table (CLUSTER SLOTS) from any node. Called
// with r.mu held, or by the fixer before it takes it.
func (r *Redis) loadSlots(ctx context.Context) error {
	owner, err := r.readSlots(ctx)
	if err != nil {
		return err
	}
	r.cs.owner = owner
	return nil
}

func (r *Redis) readSlots(ctx context.Context) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, ioTimeout)
	defer cancel()
	ranges, err := r.cluster.ClusterSlots(ctx).Result()
	if err != nil {
		return nil, fmt.Errorf("reading the cluster's slots: %w", err)
	}
	owner := make([]string, numSlots)
	for _, rg := range ranges {
		if len(rg.Nodes) == 0 || rg.Start < 0 || rg.End >= numSlots {
			continue
		}
		for s := rg.Start; s <= rg.End; s++ {
			owner[s] = rg.Nodes[0].Addr
		}
	}
	return owner, nil
}

// place subscribes prefixed channels on their connections, one SSUBSCRIBE
// per slot. Called with r.mu held and the slot table loaded. The fixer
// passes ready, the connections it made without the lock, and a missing
// connection that is not among them is not dialled: its channels wait for
// the next round. Subscribe passes nil, and a missing connection is
// dialled unless its master is known to be unreachable: it does not hold
// the lock for a dial that will fail. What place cannot place is left in
// r.cs.lost; the error is the first failure.
func (r *Redis) place(ctx context.Context, names []string, ready map[subKey]*redis.PubSub) error {
	bySlot := map[int][]string{}
	for _, name := range names {
		s := Slot(name)
		bySlot[s] = append(bySlot[s], name)
	}
	var first error
	for slot, group := range bySlot {
		if err := r.placeSlot(ctx, slot, group, ready); err != nil {
			for _, name := range group {
				r.cs.lost[name] = struct{}{}
			}
			if first == nil {
				first = err
			}
		}
	}
	return first
}

func (r *Redis) placeSlot(ctx context.Context, slot int, names []string, ready map[subKey]*redis.PubSub) error {
	addr := r.cs.owner[slot]
	if addr == "" {
		return fmt.Errorf("hash slot %d has no master", slot)
	}
	key := subKey{addr, slot % r.cs.perMaster}
	sc := r.cs.conns[key]
	fresh := sc == nil
	if fresh {
		ps := ready[key]
		if ps != nil {
			delete(ready, key)
		} else if ready != nil {
			// The fixer dials only without the lock: a channel lost
			// since it connected waits for its next round.
			return fmt.Errorf("no connection to master %s of hash slot %d yet", addr, slot)
		} else if r.cs.down[addr] {
			return fmt.Errorf("master %s of hash slot %d is unreachable", addr, slot)
		} else {
			ps = r.nodeClient(addr).SSubscribe(ctx)
		}
		sc = &subConn{key: key, ps: ps, names: map[string]struct{}{}, unsubs: map[string]int{}, pongs: make(chan string, 4)}
	}
	if err := sc.ps.SSubscribe(ctx, names...); err != nil {
		if fresh {
			sc.ps.Close()
			r.cs.down[addr] = true
		} else {
			r.dropSub(sc, err)
		}
		return err
	}
	delete(r.cs.down, addr)
	for _, name := range names {
		if old := r.cs.placed[name]; old != nil && old != sc {
			delete(old.names, name)
		}
		r.cs.placed[name] = sc
		sc.names[name] = struct{}{}
		delete(r.cs.lost, name)
	}
	if fresh {
		// Reading starts after the first SSUBSCRIBE went out: the stream
		// is connected and subscribed before anything waits on it.
		r.cs.conns[key] = sc
		r.wg.Add(1)
		go r.receiveShard(sc)
	}
	return nil
}

// nodeClient is the client of the subscriber connections to one master.
// Called with r.mu held.
func (r *Redis) nodeClient(addr string) *redis.Client {
	if c := r.cs.nodes[addr]; c != nil {
		return c
	}
	o := r.opt
	c := redis.NewClient(&redis.Options{Addr: addr, Username: o.Username, Password: o.Password, TLSConfig: o.TLS,
		ClientName: r.subscriberName(), MaxRetries: -1, DialerRetries: 1, ContextTimeoutEnabled: true, PoolSize: 1,
		DialTimeout: ioTimeout, ReadTimeout: ioTimeout, WriteTimeout: ioTimeout, PoolTimeout: ioTimeout})
	r.cs.nodes[addr] = c
	return c
}

// closeSub closes a connection that holds no channel. Called with r.mu
// held.
func (r *Redis) closeSub(sc *subConn) {
	if sc.dead {
		return
	}
	sc.dead = true
	if r.cs.conns[sc.key] == sc {
		delete(r.cs.conns, sc.key)
	}
	sc.ps.Close()
}

// dropSub closes a connection that failed and hands its channels to the
// fixer, which places them again from a fresh slot table. Called with
// r.mu held.
func (r *Redis) dropSub(sc *subConn, cause error) {
	if sc.dead || r.closed.Load() {
		return
	}
	if sc.up {
		r.log.Warn("redis cluster subscriber connection lost: subscribing its channels again", "master", sc.key.addr,
			"channels", len(sc.names), "error", cause)
		r.failures.Add(1)
		r.cs.resync = r.cs.resync || len(sc.names) > 0
	} else {
		// A connection that never worked: the fixer is trying again (a
		// master restarting answers CLUSTERDOWN for a while).
		r.log.Debug("redis cluster subscriber connection refused", "master", sc.key.addr, "error", cause)
	}
	for name := range sc.names {
		if r.cs.placed[name] == sc {
			delete(r.cs.placed, name)
			r.cs.lost[name] = struct{}{}
		}
	}
	clear(sc.names)
	r.closeSub(sc)
	r.kick()
}

// receiveShard reads one subscriber connection until it is closed or
// fails.
func (r *Redis) receiveShard(sc *subConn) {
	defer r.wg.Done()
	for {
		msg, err := sc.ps.Receive(r.ctx)
		if err == nil {
			sc.heard.Store(true)
		}
		if err != nil {
			if r.closed.Load() {
				return
			}
			r.mu.Lock()
			if sc.dead {
				r.mu.Unlock()
				return
			}
			var reply redis.Error
			if errors.As(err, &reply) {
				if slot, addr, ok := movedTo(err.Error()); ok {
					// An SSUBSCRIBE reached a master that no longer owns the
					// slot: its channels go to the master named.
					r.cs.moved[slot] = addr
					r.unplaceSlot(sc, slot)
					// A SUNSUBSCRIBE of the slot answered so has no other
					// answer to wait for.
					for name := range sc.unsubs {
						if Slot(name) == slot {
							delete(sc.unsubs, name)
						}
					}
					r.mu.Unlock()
					continue
				}
			}
			// The connection failed, or Redis refused a subscription for
			// a reason that does not name its slot (CLUSTERDOWN while a
			// master is being replaced, say): start this connection over.
			r.dropSub(sc, err)
			r.mu.Unlock()
			return
		}
		switch m := msg.(type) {
		case *redis.Message:
			r.deliver(m)
		case *redis.Pong:
			select {
			case sc.pongs <- m.Payload:
			default:
			}
		case *redis.Subscription:
			if m.Kind == "ssubscribe" {
				r.mu.Lock()
				r.confirmed(m.Channel)
				sc.up = true
				r.mu.Unlock()
				continue
			}
			if m.Kind != "sunsubscribe" {
				continue
			}
			// Either the answer to our SUNSUBSCRIBE or the master dropping a
			// channel of a slot it lost: place that one again.
			r.mu.Lock()
			if n := sc.unsubs[m.Channel]; n > 0 {
				if n == 1 {
					delete(sc.unsubs, m.Channel)
				} else {
					sc.unsubs[m.Channel] = n - 1
				}
			} else if !sc.dead && r.cs.placed[m.Channel] == sc {
				delete(r.cs.placed, m.Channel)
				delete(sc.names, m.Channel)
				r.cs.lost[m.Channel] = struct{}{}
				r.cs.resync = true
				r.kick()
			}
			r.mu.Unlock()
		}
	}
}

// unplaceSlot hands the channels of one slot on sc to the fixer. Called
// with r.mu held.
func (r *Redis) unplaceSlot(sc *subConn, slot int) {
	for name := range sc.names {
		if Slot(name) == slot {
			delete(sc.names, name)
			delete(r.cs.placed, name)
			r.cs.lost[name] = struct{}{}
		}
	}
	r.kick()
}

// movedTo reads a "MOVED <slot> <host:port>" error reply.
func movedTo(msg string) (int, string, bool) {
	f := strings.Fields(msg)
	if len(f) != 3 || f[0] != "MOVED" {
		return 0, "", false
	}
	slot, err := strconv.Atoi(f[1])
	if err != nil || slot < 0 || slot >= numSlots {
		return 0, "", false
	}
	return slot, f[2], true
}

// fixer places the lost channels again: after a connection failed, after
// a master dropped a slot's channels, and after a subscription could not
// be made. Each round reads the slot table afresh (a replica may have
// taken over, a slot may have moved), applies what MOVED replies said
// since, and subscribes; what still fails is tried again. Rounds are
// reconnectPause apart at least, so masters that disagree about a slot
// for a while, or one that refuses every subscription, are not asked in
// a tight loop.
func (r *Redis) fixer() {
	defer r.wg.Done()
	tick := time.NewTicker(r.cs.every)
	defer tick.Stop()
	for {
		select {
		case <-r.cs.fix:
		case <-tick.C:
			r.check()
		case <-r.ctx.Done():
			return
		}
		for r.fixRound() {
			if !r.pause(reconnectPause) {
				return
			}
		}
		r.resynced()
		if !r.pause(reconnectPause) {
			return
		}
	}
}

// check finds what the node would not be told of: a master that died
// without closing its connections (a host that lost power, a network
// partition) and whose slots a replica has taken over. It reads the slot
// table, and takes the channels of every slot whose master changed off
// their connections, for the fixer to place again; and it drops the
// connections that have not answered the PING of the previous check.
// Called by the fixer, every clusterCheckInterval.
func (r *Redis) check() {
	owner, err := r.readSlots(r.ctx)
	r.mu.Lock()
	if r.closed.Load() {
		r.mu.Unlock()
		return
	}
	if err == nil && r.cs.owner != nil {
		changed := map[int]bool{}
		for s, a := range owner {
			if a != "" && a != r.cs.owner[s] {
				changed[s] = true
			}
		}
		if len(changed) > 0 {
			r.cs.owner = owner
			for name, sc := range r.cs.placed {
				if changed[Slot(name)] {
					delete(r.cs.placed, name)
					delete(sc.names, name)
					r.cs.lost[name] = struct{}{}
					r.cs.resync = true
				}
			}
			r.kick()
		}
	}
	var ping []*subConn
	for _, sc := range r.cs.conns {
		if sc.pinged && !sc.heard.Load() {
			r.dropSub(sc, errors.New("no answer to PING"))
			continue
		}
		sc.pinged = true
		sc.heard.Store(false)
		ping = append(ping, sc)
	}
	r.mu.Unlock()
	for _, sc := range ping {
		ctx, cancel := context.WithTimeout(r.ctx, ioTimeout)
		sc.ps.Ping(ctx, "wsgate-check")
		cancel()
	}
	r.resynced()
}

// resynced calls RedisOptions.Reconnected once every subscription that was
// lost while it was live (its connection failed, its slot moved) is made
// again: what was published meanwhile never reached the node. A PING on
// each connection, answered after the SSUBSCRIBEs sent before it, proves
// them in effect. Called by the fixer when nothing is left to place, and
// by each check (a connection that did not answer in time is tried again
// there).
func (r *Redis) resynced() {
	r.mu.Lock()
	if !r.cs.resync || len(r.cs.lost) > 0 || r.closed.Load() {
		r.mu.Unlock()
		return
	}
	conns := make([]*subConn, 0, len(r.cs.conns))
	for _, sc := range r.cs.conns {
		conns = append(conns, sc)
	}
	r.mu.Unlock()
	for _, sc := range conns {
		if !r.roundTrip(sc) {
			return
		}
	}
	r.mu.Lock()
	done := r.cs.resync && len(r.cs.lost) == 0 && !r.closed.Load()
	if done {
		r.cs.resync = false
	}
	r.mu.Unlock()
	if f := r.opt.Reconnected; done && f != nil {
		r.wg.Go(f)
	}
}

// roundTrip PINGs sc and waits up to ioTimeout for its PONG.
func (r *Redis) roundTrip(sc *subConn) bool {
	ctx, cancel := context.WithTimeout(r.ctx, ioTimeout)
	defer cancel()
	r.cs.pings++
	token := "wsgate-resync-" + strconv.FormatUint(r.cs.pings, 10)
	if sc.ps.Ping(ctx, token) != nil {
		return false
	}
	for {
		select {
		case p := <-sc.pongs:
			if p == token {
				return true
			}
		case <-ctx.Done():
			return false
		}
	}
}

// fixRound is one round of the fixer; it reports whether channels are
// still waiting. It connects the connections it needs before it takes
// r.mu: a master that does not answer costs it a dial timeout, and
// Subscribe and Unsubscribe meanwhile nothing.
func (r *Redis) fixRound() bool {
	r.mu.Lock()
	waiting := len(r.cs.lost)
	r.mu.Unlock()
	if waiting == 0 || r.closed.Load() {
		return false
	}
	// A slot that moved is also one the commands' client must learn of.
	r.cluster.ReloadState(r.ctx)
	owner, err := r.readSlots(r.ctx)

	r.mu.Lock()
	if r.closed.Load() {
		r.mu.Unlock()
		return false
	}
	if err == nil {
		r.cs.owner = owner
	} else {
		r.log.Debug("redis cluster: slot table unavailable, subscribing from the last one", "error", err)
	}
	if r.cs.owner == nil {
		r.mu.Unlock()
		return true
	}
	for slot, addr := range r.cs.moved {
		r.cs.owner[slot] = addr
	}
	clear(r.cs.moved)
	need := map[subKey]*redis.Client{}
	for name := range r.cs.lost {
		slot := Slot(name)
		key := subKey{r.cs.owner[slot], slot % r.cs.perMaster}
		if key.addr != "" && r.cs.conns[key] == nil {
			need[key] = r.nodeClient(key.addr)
		}
	}
	r.mu.Unlock()

	ctx, cancel := context.WithTimeout(r.ctx, 2*ioTimeout)
	defer cancel()
	ready := map[subKey]*redis.PubSub{}
	reached := map[string]bool{}
	for key, c := range need {
		if ok, tried := reached[key.addr]; tried && !ok {
			continue
		}
		ps := c.SSubscribe(ctx)
		if err := ps.Ping(ctx, "wsgate-connect"); err != nil {
			ps.Close()
			reached[key.addr] = false
			continue
		}
		reached[key.addr] = true
		ready[key] = ps
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	defer func() {
		for _, ps := range ready {
			ps.Close()
		}
	}()
	if r.closed.Load() {
		return false
	}
	for addr, ok := range reached {
		if ok {
			delete(r.cs.down, addr)
		} else {
			r.cs.down[addr] = true
		}
	}
	names := make([]string, 0, len(r.cs.lost))
	for name := range r.cs.lost {
		names = append(names, name)
	}
	if err := r.place(ctx, names, ready); err != nil {
		r.log.Debug("redis cluster: subscriptions still waiting", "channels", len(r.cs.lost), "error", err)
	}
	// Connections whose every channel moved elsewhere.
	for _, sc := range r.cs.conns {
		if len(sc.names) == 0 {
			r.closeSub(sc)
		}
	}
	return len(r.cs.lost) > 0
}

// closeCluster closes the subscriber connections and their clients.
// Called with r.mu held, after r.closed is set.
func (r *Redis) closeCluster() {
	for _, sc := range r.cs.conns {
		r.closeSub(sc)
	}
	for _, c := range r.cs.nodes {
		c.Close()
	}
}
