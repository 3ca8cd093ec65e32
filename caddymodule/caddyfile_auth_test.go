package caddymodule

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/wsgate/wsgate/policy"
)

// wsgateBlock puts lines in a wsgate block, the first on line 2.
func wsgateBlock(lines ...string) string {
	return "wsgate ws://a:1 {\n\t" + strings.Join(lines, "\n\t") + "\n}"
}

func TestUnmarshalCaddyfileAuth(t *testing.T) {
	up := []string{"ws://a:1"}
	tests := []struct {
		name  string
		input string
		want  Handler
	}{
		// origins
		{
			name:  "origins",
			input: wsgateBlock("origins https://app.test"),
			want:  Handler{Upstreams: up, Origins: []string{"https://app.test"}},
		},
		{
			name: "origins repeated, several per line",
			input: wsgateBlock(
				"origins https://app.test https://*.example.com",
				"max_message 1KiB",
				"origins http://localhost:3000",
			),
			want: Handler{Upstreams: up, MaxMessage: 1024,
				Origins: []string{"https://app.test", "https://*.example.com", "http://localhost:3000"}},
		},
		{
			name:  "allow_missing_origin",
			input: wsgateBlock("allow_missing_origin"),
			want:  Handler{Upstreams: up, AllowMissingOrigin: true},
		},

		// jwt keys
		{
			name: "jwt with a secret",
			input: `wsgate ws://a:1 {
				jwt {
					secret {env.JWT_SECRET}
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{{Secret: "{env.JWT_SECRET}"}}}}}},
		},
		{
			name: "jwt secret with kid and alg",
			input: `wsgate ws://a:1 {
				jwt {
					secret "a quoted secret of at least 32 bytes" kid k1 alg HS256 HS512
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{
				{ID: "k1", Secret: "a quoted secret of at least 32 bytes", Algorithms: []string{"HS256", "HS512"}},
			}}}}},
		},
		{
			name: "jwt secret with alg only",
			input: `wsgate ws://a:1 {
				jwt {
					secret s-0123456789abcdef0123456789abcdef alg HS384
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{
				{Secret: "s-0123456789abcdef0123456789abcdef", Algorithms: []string{"HS384"}},
			}}}}},
		},
		{
			name: "jwt public_key with kid and alg",
			input: `wsgate ws://a:1 {
				jwt {
					public_key /etc/wsgate/idp.pem kid 2024-1 alg RS256 PS256
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{
				{ID: "2024-1", PublicKeyFile: "/etc/wsgate/idp.pem", Algorithms: []string{"RS256", "PS256"}},
			}}}}},
		},
		{
			name: "jwt with several keys",
			input: `wsgate ws://a:1 {
				jwt {
					secret s1-0123456789abcdef0123456789abcdef kid a
					public_key /k.pem kid b
					secret s2-0123456789abcdef0123456789abcdef kid c alg HS512
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{
				{ID: "a", Secret: "s1-0123456789abcdef0123456789abcdef"},
				{ID: "b", PublicKeyFile: "/k.pem"},
				{ID: "c", Secret: "s2-0123456789abcdef0123456789abcdef", Algorithms: []string{"HS512"}},
			}}}}},
		},
		{
			name: "jwt jwks",
			input: `wsgate ws://a:1 {
				jwt {
					jwks https://idp.test/.well-known/jwks.json
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{JWKSURL: "https://idp.test/.well-known/jwks.json"}}}},
		},
		{
			name: "jwt jwks with refresh and alg",
			input: `wsgate ws://a:1 {
				jwt {
					jwks https://idp.test/jwks refresh 15m alg RS256 ES256
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{
				JWKSURL: "https://idp.test/jwks", JWKSRefresh: dur(15 * time.Minute), JWKSAlgorithms: []string{"RS256", "ES256"},
			}}}},
		},
		{
			name: "jwt jwks with refresh only",
			input: `wsgate ws://a:1 {
				jwt {
					jwks https://idp.test/jwks refresh 1d
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{JWKSURL: "https://idp.test/jwks", JWKSRefresh: dur(24 * time.Hour)}}}},
		},
		{
			name: "jwt top-level issuer line, audience and keys",
			input: `wsgate ws://a:1 {
				jwt {
					issuer https://idp.test
					audience chat admin
					audience api
					jwks https://idp.test/jwks
					secret s-0123456789abcdef0123456789abcdef kid local
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{
				Issuer: "https://idp.test", Audience: []string{"chat", "admin", "api"},
				JWKSURL: "https://idp.test/jwks", Keys: []JWTKey{{ID: "local", Secret: "s-0123456789abcdef0123456789abcdef"}},
			}}}},
		},
		{
			name: "jwt issuer blocks",
			input: `wsgate ws://a:1 {
				jwt {
					issuer https://a.test {
						audience chat
						jwks https://a.test/jwks alg RS256
					}
					issuer https://b.test {
						secret s-0123456789abcdef0123456789abcdef kid b1
						public_key /b.pem kid b2 alg ES256
					}
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{
				{Issuer: "https://a.test", Audience: []string{"chat"}, JWKSURL: "https://a.test/jwks", JWKSAlgorithms: []string{"RS256"}},
				{Issuer: "https://b.test", Keys: []JWTKey{{ID: "b1", Secret: "s-0123456789abcdef0123456789abcdef"}, {ID: "b2", PublicKeyFile: "/b.pem", Algorithms: []string{"ES256"}}}},
			}}},
		},
		{
			name: "jwt top-level keys come first, then issuer blocks",
			input: `wsgate ws://a:1 {
				jwt {
					issuer https://b.test {
						secret sb-0123456789abcdef0123456789abcdef
					}
					issuer https://a.test
					secret sa-0123456789abcdef0123456789abcdef
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{
				{Issuer: "https://a.test", Keys: []JWTKey{{Secret: "sa-0123456789abcdef0123456789abcdef"}}},
				{Issuer: "https://b.test", Keys: []JWTKey{{Secret: "sb-0123456789abcdef0123456789abcdef"}}},
			}}},
		},

		// jwt options
		{
			name: "jwt options",
			input: `wsgate ws://a:1 {
				jwt {
					secret s-0123456789abcdef0123456789abcdef
					leeway 30s
					require_claims sub org
					allow_missing_exp
					max_token_size 16KiB
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{
				Issuers:         []JWTIssuer{{Keys: []JWTKey{{Secret: "s-0123456789abcdef0123456789abcdef"}}}},
				Leeway:          dur(30 * time.Second),
				RequiredClaims:  []string{"sub", "org"},
				AllowMissingExp: true,
				MaxTokenSize:    16 << 10,
			}},
		},
		{
			name: "jwt max_token_size in plain bytes",
			input: `wsgate ws://a:1 {
				jwt {
					max_token_size 4096
					secret s-0123456789abcdef0123456789abcdef
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{{Secret: "s-0123456789abcdef0123456789abcdef"}}}}, MaxTokenSize: 4096}},
		},
		{
			name: "jwt from every kind, in order",
			input: `wsgate ws://a:1 {
				jwt {
					secret s-0123456789abcdef0123456789abcdef
					from header
					from header X-Token
					from query access_token
					from cookie session
					from protocol
					from protocol access_token
				}
			}`,
			want: Handler{Upstreams: up, JWT: &JWT{
				Issuers: []JWTIssuer{{Keys: []JWTKey{{Secret: "s-0123456789abcdef0123456789abcdef"}}}},
				From: []TokenSource{
					{Kind: "header"},
					{Kind: "header", Name: "X-Token"},
					{Kind: "query", Name: "access_token"},
					{Kind: "cookie", Name: "session"},
					{Kind: "protocol"},
					{Kind: "protocol", Name: "access_token"},
				},
			}},
		},

		// forward_auth
		{
			name:  "forward_auth with a URL only",
			input: wsgateBlock("forward_auth http://app:8080/auth/check"),
			want:  Handler{Upstreams: up, ForwardAuth: &ForwardAuth{URL: "http://app:8080/auth/check"}},
		},
		{
			name:  "forward_auth with an empty block",
			input: "wsgate ws://a:1 {\n\tforward_auth https://app/auth {\n\t}\n}",
			want:  Handler{Upstreams: up, ForwardAuth: &ForwardAuth{URL: "https://app/auth"}},
		},
		{
			name: "forward_auth with every subdirective",
			input: `wsgate ws://a:1 {
				forward_auth http://app:8080/auth {
					copy_headers Cookie X-Api-Key
					timeout 2s
					cache 30s
					claims_from_body
					claim_header X-User-Id sub
					claim_header X-Org org.id
				}
			}`,
			want: Handler{Upstreams: up, ForwardAuth: &ForwardAuth{
				URL:            "http://app:8080/auth",
				CopyHeaders:    []string{"Cookie", "X-Api-Key"},
				Timeout:        dur(2 * time.Second),
				CacheTTL:       dur(30 * time.Second),
				ClaimsFromBody: true,
				ClaimHeaders:   map[string]string{"X-User-Id": "sub", "X-Org": "org.id"},
			}},
		},
		{
			name: "jwt and forward_auth together",
			input: `wsgate ws://a:1 {
				forward_auth http://app/auth
				jwt {
					secret s-0123456789abcdef0123456789abcdef
				}
			}`,
			want: Handler{Upstreams: up,
				ForwardAuth: &ForwardAuth{URL: "http://app/auth"},
				JWT:         &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{{Secret: "s-0123456789abcdef0123456789abcdef"}}}}},
			},
		},

		// the rest
		{
			name:  "refresh_field",
			input: wsgateBlock("jwt {", "\tsecret "+testSecret, "}", "refresh_field access_token"),
			want:  Handler{Upstreams: up, JWT: &JWT{Issuers: []JWTIssuer{{Keys: []JWTKey{{Secret: testSecret}}}}}, RefreshField: "access_token"},
		},
		{
			name: "claims_header repeated",
			input: wsgateBlock(
				"claims_header sub X-User-Id",
				"idle_timeout 1m",
				"claims_header org.id X-Org-Id",
			),
			want: Handler{Upstreams: up, IdleTimeout: dur(time.Minute),
				ClaimsHeaders: map[string]string{"sub": "X-User-Id", "org.id": "X-Org-Id"}},
		},
		{
			name: "limit_connections with every subdirective",
			input: `wsgate ws://a:1 {
				limit_connections {
					total 10000
					per_ip 20
					per_subject 5
					zone chat
				}
			}`,
			want: Handler{Upstreams: up, ConnectionLimits: &ConnectionLimits{Total: 10000, PerIP: 20, PerSubject: 5, Zone: "chat"}},
		},
		{
			name: "limit_connections with one limit",
			input: `wsgate ws://a:1 {
				limit_connections {
					per_ip 1
				}
			}`,
			want: Handler{Upstreams: up, ConnectionLimits: &ConnectionLimits{PerIP: 1}},
		},
		{
			name: "every auth option after the relay options",
			input: `wsgate ws://a:1 {
				dial_timeout 2s
				max_message 64KiB
				origins https://app.test
				allow_missing_origin
				jwt {
					issuer https://idp.test
					jwks https://idp.test/jwks
					from query token
				}
				forward_auth http://app/auth {
					cache 1m
				}
				refresh_field token
				claims_header sub X-User
				limit_connections {
					per_subject 3
				}
				ping_interval off
			}`,
			want: Handler{
				Upstreams:          up,
				DialTimeout:        dur(2 * time.Second),
				MaxMessage:         64 << 10,
				Origins:            []string{"https://app.test"},
				AllowMissingOrigin: true,
				JWT: &JWT{
					Issuers: []JWTIssuer{{Issuer: "https://idp.test", JWKSURL: "https://idp.test/jwks"}},
					From:    []TokenSource{{Kind: "query", Name: "token"}},
				},
				ForwardAuth:      &ForwardAuth{URL: "http://app/auth", CacheTTL: dur(time.Minute)},
				RefreshField:     "token",
				ClaimsHeaders:    map[string]string{"sub": "X-User"},
				ConnectionLimits: &ConnectionLimits{PerSubject: 3},
				PingInterval:     -1,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := unmarshal(t, tt.input)
			if err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			for _, d := range handlerDiffs(got, &tt.want) {
				t.Error(d)
			}
		})
	}
}

func TestUnmarshalCaddyfileAuthErrors(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string // a substring of the message
		line    int    // the line the error must point at
	}{
		// the wsgate block
		{"origins without an origin", wsgateBlock("origins"), "wrong argument count", 2},
		{"allow_missing_origin with an argument", wsgateBlock("allow_missing_origin true"), "wrong argument count", 2},
		{"allow_missing_origin twice", wsgateBlock("allow_missing_origin", "origins https://a.test", "allow_missing_origin"),
			`duplicate subdirective "allow_missing_origin"`, 4},
		{"refresh_field without a name", wsgateBlock("refresh_field"), "wrong argument count", 2},
		{"refresh_field with two names", wsgateBlock("refresh_field a b"), "wrong argument count", 2},
		{"refresh_field twice", wsgateBlock("refresh_field a", "refresh_field b"), `duplicate subdirective "refresh_field"`, 3},
		{"claims_header with one argument", wsgateBlock("claims_header sub"), "wrong argument count", 2},
		{"claims_header with three arguments", wsgateBlock("claims_header sub X-User extra"), "wrong argument count", 2},
		{"claims_header twice for a claim", wsgateBlock("claims_header sub X-User", "claims_header org X-Org", "claims_header sub X-Other"),
			`duplicate claims_header for claim "sub"`, 4},
		{"claims_header twice for a header", wsgateBlock("claims_header sub X-User", "claims_header org x_user"),
			`both set header`, 3},
		{"jwt twice", wsgateBlock("jwt {", "\tsecret "+testSecret, "}", "jwt {", "\tsecret "+testSecret, "}"), `duplicate subdirective "jwt"`, 5},
		{"forward_auth twice", wsgateBlock("forward_auth http://a/", "forward_auth http://b/"), `duplicate subdirective "forward_auth"`, 3},
		{"limit_connections twice", wsgateBlock("limit_connections {", "\ttotal 1", "}", "limit_connections {", "\ttotal 2", "}"),
			`duplicate subdirective "limit_connections"`, 5},

		// jwt structure
		{"jwt with an argument", wsgateBlock("jwt s3cr3t {", "\tsecret "+testSecret, "}"), "wrong argument count", 2},
		{"jwt without a block", wsgateBlock("jwt"), "jwt needs a key", 2},
		{"jwt without a key", wsgateBlock("jwt {", "\tleeway 1s", "\trequire_claims sub", "}"), "jwt needs a key", 2},
		{"jwt with only an issuer line", wsgateBlock("jwt {", "\tissuer https://idp.test", "}"), `jwt issuer "https://idp.test" has no key`, 2},
		{"jwt with only an audience", wsgateBlock("jwt {", "\taudience api", "}"), `jwt issuer "" has no key`, 2},
		{"issuer block without a key", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tissuer https://b.test {", "\t\taudience api", "\t}", "}"),
			`jwt issuer "https://b.test" has no key`, 4},
		{"unknown jwt subdirective", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tleway 1s", "}"), `unrecognized jwt subdirective "leway"`, 4},
		{"unknown issuer subdirective", wsgateBlock("jwt {", "\tissuer a {", "\t\tsecret "+testSecret, "\t\tkeyfile /k.pem", "\t}", "}"),
			`unrecognized issuer subdirective "keyfile"`, 5},
		{"jwt option inside an issuer block", wsgateBlock("jwt {", "\tissuer a {", "\t\tsecret "+testSecret, "\t\tleeway 1s", "\t}", "}"),
			`unrecognized issuer subdirective "leeway"`, 5},
		{"issuer without a name", wsgateBlock("jwt {", "\tissuer", "\tsecret "+testSecret, "}"), "wrong argument count", 3},
		{"issuer with two names", wsgateBlock("jwt {", "\tissuer a b", "\tsecret "+testSecret, "}"), "wrong argument count", 3},
		{"issuer line twice", wsgateBlock("jwt {", "\tissuer a", "\tissuer b", "\tsecret "+testSecret, "}"), "duplicate issuer line", 4},
		{"duplicate leeway", wsgateBlock("jwt {", "\tleeway 1s", "\tsecret "+testSecret, "\tleeway 2s", "}"), `duplicate jwt subdirective "leeway"`, 5},
		{"duplicate require_claims", wsgateBlock("jwt {", "\trequire_claims a", "\trequire_claims b", "}"), `duplicate jwt subdirective "require_claims"`, 4},
		{"duplicate allow_missing_exp", wsgateBlock("jwt {", "\tallow_missing_exp", "\tallow_missing_exp", "}"), `duplicate jwt subdirective "allow_missing_exp"`, 4},
		{"duplicate max_token_size", wsgateBlock("jwt {", "\tmax_token_size 1KiB", "\tmax_token_size 2KiB", "}"), `duplicate jwt subdirective "max_token_size"`, 4},
		{"duplicate jwks", wsgateBlock("jwt {", "\tjwks https://a/", "\tjwks https://b/", "}"), `duplicate jwks for issuer ""`, 4},
		{"duplicate jwks in an issuer block", wsgateBlock("jwt {", "\tissuer a {", "\t\tjwks https://a/", "\t\tjwks https://b/", "\t}", "}"),
			`duplicate jwks for issuer "a"`, 5},

		// jwt arguments
		{"audience without a value", wsgateBlock("jwt {", "\tsecret "+testSecret, "\taudience", "}"), "wrong argument count", 4},
		{"secret without a value", wsgateBlock("jwt {", "\tsecret", "}"), "wrong argument count", 3},
		{"secret kid without an id", wsgateBlock("jwt {", "\tsecret "+testSecret+" kid", "}"), "wrong argument count", 3},
		{"secret alg without algorithms", wsgateBlock("jwt {", "\tsecret "+testSecret+" alg", "}"), "wrong argument count", 3},
		{"secret with an unknown word", wsgateBlock("jwt {", "\tsecret "+testSecret+" id k1", "}"), `unexpected "id": want kid <id> or alg`, 3},
		{"public_key without a file", wsgateBlock("jwt {", "\tpublic_key", "}"), "wrong argument count", 3},
		{"public_key with an unknown word", wsgateBlock("jwt {", "\tpublic_key /k.pem algorithm RS256", "}"), `unexpected "algorithm"`, 3},
		{"jwks without a URL", wsgateBlock("jwt {", "\tjwks", "}"), "wrong argument count", 3},
		{"jwks refresh without a duration", wsgateBlock("jwt {", "\tjwks https://a/ refresh", "}"), "wrong argument count", 3},
		{"jwks refresh not a duration", wsgateBlock("jwt {", "\tjwks https://a/ refresh soon", "}"), `bad refresh duration "soon"`, 3},
		{"jwks refresh of zero", wsgateBlock("jwt {", "\tjwks https://a/ refresh 0s", "}"), `bad refresh duration "0s"`, 3},
		{"jwks refresh negative", wsgateBlock("jwt {", "\tjwks https://a/ refresh -1m", "}"), `bad refresh duration "-1m"`, 3},
		{"jwks alg without algorithms", wsgateBlock("jwt {", "\tjwks https://a/ alg", "}"), "wrong argument count", 3},
		{"jwks with an unknown word", wsgateBlock("jwt {", "\tjwks https://a/ every 1h", "}"), `unexpected "every": want refresh`, 3},
		{"leeway without a duration", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tleeway", "}"), "wrong argument count", 4},
		{"leeway not a duration", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tleeway a-bit", "}"), `bad duration "a-bit"`, 4},
		{"leeway negative", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tleeway -1s", "}"), `duration "-1s" must be positive`, 4},
		{"require_claims without claims", wsgateBlock("jwt {", "\tsecret "+testSecret, "\trequire_claims", "}"), "wrong argument count", 4},
		{"allow_missing_exp with an argument", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tallow_missing_exp yes", "}"), "wrong argument count", 4},
		{"max_token_size without a size", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tmax_token_size", "}"), "wrong argument count", 4},
		{"max_token_size of zero", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tmax_token_size 0", "}"), `bad size "0"`, 4},
		{"max_token_size off", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tmax_token_size off", "}"), `bad size "off"`, 4},
		{"max_token_size not a size", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tmax_token_size big", "}"), `bad size "big"`, 4},

		// from
		{"from without a kind", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom", "}"), "from needs a kind", 4},
		{"from with too many arguments", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom header X-Token extra", "}"), "from needs a kind", 4},
		{"from with a bad kind", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom body token", "}"), `unknown token source "body"`, 4},
		{"from with a kind in upper case", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom Header", "}"), `unknown token source "Header"`, 4},
		{"from query without a name", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom query", "}"), "token source query needs a name", 4},
		{"from cookie without a name", wsgateBlock("jwt {", "\tsecret "+testSecret, "\tfrom cookie", "}"), "token source cookie needs a name", 4},

		// forward_auth
		{"forward_auth without a URL", wsgateBlock("forward_auth"), "wrong argument count", 2},
		{"forward_auth without a URL, with a block", wsgateBlock("forward_auth {", "\ttimeout 1s", "}"), "wrong argument count", 2},
		{"forward_auth with two URLs", wsgateBlock("forward_auth http://a/ http://b/"), "wrong argument count", 2},
		{"unknown forward_auth subdirective", wsgateBlock("forward_auth http://a/ {", "\ttimeout 1s", "\tretries 3", "}"),
			`unrecognized forward_auth subdirective "retries"`, 4},
		{"duplicate copy_headers", wsgateBlock("forward_auth http://a/ {", "\tcopy_headers Cookie", "\tcopy_headers X-Key", "}"),
			`duplicate forward_auth subdirective "copy_headers"`, 4},
		{"duplicate timeout", wsgateBlock("forward_auth http://a/ {", "\ttimeout 1s", "\ttimeout 2s", "}"),
			`duplicate forward_auth subdirective "timeout"`, 4},
		{"duplicate cache", wsgateBlock("forward_auth http://a/ {", "\tcache 1s", "\tclaims_from_body", "\tcache 2s", "}"),
			`duplicate forward_auth subdirective "cache"`, 5},
		{"duplicate claims_from_body", wsgateBlock("forward_auth http://a/ {", "\tclaims_from_body", "\tclaims_from_body", "}"),
			`duplicate forward_auth subdirective "claims_from_body"`, 4},
		{"claim_header twice for a header", wsgateBlock("forward_auth http://a/ {", "\tclaim_header X-User sub", "\tclaim_header x-user uid", "}"),
			`duplicate claim_header for header "x-user"`, 4},
		{"claim_header twice for a claim", wsgateBlock("forward_auth http://a/ {", "\tclaim_header X-User sub", "\tclaim_header X-Sub sub", "}"),
			`duplicate claim_header for claim "sub"`, 4},
		{"copy_headers without headers", wsgateBlock("forward_auth http://a/ {", "\tcopy_headers", "}"), "wrong argument count", 3},
		{"timeout without a duration", wsgateBlock("forward_auth http://a/ {", "\ttimeout", "}"), "wrong argument count", 3},
		{"timeout of zero", wsgateBlock("forward_auth http://a/ {", "\ttimeout 0s", "}"), `duration "0s" must be positive`, 3},
		{"cache not a duration", wsgateBlock("forward_auth http://a/ {", "\tcache forever", "}"), `bad duration "forever"`, 3},
		{"claims_from_body with an argument", wsgateBlock("forward_auth http://a/ {", "\tclaims_from_body true", "}"), "wrong argument count", 3},
		{"claim_header with one argument", wsgateBlock("forward_auth http://a/ {", "\tclaim_header X-User", "}"), "wrong argument count", 3},
		{"claim_header with three arguments", wsgateBlock("forward_auth http://a/ {", "\tclaim_header X-User sub uid", "}"), "wrong argument count", 3},

		// limit_connections
		{"limit_connections with an argument", wsgateBlock("limit_connections 10 {", "\ttotal 1", "}"), "wrong argument count", 2},
		{"limit_connections without a block", wsgateBlock("limit_connections"), "limit_connections needs total, per_ip or per_subject", 2},
		{"limit_connections with an empty block", wsgateBlock("limit_connections {", "}"), "limit_connections needs total, per_ip or per_subject", 2},
		{"limit_connections with only a zone", wsgateBlock("limit_connections {", "\tzone z", "}"), "limit_connections needs total, per_ip or per_subject", 2},
		{"unknown limit_connections subdirective", wsgateBlock("limit_connections {", "\ttotal 1", "\tper_user 2", "}"),
			`unrecognized limit_connections subdirective "per_user"`, 4},
		{"unknown limit_connections subdirective without a value", wsgateBlock("limit_connections {", "\tper_user", "}"),
			`unrecognized limit_connections subdirective "per_user"`, 3},
		{"unknown limit_connections subdirective with a word", wsgateBlock("limit_connections {", "\tper_user many", "}"),
			`unrecognized limit_connections subdirective "per_user"`, 3},
		{"duplicate total", wsgateBlock("limit_connections {", "\ttotal 1", "\tper_ip 1", "\ttotal 2", "}"),
			`duplicate limit_connections subdirective "total"`, 5},
		{"duplicate zone", wsgateBlock("limit_connections {", "\ttotal 1", "\tzone a", "\tzone b", "}"),
			`duplicate limit_connections subdirective "zone"`, 5},
		{"total of zero", wsgateBlock("limit_connections {", "\ttotal 0", "}"), `total must be a positive number, not "0"`, 3},
		{"per_ip negative", wsgateBlock("limit_connections {", "\tper_ip -1", "}"), `per_ip must be a positive number, not "-1"`, 3},
		{"per_subject not a number", wsgateBlock("limit_connections {", "\tper_subject five", "}"), `per_subject must be a positive number, not "five"`, 3},
		{"per_subject fractional", wsgateBlock("limit_connections {", "\tper_subject 1.5", "}"), `per_subject must be a positive number`, 3},
		{"total without a number", wsgateBlock("limit_connections {", "\ttotal", "}"), "wrong argument count", 3},
		{"total with two numbers", wsgateBlock("limit_connections {", "\ttotal 1 2", "}"), "wrong argument count", 3},
		{"zone without a name", wsgateBlock("limit_connections {", "\ttotal 1", "\tzone", "}"), "wrong argument count", 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := unmarshal(t, tt.input)
			if err == nil {
				t.Fatalf("no error; parsed %s jwt=%s forward_auth=%s limits=%s", describe(h),
					show(reflect.ValueOf(h.JWT)), show(reflect.ValueOf(h.ForwardAuth)), show(reflect.ValueOf(h.ConnectionLimits)))
			}
			checkErrorAt(t, err, tt.input, tt.wantErr, tt.line)
		})
	}
}

// authConfig is a configuration using every auth option.
const authConfig = `wsgate ws://a:1 {
	upstream wss://b:2/socket
	max_message 64KiB
	origins https://app.test https://*.example.com
	allow_missing_origin
	jwt {
		issuer https://idp.test {
			audience chat
			jwks https://idp.test/jwks refresh 10m alg RS256
		}
		issuer https://other.test {
			secret {env.OTHER_SECRET} kid o1 alg HS256
			public_key /etc/other.pem kid o2
		}
		leeway 5s
		require_claims sub
		allow_missing_exp
		max_token_size 4KiB
		from query access_token
		from protocol
	}
	forward_auth http://app/auth {
		copy_headers Cookie
		timeout 1s
		cache 1m
		claims_from_body
		claim_header X-User-Id sub
	}
	refresh_field access_token
	claims_header sub X-User-Id
	claims_header org.id X-Org
	limit_connections {
		total 100
		per_ip 10
		per_subject 2
		zone chat
	}
}`

// TestUnmarshalCaddyfileAuthJSON checks the JSON the Caddyfile adapter
// makes of the auth options, and that it reads back the same.
func TestUnmarshalCaddyfileAuthJSON(t *testing.T) {
	h, err := unmarshal(t, authConfig)
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"upstreams":["ws://a:1","wss://b:2/socket"],"max_message":65536,` +
		`"origins":["https://app.test","https://*.example.com"],"allow_missing_origin":true,` +
		`"jwt":{"issuers":[` +
		`{"issuer":"https://idp.test","audience":["chat"],"jwks_url":"https://idp.test/jwks","jwks_refresh":600000000000,"jwks_algorithms":["RS256"]},` +
		`{"issuer":"https://other.test","keys":[{"id":"o1","secret":"{env.OTHER_SECRET}","algorithms":["HS256"]},{"id":"o2","public_key_file":"/etc/other.pem"}]}],` +
		`"leeway":5000000000,"required_claims":["sub"],"allow_missing_exp":true,"max_token_size":4096,` +
		`"from":[{"kind":"query","name":"access_token"},{"kind":"protocol"}]},` +
		`"forward_auth":{"url":"http://app/auth","copy_headers":["Cookie"],"timeout":1000000000,"cache_ttl":60000000000,` +
		`"claims_from_body":true,"claim_headers":{"X-User-Id":"sub"}},` +
		`"refresh_field":"access_token","claims_headers":{"org.id":"X-Org","sub":"X-User-Id"},` +
		`"connection_limits":{"total":100,"per_ip":10,"per_subject":2,"zone":"chat"}}`
	if string(got) != want {
		t.Errorf("JSON\n got %s\nwant %s", got, want)
	}
	checkRoundTrip(t, got, h)
}

// TestUnmarshalCaddyfileAuthProxyConfig checks that the auth options leave
// the relay engine's config alone.
func TestUnmarshalCaddyfileAuthProxyConfig(t *testing.T) {
	h, err := unmarshal(t, authConfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := h.proxyConfig()
	if err != nil {
		t.Fatalf("proxyConfig: %v", err)
	}
	if got, want := cfg.Upstreams, []string{"ws://a:1", "wss://b:2/socket"}; !reflect.DeepEqual(got, want) {
		t.Errorf("Upstreams = %q, want %q", got, want)
	}
	if cfg.Client.MaxMessage != 64<<10 {
		t.Errorf("Client.MaxMessage = %d, want %d", cfg.Client.MaxMessage, 64<<10)
	}
}

// provisionContext is a Caddy context without a running Caddy; its
// cancellation ends the JWKS refreshers.
func provisionContext(t *testing.T) caddy.Context {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	return ctx
}

// provisionAuth parses input and runs the auth part of Provision, which
// validates what the parser cannot: origins, keys, algorithms, URLs.
func provisionAuth(t *testing.T, input string) (*Handler, error) {
	t.Helper()
	h, err := unmarshal(t, input)
	if err != nil {
		t.Fatalf("UnmarshalCaddyfile: %v", err)
	}
	err = h.provisionAuth(provisionContext(t))
	t.Cleanup(h.cleanupAuth)
	return h, err
}

const testSecret = "0123456789abcdef0123456789abcdef"

// writeFile writes data to a file in a test's temporary directory.
func writeFile(t *testing.T, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// ecKeyFiles writes a P-256 key pair as PEM files: the public key and,
// for the mistake of configuring it, the private key.
func ecKeyFiles(t *testing.T) (pub, priv string) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&k.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	privDER, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	pub = writeFile(t, "pub.pem", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}))
	priv = writeFile(t, "priv.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: privDER}))
	return pub, priv
}

func TestProvisionAuth(t *testing.T) {
	pub, _ := ecKeyFiles(t)
	t.Setenv("WSGATE_TEST_SECRET", testSecret)
	h, err := provisionAuth(t, `wsgate ws://a:1 {
		origins https://app.test
		jwt {
			issuer https://a.test {
				secret {env.WSGATE_TEST_SECRET} kid a1 alg HS256 HS512
				public_key `+pub+` kid a2
			}
			issuer https://b.test {
				secret `+testSecret+`
			}
			from query access_token
			from header
		}
		forward_auth http://127.0.0.1:1/auth
		claims_header sub X-User-Id
		limit_connections {
			per_ip 2
		}
	}`)
	if err != nil {
		t.Fatalf("provisionAuth: %v", err)
	}
	a := &h.auth
	if a.origin == nil || a.origin.SameOrigin() {
		t.Errorf("origin policy = %+v, want an allow-list", a.origin)
	}
	if a.verifier == nil || a.forward == nil || a.counter == nil {
		t.Fatalf("verifier %v, forward auth %v, counter %v: want all three", a.verifier, a.forward, a.counter)
	}
	wantSources := []policy.TokenSource{{Kind: policy.FromQuery, Name: "access_token"}, {Kind: policy.FromHeader, Name: "Authorization"}}
	if !reflect.DeepEqual(a.sources, wantSources) {
		t.Errorf("sources = %+v, want %+v", a.sources, wantSources)
	}
	if !reflect.DeepEqual(a.strip, []string{"X-User-Id"}) {
		t.Errorf("strip = %q, want the claims header", a.strip)
	}
	if a.zone != "upstreams:ws://a:1" {
		t.Errorf("zone = %q, want the default from the upstreams", a.zone)
	}
}

func TestProvisionAuthDefaults(t *testing.T) {
	h, err := provisionAuth(t, `wsgate ws://a:1`)
	if err != nil {
		t.Fatal(err)
	}
	a := &h.auth
	if a.origin == nil || !a.origin.SameOrigin() {
		t.Errorf("origin policy = %+v, want same origin", a.origin)
	}
	if a.verifier != nil || a.forward != nil || a.counter != nil || a.sources != nil {
		t.Errorf("auth state %+v, want no token check and no limits", a)
	}
}

// TestProvisionAuthErrors lists configurations that parse but that
// provisioning refuses: what they get wrong is only known from a file or
// the environment, which may differ where the Caddyfile is adapted.
// (Everything else is refused with its line: config_errors_test.go.)
func TestProvisionAuthErrors(t *testing.T) {
	pub, priv := ecKeyFiles(t)
	jwtWith := func(lines ...string) string {
		return wsgateBlock(append(append([]string{"jwt {"}, lines...), "}")...)
	}
	tests := []struct {
		name, input, wantErr string
	}{
		{"secret from an unset variable", jwtWith("secret {env.WSGATE_TEST_UNSET_VARIABLE}"), "secret is empty"},
		{"short secret from a variable", jwtWith("secret {env.WSGATE_TEST_SHORT_SECRET}"), "at least 32 bytes"},
		{"public key file missing", jwtWith("public_key " + filepath.Join(t.TempDir(), "none.pem")), "jwt key"},
		{"private key as public_key", jwtWith("public_key " + priv), "never configure a private key"},
		{"RS256 on an EC key", jwtWith("public_key " + pub + " alg RS256"), "does not fit"},
	}
	t.Setenv("WSGATE_TEST_SHORT_SECRET", "short")
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := provisionAuth(t, tt.input)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("provisionAuth error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestProvisionAuthNegativeLimits covers what only JSON can say: the
// Caddyfile parser refuses limits that are not positive.
func TestProvisionAuthNegativeLimits(t *testing.T) {
	for _, l := range []ConnectionLimits{{Total: -1}, {PerIP: -1}, {PerSubject: -1, Total: 5}} {
		h := &Handler{Upstreams: []string{"ws://a:1"}, ConnectionLimits: &l}
		err := h.provisionAuth(provisionContext(t))
		h.cleanupAuth()
		if err == nil || !strings.Contains(err.Error(), "must not be negative") {
			t.Errorf("limits %+v: error = %v, want a refusal", l, err)
		}
	}
}

// TestProvisionAuthSharedZone checks that handlers naming the same zone
// share one counter, and a reload keeps its counts.
func TestProvisionAuthSharedZone(t *testing.T) {
	input := wsgateBlock("limit_connections {", "\ttotal 1", "\tzone shared-test", "}")
	h1, err := provisionAuth(t, input)
	if err != nil {
		t.Fatal(err)
	}
	release, err := h1.auth.counter.Acquire("10.0.0.1", "")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	h2, err := provisionAuth(t, input)
	if err != nil {
		t.Fatal(err)
	}
	if h1.auth.counter != h2.auth.counter {
		t.Fatal("two handlers with one zone got two counters")
	}
	if _, err := h2.auth.counter.Acquire("10.0.0.2", ""); err == nil {
		t.Error("the second handler admitted a connection over the zone's total")
	}
}

// TestAlgBeforeKid: the algorithms end where the kid keyword starts.
func TestAlgBeforeKid(t *testing.T) {
	for _, line := range []string{"secret " + testSecret + " alg HS256 HS384 kid k1", "secret " + testSecret + " kid k1 alg HS256 HS384"} {
		d := caddyfile.NewTestDispenser("wsgate {\n\tupstream ws://127.0.0.1:1\n\tjwt {\n\t\t" + line + "\n\t}\n}")
		var h Handler
		if err := h.UnmarshalCaddyfile(d); err != nil {
			t.Fatalf("%s: %v", line, err)
		}
		k := h.JWT.Issuers[0].Keys[0]
		if k.ID != "k1" || strings.Join(k.Algorithms, ",") != "HS256,HS384" {
			t.Fatalf("%s: key %+v", line, k)
		}
	}
	d := caddyfile.NewTestDispenser("wsgate {\n\tupstream ws://127.0.0.1:1\n\tjwt {\n\t\tjwks http://127.0.0.1:1/j alg ES256 refresh 5m\n\t}\n}")
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if is := h.JWT.Issuers[0]; strings.Join(is.JWKSAlgorithms, ",") != "ES256" || time.Duration(is.JWKSRefresh) != 5*time.Minute {
		t.Fatalf("jwks line: %+v", is)
	}
}

// TestJSONDuplicateClaimMappings: JSON config is held to what the
// Caddyfile refuses.
func TestJSONDuplicateClaimMappings(t *testing.T) {
	h := &Handler{Upstreams: []string{"ws://127.0.0.1:1"}, ClaimsHeaders: map[string]string{"sub": "X-User", "uid": "x_user"}}
	if err := h.provisionAuth(caddy.Context{Context: context.Background()}); err == nil || !strings.Contains(err.Error(), "both set header") {
		t.Fatalf("two claims on one header: %v", err)
	}
	h = &Handler{Upstreams: []string{"ws://127.0.0.1:1"}, ForwardAuth: &ForwardAuth{URL: "http://127.0.0.1:1/auth",
		ClaimHeaders: map[string]string{"X-A": "sub", "X-B": "sub"}}}
	if err := h.provisionAuth(caddy.Context{Context: context.Background()}); err == nil || !strings.Contains(err.Error(), "both set claim") {
		t.Fatalf("two headers on one claim: %v", err)
	}
}
