package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
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
}

// A publish is retried once, quickly: while Redis is down a client that
// publishes must learn it in well under a second (go-redis's defaults
// retry three times with backoff, about 1.7 s), and the hub delivers on
// this node meanwhile.
const (
	maxRetries      = 1
	maxRetryBackoff = 50 * time.Millisecond
)

// Redis is a broker on Redis pub/sub.
type Redis struct {
	opt     RedisOptions
	h       Handler
	client  redis.UniversalClient
	cluster *redis.ClusterClient
	log     *slog.Logger

	mu     sync.Mutex
	ps     *redis.PubSub   // standalone and Sentinel: one stream
	shards map[int]*shard  // cluster: one stream per hash slot in use
	chans  map[string]bool // subscribed channels (without prefix)
	closed bool
	wg     sync.WaitGroup
}

type shard struct {
	ps    *redis.PubSub
	count int
}

// CheckRedisURL reports whether NewRedis can read u as RedisOptions.URL.
func CheckRedisURL(u string) error {
	_, err := parseRedisURL(u)
	return err
}

func parseRedisURL(u string) (*redis.Options, error) {
	o, err := redis.ParseURL(u)
	if err != nil {
		return nil, fmt.Errorf("redis url: %w", err)
	}
	return o, nil
}

// NewRedis connects lazily (go-redis dials on first use and reconnects by
// itself); an unreachable Redis at start is not an error.
func NewRedis(opt RedisOptions, h Handler) (*Redis, error) {
	r := &Redis{opt: opt, h: h, log: opt.Logger, chans: map[string]bool{}, shards: map[int]*shard{}}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
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
		o.MaxRetries, o.MaxRetryBackoff = maxRetries, maxRetryBackoff
		r.client = redis.NewClient(o)
	case opt.Cluster:
		if len(opt.Addrs) == 0 {
			return nil, errors.New("redis cluster needs node addresses")
		}
		r.cluster = redis.NewClusterClient(&redis.ClusterOptions{Addrs: opt.Addrs, Username: opt.Username, Password: opt.Password, TLSConfig: opt.TLS,
			MaxRetries: maxRetries, MaxRetryBackoff: maxRetryBackoff})
		r.client = r.cluster
	case opt.MasterName != "":
		r.client = redis.NewFailoverClient(&redis.FailoverOptions{MasterName: opt.MasterName, SentinelAddrs: opt.Addrs,
			Username: opt.Username, Password: opt.Password, TLSConfig: opt.TLS,
			MaxRetries: maxRetries, MaxRetryBackoff: maxRetryBackoff})
	default:
		return nil, errors.New("redis broker needs a URL, Sentinel addresses with a master name, or cluster addresses")
	}
	if r.cluster == nil {
		r.ps = r.client.Subscribe(context.Background())
		r.receive(r.ps)
	}
	return r, nil
}

func (r *Redis) receive(ps *redis.PubSub) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		prefix := r.opt.Prefix
		for msg := range ps.Channel(redis.WithChannelSize(4096)) {
			ch, ok := strings.CutPrefix(msg.Channel, prefix)
			if !ok {
				continue
			}
			r.h(ch, []byte(msg.Payload))
		}
	}()
}

// Publish sends one PUBLISH (or SPUBLISH on a cluster).
func (r *Redis) Publish(ctx context.Context, channel string, data []byte) error {
	if r.isClosed() {
		return ErrClosed
	}
	var err error
	if r.cluster != nil {
		err = r.cluster.SPublish(ctx, r.opt.Prefix+channel, data).Err()
	} else {
		err = r.client.Publish(ctx, r.opt.Prefix+channel, data).Err()
	}
	if err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// PublishBatch sends several publications in one pipelined round trip.
func (r *Redis) PublishBatch(ctx context.Context, channels []string, data [][]byte) error {
	if r.isClosed() {
		return ErrClosed
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
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// Subscribe subscribes the node once per channel. While Redis is down the
// subscription is remembered and made when the connection comes back.
func (r *Redis) Subscribe(ctx context.Context, channel string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if r.chans[channel] {
		return nil
	}
	r.chans[channel] = true
	name := r.opt.Prefix + channel
	if r.cluster == nil {
		if err := r.ps.Subscribe(ctx, name); err != nil {
			// go-redis keeps the channel and resubscribes on reconnect.
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return nil
	}
	slot := Slot(name)
	s := r.shards[slot]
	if s == nil {
		// The first SSUBSCRIBE must go out before the receive loop starts:
		// the stream connects to the node that owns its first channel, and
		// a loop that connected first would pick a random node.
		s = &shard{ps: r.cluster.SSubscribe(ctx, name)}
		r.shards[slot] = s
		s.count++
		r.receive(s.ps)
		return nil
	}
	s.count++
	if err := s.ps.SSubscribe(ctx, name); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

// Unsubscribe drops the node's subscription to channel.
func (r *Redis) Unsubscribe(ctx context.Context, channel string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return ErrClosed
	}
	if !r.chans[channel] {
		return nil
	}
	delete(r.chans, channel)
	name := r.opt.Prefix + channel
	if r.cluster == nil {
		if err := r.ps.Unsubscribe(ctx, name); err != nil {
			return fmt.Errorf("%w: %v", ErrUnavailable, err)
		}
		return nil
	}
	slot := Slot(name)
	s := r.shards[slot]
	if s == nil {
		return nil
	}
	s.count--
	if s.count <= 0 {
		delete(r.shards, slot)
		return s.ps.Close()
	}
	if err := s.ps.SUnsubscribe(ctx, name); err != nil {
		return fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	return nil
}

func (r *Redis) isClosed() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closed
}

// Ping checks the connection to Redis.
func (r *Redis) Ping(ctx context.Context) error { return r.client.Ping(ctx).Err() }

// Close closes the subscriptions and the client.
func (r *Redis) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	if r.ps != nil {
		r.ps.Close()
	}
	for _, s := range r.shards {
		s.ps.Close()
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
