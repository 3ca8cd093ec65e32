package wsgate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"slices"
	"sync"
	"time"
)

// Options configure a Client. The zero value of every field is its default.
type Options struct {
	// Token returns the token sent at the handshake (as the subprotocols
	// "bearer", <token>) and in band by refresh. It is called for the first
	// connection, for every reconnect and for every refresh. Nil: no token.
	Token func(ctx context.Context) (string, error)
	// Header holds extra handshake headers, such as Origin.
	Header http.Header
	// MinReconnectDelay is the cap of the first reconnect delay; each failed
	// attempt doubles it, up to MaxReconnectDelay; the delay is drawn
	// uniformly below the cap (full jitter). Default: 500 ms.
	MinReconnectDelay time.Duration
	// MaxReconnectDelay bounds the cap of reconnect delays; a connection
	// that stayed up this long starts the doubling again. Default: 20 s.
	MaxReconnectDelay time.Duration
	// LivenessInterval is how long the connection may stay silent before the
	// client sends a ping op. Default: 10 s.
	LivenessInterval time.Duration
	// LivenessTimeout is how long the client then waits for anything from
	// the gateway before it takes the connection for dead, closes it and
	// reconnects. Default: 5 s.
	LivenessTimeout time.Duration
	// QueueSize bounds the requests (publishes, presence, history) held
	// while not connected; beyond it a request fails at once with
	// ErrQueueFull. Requests a lost connection never wrote go back to the
	// front of the queue even past QueueSize (they were accepted already);
	// new ones fail until it is below QueueSize again. Default: 1000.
	QueueSize int
	// RefreshBefore is how long before the token's exp the client gets a new
	// token and sends it with the refresh op (never sooner than halfway
	// through the token's remaining life). Default: 30 s.
	RefreshBefore time.Duration
	// HandshakeTimeout bounds the TCP connect and the WebSocket handshake.
	// Default: 10 s.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds each write to the socket. Default: 10 s.
	WriteTimeout time.Duration
	// MaxMessageSize bounds a message from the gateway. Default: 16 MiB.
	MaxMessageSize int64
	// OnEvent is called with every connection event, in order, on the
	// client's callback goroutine.
	OnEvent func(Event)
	// NetDial dials the TCP connection. Default: net.Dialer.
	NetDial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Rand returns a number in [0, 1) for jitter. Default: math/rand/v2.
	Rand func() float64
	// Clock drives reconnect delays, liveness and refresh. Default: real time.
	Clock Clock
}

func (o *Options) setDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&o.MinReconnectDelay, 500*time.Millisecond)
	def(&o.MaxReconnectDelay, 20*time.Second)
	o.MaxReconnectDelay = max(o.MaxReconnectDelay, o.MinReconnectDelay)
	def(&o.LivenessInterval, 10*time.Second)
	def(&o.LivenessTimeout, 5*time.Second)
	def(&o.RefreshBefore, 30*time.Second)
	def(&o.HandshakeTimeout, 10*time.Second)
	def(&o.WriteTimeout, 10*time.Second)
	if o.QueueSize <= 0 {
		o.QueueSize = 1000
	}
	if o.MaxMessageSize <= 0 {
		o.MaxMessageSize = 16 << 20
	}
	if o.Rand == nil {
		o.Rand = rand.Float64
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
}

// Close codes of the client's own, shared with the JavaScript client;
// both are followed by a reconnect.
const (
	// CloseLivenessTimeout ends a connection on which nothing arrived
	// within LivenessTimeout of a ping: the path is dead, and the socket is
	// dropped without a close frame.
	CloseLivenessTimeout = 4000
	// CloseRefreshFailed ends a connection whose token could not be
	// refreshed; the next one is made with a fresh token.
	CloseRefreshFailed = 4002
)

// State is where the client's connection stands.
type State int

const (
	// Disconnected: not connected; a reconnect is due (or Connect was not called yet).
	Disconnected State = iota
	// Connecting: a handshake is in progress.
	Connecting
	// Connected: the connection is open.
	Connected
	// Closed: Close was called, or the gateway closed with a terminal code.
	Closed
)

func (s State) String() string {
	return [...]string{"disconnected", "connecting", "connected", "closed"}[s]
}

// EventType names a connection event.
type EventType int

const (
	EventConnecting EventType = iota
	EventConnected
	EventDisconnected
	EventError
)

func (e EventType) String() string {
	return [...]string{"connecting", "connected", "disconnected", "error"}[e]
}

// Event is a change of the connection, passed to Options.OnEvent.
type Event struct {
	Type EventType
	// Code and Reason of the close (disconnected): the gateway's close frame,
	// 1006 when the connection ended without one (including a failed
	// handshake), CloseLivenessTimeout or CloseRefreshFailed when the
	// client ended it for those reasons, 1000 after Close.
	Code   int
	Reason string
	// WillReconnect is false when the client is now closed.
	WillReconnect bool
	// Err is the error behind a disconnected or error event, if any.
	Err error
}

// Error is an error reply of the gateway ({"op":"error","code":…}).
type Error struct {
	Code    string // bad_request, forbidden, rate_limited, too_large, unavailable, not_found
	Message string
}

func (e *Error) Error() string { return "wsgate: " + e.Code + ": " + e.Message }

// CloseError is why a client closed for good: the gateway's terminal close.
type CloseError struct {
	Code   int
	Reason string
}

func (e *CloseError) Error() string {
	return fmt.Sprintf("wsgate: closed by the gateway: %d %s", e.Code, e.Reason)
}

var (
	// ErrClosed: the client is closed.
	ErrClosed = errors.New("wsgate: client closed")
	// ErrQueueFull: the client is not connected and QueueSize requests wait already.
	ErrQueueFull = errors.New("wsgate: queue full")
	// ErrConnectionLost: the connection ended after the request was sent and
	// before its reply came; the request may or may not have taken effect.
	ErrConnectionLost = errors.New("wsgate: connection lost before the reply")
	// ErrAlreadySubscribed: the client has a subscription to the channel.
	ErrAlreadySubscribed = errors.New("wsgate: already subscribed")
)

// Client is a wsgate.v1 client. Its methods are safe for concurrent use.
type Client struct {
	url   string
	opts  Options
	clock Clock

	ctx    context.Context // ends with Close
	cancel context.CancelFunc
	wg     sync.WaitGroup
	disp   *dispatcher

	mu       sync.Mutex
	state    State
	stateCh  chan struct{} // closed and replaced at every change of state
	started  bool
	closeErr error // why the client is closed
	cur      *conn // the open connection, when connected
	nextID   uint64
	queue    []*call
	subs     []*Subscription // in the order they were made
	byCh     map[string]*Subscription
}

// New returns a client for the gateway's wsgate.v1 endpoint url
// (ws:// or wss://). It does not connect: call Connect.
func New(url string, opts Options) *Client {
	opts.setDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	return &Client{url: url, opts: opts, clock: opts.Clock, ctx: ctx, cancel: cancel,
		disp: newDispatcher(), stateCh: make(chan struct{}), byCh: map[string]*Subscription{}}
}

// Dial is New and Connect; the client is closed when Connect fails.
func Dial(ctx context.Context, url string, opts Options) (*Client, error) {
	c := New(url, opts)
	if err := c.Connect(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Connect starts the client and waits until it is connected. When ctx ends
// first it returns ctx's error and the client goes on trying in the
// background until Close. It returns a *CloseError when the gateway closed
// the connection for good, and ErrClosed after Close.
func (c *Client) Connect(ctx context.Context) error {
	c.mu.Lock()
	if !c.started && c.state != Closed {
		c.started = true
		c.wg.Add(2)
		go func() { defer c.wg.Done(); c.disp.run() }()
		go c.run()
	}
	c.mu.Unlock()
	for {
		c.mu.Lock()
		st, ch, err := c.state, c.stateCh, c.closeErr
		c.mu.Unlock()
		switch st {
		case Connected:
			return nil
		case Closed:
			if err == nil {
				err = ErrClosed
			}
			return err
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Close ends the connection with 1000, fails every waiting request with
// ErrClosed, and returns once every goroutine of the client has ended and
// every callback has run. It must not be called from a handler.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.state != Closed {
		c.setStateLocked(Closed)
	}
	if c.closeErr == nil {
		c.closeErr = ErrClosed
	}
	started := c.started
	c.started = true
	c.failQueueLocked(ErrClosed)
	c.mu.Unlock()
	c.cancel()
	if !started {
		return nil
	}
	c.wg.Wait()
	return nil
}

// State is the connection's state now.
func (c *Client) State() State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

func (c *Client) setStateLocked(s State) {
	if c.state == s || c.state == Closed {
		return
	}
	c.state = s
	close(c.stateCh)
	c.stateCh = make(chan struct{})
}

func (c *Client) emit(e Event) {
	if f := c.opts.OnEvent; f != nil {
		c.disp.push(func() { f(e) })
	}
}

// run is the connection loop: connect, serve, wait, again, until Close or
// a terminal close.
func (c *Client) run() {
	defer c.wg.Done()
	defer close(c.disp.stop) // after the last event is pushed
	attempt := 0
	for first := true; ; first = false {
		if !first {
			d := time.Duration(backoff(attempt, int64(c.opts.MinReconnectDelay), int64(c.opts.MaxReconnectDelay), c.opts.Rand))
			attempt++
			if !c.wait(d) {
				c.finish()
				return
			}
		}
		c.mu.Lock()
		if c.state == Closed {
			c.mu.Unlock()
			c.finish()
			return
		}
		c.setStateLocked(Connecting)
		c.mu.Unlock()
		c.emit(Event{Type: EventConnecting})
		cn, err := c.dial()
		if err != nil {
			if c.ctx.Err() != nil {
				c.finish()
				return
			}
			c.mu.Lock()
			c.setStateLocked(Disconnected)
			c.mu.Unlock()
			c.emit(Event{Type: EventDisconnected, Code: 1006, Reason: "handshake failed", WillReconnect: true, Err: err})
			continue
		}
		began := c.clock.Now()
		end := c.serve(cn)
		if c.clock.Now().Sub(began) >= c.opts.MaxReconnectDelay {
			// A connection that lasted counts as a success; one that the
			// gateway ends soon keeps backing off.
			attempt = 0
		}
		if c.ctx.Err() != nil {
			c.emit(Event{Type: EventDisconnected, Code: end.code, Reason: end.reason, Err: end.err})
			c.finish()
			return
		}
		if terminal(end.code, end.reason) {
			cerr := &CloseError{Code: end.code, Reason: end.reason}
			c.mu.Lock()
			c.closeErr = cerr
			c.setStateLocked(Closed)
			c.failQueueLocked(cerr)
			c.mu.Unlock()
			c.emit(Event{Type: EventDisconnected, Code: end.code, Reason: end.reason, Err: cerr})
			c.finish()
			return
		}
		c.emit(Event{Type: EventDisconnected, Code: end.code, Reason: end.reason, WillReconnect: true, Err: end.err})
	}
}

// finish ends the client: closed state, subscriptions over.
func (c *Client) finish() {
	c.mu.Lock()
	c.setStateLocked(Closed)
	if c.closeErr == nil {
		c.closeErr = ErrClosed
	}
	err := c.closeErr
	c.failQueueLocked(err)
	subs := c.subs
	c.subs, c.byCh = nil, map[string]*Subscription{}
	for _, s := range subs {
		s.endLocked(err)
	}
	c.mu.Unlock()
	c.cancel()
}

// wait waits d on the client's clock; false if the client was closed.
func (c *Client) wait(d time.Duration) bool {
	t := c.clock.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C():
		return true
	case <-c.ctx.Done():
		return false
	}
}

func (c *Client) failQueueLocked(err error) {
	for _, cl := range c.queue {
		cl.settle(nil, err)
	}
	c.queue = nil
}

// request is one request to the gateway and its reply.
type request struct {
	ID      uint64          `json:"id"`
	Op      string          `json:"op"`
	Channel string          `json:"channel,omitempty"`
	Data    json.RawMessage `json:"data,omitempty"`
	Since   *Position       `json:"since,omitempty"`
	Limit   *int            `json:"limit,omitempty"`
	Token   string          `json:"token,omitempty"`
}

// call is a request waiting for its reply.
type call struct {
	req request
	res chan callResult // buffered: the reader never waits for the caller
	// onReply, when set, handles the reply on the reader goroutine instead
	// (subscribe: what follows the reply depends on it).
	onReply func(m *inMsg)
	onFail  func(err error) // with onReply: the reply came but could not be read
	written bool            // the writer began writing it (under the client's mu)
}

type callResult struct {
	msg *inMsg
	err error
}

func (cl *call) settle(m *inMsg, err error) {
	if cl.res != nil {
		select {
		case cl.res <- callResult{m, err}:
		default:
		}
	}
}

// sendLocked gives cl an id and hands it to cn's writer.
func (c *Client) sendLocked(cn *conn, cl *call) {
	c.nextID++
	cl.req.ID = c.nextID
	cn.pending[cl.req.ID] = cl
	b, _ := json.Marshal(&cl.req)
	cn.enqueue(outFrame{text: b, call: cl})
}

// do sends req (or queues it while not connected) and waits for its reply.
func (c *Client) do(ctx context.Context, req request) (*inMsg, error) {
	cl := &call{req: req, res: make(chan callResult, 1)}
	c.mu.Lock()
	switch {
	case c.state == Closed:
		err := c.closeErr
		c.mu.Unlock()
		return nil, err
	case c.cur != nil:
		c.sendLocked(c.cur, cl)
	case len(c.queue) >= c.opts.QueueSize:
		c.mu.Unlock()
		return nil, ErrQueueFull
	default:
		c.queue = append(c.queue, cl)
	}
	c.mu.Unlock()
	select {
	case r := <-cl.res:
		if r.err != nil {
			return nil, r.err
		}
		if r.msg.Op == "error" {
			return r.msg, &Error{Code: r.msg.Code, Message: r.msg.Message}
		}
		return r.msg, nil
	case <-ctx.Done():
		c.mu.Lock()
		if i := slices.Index(c.queue, cl); i >= 0 {
			c.queue = slices.Delete(c.queue, i, i+1)
		}
		c.mu.Unlock()
		return nil, ctx.Err()
	}
}

// Publish publishes data (any value encoding/json takes; json.RawMessage
// passes as it is) to channel, and returns when the gateway has answered:
// nil for ok, an *Error for an error reply. While the client is not
// connected the publish waits in the queue (see QueueSize) and is sent, in
// order, once connected. A publish whose connection ends before its reply
// fails with ErrConnectionLost; one that was never written is sent again
// on the next connection.
func (c *Client) Publish(ctx context.Context, channel string, data any) error {
	b, err := json.Marshal(data)
	if err != nil {
		return fmt.Errorf("wsgate: encoding data: %w", err)
	}
	_, err = c.do(ctx, request{Op: "publish", Channel: channel, Data: b})
	return err
}

// PresenceEntry is one connection subscribed to a channel.
type PresenceEntry struct {
	Conn    string         `json:"conn"`
	Subject string         `json:"subject,omitempty"`
	Claims  map[string]any `json:"claims,omitempty"`
}

// Presence lists the connections subscribed to channel on every node.
func (c *Client) Presence(ctx context.Context, channel string) ([]PresenceEntry, error) {
	m, err := c.do(ctx, request{Op: "presence", Channel: channel})
	if err != nil {
		return nil, err
	}
	return m.Presence, nil
}

// PresenceCount counts the connections subscribed to channel on every node.
func (c *Client) PresenceCount(ctx context.Context, channel string) (int, error) {
	m, err := c.do(ctx, request{Op: "presence_count", Channel: channel})
	if err != nil {
		return 0, err
	}
	return m.Count, nil
}

// Publication is a message of a channel's history.
type Publication struct {
	Offset uint64          `json:"offset"`
	Data   json.RawMessage `json:"data"`
}

// HistoryResult is a history reply: the channel's position and its last
// publications, oldest first.
type HistoryResult struct {
	Epoch        string
	Offset       uint64
	Publications []Publication
}

// History returns the last limit publications of channel, at most the
// channel's recover_max. A negative limit sends none, and 0 sends
// "limit":0: the gateway reads both as its default, recover_max.
func (c *Client) History(ctx context.Context, channel string, limit int) (*HistoryResult, error) {
	req := request{Op: "history", Channel: channel}
	if limit >= 0 {
		req.Limit = &limit
	}
	m, err := c.do(ctx, req)
	if err != nil {
		return nil, err
	}
	r := &HistoryResult{Epoch: m.Epoch, Publications: m.Publications}
	if m.Offset != nil {
		r.Offset = *m.Offset
	}
	return r, nil
}
