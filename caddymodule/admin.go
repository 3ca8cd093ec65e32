package caddymodule

import (
	"cmp"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves wsgate's routes on Caddy's admin endpoint, behind its
// access control:
//
//	GET  /wsgate/connections   live connections (filters, cursor, count)
//	GET  /wsgate/channels      channels with their subscriber counts
//	GET  /wsgate/upstreams     each handler's upstreams: live connections, health
//	POST /wsgate/disconnect    close connections by id or by subject
//
// With a Redis broker every route covers every node that shares the Redis
// (see broker.Gatherer); with the memory broker, this node. It has no
// configuration: Caddy loads every admin.api module.
type AdminAPI struct{}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "admin.api.wsgate", New: func() caddy.Module { return new(AdminAPI) }}
}

// Routes returns the admin routes.
func (AdminAPI) Routes() []caddy.AdminRoute {
	a := &adminServer{conns: registry, hub: currentHub}
	return []caddy.AdminRoute{
		{Pattern: "/wsgate/connections", Handler: caddy.AdminHandlerFunc(a.handleConnections)},
		{Pattern: "/wsgate/channels", Handler: caddy.AdminHandlerFunc(a.handleChannels)},
		{Pattern: "/wsgate/upstreams", Handler: caddy.AdminHandlerFunc(a.handleUpstreams)},
		{Pattern: "/wsgate/disconnect", Handler: caddy.AdminHandlerFunc(a.handleDisconnect)},
	}
}

// adminServer serves the routes for one node.
type adminServer struct {
	conns connSource        // this node's connections
	hub   func() *sharedHub // the hub and the broker that reaches the other nodes
}

// connSource is what the API needs of the registry.
type connSource interface {
	Conns() []*proxy.ConnInfo
	Disconnect(match func(*proxy.ConnInfo) bool, code uint16, reason string) int
}

// Listing bounds.
const (
	defaultLimit = 100
	maxLimit     = 1000
	// defaultGather is how long a request waits for the other nodes'
	// answers when it does not say (?timeout=); maxGather bounds what it
	// may say.
	defaultGather = 500 * time.Millisecond
	maxGather     = 10 * time.Second
	// maxReason is the longest close reason: a close frame's payload is at
	// most 125 bytes, two of which are the code.
	maxReason = 123
)

// adminRequest is what one node asks every node (JSON on the control
// channel).
type adminRequest struct {
	Op     string     `json:"op"` // connections, count, channels, upstreams, disconnect
	Filter connFilter `json:"filter,omitzero"`
	Prefix string     `json:"prefix,omitempty"` // channels
	After  string     `json:"after,omitempty"`  // cursor: list what sorts after it
	Limit  int        `json:"limit,omitempty"`
	Code   uint16     `json:"code,omitempty"`
	Reason string     `json:"reason,omitempty"`
}

// connFilter selects connections; empty fields match any.
type connFilter struct {
	ID      string `json:"id,omitempty"`
	Subject string `json:"subject,omitempty"`
	Remote  string `json:"remote,omitempty"` // an address or a CIDR prefix
	Handler string `json:"handler,omitempty"`
	Mode    string `json:"mode,omitempty"`
	Channel string `json:"channel,omitempty"`
}

// adminAnswer is one node's answer.
type adminAnswer struct {
	Node        string          `json:"node"`
	Connections []connEntry     `json:"connections,omitempty"`
	Channels    []channelEntry  `json:"channels,omitempty"`
	Upstreams   []upstreamEntry `json:"upstreams,omitempty"`
	Count       int             `json:"count,omitempty"` // count: matching; disconnect: closed
	More        bool            `json:"more,omitempty"`  // the node has more than Limit after After
}

// connEntry is a connection as the API lists it.
type connEntry struct {
	ID       string    `json:"id"`
	Node     string    `json:"node"`
	Subject  string    `json:"subject,omitempty"`
	Remote   string    `json:"remote"`
	Handler  string    `json:"handler"`
	Mode     string    `json:"mode"`
	Upstream string    `json:"upstream,omitempty"`
	Started  time.Time `json:"started"`
	Channels []string  `json:"channels,omitempty"`
}

// upstreamEntry is an upstream of a handler, as one node sees it.
type upstreamEntry struct {
	Node    string `json:"node"`
	Handler string `json:"handler"`
	URL     string `json:"url"`
	// Connections counts its relayed connections (and those being dialled).
	Connections int64 `json:"connections"`
	// Healthy: it takes new connections.
	Healthy bool `json:"healthy"`
	// PassiveDown: passive checks set it aside, until DownUntil (then one
	// dial at a time tries it).
	PassiveDown bool       `json:"passive_down,omitzero"`
	DownUntil   *time.Time `json:"down_until,omitempty"`
	// ActiveDown: its last probes failed.
	ActiveDown bool `json:"active_down,omitzero"`
	// Removed: a reload removed it; its connections live on or drain.
	Removed   bool   `json:"removed,omitzero"`
	LastError string `json:"last_error,omitempty"`
}

// channelEntry is a channel and its subscribers (on one node, or summed).
type channelEntry struct {
	Channel     string `json:"channel"`
	Subscribers int    `json:"subscribers"`
}

// nodeName names this process in answers: its host name and process id.
var nodeName = func() string {
	host, _ := os.Hostname()
	return host + ":" + strconv.Itoa(os.Getpid())
}()

// check refuses a filter that can never match.
func (f connFilter) check() error {
	if f.Remote != "" && strings.Contains(f.Remote, "/") {
		if _, err := netip.ParsePrefix(f.Remote); err != nil {
			return fmt.Errorf("remote %q: not an address or a CIDR prefix", f.Remote)
		}
	}
	return nil
}

// match reports whether m passes the filter.
func (f connFilter) match(m *proxy.ConnInfo) bool {
	switch {
	case f.ID != "" && m.ID != f.ID,
		f.Subject != "" && m.Subject != f.Subject,
		f.Handler != "" && m.Handler != f.Handler,
		f.Mode != "" && m.Mode != f.Mode,
		f.Remote != "" && !matchRemote(f.Remote, m.Remote):
		return false
	case f.Channel != "":
		return m.Channels != nil && slices.Contains(m.Channels(), f.Channel)
	}
	return true
}

func matchRemote(want, remote string) bool {
	if !strings.Contains(want, "/") {
		return remote == want
	}
	p, err1 := netip.ParsePrefix(want)
	a, err2 := netip.ParseAddr(remote)
	return err1 == nil && err2 == nil && p.Contains(a.Unmap())
}

// answerLocal answers a request for this node's connections (reg) and
// channels (hub).
func answerLocal(reg connSource, hub *rooms.Hub, req adminRequest) adminAnswer {
	ans := adminAnswer{Node: nodeName}
	switch req.Op {
	case "count":
		for _, m := range reg.Conns() {
			if req.Filter.match(m) {
				ans.Count++
			}
		}
	case "connections":
		var list []*proxy.ConnInfo
		for _, m := range reg.Conns() {
			if m.ID > req.After && req.Filter.match(m) {
				list = append(list, m)
			}
		}
		slices.SortFunc(list, func(a, b *proxy.ConnInfo) int { return strings.Compare(a.ID, b.ID) })
		if len(list) > req.Limit {
			list, ans.More = list[:req.Limit], true
		}
		ans.Connections = make([]connEntry, len(list))
		for i, m := range list {
			e := connEntry{ID: m.ID, Node: nodeName, Subject: m.Subject, Remote: m.Remote, Handler: m.Handler, Mode: m.Mode,
				Upstream: m.Upstream, Started: m.Started}
			if m.Channels != nil {
				e.Channels = m.Channels()
			}
			ans.Connections[i] = e
		}
	case "channels":
		for _, c := range hub.ChannelCounts() {
			if c.Channel <= req.After || !strings.HasPrefix(c.Channel, req.Prefix) {
				continue
			}
			if len(ans.Channels) == req.Limit {
				ans.More = true
				break
			}
			ans.Channels = append(ans.Channels, channelEntry{c.Channel, c.Subscribers})
		}
	case "upstreams":
		ans.Upstreams = localUpstreams(req.Filter.Handler)
	case "disconnect":
		ans.Count = reg.Disconnect(req.Filter.match, req.Code, req.Reason)
	}
	return ans
}

// answerer is the broker's Answer function: it answers the control
// requests of every node sharing the broker for this process.
func answerer(hub *rooms.Hub) func([]byte) []byte {
	return func(body []byte) []byte {
		var req adminRequest
		if json.Unmarshal(body, &req) != nil || req.check() != nil {
			return nil // the asker counts this node as not answering
		}
		b, _ := json.Marshal(answerLocal(registry, hub, req))
		return b
	}
}

// check refuses requests that a node cannot answer (from a node of another
// version, or altered on the way).
func (req adminRequest) check() error {
	switch req.Op {
	case "count", "upstreams":
	case "connections", "channels":
		if req.Limit < 1 || req.Limit > maxLimit {
			return errors.New("bad limit")
		}
	case "disconnect":
		if req.Filter.ID == "" && req.Filter.Subject == "" {
			return errors.New("disconnect needs an id or a subject")
		}
		if err := checkClose(req.Code, req.Reason); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown op %q", req.Op)
	}
	return req.Filter.check()
}

// checkClose refuses a close code an application may not send, and a
// reason that does not fit in a close frame.
func checkClose(code uint16, reason string) error {
	if code != 1000 && (code < 3000 || code > 4999) {
		return fmt.Errorf("code %d: want 1000 or 3000-4999", code)
	}
	if len(reason) > maxReason {
		return fmt.Errorf("reason is %d bytes: at most %d", len(reason), maxReason)
	}
	if !utf8.ValidString(reason) {
		return errors.New("reason is not valid UTF-8")
	}
	return nil
}

// gathered is what the nodes answered to one request.
type gathered struct {
	answers   []adminAnswer
	nodes     int   // how many nodes got the request
	brokerErr error // the broker could not be reached: this node answered alone
}

// ask sends req to every node (through the current wsgate app's broker)
// and gathers their answers for at most wait.
func (s *adminServer) ask(ctx context.Context, req adminRequest, wait time.Duration) gathered {
	sh := s.hub()
	g, ok := sh.broker.(broker.Gatherer)
	if !ok {
		return gathered{answers: []adminAnswer{answerLocal(s.conns, sh.hub, req)}, nodes: 1}
	}
	body, _ := json.Marshal(req)
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	raw, n, err := g.Gather(ctx, body)
	if err != nil {
		return gathered{answers: []adminAnswer{answerLocal(s.conns, sh.hub, req)}, nodes: 1, brokerErr: err}
	}
	res := gathered{nodes: n}
	for _, b := range raw {
		var a adminAnswer
		if json.Unmarshal(b, &a) == nil && a.Node != "" {
			res.answers = append(res.answers, a)
		}
	}
	return res
}

// status is the part of every response that says how complete it is.
type status struct {
	Nodes    int    `json:"nodes"`            // nodes that got the request
	Answered int    `json:"answered"`         // nodes that answered in time
	Partial  bool   `json:"partial,omitzero"` // some node's part is missing
	Error    string `json:"error,omitempty"`  // why
}

func (g gathered) status() status {
	s := status{Nodes: g.nodes, Answered: len(g.answers)}
	switch {
	case g.brokerErr != nil:
		s.Partial, s.Error = true, "broker unavailable: this node only ("+g.brokerErr.Error()+")"
	case s.Answered < s.Nodes:
		s.Partial, s.Error = true, fmt.Sprintf("%d of %d nodes did not answer in time", s.Nodes-s.Answered, s.Nodes)
	}
	return s
}

// badRequest is a 400 with the error as JSON.
func badRequest(format string, args ...any) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}

func allow(r *http.Request, w http.ResponseWriter, method string) error {
	if r.Method == method || (method == http.MethodGet && r.Method == http.MethodHead) {
		return nil
	}
	w.Header().Set("Allow", method)
	return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method %s not allowed: use %s", r.Method, method)}
}

// listParams reads the query parameters every listing takes: limit,
// cursor and timeout. Unknown parameters are refused (a typo in a filter
// would otherwise list everything).
func listParams(r *http.Request, known ...string) (limit int, after string, wait time.Duration, err error) {
	q := r.URL.Query()
	for k := range q {
		if !slices.Contains(known, k) && k != "limit" && k != "cursor" && k != "timeout" {
			return 0, "", 0, badRequest("unknown parameter %q: known are %s, limit, cursor, timeout", k, strings.Join(known, ", "))
		}
		if len(q[k]) > 1 {
			return 0, "", 0, badRequest("parameter %q given %d times", k, len(q[k]))
		}
	}
	limit = defaultLimit
	if v := q.Get("limit"); v != "" {
		if limit, err = strconv.Atoi(v); err != nil || limit < 1 || limit > maxLimit {
			return 0, "", 0, badRequest("limit %q: want a number from 1 to %d", v, maxLimit)
		}
	}
	if v := q.Get("cursor"); v != "" {
		b, err := base64.RawURLEncoding.DecodeString(v)
		if err != nil || len(b) == 0 {
			return 0, "", 0, badRequest("cursor %q: not one this API returned", v)
		}
		after = string(b)
	}
	if wait, err = parseWait(q); err != nil {
		return 0, "", 0, err
	}
	return limit, after, wait, nil
}

// parseWait reads the timeout parameter: how long to wait for the other
// nodes' answers.
func parseWait(q url.Values) (time.Duration, error) {
	v := q.Get("timeout")
	if v == "" {
		return defaultGather, nil
	}
	wait, err := time.ParseDuration(v)
	if err != nil || wait <= 0 || wait > maxGather {
		return 0, badRequest("timeout %q: want a duration such as 500ms, at most %v", v, maxGather)
	}
	return wait, nil
}

func cursor(key string) string { return base64.RawURLEncoding.EncodeToString([]byte(key)) }

// page is the first limit entries of a sorted list, and the cursor of the
// page after them: when the list, or a node's part of it (more), goes on.
func page[T any](list []T, limit int, more bool, key func(T) string) ([]T, string) {
	if len(list) > limit {
		list, more = list[:limit], true
	}
	if !more || len(list) == 0 {
		return list, ""
	}
	return list, cursor(key(list[len(list)-1]))
}

func writeJSON(w http.ResponseWriter, status int, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(v)
}

// handleConnections lists connections:
//
//	GET /wsgate/connections?subject=&remote=&handler=&mode=&channel=&id=&limit=&cursor=&timeout=
//	GET /wsgate/connections?count[&filters]
func (s *adminServer) handleConnections(w http.ResponseWriter, r *http.Request) error {
	if err := allow(r, w, http.MethodGet); err != nil {
		return err
	}
	limit, after, wait, err := listParams(r, "id", "subject", "remote", "handler", "mode", "channel", "count")
	if err != nil {
		return err
	}
	q := r.URL.Query()
	f := connFilter{ID: q.Get("id"), Subject: q.Get("subject"), Remote: q.Get("remote"), Handler: q.Get("handler"), Mode: q.Get("mode"), Channel: q.Get("channel")}
	if err := f.check(); err != nil {
		return badRequest("%v", err)
	}
	if q.Has("count") {
		if q.Get("count") != "" && q.Get("count") != "true" {
			return badRequest("count takes no value")
		}
		if q.Has("cursor") || q.Has("limit") {
			return badRequest("count does not take limit or cursor")
		}
		g := s.ask(r.Context(), adminRequest{Op: "count", Filter: f}, wait)
		total := 0
		for _, a := range g.answers {
			total += a.Count
		}
		return writeJSON(w, http.StatusOK, struct {
			Count int `json:"count"`
			status
		}{total, g.status()})
	}
	g := s.ask(r.Context(), adminRequest{Op: "connections", Filter: f, After: after, Limit: limit}, wait)
	list := []connEntry{}
	more := false
	for _, a := range g.answers {
		list = append(list, a.Connections...)
		more = more || a.More
	}
	slices.SortFunc(list, func(a, b connEntry) int { return strings.Compare(a.ID, b.ID) })
	resp := struct {
		Connections []connEntry `json:"connections"`
		NextCursor  string      `json:"next_cursor,omitempty"`
		status
	}{status: g.status()}
	resp.Connections, resp.NextCursor = page(list, limit, more, func(c connEntry) string { return c.ID })
	return writeJSON(w, http.StatusOK, resp)
}

// handleChannels lists channels with their subscribers on every node:
//
//	GET /wsgate/channels?prefix=&limit=&cursor=&timeout=
func (s *adminServer) handleChannels(w http.ResponseWriter, r *http.Request) error {
	if err := allow(r, w, http.MethodGet); err != nil {
		return err
	}
	limit, after, wait, err := listParams(r, "prefix")
	if err != nil {
		return err
	}
	g := s.ask(r.Context(), adminRequest{Op: "channels", Prefix: r.URL.Query().Get("prefix"), After: after, Limit: limit}, wait)
	sum := map[string]int{}
	more := false
	for _, a := range g.answers {
		for _, c := range a.Channels {
			sum[c.Channel] += c.Subscribers
		}
		more = more || a.More
	}
	// Each node sent its first limit channels after the cursor: the first
	// limit of their union are complete (a node missing one of them would
	// have had limit channels before it).
	list := make([]channelEntry, 0, len(sum))
	for ch, n := range sum {
		list = append(list, channelEntry{ch, n})
	}
	slices.SortFunc(list, func(a, b channelEntry) int { return strings.Compare(a.Channel, b.Channel) })
	resp := struct {
		Channels   []channelEntry `json:"channels"`
		NextCursor string         `json:"next_cursor,omitempty"`
		status
	}{status: g.status()}
	resp.Channels, resp.NextCursor = page(list, limit, more, func(c channelEntry) string { return c.Channel })
	return writeJSON(w, http.StatusOK, resp)
}

// localUpstreams lists the upstreams of this node's handlers (of the name
// handler, or all), sorted by handler and URL.
func localUpstreams(handler string) []upstreamEntry {
	var out []upstreamEntry
	now := time.Now()
	for _, m := range allHandlerMetrics() {
		if handler != "" && m.name != handler {
			continue
		}
		for _, u := range m.pool.Status(now) {
			e := upstreamEntry{Node: nodeName, Handler: m.name, URL: u.URL, Connections: u.Live,
				Healthy: u.TakesConnections(), PassiveDown: u.PassiveDown, ActiveDown: u.ActiveDown,
				Removed: u.Removed, LastError: u.LastError}
			if u.PassiveDown {
				until := u.DownUntil
				e.DownUntil = &until
			}
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b upstreamEntry) int {
		return cmp.Or(strings.Compare(a.Handler, b.Handler), strings.Compare(a.URL, b.URL))
	})
	return out
}

// handleUpstreams lists the upstreams of every node's handlers, with their
// live connections and health:
//
//	GET /wsgate/upstreams?handler=&timeout=
func (s *adminServer) handleUpstreams(w http.ResponseWriter, r *http.Request) error {
	if err := allow(r, w, http.MethodGet); err != nil {
		return err
	}
	q := r.URL.Query()
	for k := range q {
		if k != "handler" && k != "timeout" {
			return badRequest("unknown parameter %q: known are handler, timeout", k)
		}
	}
	wait, err := parseWait(q)
	if err != nil {
		return err
	}
	g := s.ask(r.Context(), adminRequest{Op: "upstreams", Filter: connFilter{Handler: q.Get("handler")}}, wait)
	list := []upstreamEntry{}
	for _, a := range g.answers {
		list = append(list, a.Upstreams...)
	}
	slices.SortFunc(list, func(a, b upstreamEntry) int {
		return cmp.Or(strings.Compare(a.Handler, b.Handler), strings.Compare(a.URL, b.URL), strings.Compare(a.Node, b.Node))
	})
	return writeJSON(w, http.StatusOK, struct {
		Upstreams []upstreamEntry `json:"upstreams"`
		status
	}{list, g.status()})
}

// disconnectBody is the body of POST /wsgate/disconnect.
type disconnectBody struct {
	ID      string `json:"id"`
	Subject string `json:"subject"`
	Code    uint16 `json:"code"`
	Reason  string `json:"reason"`
}

// handleDisconnect closes the connections with an id, or of a subject, on
// every node:
//
//	POST /wsgate/disconnect[?timeout=] {"subject":"u-7","code":4001,"reason":"account disabled"}
//
// It answers 200 when every node answered, 503 when some did not (the
// broker is down, or a node was too slow): closing again is harmless.
func (s *adminServer) handleDisconnect(w http.ResponseWriter, r *http.Request) error {
	if err := allow(r, w, http.MethodPost); err != nil {
		return err
	}
	var body disconnectBody
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		return badRequest("reading the body: %v (want JSON such as {\"subject\":\"u-7\",\"code\":4001,\"reason\":\"account disabled\"})", err)
	}
	if dec.More() {
		return badRequest("the body holds more than one JSON value")
	}
	if (body.ID == "") == (body.Subject == "") {
		return badRequest("give either id or subject")
	}
	if body.Code == 0 {
		body.Code = 1000
	}
	if err := checkClose(body.Code, body.Reason); err != nil {
		return badRequest("%v", err)
	}
	wait, err := parseWait(r.URL.Query())
	if err != nil {
		return err
	}
	g := s.ask(r.Context(), adminRequest{Op: "disconnect", Filter: connFilter{ID: body.ID, Subject: body.Subject}, Code: body.Code, Reason: body.Reason}, wait)
	total := 0
	for _, a := range g.answers {
		total += a.Count
	}
	st := g.status()
	code := http.StatusOK
	if st.Partial {
		code = http.StatusServiceUnavailable
	}
	return writeJSON(w, code, struct {
		Disconnected int `json:"disconnected"`
		status
	}{total, st})
}

// Interface guards
var _ caddy.AdminRouter = AdminAPI{}
