package policy

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
)

// OriginPolicy decides whether a browser Origin may open a socket.
//
// Entries are serialized origins as browsers send them: scheme://host or
// scheme://host:port, lower case, without a path. An entry may start its
// host with "*." to allow any subdomain (one or more labels) of the rest:
// https://*.example.com allows https://a.example.com and
// https://a.b.example.com but not https://example.com, and only on the
// default port. Matching is exact: scheme, host and port must all agree, so
// http://, :443 spelled out, upper case or a longer host never match.
//
// With no entries the policy is same-origin: the Origin's host (and port)
// must equal the request's Host.
type OriginPolicy struct {
	exact        map[string]bool
	wild         []wildOrigin
	allowMissing bool
}

type wildOrigin struct {
	scheme string // "https"
	suffix string // ".example.com"
	port   string // "" or "8443"
}

// ErrOrigin is returned (wrapped) for every refused origin.
var ErrOrigin = errors.New("origin not allowed")

// ErrNoOrigin is wrapped, with ErrOrigin, when a request without an Origin
// header is refused: unlike a wrong Origin, that refusal is often a
// non-browser client that allow_missing_origin would let in.
var ErrNoOrigin = errors.New("no Origin header")

// NewOriginPolicy compiles an allow-list. allowMissing lets requests without
// an Origin header (non-browser clients) through.
func NewOriginPolicy(allowed []string, allowMissing bool) (*OriginPolicy, error) {
	p := &OriginPolicy{exact: map[string]bool{}, allowMissing: allowMissing}
	for _, a := range allowed {
		if err := p.add(a); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func (p *OriginPolicy) add(a string) error {
	u, err := url.Parse(a)
	if err != nil || u.Scheme == "" || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("origin %q: want scheme://host[:port]", a)
	}
	if (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return fmt.Errorf("origin %q: an origin has no path, query or user", a)
	}
	if a != strings.ToLower(a) {
		return fmt.Errorf("origin %q: write origins in lower case, as browsers send them", a)
	}
	// The parser unescapes the host and drops an empty query or fragment;
	// an entry must match as written.
	if canon := u.Scheme + "://" + u.Host; a != canon && a != canon+"/" {
		return fmt.Errorf("origin %q: want scheme://host[:port], as browsers send it", a)
	}
	host, port := u.Hostname(), u.Port()
	if port != "" && port == defaultPort(u.Scheme) {
		return fmt.Errorf("origin %q: browsers omit the default port; write %s://%s", a, u.Scheme, host)
	}
	if strings.HasPrefix(host, "*.") {
		rest := host[1:]
		if !strings.Contains(rest[1:], ".") || !validHost(rest[1:]) {
			return fmt.Errorf("origin %q: a wildcard needs a domain of at least two labels after it (https://*.example.com)", a)
		}
		p.wild = append(p.wild, wildOrigin{scheme: u.Scheme, suffix: rest, port: port})
		return nil
	}
	if strings.Contains(host, "*") {
		return fmt.Errorf("origin %q: a wildcard may only be the first label (https://*.example.com)", a)
	}
	p.exact[u.Scheme+"://"+u.Host] = true
	return nil
}

func defaultPort(scheme string) string {
	switch scheme {
	case "http", "ws":
		return "80"
	case "https", "wss":
		return "443"
	}
	return ""
}

// SameOrigin reports whether the policy has no allow-list.
func (p *OriginPolicy) SameOrigin() bool { return len(p.exact) == 0 && len(p.wild) == 0 }

// Check decides an upgrade request's Origin header values against the
// policy; host is the request's Host header.
func (p *OriginPolicy) Check(origins []string, host string) error {
	if len(origins) == 0 {
		if p.allowMissing {
			return nil
		}
		return fmt.Errorf("%w: %w", ErrOrigin, ErrNoOrigin)
	}
	if len(origins) > 1 {
		return fmt.Errorf("%w: more than one Origin header", ErrOrigin)
	}
	o := origins[0]
	if p.SameOrigin() {
		if sameOrigin(o, host) {
			return nil
		}
		return fmt.Errorf("%w: cross-origin", ErrOrigin)
	}
	if p.exact[o] {
		return nil
	}
	if len(p.wild) > 0 {
		scheme, hostport, ok := strings.Cut(o, "://")
		if ok && o == strings.ToLower(o) {
			h, port := splitHostPort(hostport)
			// SplitHostPort also reads "[host]:port" and "host:"
			canon := h
			if port != "" {
				canon += ":" + port
			}
			for _, w := range p.wild {
				if canon == hostport && w.scheme == scheme && w.port == port && len(h) > len(w.suffix) &&
					strings.HasSuffix(h, w.suffix) && validHost(h[:len(h)-len(w.suffix)]) {
					return nil
				}
			}
		}
	}
	return fmt.Errorf("%w: not in the allow-list", ErrOrigin)
}

// sameOrigin compares an Origin with the Host header: the authority must be
// the same (the scheme is not compared: behind a TLS-terminating proxy the
// gateway may not know it).
func sameOrigin(origin, host string) bool {
	scheme, authority, ok := strings.Cut(origin, "://")
	if !ok || (scheme != "http" && scheme != "https") || authority == "" || origin != strings.ToLower(origin) {
		return false
	}
	if strings.ContainsAny(authority, "/?#@") {
		return false
	}
	h := strings.ToLower(host)
	if authority == h {
		return true
	}
	// Host may spell out the default port that the Origin omits.
	if oh, op := splitHostPort(authority); op == "" {
		if hh, hp := splitHostPort(h); hh == oh && hp == defaultPort(scheme) {
			return true
		}
	}
	return false
}

func splitHostPort(hp string) (string, string) {
	if h, p, err := net.SplitHostPort(hp); err == nil {
		return h, p
	}
	return hp, ""
}

// validHost reports whether s is a plausible dot-separated run of DNS
// labels (what a wildcard may stand for).
func validHost(s string) bool {
	if s == "" {
		return false
	}
	for _, label := range strings.Split(s, ".") {
		if label == "" {
			return false
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
