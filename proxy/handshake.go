package proxy

import (
	"bufio"
	"crypto/sha1"
	"encoding/base64"
	"net"
	"net/http"
	"net/textproto"
	"strings"
	"time"
)

// IsUpgrade reports whether r asks for a WebSocket: an HTTP/1.1 upgrade, or
// an HTTP/2 or HTTP/3 extended CONNECT with :protocol websocket.
func IsUpgrade(r *http.Request) bool {
	if r.Method == http.MethodConnect && strings.EqualFold(r.Header.Get(":protocol"), "websocket") {
		return true
	}
	return headerHasToken(r.Header["Connection"], "upgrade") &&
		headerHasToken(r.Header["Upgrade"], "websocket")
}

// HandshakeError is a refusal that is answered with an HTTP status before
// any hijack.
type HandshakeError struct {
	Status  int
	Message string
	Header  http.Header
}

func (e *HandshakeError) Error() string { return e.Message }

// CheckHandshake validates a client's opening handshake (RFC 6455 §4.2.1)
// so that problems are answered with a proper HTTP status instead of a
// response written into a hijacked socket.
func CheckHandshake(r *http.Request) *HandshakeError {
	if r.ProtoMajor >= 2 {
		return &HandshakeError{Status: http.StatusNotImplemented,
			Message: "WebSocket over HTTP/2 and HTTP/3 is not supported; connect with HTTP/1.1"}
	}
	if r.Method != http.MethodGet {
		return &HandshakeError{Status: http.StatusMethodNotAllowed, Message: "a WebSocket handshake must use GET",
			Header: http.Header{"Allow": {http.MethodGet}}}
	}
	if r.ProtoMajor != 1 || r.ProtoMinor < 1 {
		return &HandshakeError{Status: http.StatusBadRequest, Message: "a WebSocket handshake needs HTTP/1.1"}
	}
	if !headerHasToken(r.Header["Connection"], "upgrade") || !headerHasToken(r.Header["Upgrade"], "websocket") {
		return &HandshakeError{Status: http.StatusBadRequest,
			Message: "not a WebSocket upgrade: Connection: Upgrade and Upgrade: websocket are required"}
	}
	if v := r.Header.Get("Sec-WebSocket-Version"); v != "13" {
		return &HandshakeError{Status: http.StatusUpgradeRequired, Message: "unsupported Sec-WebSocket-Version; use 13",
			Header: http.Header{"Sec-Websocket-Version": {"13"}}}
	}
	keys := r.Header["Sec-Websocket-Key"]
	if len(keys) != 1 {
		return &HandshakeError{Status: http.StatusBadRequest, Message: "missing or repeated Sec-WebSocket-Key"}
	}
	if k, err := base64.StdEncoding.DecodeString(keys[0]); err != nil || len(k) != 16 {
		return &HandshakeError{Status: http.StatusBadRequest, Message: "malformed Sec-WebSocket-Key"}
	}
	for _, p := range offeredProtocols(r) {
		if !validToken(p) {
			return &HandshakeError{Status: http.StatusBadRequest, Message: "malformed Sec-WebSocket-Protocol"}
		}
	}
	return nil
}

// upgrade answers a checked handshake (CheckHandshake) with 101, protocol
// and extensions (none when empty), then takes the connection over. The 101 goes
// through w, like any response, before the hijack: the layers around the
// handler (an access log, metrics) record the status they see written, and
// a response written into the hijacked socket would leave them none.
func upgrade(w http.ResponseWriter, r *http.Request, protocol, extensions string) (net.Conn, *bufio.ReadWriter, error) {
	h := w.Header()
	h["Upgrade"] = []string{"websocket"}
	h["Connection"] = []string{"Upgrade"}
	h["Sec-Websocket-Accept"] = []string{acceptKey(r.Header.Get("Sec-Websocket-Key"))}
	if protocol != "" {
		h["Sec-Websocket-Protocol"] = []string{protocol}
	}
	if extensions != "" {
		h[extensionHeader] = []string{extensions}
	}
	w.WriteHeader(http.StatusSwitchingProtocols)
	// The connection is taken from the innermost writer: a wrapper's
	// Hijack (Caddy's response recorders, there with an access log or
	// metrics) hands back its own wrapper of the socket, which hides the
	// socket from the poller, so idle sides could not park; and what the
	// wrappers count of it is never read, their request being logged when
	// the handler returns.
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			break
		}
		w = u.Unwrap()
	}
	return http.NewResponseController(w).Hijack()
}

// acceptKey is the Sec-WebSocket-Accept answering key (RFC 6455 §4.2.2).
func acceptKey(key string) string {
	sum := sha1.Sum([]byte(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
	return base64.StdEncoding.EncodeToString(sum[:])
}

// pickProtocol is the first subprotocol the client offered that ok takes,
// or "".
func pickProtocol(r *http.Request, ok func(string) bool) string {
	for _, p := range offeredProtocols(r) {
		if ok(p) {
			return p
		}
	}
	return ""
}

// offeredProtocols lists the subprotocols the client offered, in order.
func offeredProtocols(r *http.Request) []string {
	var out []string
	for _, v := range r.Header["Sec-Websocket-Protocol"] {
		for _, p := range strings.Split(v, ",") {
			if p = textproto.TrimString(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func validToken(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte("()<>@,;:\\\"/[]?={}", c) >= 0 {
			return false
		}
	}
	return s != ""
}

func headerHasToken(values []string, token string) bool {
	for _, v := range values {
		for _, t := range strings.Split(v, ",") {
			if strings.EqualFold(textproto.TrimString(t), token) {
				return true
			}
		}
	}
	return false
}

// hopHeaders are never copied from the client's request to the upstream's.
var hopHeaders = map[string]bool{
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
	"Host": true, "Content-Length": true,
}

// neverForward reports whether a (canonical) header is managed by the
// gateway and so cannot be listed in ForwardHeaders.
func neverForward(h string) bool {
	return hopHeaders[h] || strings.HasPrefix(h, "Sec-Websocket-") || strings.HasPrefix(h, "X-Forwarded-") || h == "X-Real-Ip"
}

// RequestInfo is what the gateway knows about the client beyond the request:
// the caller (the Caddy module) fills it from its own trusted-proxy logic.
type RequestInfo struct {
	// ClientIP is the real client's address (after trusted proxies).
	ClientIP string
	// TrustedProxy is true when the immediate peer is a trusted proxy, so
	// its X-Forwarded-* headers are kept and extended rather than replaced.
	TrustedProxy bool

	// BalanceKey is what the key LB policy hashes (a claim, for
	// instance); "" lets its fallback choose.
	BalanceKey string

	// Header is set on the upstream handshake after the forwarded headers
	// (claims, for instance).
	Header http.Header
	// Protocols, if not nil, replaces the subprotocols offered to the
	// upstream (a token carried in Sec-WebSocket-Protocol is removed so).
	Protocols []string
	// AcceptProtocol is answered to the client when the upstream picks no
	// subprotocol (browsers fail a handshake that offered subprotocols and
	// got none back).
	AcceptProtocol string

	// Expiry is when the client's credentials expire: the connection is
	// closed then (1008 "token expired") unless refreshed. Zero: never.
	Expiry time.Time
	// Refresh verifies a token sent in band as a client text message
	// {"<RefreshField>": "<token>"} and returns its expiry.
	Refresh      func(token string) (time.Time, error)
	RefreshField string

	// OnClose is called exactly once when the connection has ended, or when
	// the request failed before a connection was made.
	OnClose func()
	// OnEnd, if set, is called once when a connection that started has
	// ended (before OnClose), with what it did and how it closed.
	OnEnd func(*ConnEnd)

	// Inspect, if set, sees every complete client message (unmasked; text
	// already checked as UTF-8) before it is forwarded, and says whether it
	// passes. A drop may carry a text reply for the client. Fragmented
	// messages are assembled first (up to the client's MaxMessage) and
	// forwarded as one frame.
	Inspect func(msg []byte, text bool) (Verdict, []byte)

	// OnStart is called once the connection is live, with a handle to it.
	OnStart func(Session)

	// UpstreamControl, if set, sees single-frame text messages from the
	// upstream (up to 16 KiB) and reports whether it consumed them (they
	// then never reach the client).
	UpstreamControl func(msg []byte) bool

	// Meta describes the connection in the registry's listings (the admin
	// API). The gateway sets its ID and Started, and its Remote when empty.
	Meta ConnInfo
}

// Verdict is what Inspect decides for a message.
type Verdict uint8

// Verdicts.
const (
	// Pass forwards the message.
	Pass Verdict = iota
	// Drop discards it (and sends the reply, if any); the connection stays.
	Drop
	// Close closes the connection with 1008 "forbidden".
	Close
)

// upstreamHeader builds the headers of the upstream handshake: the chosen
// client headers, then X-Forwarded-For/Proto/Host and X-Real-IP.
func (g *Gateway) upstreamHeader(r *http.Request, info *RequestInfo) http.Header {
	h := make(http.Header, len(g.cfg.ForwardHeaders)+4)
	for _, name := range g.cfg.ForwardHeaders {
		name = http.CanonicalHeaderKey(name)
		if vs := r.Header[name]; len(vs) > 0 {
			h[name] = append([]string(nil), vs...)
		}
	}
	peer, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		peer = r.RemoteAddr
	}
	client := info.ClientIP
	if client == "" {
		client = peer
	}
	xff := peer
	proto := "http"
	if r.TLS != nil {
		proto = "https"
	}
	host := r.Host
	if info.TrustedProxy {
		if prior := r.Header.Values("X-Forwarded-For"); len(prior) > 0 {
			xff = strings.Join(prior, ", ") + ", " + peer
		}
		if p := r.Header.Get("X-Forwarded-Proto"); p != "" {
			proto = p
		}
		if p := r.Header.Get("X-Forwarded-Host"); p != "" {
			host = p
		}
	}
	h.Set("X-Forwarded-For", xff)
	h.Set("X-Forwarded-Proto", proto)
	h.Set("X-Forwarded-Host", host)
	h.Set("X-Real-Ip", client)
	for k, v := range info.Header {
		h[k] = v
	}
	return h
}
