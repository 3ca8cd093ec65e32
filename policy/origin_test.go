package policy

import (
	"errors"
	"strings"
	"testing"
)

func TestOriginPolicy(t *testing.T) {
	tests := []struct {
		name         string
		allowed      []string
		allowMissing bool
		origins      []string // the request's Origin header values
		host         string   // the request's Host
		ok           bool
	}{
		// exact entries
		{"exact", []string{"https://app.test"}, false, []string{"https://app.test"}, "gw.test", true},
		{"exact among several", []string{"https://a.test", "https://app.test"}, false, []string{"https://app.test"}, "gw.test", true},
		{"exact with a port", []string{"http://app.test:8080"}, false, []string{"http://app.test:8080"}, "gw.test", true},
		{"exact written with a trailing slash", []string{"https://app.test/"}, false, []string{"https://app.test"}, "gw.test", true},
		{"exact, the Host does not matter", []string{"https://app.test"}, false, []string{"https://app.test"}, "app.test", true},
		{"exact, the same-origin default is off", []string{"https://app.test"}, false, []string{"https://gw.test"}, "gw.test", false},
		{"exact IPv6", []string{"http://[::1]:8080"}, false, []string{"http://[::1]:8080"}, "gw.test", true},

		// wildcards
		{"wildcard, one label", []string{"https://*.example.com"}, false, []string{"https://a.example.com"}, "gw.test", true},
		{"wildcard, several labels", []string{"https://*.example.com"}, false, []string{"https://a.b.c.example.com"}, "gw.test", true},
		{"wildcard with digits and hyphens", []string{"https://*.example.com"}, false, []string{"https://x-1.example.com"}, "gw.test", true},
		{"wildcard with a port", []string{"https://*.example.com:8443"}, false, []string{"https://a.example.com:8443"}, "gw.test", true},
		{"wildcard next to an exact entry", []string{"https://app.test", "https://*.example.com"}, false, []string{"https://a.example.com"}, "gw.test", true},
		{"wildcard, the bare domain", []string{"https://*.example.com"}, false, []string{"https://example.com"}, "gw.test", false},
		{"wildcard, empty label", []string{"https://*.example.com"}, false, []string{"https://.example.com"}, "gw.test", false},
		{"wildcard, empty inner label", []string{"https://*.example.com"}, false, []string{"https://a..example.com"}, "gw.test", false},
		{"wildcard, suffix without a dot", []string{"https://*.example.com"}, false, []string{"https://evilexample.com"}, "gw.test", false},
		{"wildcard, longer domain", []string{"https://*.example.com"}, false, []string{"https://a.example.com.evil"}, "gw.test", false},
		{"wildcard, other scheme", []string{"https://*.example.com"}, false, []string{"http://a.example.com"}, "gw.test", false},
		{"wildcard, explicit default port", []string{"https://*.example.com"}, false, []string{"https://a.example.com:443"}, "gw.test", false},
		{"wildcard, other port", []string{"https://*.example.com"}, false, []string{"https://a.example.com:8443"}, "gw.test", false},
		{"wildcard with a port, no port", []string{"https://*.example.com:8443"}, false, []string{"https://a.example.com"}, "gw.test", false},
		{"wildcard, upper case", []string{"https://*.example.com"}, false, []string{"https://A.example.com"}, "gw.test", false},
		{"wildcard, upper case scheme", []string{"https://*.example.com"}, false, []string{"HTTPS://a.example.com"}, "gw.test", false},
		{"wildcard, path", []string{"https://*.example.com"}, false, []string{"https://a.example.com/"}, "gw.test", false},
		{"wildcard, path ending in the domain", []string{"https://*.example.com"}, false, []string{"https://evil.test/.example.com"}, "gw.test", false},
		{"wildcard, query ending in the domain", []string{"https://*.example.com"}, false, []string{"https://evil.test?.example.com"}, "gw.test", false},
		{"wildcard, fragment ending in the domain", []string{"https://*.example.com"}, false, []string{"https://evil.test#.example.com"}, "gw.test", false},
		{"wildcard, userinfo", []string{"https://*.example.com"}, false, []string{"https://evil.test@a.example.com"}, "gw.test", false},
		{"wildcard, userinfo with a colon", []string{"https://*.example.com"}, false, []string{"https://a:b@a.example.com"}, "gw.test", false},
		{"wildcard, underscore", []string{"https://*.example.com"}, false, []string{"https://a_b.example.com"}, "gw.test", false},
		{"wildcard, empty port", []string{"https://*.example.com"}, false, []string{"https://a.example.com:"}, "gw.test", false},
		{"wildcard, brackets", []string{"https://*.example.com:8443"}, false, []string{"https://[a.example.com]:8443"}, "gw.test", false},
		{"wildcard, percent-encoding", []string{"https://*.example.com"}, false, []string{"https://a%2eexample.com"}, "gw.test", false},
		{"wildcard, no scheme", []string{"https://*.example.com"}, false, []string{"a.example.com"}, "gw.test", false},

		// refused variants of an exact entry
		{"null", []string{"https://app.test"}, false, []string{"null"}, "gw.test", false},
		{"upper case host", []string{"https://app.test"}, false, []string{"https://APP.test"}, "gw.test", false},
		{"upper case scheme", []string{"https://app.test"}, false, []string{"HTTPS://app.test"}, "gw.test", false},
		{"explicit default port", []string{"https://app.test"}, false, []string{"https://app.test:443"}, "gw.test", false},
		{"other port", []string{"https://app.test"}, false, []string{"https://app.test:8443"}, "gw.test", false},
		{"other scheme", []string{"https://app.test"}, false, []string{"http://app.test"}, "gw.test", false},
		{"ws scheme", []string{"https://app.test"}, false, []string{"wss://app.test"}, "gw.test", false},
		{"longer domain", []string{"https://allowed.com"}, false, []string{"https://allowed.com.evil"}, "gw.test", false},
		{"subdomain of an exact entry", []string{"https://allowed.com"}, false, []string{"https://a.allowed.com"}, "gw.test", false},
		{"suffix without a dot", []string{"https://example.com"}, false, []string{"https://evilexample.com"}, "gw.test", false},
		{"trailing dot", []string{"https://app.test"}, false, []string{"https://app.test."}, "gw.test", false},
		{"path", []string{"https://app.test"}, false, []string{"https://app.test/"}, "gw.test", false},
		{"longer path", []string{"https://app.test"}, false, []string{"https://app.test/x"}, "gw.test", false},
		{"query", []string{"https://app.test"}, false, []string{"https://app.test?x=1"}, "gw.test", false},
		{"userinfo before the allowed host", []string{"https://app.test"}, false, []string{"https://evil.test@app.test"}, "gw.test", false},
		{"allowed host as userinfo", []string{"https://app.test"}, false, []string{"https://app.test@evil.test"}, "gw.test", false},
		{"spaces", []string{"https://app.test"}, false, []string{" https://app.test"}, "gw.test", false},
		{"empty Origin", []string{"https://app.test"}, false, []string{""}, "gw.test", false},

		// same origin (no allow-list)
		{"same origin", nil, false, []string{"https://gw.test"}, "gw.test", true},
		{"same origin over http", nil, false, []string{"http://gw.test"}, "gw.test", true},
		{"same origin with a port", nil, false, []string{"https://gw.test:8443"}, "gw.test:8443", true},
		{"same origin, Host spells out 443", nil, false, []string{"https://gw.test"}, "gw.test:443", true},
		{"same origin, Host spells out 80", nil, false, []string{"http://gw.test"}, "gw.test:80", true},
		{"same origin, Host in upper case", nil, false, []string{"https://gw.test"}, "GW.test", true},
		{"same origin IPv6", nil, false, []string{"http://[::1]:8080"}, "[::1]:8080", true},
		{"same origin, 80 for https", nil, false, []string{"https://gw.test"}, "gw.test:80", false},
		{"same origin, 443 for http", nil, false, []string{"http://gw.test"}, "gw.test:443", false},
		{"same origin, Origin spells out 443", nil, false, []string{"https://gw.test:443"}, "gw.test", false},
		{"same origin, other port", nil, false, []string{"https://gw.test:8443"}, "gw.test", false},
		{"same origin, Host has a port the Origin lacks", nil, false, []string{"https://gw.test"}, "gw.test:8443", false},
		{"same origin, other host", nil, false, []string{"https://evil.test"}, "gw.test", false},
		{"same origin, subdomain", nil, false, []string{"https://a.gw.test"}, "gw.test", false},
		{"same origin, longer host", nil, false, []string{"https://gw.test.evil"}, "gw.test", false},
		{"same origin, suffix without a dot", nil, false, []string{"https://evilgw.test"}, "gw.test", false},
		{"same origin, null", nil, false, []string{"null"}, "gw.test", false},
		{"same origin, upper case Origin", nil, false, []string{"https://GW.test"}, "gw.test", false},
		{"same origin, ws scheme", nil, false, []string{"wss://gw.test"}, "gw.test", false},
		{"same origin, file scheme", nil, false, []string{"file://gw.test"}, "gw.test", false},
		{"same origin, path", nil, false, []string{"https://gw.test/"}, "gw.test", false},
		{"same origin, query", nil, false, []string{"https://gw.test?"}, "gw.test", false},
		{"same origin, userinfo", nil, false, []string{"https://gw.test@evil.test"}, "gw.test", false},
		{"same origin, Host as userinfo", nil, false, []string{"https://evil.test@gw.test"}, "gw.test", false},
		{"same origin, empty Host", nil, false, []string{"https://"}, "", false},
		{"same origin, empty Origin", nil, false, []string{""}, "gw.test", false},

		// missing and repeated headers
		{"missing Origin", []string{"https://app.test"}, false, nil, "gw.test", false},
		{"missing Origin, allowed", []string{"https://app.test"}, true, nil, "gw.test", true},
		{"missing Origin, same origin", nil, false, nil, "gw.test", false},
		{"missing Origin, same origin, allowed", nil, true, nil, "gw.test", true},
		{"two Origin headers", []string{"https://app.test"}, false, []string{"https://app.test", "https://app.test"}, "gw.test", false},
		{"two Origin headers, missing allowed", []string{"https://app.test"}, true, []string{"https://app.test", "https://evil.test"}, "gw.test", false},
		{"two Origin headers, same origin", nil, true, []string{"https://gw.test", "https://gw.test"}, "gw.test", false},
		{"an empty Origin is not a missing one", nil, true, []string{""}, "gw.test", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := NewOriginPolicy(tt.allowed, tt.allowMissing)
			if err != nil {
				t.Fatalf("NewOriginPolicy(%q): %v", tt.allowed, err)
			}
			if got, want := p.SameOrigin(), len(tt.allowed) == 0; got != want {
				t.Errorf("SameOrigin() = %v, want %v", got, want)
			}
			err = p.Check(tt.origins, tt.host)
			if tt.ok && err != nil {
				t.Errorf("Check(%q, %q) = %v, want allowed", tt.origins, tt.host, err)
			}
			if !tt.ok {
				if err == nil {
					t.Errorf("Check(%q, %q) allowed, want refused", tt.origins, tt.host)
				} else if !errors.Is(err, ErrOrigin) {
					t.Errorf("error %q is not ErrOrigin", err)
				} else if got, want := errors.Is(err, ErrNoOrigin), tt.origins == nil; got != want {
					t.Errorf("error %q: errors.Is(ErrNoOrigin) = %v, want %v", err, got, want)
				}
			}
		})
	}
}

func TestNewOriginPolicyErrors(t *testing.T) {
	tests := []struct {
		entry, want string
	}{
		{"https://app.test/path", "no path"},
		{"https://app.test/?", "want scheme://host"},
		{"https://app.test?", "want scheme://host"},
		{"https://app.test#", "want scheme://host"},
		{"https://a%c3%a9.test", "want scheme://host"},
		{"https://app.test?x=1", "no path"},
		{"https://app.test#top", "no path"},
		{"https://user@app.test", "no path"},
		{"https://user:pw@app.test", "no path"},
		{"https://App.test", "lower case"},
		{"HTTPS://app.test", "lower case"},
		{"https://app.test:443", "omit the default port"},
		{"http://app.test:80", "omit the default port"},
		{"wss://app.test:443", "omit the default port"},
		{"https://*.com", "at least two labels"},
		{"https://*.", "at least two labels"},
		{"https://*.com.", "at least two labels"},
		{"https://*.a..b", "at least two labels"},
		{"https://*.*.example.com", "at least two labels"},
		{"https://a.*.b", "only be the first label"},
		{"https://*example.com", "only be the first label"},
		{"https://app*.example.com", "only be the first label"},
		{"https://*", "only be the first label"},
		{"app.test", "want scheme://host"},
		{"*.example.com", "want scheme://host"},
		{"//app.test", "want scheme://host"},
		{"https://", "want scheme://host"},
		{"https:app.test", "want scheme://host"},
		{"", "want scheme://host"},
		{"https://app .test", "want scheme://host"},
	}
	for _, tt := range tests {
		t.Run(tt.entry, func(t *testing.T) {
			p, err := NewOriginPolicy([]string{"https://ok.test", tt.entry}, false)
			if err == nil {
				t.Fatalf("accepted; policy %+v", p)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q does not contain %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.entry) {
				t.Errorf("error %q does not name the entry", err)
			}
		})
	}
}
