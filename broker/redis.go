package broker

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// RedisOptions configures the Redis broker. Set URL for a standalone
// server; Addrs with MasterName for Sentinel; Addrs with Cluster for a
// Redis Cluster (sharded pub/sub: SSUBSCRIBE/SPUBLISH, Redis 7).
type RedisOptions struct {
	// URL is redis://[[user]:password@]host:port[/db] or rediss://….
	URL string
	// Addrs are Sentinel or Cluster node addresses (host:port).
	Addrs []string
	// MasterName selects Sentinel.
	MasterName string
	// Cluster selects Redis Cluster.
	Cluster bool
	// Username and Password authenticate (also taken from URL).
	Username, Password string
	// TLS enables TLS (rediss:// in a URL does too).
	TLS *tls.Config
	// Prefix is put in front of every channel name on the Redis side, so
	// several deployments can share one Redis. A plain
	// `PUBLISH <prefix><channel> <json>` reaches subscribers.
	Prefix string
	// Logger may be nil.
	Logger *slog.Logger
	// Answer, if not nil, answers the control requests of the nodes that
	// share the Redis (see Gatherer), this one's included; it may be
	// called from several goroutines at once. Nil: the node neither
	// answers nor gathers.
	Answer func(req []byte) []byte
	// Reconnected, if not nil, is called (on a goroutine of its own) each
	// time Redis is reachable again after an outage, once the
	// subscriptions are back: what was published meanwhile never reached
	// this node through pub/sub. On a Redis Cluster: each time the
	// subscriptions lost while live (a master's connection failed, a slot
	// moved to another master) are all made again.
	Reconnected func()
	// ClusterSubscribers is the number of sharded subscriber connections
	// the node keeps to each cluster master, 1 to MaxClusterSubscribers;
	// a channel uses connection (hash slot mod ClusterSubscribers) of its
	// slot's master. Cluster only. Default: DefaultClusterSubscribers (1).
	ClusterSubscribers int
}

// How the broker meets a Redis that is down. Every dial, read, write and
// wait for a pooled connection is bounded by ioTimeout, and a command gets
// one attempt (a PUBLISH is not idempotent, and retrying a dead server only
// holds the publisher longer): a Redis that stops answering costs the
// commands in flight at most about ioTimeout. The first failure marks Redis
// down; from then on Publish answers ErrUnavailable at once, without I/O,
// and the rooms hub delivers on this node. A background probe, every
// probeInterval, clears the mark when the subscription stream has
// reconnected and a PING goes through.
const (
	ioTimeout      = time.Second
	probeInterval  = 100 * time.Millisecond
	reconnectPause = 100 * time.Millisecond
)

// errDown is what Publish answers while Redis is known to be down.
var errDown = fmt.Errorf("%w: redis is unreachable (reconnecting in the background)", ErrUnavailable)

// Redis is a broker on Redis pub/sub.
type Redis struct {
	opt     RedisOptions
	h       Handler
	client  redis.UniversalClient
	cluster *redis.ClusterClient
	log     *slog.Logger

	// down is set from the first failure to reach Redis until the probe
	// finds it back. Standalone and Sentinel only: a cluster's masters
	// fail one at a time, and one mark for all would stop the healthy ones.
	down   atomic.Bool
	closed atomic.Bool     // set under mu, read anywhere
	ctx    context.Context // cancelled by Close
	cancel context.CancelFunc
	wake   chan struct{} // markDown → probe
	pongs  chan string   // PONG payloads from the standalone stream
	probes uint64        // PINGs sent by the probe (its goroutine only)

	node    string                // this node's id, for control replies
	pmu     sync.Mutex            // guards pending
	pending map[string]*gathering // control requests awaiting answers, by id

	reconnects, failures atomic.Uint64 // for Stats

	nowMu sync.RWMutex
	now   func() time.Time // nil: time.Now; see SetClock

	pres    presence    // the entries this node made
	closing atomic.Bool // set when Close starts
	crashed atomic.Bool // Close leaves the entries to expire (tests)

	mu    sync.Mutex
	ps    *redis.PubSub   // standalone and Sentinel: one stream
	cs    clusterSubs     // cluster: the sharded subscriber connections
	chans map[string]bool // subscribed channels (without prefix)
	// unconfirmed holds, by prefixed name, the subscriptions asked for and
	// not yet confirmed by Redis; the channel is closed on confirmation.
	unconfirmed map[string]chan struct{}
	wg          sync.WaitGroup
}

// CheckRedisURL reports whether NewRedis can read u as RedisOptions.URL.
func CheckRedisURL(u string) error {
	_, err := parseRedisURL(u)
	return err
}

func parseRedisURL(u string) (*redis.Options, error) {
	o, err := redis.ParseURL(u)
	if err != nil {
		// url.Parse quotes the whole URL, password included: keep only
		// what went wrong.
		var ue *url.Error
		if errors.As(err, &ue) {
			return nil, fmt.Errorf("redis url: %v", ue.Err)
		}
		return nil, fmt.Errorf("redis url: %w", err)
	}
	return o, nil
}

// NewRedis connects lazily (go-redis dials on first use and reconnects by
// itself); an unreachable Redis at start is not an error.
func NewRedis(opt RedisOptions, h Handler) (*Redis, error) {
	r := &Redis{opt: opt, h: h, log: opt.Logger, chans: map[string]bool{}, unconfirmed: map[string]chan struct{}{}, wake: make(chan struct{}, 1), pongs: make(chan string, 1),
		node: newID(), pending: map[string]*gathering{}}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	if n := opt.ClusterSubscribers; n != 0 && (opt.URL != "" || !opt.Cluster) {
		return nil, errors.New("redis cluster subscribers: only a Redis Cluster has them")
	} else if n < 0 || n > MaxClusterSubscribers {
		return nil, fmt.Errorf("redis cluster subscribers: %d is not between 1 and %d", n, MaxClusterSubscribers)
	}
	switch {
	case opt.URL != "":
		o, err := parseRedisURL(opt.URL)
		if err != nil {
			return nil, err
		}
		if opt.Password != "" {
			o.Password = opt.Password
		}
		if opt.Username != "" {
			o.Username = opt.Username
		}
		if opt.TLS != nil {
			o.TLSConfig = opt.TLS
		}
		o.MaxRetries, o.DialerRetries, o.ContextTimeoutEnabled = -1, 1, true
		o.DialTimeout, o.ReadTimeout, o.WriteTimeout, o.PoolTimeout = ioTimeout, ioTimeout, ioTimeout, ioTimeout
		r.client = redis.NewClient(o)
	case opt.Cluster:
		if len(opt.Addrs) == 0 {
			return nil, errors.New("redis cluster needs node addresses")
		}
		r.cs.init(cmp.Or(opt.ClusterSubscribers, DefaultClusterSubscribers))
		// A cluster keeps its one quick retry: the broker does not track
		// a cluster's health (its masters fail one at a time), so a
		// command that failed on a connection is tried once more.
		r.cluster = redis.NewClusterClient(&redis.ClusterOptions{Addrs: opt.Addrs, Username: opt.Username, Password: opt.Password, TLSConfig: opt.TLS,
			MaxRetries: 1, MaxRetryBackoff: 50 * time.Millisecond, DialerRetries: 1, ContextTimeoutEnabled: true,
			DialTimeout: ioTimeout, ReadTimeout: ioTimeout, WriteTimeout: ioTimeout, PoolTimeout: ioTimeout})
		r.client = r.cluster
	case opt.MasterName != "":
		r.client = redis.NewFailoverClient(&redis.FailoverOptions{MasterName: opt.MasterName, SentinelAddrs: opt.Addrs,
			Username: opt.Username, Password: opt.Password, TLSConfig: opt.TLS,
			MaxRetries: -1, DialerRetries: 1, ContextTimeoutEnabled: true,
			DialTimeout: ioTimeout, ReadTimeout: ioTimeout, WriteTimeout: ioTimeout, PoolTimeout: ioTimeout})
	default:
		return nil, errors.New("redis broker needs a URL, Sentinel addresses with a master name, or cluster addresses")
	}
	r.ctx, r.cancel = context.WithCancel(context.Background())
	r.pres.init()
	go r.refresher()
	if r.cluster == nil {
		r.ps = r.client.Subscribe(r.ctx)
		r.receive(r.ps)
		r.wg.Add(1)
		go r.probe()
	} else {
		r.wg.Add(1)
		go r.fixer()
	}
	if opt.Answer != nil {
		r.wg.Add(1)
		go r.subscribeControl()
	}
	return r, nil
}

// receive reads a subscription stream until it is closed. The standalone
// stream also watches the connection: its failure is the first sign of an
// outage (Redis closing is seen here before any publish fails), and the
// probe's PINGs come back on it.
func (r *Redis) receive(ps *redis.PubSub) {
	r.wg.Add(1)
	watch := ps == r.ps
	go func() {
		defer r.wg.Done()
		for {
			msg, err := ps.Receive(r.ctx)
			if err != nil {
				if r.closed.Load() || errors.Is(err, redis.ErrClosed) {
					return
				}
				if watch && r.markDown(err) {
					r.failures.Add(1)
				}
				// The next Receive dials again (and resubscribes); a Redis
				// that refuses connections is not dialled in a tight loop.
				if !r.pause(reconnectPause) {
					return
				}
				continue
			}
			switch m := msg.(type) {
			case *redis.Message:
				r.deliver(m)
			case *redis.Pong:
				select {
				case r.pongs <- m.Payload:
				default:
				}
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					r.mu.Lock()
					r.confirmed(m.Channel)
					r.mu.Unlock()
				}
			}
		}
	}()
}

// confirmed records Redis's confirmation of a subscription to a prefixed
// channel (a reply to our SUBSCRIBE or SSUBSCRIBE, or to go-redis's
// resubscription after a reconnect). Called with r.mu held.
func (r *Redis) confirmed(name string) {
	if c := r.unconfirmed[name]; c != nil {
		close(c)
		delete(r.unconfirmed, name)
	}
}

// Confirm waits until Redis has confirmed the node's subscription to
// channel: Redis runs a connection's commands in order, so every
// publication it runs after the confirmation reaches the node. While Redis
// (a cluster: the channel's master) is known to be down it does not wait;
// otherwise it waits at most ioTimeout.
func (r *Redis) Confirm(ctx context.Context, channel string) error {
	name := r.opt.Prefix + channel
	r.mu.Lock()
	c := r.unconfirmed[name]
	_, lost := r.cs.lost[name] // a cluster's channel left to the fixer
	r.mu.Unlock()
	if c == nil {
		return nil
	}
	if lost || r.cluster == nil && r.down.Load() {
		return fmt.Errorf("%w: the subscription to %q is made when redis is back", ErrUnavailable, channel)
	}
	t := time.NewTimer(ioTimeout)
	defer t.Stop()
	select {
	case <-c:
		return nil
	case <-r.ctx.Done():
		return ErrClosed
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return fmt.Errorf("%w: redis has not confirmed the subscription to %q within %v", ErrUnavailable, channel, ioTimeout)
	}
}

// deliver hands a message of a subscription stream to the handler, or to
// control when it is on a control channel.
func (r *Redis) deliver(m *redis.Message) {
	ch, ok := strings.CutPrefix(m.Channel, r.opt.Prefix)
	if !ok {
		return
	}
	if ch != "" && ch[0] == '#' {
		r.control(ch, m.Payload)
		return
	}
	if msg, ok := decodeEnvelope([]byte(m.Payload)); ok {
		r.h(ch, msg)
	}
}

// pause waits d, or until Close; it reports whether the broker is open.
func (r *Redis) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.ctx.Done():
		return false
	}
}

// markDown notes that Redis could not be reached and wakes the probe. It
// is a no-op on a cluster. It reports whether Redis was thought up.
func (r *Redis) markDown(cause error) bool {
	if r.ps == nil || r.closed.Load() || !r.down.CompareAndSwap(false, true) {
		return false
	}
	r.log.Warn("redis unreachable: publications reach this node's clients only until it is back", "error", cause)
	select {
	case r.wake <- struct{}{}:
	default:
	}
	return true
}

// probe waits for Redis to be marked down, then checks every
// probeInterval whether it is back and clears the mark.
func (r *Redis) probe() {
	defer r.wg.Done()
	for {
		select {
		case <-r.wake:
		case <-r.ctx.Done():
			return
		}
		since := time.Now()
		for !r.reachable() {
			if !r.pause(probeInterval) {
				return
			}
		}
		r.down.Store(false)
		r.reconnects.Add(1)
		signal(r.pres.back)
		if f := r.opt.Reconnected; f != nil {
			r.wg.Go(f)
		}
		r.log.Info("redis reachable again: publishing through it", "down_for", time.Since(since).Round(time.Millisecond).String())
	}
}

// reachable reports whether the subscription stream is connected and
// subscribed, and a command gets through. The stream comes first: marked
// up before it has resubscribed, the node's publications would reach the
// other nodes but not its own clients. A PING on the stream is answered
// after the SUBSCRIBE that reconnecting sends first, so its PONG proves
// the subscriptions live. (Checking the stream first also keeps the probe
// off go-redis's command pool, which after many failed dials waits a
// second between tries.)
func (r *Redis) reachable() bool {
	ctx, cancel := context.WithTimeout(r.ctx, ioTimeout)
	defer cancel()
	select {
	case <-r.pongs: // stale
	default:
	}
	r.probes++
	token := "wsgate-probe-" + strconv.FormatUint(r.probes, 10)
	if r.ps.Ping(ctx, token) != nil {
		return false
	}
	for {
		select {
		case p := <-r.pongs:
			if p == token {
				return r.client.Ping(ctx).Err() == nil
			}
		case <-ctx.Done():
			return false
		}
	}
}

// Stats reads the broker's counts.
func (r *Redis) Stats() Stats {
	return Stats{Up: r.Reachable(), Reconnects: r.reconnects.Load(), Errors: r.failures.Load()}
}

// Reachable reports whether publications go through Redis: false from the
// first failure to reach it until the background probe finds it back
// (always true on a cluster, where no single state describes the masters).
func (r *Redis) Reachable() bool { return !r.down.Load() }

// failed turns a command's error into the broker's, and marks Redis down
// when the error says it could not be reached: not when the caller gave
// up (its context ended) nor when Redis answered with an error reply.
func (r *Redis) failed(ctx context.Context, err error) error {
	if r.closed.Load() {
		return ErrClosed
	}
	var reply redis.Error
	if ctx.Err() == nil {
		r.failures.Add(1)
		if !errors.As(err, &reply) {
			r.markDown(err)
		}
	}
	return fmt.Errorf("%w: %v", ErrUnavailable, err)
}

// usable is the check before a command: ErrClosed after Close, errDown
// while Redis is known to be down. It takes no lock.
func (r *Redis) usable() error {
	if r.closed.Load() {
		return ErrClosed
	}
	if r.down.Load() {
		return errDown
	}
	return nil
}

// Publish sends one PUBLISH (or SPUBLISH on a cluster). While Redis is
// known to be down it returns ErrUnavailable at once.
func (r *Redis) Publish(ctx context.Context, channel string, data []byte) error {
	_, err := r.publish(ctx, channel, data)
	return err
}

// PublishBatch sends several publications in one pipelined round trip.
// While Redis is known to be down it returns ErrUnavailable at once.
func (r *Redis) PublishBatch(ctx context.Context, channels []string, data [][]byte) error {
	if err := r.usable(); err != nil {
		return err
	}
	_, err := r.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, ch := range channels {
			if r.cluster != nil {
				p.SPublish(ctx, r.opt.Prefix+ch, data[i])
			} else {
				p.Publish(ctx, r.opt.Prefix+ch, data[i])
			}
		}
		return nil
	})
	if err != nil {
		return r.failed(ctx, err)
	}
	return nil
}

// Subscribe subscribes the node once per channel. While Redis is down the
// subscription is remembered and made when the connection comes back.
func (r *Redis) Subscribe(ctx context.Context, channel string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed.Load() {
		return ErrClosed
	}
	if r.chans[channel] {
		return nil
	}
	r.chans[channel] = true
	name := r.opt.Prefix + channel
	if r.unconfirmed[name] == nil {
		r.unconfirmed[name] = make(chan struct{})
	}
	if r.cluster == nil {
		if err := r.ps.Subscribe(ctx, name); err != nil {
			// go-redis keeps the channel and resubscribes on reconnect.
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return nil
	}
	return r.shardSubscribe(ctx, name)
}

// Unsubscribe drops the node's subscription to channel.
func (r *Redis) Unsubscribe(ctx context.Context, channel string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed.Load() {
		return ErrClosed
	}
	if !r.chans[channel] {
		return nil
	}
	delete(r.chans, channel)
	name := r.opt.Prefix + channel
	// A confirmation still due releases no one now. (Subscribing again
	// before it arrives takes that confirmation, of the subscription
	// dropped, for its own: a publication in the round trip between may be
	// missed, as before Confirm existed.)
	r.confirmed(name)
	if r.cluster == nil {
		if err := r.ps.Unsubscribe(ctx, name); err != nil {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return nil
	}
	return r.shardUnsubscribe(ctx, name)
}

// Ping checks the connection to Redis.
func (r *Redis) Ping(ctx context.Context) error { return r.client.Ping(ctx).Err() }

// Close removes the presence entries the node made, publishing their
// leave events, then closes the subscriptions and the client. (A node that
// dies without Close leaves its entries to expire after their TTL.)
func (r *Redis) Close() error {
	if r.closing.CompareAndSwap(false, true) {
		close(r.pres.stop)
		<-r.pres.done
		if !r.crashed.Load() {
			r.leaveAll()
		}
	}
	r.mu.Lock()
	if r.closed.Load() {
		r.mu.Unlock()
		return nil
	}
	r.closed.Store(true)
	r.cancel()
	if r.ps != nil {
		r.ps.Close()
	}
	if r.cluster != nil {
		r.closeCluster()
	}
	r.mu.Unlock()
	err := r.client.Close()
	r.wg.Wait()
	return err
}

// Slot is the Redis Cluster hash slot of a key (CRC16 of the key, or of
// its {hash tag}, modulo 16384).
func Slot(key string) int {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			key = key[i+1 : i+1+j]
		}
	}
	return int(crc16(key) % 16384)
}

// crc16 is CRC-16/XMODEM, the checksum Redis Cluster uses for key slots.
func crc16(s string) uint16 {
	var crc uint16
	for i := 0; i < len(s); i++ {
		crc ^= uint16(s[i]) << 8
		for b := 0; b < 8; b++ {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc
}
