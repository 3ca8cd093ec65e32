package proxy

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// LB policy names.
const (
	RoundRobin   = "round_robin"
	LeastConn    = "least_conn"
	Random       = "random"
	RandomChoose = "random_choose"
	First        = "first"
	IPHash       = "ip_hash"
	ClientIPHash = "client_ip_hash"
	HeaderHash   = "header"
	CookieHash   = "cookie"
	KeyHash      = "key"
)

// DefaultLBCookie is the sticky cookie's name when none is given, as
// reverse_proxy's.
const DefaultLBCookie = "lb"

// LBPolicy chooses the upstream of each new connection among the usable
// ones (not set aside by health checks); when its dial fails, the policy
// chooses again among the others.
type LBPolicy struct {
	// Policy is one of:
	//   - round_robin (default): each in turn;
	//   - least_conn: the fewest live connections, ties broken at random;
	//   - random;
	//   - random_choose: Choose upstreams at random, then the one of them
	//     with the fewest live connections;
	//   - first: the first usable, in the order configured;
	//   - ip_hash: by the address of the immediate peer;
	//   - client_ip_hash: by the client's address (RequestInfo.ClientIP);
	//   - header: by the value of the request header Field;
	//   - cookie: by the cookie Field (default "lb"): a request without it,
	//     or whose upstream is set aside, gets one chosen by Fallback, and
	//     the cookie is set in the 101 response;
	//   - key: by RequestInfo.BalanceKey (the Caddy module puts a claim
	//     there).
	// The hashing policies use rendezvous (highest random weight) hashing
	// over the usable upstreams: a client moves only when its upstream is
	// set aside or removed, and moves back when it returns.
	Policy string
	// Choose is random_choose's sample size. Default 2.
	Choose int
	// Field is header's header name, or cookie's cookie name.
	Field string
	// Secret keys the HMAC that the cookie's value is (of the upstream's
	// URL, password redacted), so that clients cannot tell which address
	// a value names. Default empty (an HMAC with an empty key: anyone who
	// knows the upstream URLs can compute the values).
	Secret string
	// MaxAge is the cookie's Max-Age. Default: none (a session cookie).
	MaxAge time.Duration
	// Fallback chooses for a request without a key (header, cookie, key).
	// Default random, as reverse_proxy's.
	Fallback *LBPolicy
}

// Check reports what Config.Prepare would refuse in p, leaving p as it is.
func (p LBPolicy) Check() error {
	if p.Fallback != nil {
		fb := *p.Fallback
		p.Fallback = &fb
	}
	_, err := p.prepare(func(int) int { return 0 }, false)
	return err
}

// query is what a policy sees of a request.
type query struct {
	r    *http.Request
	info *RequestInfo
}

// selector is a prepared LBPolicy: it returns the index, in cands, of the
// upstream to dial. cands is never empty.
type selector interface {
	pick(cands []*Upstream, q *query) int
}

// prepare checks p and makes its selector; rnd returns numbers in [0,n).
func (p *LBPolicy) prepare(rnd func(int) int, nested bool) (selector, error) {
	needsFallback := false
	var s selector
	switch p.Policy {
	case "", RoundRobin:
		s = new(roundRobin)
	case LeastConn:
		s = leastConn{rnd}
	case Random:
		s = randomPick{rnd}
	case RandomChoose:
		if p.Choose == 0 {
			p.Choose = 2
		}
		if p.Choose < 2 {
			return nil, fmt.Errorf("lb_policy random_choose needs at least 2, not %d", p.Choose)
		}
		s = randomChoose{rnd, p.Choose}
	case First:
		s = firstPick{}
	case IPHash:
		s = hashPick{key: func(q *query) string { return peerIP(q.r) }}
	case ClientIPHash:
		s = hashPick{key: func(q *query) string {
			if q.info.ClientIP != "" {
				return q.info.ClientIP
			}
			return peerIP(q.r)
		}}
	case HeaderHash:
		if p.Field == "" {
			return nil, errors.New("lb_policy header needs a header name")
		}
		field := http.CanonicalHeaderKey(p.Field)
		s = hashPick{key: func(q *query) string {
			if field == "Host" {
				return q.r.Host
			}
			return q.r.Header.Get(field)
		}}
		needsFallback = true
	case KeyHash:
		s = hashPick{key: func(q *query) string { return q.info.BalanceKey }}
		needsFallback = true
	case CookieHash:
		if p.Field == "" {
			p.Field = DefaultLBCookie
		}
		if p.MaxAge < 0 {
			return nil, errors.New("lb_policy cookie max_age must not be negative")
		}
		s = &cookiePick{name: p.Field, secret: []byte(p.Secret), maxAge: p.MaxAge}
		needsFallback = true
	default:
		return nil, fmt.Errorf("unknown lb_policy %q", p.Policy)
	}
	if !needsFallback {
		if p.Fallback != nil {
			return nil, fmt.Errorf("lb_policy %s takes no fallback", p.Policy)
		}
		return s, nil
	}
	if nested {
		return nil, fmt.Errorf("%s cannot be a fallback: it needs a fallback of its own", p.Policy)
	}
	if p.Fallback == nil {
		p.Fallback = &LBPolicy{Policy: Random}
	}
	fb, err := p.Fallback.prepare(rnd, true)
	if err != nil {
		return nil, fmt.Errorf("fallback: %w", err)
	}
	switch t := s.(type) {
	case hashPick:
		t.fallback = fb
		s = t
	case *cookiePick:
		t.fallback = fb
	}
	return s, nil
}

type roundRobin struct{ next atomic.Uint32 }

func (r *roundRobin) pick(cands []*Upstream, _ *query) int {
	return int((r.next.Add(1) - 1) % uint32(len(cands)))
}

type leastConn struct{ rnd func(int) int }

func (l leastConn) pick(cands []*Upstream, _ *query) int {
	best, ties := 0, 0
	least := int64(-1)
	for i, u := range cands {
		n := u.live.Load()
		switch {
		case least < 0 || n < least:
			best, least, ties = i, n, 1
		case n == least:
			// reservoir sampling among the ties
			ties++
			if l.rnd(ties) == 0 {
				best = i
			}
		}
	}
	return best
}

type randomPick struct{ rnd func(int) int }

func (r randomPick) pick(cands []*Upstream, _ *query) int { return r.rnd(len(cands)) }

type randomChoose struct {
	rnd    func(int) int
	choose int
}

func (r randomChoose) pick(cands []*Upstream, _ *query) int {
	k := min(r.choose, len(cands))
	// a partial Fisher-Yates shuffle of the indexes draws k distinct ones
	idx := make([]int, len(cands))
	for i := range idx {
		idx[i] = i
	}
	best := -1
	for i := 0; i < k; i++ {
		j := i + r.rnd(len(idx)-i)
		idx[i], idx[j] = idx[j], idx[i]
		if best < 0 || cands[idx[i]].live.Load() < cands[best].live.Load() {
			best = idx[i]
		}
	}
	return best
}

type firstPick struct{}

func (firstPick) pick([]*Upstream, *query) int { return 0 }

// hashPick is rendezvous hashing of a key taken from the request.
type hashPick struct {
	key      func(*query) string
	fallback selector // for an empty key; nil: never empty
}

func (h hashPick) pick(cands []*Upstream, q *query) int {
	k := h.key(q)
	if k == "" && h.fallback != nil {
		return h.fallback.pick(cands, q)
	}
	return rendezvous(cands, k)
}

// rendezvous is the upstream with the highest weight for key: each
// upstream's weight depends on the key and its URL alone, so the choice
// is the same on every gateway with the same upstreams, and changes only
// for keys whose upstream comes or goes.
func rendezvous(cands []*Upstream, key string) int {
	best, bestW := 0, uint64(0)
	for i, u := range cands {
		if w := weight(u.name, key); i == 0 || w > bestW {
			best, bestW = i, w
		}
	}
	return best
}

func weight(upstream, key string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(upstream))
	h.Write([]byte{0})
	h.Write([]byte(key))
	// FNV's low bits mix poorly for inputs that differ at the end; the
	// splitmix64 finalizer spreads them.
	x := h.Sum64()
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// cookiePick follows the cookie that names an upstream (by an HMAC of its
// URL, password redacted), or lets the fallback choose.
type cookiePick struct {
	name     string
	secret   []byte
	maxAge   time.Duration
	fallback selector
	values   map[string]string // by upstream name: computed once per configuration
}

// prepareValues computes the cookie value of each upstream (by name,
// password redacted).
func (c *cookiePick) prepareValues(names []string) {
	c.values = make(map[string]string, len(names))
	for _, n := range names {
		c.values[n] = c.hmac(n)
	}
}

// hmac of the redacted URL: the password is no input, so the value
// cannot be used to guess it.
func (c *cookiePick) hmac(name string) string {
	m := hmac.New(sha256.New, c.secret)
	m.Write([]byte(name))
	return hex.EncodeToString(m.Sum(nil))
}

func (c *cookiePick) value(u *Upstream) string {
	if v, ok := c.values[u.name]; ok {
		return v
	}
	return c.hmac(u.name)
}

func (c *cookiePick) pick(cands []*Upstream, q *query) int {
	if ck, err := q.r.Cookie(c.name); err == nil && ck.Value != "" {
		for i, u := range cands {
			if hmac.Equal([]byte(c.value(u)), []byte(ck.Value)) {
				return i
			}
		}
	}
	return c.fallback.pick(cands, q)
}

// cookieFor is the cookie to set in the 101 response when the connection
// went to u: nil when the request's cookie names u already.
func (c *cookiePick) cookieFor(u *Upstream, q *query) *http.Cookie {
	v := c.value(u)
	if ck, err := q.r.Cookie(c.name); err == nil && hmac.Equal([]byte(ck.Value), []byte(v)) {
		return nil
	}
	ck := &http.Cookie{Name: c.name, Value: v, Path: "/", HttpOnly: true, SameSite: http.SameSiteLaxMode}
	if q.r.TLS != nil || q.info.TrustedProxy && q.r.Header.Get("X-Forwarded-Proto") == "https" {
		// a cross-site page's socket carries it only with None, which
		// browsers take only when Secure
		ck.Secure, ck.SameSite = true, http.SameSiteNoneMode
	}
	if c.maxAge > 0 {
		ck.MaxAge = int((c.maxAge + time.Second - 1) / time.Second)
	}
	return ck
}

func peerIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}
