package proxy

import (
	"crypto/rand"
	"encoding/hex"
	"net"
	"time"

	"github.com/gobwas/ws"
)

// ConnInfo describes a live connection to those who list it (the admin
// API). It is made once, when the connection starts, and never changes
// after; only Channels reads live state.
type ConnInfo struct {
	// ID is random (128 bits, hex) and cannot be guessed: it names the
	// connection to close.
	ID string
	// Subject is the authenticated subject (the token's sub), or "".
	Subject string
	// Remote is the client's address (after trusted proxies).
	Remote string
	// Handler names the handler that serves the connection.
	Handler string
	// Mode is how it is served ("relay", "rooms").
	Mode string
	// Upstream is the URL of the upstream it is relayed to (password
	// redacted), set by the gateway; "" in rooms mode.
	Upstream string
	// Started is when the connection was upgraded.
	Started time.Time
	// Channels, if not nil, returns the channels the connection is
	// subscribed to at the time of the call.
	Channels func() []string
}

// NewConnID makes a connection id: 128 random bits, in hex.
func NewConnID() string {
	var id [16]byte
	rand.Read(id[:]) // never fails (crypto/rand panics rather)
	return hex.EncodeToString(id[:])
}

// newConnInfo completes m for a connection on client: its ID (unless the
// caller chose one with NewConnID), start time and, when the caller gave
// none, its remote address.
func newConnInfo(m ConnInfo, client net.Conn) *ConnInfo {
	if m.ID == "" {
		m.ID = NewConnID()
	}
	m.Started = time.Now()
	if m.Remote == "" && client != nil {
		m.Remote = client.RemoteAddr().String()
		if host, _, err := net.SplitHostPort(m.Remote); err == nil {
			m.Remote = host
		}
	}
	return &m
}

// Conns returns the descriptions of the live connections, in no
// particular order.
func (r *Registry) Conns() []*ConnInfo {
	r.mu.Lock()
	defer r.mu.Unlock()
	list := make([]*ConnInfo, 0, len(r.conns))
	for c := range r.conns {
		list = append(list, c.meta)
	}
	return list
}

// Disconnect closes the live connections match selects with code and
// reason, both sides, through their writers (as Shutdown does), and
// returns how many it closed. The caller checks code and reason (a close
// frame's reason is at most 123 bytes). It does not wait for the closing
// handshakes.
func (r *Registry) Disconnect(match func(*ConnInfo) bool, code uint16, reason string) int {
	return r.disconnectWhere(func(c *relay) bool { return match(c.meta) }, ws.StatusCode(code), reason)
}

// disconnectWhere closes the live connections match selects, as
// Disconnect.
func (r *Registry) disconnectWhere(match func(*relay) bool, code ws.StatusCode, reason string) int {
	r.mu.Lock()
	var list []*relay
	for c := range r.conns {
		if !c.closing.Load() && match(c) {
			list = append(list, c)
		}
	}
	r.mu.Unlock()
	for _, c := range list {
		c.beginClosing()
		go c.shutdown(code, reason)
	}
	return len(list)
}
