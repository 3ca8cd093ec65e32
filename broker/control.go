package broker

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"slices"
	"strings"
	"sync"
)

// Control requests link the nodes that share a Redis: one node asks, every
// node (itself included) answers, and the asker gathers the answers. The
// admin API lists and closes connections on every node so.
//
// A request is PUBLISHed on <prefix>#control as "<request id> <node
// id>\n<body>"; every node subscribed there runs its Answer function and
// PUBLISHes "<request id>\n<answer>" on the asker's own channel,
// <prefix>#reply:<node id>. PUBLISH returns how many subscribers received
// the request, which tells the asker how many answers to wait for without
// any membership list: a node that has gone away is no longer subscribed.
// '#' cannot appear in a channel name, so no client can subscribe to or
// publish on these channels.
const (
	controlChannel = "#control"
	replyChannel   = "#reply:"
)

// Gatherer is implemented by brokers that link several nodes (Redis, with
// RedisOptions.Answer set).
type Gatherer interface {
	// Gather sends req to every node sharing the broker, this one included,
	// and returns the answers that came back. It waits until each node that
	// received the request has answered, or until ctx ends (then the
	// answers so far are returned, with no error); received says how many
	// nodes got the request. An unreachable broker is an error that wraps
	// ErrUnavailable.
	Gather(ctx context.Context, req []byte) (answers [][]byte, received int, err error)
}

// gathering collects the answers to one request.
type gathering struct {
	mu      sync.Mutex
	answers [][]byte
	more    chan struct{} // a new answer came (capacity 1)
}

// newID is 128 random bits in hex.
func newID() string {
	var b [16]byte
	rand.Read(b[:]) // never fails (crypto/rand panics rather)
	return hex.EncodeToString(b[:])
}

// subscribeControl subscribes the node to the control channel and to its
// own reply channel. A Redis that is down is no error: the subscriptions
// are made when it comes back.
func (r *Redis) subscribeControl() {
	defer r.wg.Done()
	for _, ch := range []string{controlChannel, replyChannel + r.node} {
		if err := r.Subscribe(r.ctx, ch); err != nil && !errors.Is(err, ErrUnavailable) {
			return
		}
	}
}

// control handles a message on a control channel (ch without the prefix).
func (r *Redis) control(ch, payload string) {
	head, body, ok := strings.Cut(payload, "\n")
	if !ok {
		return
	}
	if ch == controlChannel {
		id, from, ok := strings.Cut(head, " ")
		if !ok || r.opt.Answer == nil {
			return
		}
		// Answering may take a while (and publishes): not on the stream's
		// reader.
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			answer := r.opt.Answer([]byte(body))
			ctx, cancel := context.WithTimeout(r.ctx, ioTimeout)
			defer cancel()
			r.publish(ctx, replyChannel+from, append([]byte(id+"\n"), answer...))
		}()
		return
	}
	if ch != replyChannel+r.node {
		return
	}
	r.pmu.Lock()
	g := r.pending[head]
	r.pmu.Unlock()
	if g == nil {
		return // late: the asker has stopped waiting
	}
	g.mu.Lock()
	g.answers = append(g.answers, []byte(body))
	g.mu.Unlock()
	select {
	case g.more <- struct{}{}:
	default:
	}
}

// publish sends data on channel (under the prefix) and returns how many
// subscribers received it.
func (r *Redis) publish(ctx context.Context, channel string, data []byte) (int64, error) {
	if err := r.usable(); err != nil {
		return 0, err
	}
	var n int64
	var err error
	if r.cluster != nil {
		n, err = r.cluster.SPublish(ctx, r.opt.Prefix+channel, data).Result()
	} else {
		n, err = r.client.Publish(ctx, r.opt.Prefix+channel, data).Result()
	}
	if err != nil {
		return 0, r.failed(ctx, err)
	}
	return n, nil
}

// Gather implements Gatherer.
func (r *Redis) Gather(ctx context.Context, req []byte) ([][]byte, int, error) {
	if r.opt.Answer == nil {
		return nil, 0, errors.New("control requests are not enabled on this broker")
	}
	id := newID()
	g := &gathering{more: make(chan struct{}, 1)}
	r.pmu.Lock()
	r.pending[id] = g
	r.pmu.Unlock()
	defer func() {
		r.pmu.Lock()
		delete(r.pending, id)
		r.pmu.Unlock()
	}()
	msg := make([]byte, 0, len(id)+len(r.node)+2+len(req))
	msg = append(append(append(append(msg, id...), ' '), r.node...), '\n')
	n, err := r.publish(ctx, controlChannel, append(msg, req...))
	if err != nil {
		return nil, 0, err
	}
	for !g.has(n) {
		select {
		case <-g.more:
		case <-ctx.Done():
			return g.taken(), int(n), nil
		}
	}
	return g.taken(), int(n), nil
}

// has reports whether n answers have come.
func (g *gathering) has(n int64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return int64(len(g.answers)) >= n
}

// taken returns the answers so far (a copy: more may still come).
func (g *gathering) taken() [][]byte {
	g.mu.Lock()
	defer g.mu.Unlock()
	return slices.Clone(g.answers)
}
