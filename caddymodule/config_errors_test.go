package caddymodule

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// mark ends the line a test expects an error or warning to point at.
const mark = "# <-"

// markedLine is the 1-based number of the line of input that holds mark.
func markedLine(t *testing.T, input string) int {
	t.Helper()
	for i, l := range strings.Split(input, "\n") {
		if strings.Contains(l, mark) {
			return i + 1
		}
	}
	t.Fatalf("no %q in\n%s", mark, numbered(input))
	return 0
}

// site puts a route body into a site block, as a Caddyfile.
func site(body string) string { return ":8080 {\n" + body + "\n}\n" }

// global puts global options before a minimal site.
func global(options string) string {
	return "{\n" + options + "\n}\n:8080 {\n\twsgate ws://a:1\n}\n"
}

// adapt adapts a Caddyfile with the real adapter, as caddy adapt and
// caddy run do.
func adapt(t *testing.T, input string) ([]byte, []caddyconfig.Warning, error) {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter registered")
	}
	return adapter.Adapt([]byte(input), nil)
}

var adaptedLine = regexp.MustCompile(`, at Caddyfile:(\d+)$`)

// TestCaddyfileErrorsNameTheLine lists malformed Caddyfiles whose mistakes
// used to surface only when the config was provisioned, without a line.
// Adapting must now refuse each with the line of the mistake.
func TestCaddyfileErrorsNameTheLine(t *testing.T) {
	const secret = testSecret
	tests := []struct {
		name, input, wantErr string
	}{
		// upstreams and headers
		{"inline upstream not ws", site("\twsgate http://a:1 " + mark), `upstream "http://a:1": scheme must be ws or wss`},
		{"upstream not ws", site("\twsgate {\n\t\tupstream ws://a:1 http://b:2 " + mark + "\n\t}"), `upstream "http://b:2": scheme must be ws or wss`},
		{"upstream without host", site("\twsgate {\n\t\tupstream ws:///socket " + mark + "\n\t}"), "missing host"},
		{"managed header forwarded", site("\twsgate ws://a:1 {\n\t\tforward_headers Cookie Sec-WebSocket-Key " + mark + "\n\t}"), `header "Sec-WebSocket-Key" cannot be forwarded`},

		// load balancing and health checks
		{"unknown lb_policy", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy leastconn " + mark + "\n\t}"), `unrecognized lb_policy "leastconn", did you mean "least_conn"?`},
		{"lb_policy header without a name", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy header " + mark + "\n\t}"), "wrong argument count"},
		{"random_choose 1", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy random_choose 1 " + mark + "\n\t}"), "at least 2"},
		{"fallback of a policy without key", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy least_conn {\n\t\t\tfallback random " + mark + "\n\t\t}\n\t}"), "lb_policy least_conn takes no fallback"},
		{"sticky fallback", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy header X-T {\n\t\t\tfallback cookie " + mark + "\n\t\t}\n\t}"), "cookie cannot be a fallback"},
		{"max_age outside cookie", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy claim sub {\n\t\t\tmax_age 1h " + mark + "\n\t\t}\n\t}"), "lb_policy claim takes no max_age"},
		{"fallback twice", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy header X-T {\n\t\t\tfallback first\n\t\t\tfallback random " + mark + "\n\t\t}\n\t}"), `duplicate lb_policy subdirective "fallback"`},
		{"max_age twice", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy cookie lb s {\n\t\t\tmax_age 1h\n\t\t\tfallback first\n\t\t\tmax_age 2h " + mark + "\n\t\t}\n\t}"), `duplicate lb_policy subdirective "max_age"`},
		{"unknown lb_policy option", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy cookie {\n\t\t\tfalback random " + mark + "\n\t\t}\n\t}"), `did you mean "fallback"?`},
		{"health options without a probe", site("\twsgate ws://a:1 ws://b:2 {\n\t\tdial_timeout 1s\n\t\thealth_timeout 1s " + mark + "\n\t\thealth_interval 5s\n\t}"), "active health checks need health_uri or health_websocket"},
		{"health_uri and health_websocket", site("\twsgate ws://a:1 ws://b:2 {\n\t\thealth_uri /h\n\t\thealth_websocket " + mark + "\n\t}"), "exclude each other"},
		{"health_status with health_websocket", site("\twsgate ws://a:1 ws://b:2 {\n\t\thealth_websocket\n\t\thealth_status 200 " + mark + "\n\t}"), "a WebSocket probe expects 101"},
		{"health_status malformed", site("\twsgate ws://a:1 ws://b:2 {\n\t\thealth_uri /h\n\t\thealth_status 2x " + mark + "\n\t}"), `not "2x"`},
		{"health_websocket without a slash", site("\twsgate ws://a:1 ws://b:2 {\n\t\thealth_interval 5s\n\t\thealth_websocket ws " + mark + "\n\t}"), `health_websocket "ws" must start with /`},
		{"random_choose 0", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy random_choose 0 " + mark + "\n\t}"), "takes a positive number"},
		{"health_uri without a slash", site("\twsgate ws://a:1 ws://b:2 {\n\t\thealth_uri healthz " + mark + "\n\t}"), "must start with /"},
		{"unhealthy_close without fail_duration", site("\twsgate ws://a:1 ws://b:2 {\n\t\tdial_timeout 1s\n\t\tunhealthy_close " + mark + "\n\t}"), "passive health checks need fail_duration"},
		{"unhealthy_close with a bad code", site("\twsgate ws://a:1 ws://b:2 {\n\t\tfail_duration 10s\n\t\tunhealthy_close 1006 999 " + mark + "\n\t}"), "unhealthy_close code 999: want 1000-4999"},
		{"max_fails zero", site("\twsgate ws://a:1 ws://b:2 {\n\t\tfail_duration 10s\n\t\tmax_fails 0 " + mark + "\n\t}"), "max_fails must be a positive number"},
		{"lb_policy twice", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy first\n\t\tlb_policy random " + mark + "\n\t}"), `duplicate subdirective "lb_policy"`},

		// origins
		{"origin without scheme", site("\twsgate ws://a:1 {\n\t\torigins https://a.test\n\t\torigins app.example.com " + mark + "\n\t}"), `origin "app.example.com": want scheme://host[:port]`},
		{"origin in upper case", site("\twsgate ws://a:1 {\n\t\torigins https://App.test " + mark + "\n\t}"), "lower case"},
		{"origin with a path", site("\twsgate ws://a:1 {\n\t\torigins https://app.test/ws " + mark + "\n\t}"), "no path"},
		{"origin with the default port", site("\twsgate ws://a:1 {\n\t\torigins https://app.test:443 " + mark + "\n\t}"), "default port"},
		{"origin wildcard on a TLD", site("\twsgate ws://a:1 {\n\t\torigins https://*.com " + mark + "\n\t}"), "at least two labels"},

		// jwt keys and algorithms
		{"short secret", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret too-short " + mark + "\n\t\t}\n\t}"), "an HMAC secret needs at least 32 bytes"},
		{"unknown algorithm", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret " + secret + " alg HS257 " + mark + "\n\t\t}\n\t}"), `unknown algorithm "HS257"`},
		{"algorithm that does not fit a secret", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret " + secret + " alg RS256 " + mark + "\n\t\t}\n\t}"), "algorithm RS256 does not fit this key (it takes HS256, HS384, HS512)"},
		{"algorithm that does not fit a public key", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tpublic_key /etc/jwt.pem alg HS256 " + mark + "\n\t\t}\n\t}"), "algorithm HS256 does not fit this key"},
		{"unknown jwks algorithm", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tjwks https://idp.test/jwks alg RS257 " + mark + "\n\t\t}\n\t}"), `unknown algorithm "RS257"`},
		{"jwks algorithm none", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tjwks https://idp.test/jwks alg none " + mark + "\n\t\t}\n\t}"), `unknown algorithm "none"`},
		{"jwks URL not http", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tjwks idp.test/jwks " + mark + "\n\t\t}\n\t}"), "must be http(s)://host"},
		{"two keys without kid", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret " + secret + "\n\t\t\tsecret " + secret + "x " + mark + "\n\t\t}\n\t}"), "several keys without an id"},
		{"the same kid twice", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tissuer a {\n\t\t\t\tsecret " + secret + " kid k\n\t\t\t\tsecret " + secret + "x kid k " + mark + "\n\t\t\t}\n\t\t}\n\t}"), `key id "k" used twice`},
		{"top-level keys next to an issuer block", site("\twsgate ws://a:1 {\n\t\tjwt { " + mark + "\n\t\t\tsecret " + secret + "\n\t\t\tissuer b {\n\t\t\t\tsecret " + secret + "\n\t\t\t}\n\t\t}\n\t}"), "several issuers need an issuer name each"},
		{"the same issuer twice", site("\twsgate ws://a:1 {\n\t\tjwt { " + mark + "\n\t\t\tissuer a {\n\t\t\t\tsecret " + secret + "\n\t\t\t}\n\t\t\tissuer a {\n\t\t\t\tsecret " + secret + "\n\t\t\t}\n\t\t}\n\t}"), `jwt issuer "a": configured twice`},
		{"token source without a name", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret " + secret + "\n\t\t\tfrom cookie " + mark + "\n\t\t}\n\t}"), "token source cookie needs a name"},

		// forward auth and options that need each other
		{"forward_auth URL not http", site("\twsgate ws://a:1 {\n\t\tforward_auth ftp://app/auth " + mark + "\n\t}"), "must be http(s)://host"},
		{"forward_auth URL without host", site("\twsgate ws://a:1 {\n\t\tforward_auth /auth " + mark + "\n\t}"), "must be http(s)://host"},
		{"refresh_field without jwt", site("\twsgate ws://a:1 {\n\t\tidle_timeout 1m\n\t\trefresh_field token " + mark + "\n\t}"), "refresh_field needs jwt"},
		{"refresh_field with forward_auth only", site("\twsgate ws://a:1 {\n\t\tforward_auth http://app/auth\n\t\trefresh_field token " + mark + "\n\t}"), "refresh_field needs jwt"},
		{"rooms and upstream", site("\twsgate ws://a:1 { " + mark + "\n\t\trooms\n\t}"), "rooms and upstream exclude each other"},
		{"upstream_control in rooms mode", site("\twsgate {\n\t\trooms\n\t\tupstream_control x: " + mark + "\n\t}"), "upstream_control is for relay mode"},

		// channels
		{"channels without relay_channels", site("\twsgate ws://a:1 {\n\t\tchannels { " + mark + "\n\t\t\tallow * **\n\t\t}\n\t}"), "channels in relay mode need relay_channels"},
		{"relay_channels without channels", site("\twsgate ws://a:1 {\n\t\trelay_channels { " + mark + "\n\t\t\tchannel_field ch\n\t\t}\n\t}"), "relay_channels needs a channels block"},
		{"relay_channels in rooms mode", site("\twsgate {\n\t\trooms\n\t\tchannels {\n\t\t\tallow * **\n\t\t}\n\t\trelay_channels { " + mark + "\n\t\t\tchannel_field ch\n\t\t}\n\t}"), "relay_channels is for relay mode"},
		{"nested channel and action fields", site("\twsgate ws://a:1 {\n\t\tchannels {\n\t\t\tallow * **\n\t\t}\n\t\trelay_channels {\n\t\t\tchannel_field msg\n\t\t\taction_field msg.type " + mark + "\n\t\t}\n\t}"), "must name different, unnested fields"},
		{"channel and action fields differing in case only", site("\twsgate ws://a:1 {\n\t\tchannels {\n\t\t\tallow * **\n\t\t}\n\t\trelay_channels {\n\t\t\tchannel_field room\n\t\t\taction_field Room " + mark + "\n\t\t}\n\t}"), "differ only in letter case"},
		{"a word mapped to two actions", site("\twsgate ws://a:1 {\n\t\tchannels {\n\t\t\tallow * **\n\t\t}\n\t\trelay_channels {\n\t\t\tchannel_field ch\n\t\t\taction subscribe join\n\t\t\taction publish join say " + mark + "\n\t\t}\n\t}"), `word "join" maps to both publish and subscribe`},

		// compression
		{"window_bits too large", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tcontext_takeover\n\t\t\twindow_bits 16 " + mark + "\n\t\t}\n\t}"), "window_bits must be 8 to 15, not 16"},
		{"window_bits too small", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\twindow_bits 7 " + mark + "\n\t\t}\n\t}"), "window_bits must be 8 to 15, not 7"},
		{"window_bits not a number", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\twindow_bits 32KiB " + mark + "\n\t\t}\n\t}"), `window_bits must be a positive number, not "32KiB"`},
		{"window_bits without a value", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\twindow_bits " + mark + "\n\t\t}\n\t}"), "wrong argument count"},
		{"min_size zero", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tmin_size 0 " + mark + "\n\t\t}\n\t}"), `bad size "0"`},
		{"min_size too large", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tmin_size 4GiB " + mark + "\n\t\t}\n\t}"), "min_size 4294967296 is too large"},
		{"context_takeover with an argument", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tcontext_takeover on " + mark + "\n\t\t}\n\t}"), "wrong argument count"},
		{"compression upstream on", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tupstream on " + mark + "\n\t\t}\n\t}"), `compression upstream takes off, not "on"`},
		{"compression subdirective twice", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tmin_size 256\n\t\t\tcontext_takeover\n\t\t\tmin_size 512 " + mark + "\n\t\t}\n\t}"), `duplicate compression subdirective "min_size"`},
		{"compression twice", site("\twsgate ws://a:1 {\n\t\tcompression\n\t\tmax_message 1MiB\n\t\tcompression off " + mark + "\n\t}"), `duplicate subdirective "compression"`},
		{"compression on", site("\twsgate ws://a:1 {\n\t\tcompression on " + mark + "\n\t}"), `compression takes no argument but off, not "on"`},
		{"compression off with another argument", site("\twsgate ws://a:1 {\n\t\tcompression off upstream " + mark + "\n\t}"), `compression takes no argument but off, not "upstream"`},
		{"compression off with an empty block on its line", site("\twsgate ws://a:1 {\n\t\tcompression off { } " + mark + "\n\t}"), "Unexpected next token after '{' on same line"},
		{"compression off with an empty block over two lines", site("\twsgate ws://a:1 {\n\t\tcompression off { " + mark + "\n\t\t}\n\t}"), "compression off takes no block"},
		{"compression off with a block", site("\twsgate ws://a:1 {\n\t\tcompression off { " + mark + "\n\t\t\tmin_size 256\n\t\t}\n\t}"), "compression off takes no block"},

		// wsgate_publish
		{"short publish key", site("\twsgate_publish {\n\t\tkey 0123456789abcdef\n\t\tkey short " + mark + "\n\t}"), "a key needs at least 16 characters"},
		{"short publish jwt secret", site("\twsgate_publish {\n\t\tjwt {\n\t\t\tsecret too-short " + mark + "\n\t\t}\n\t}"), "an HMAC secret needs at least 32 bytes"},

		// global options
		{"redis URL with a bad database", global("\twsgate {\n\t\tbroker redis redis://127.0.0.1:6379/wsgate " + mark + "\n\t}"), `redis url: redis: invalid database number: "wsgate"`},
		{"redis URL with a bad scheme", global("\twsgate {\n\t\tbroker redis http://127.0.0.1:6379 " + mark + "\n\t}"), "invalid URL scheme"},
		{"cluster_subscribers on a standalone redis", global("\twsgate {\n\t\tbroker redis redis://a:1 {\n\t\t\tcluster_subscribers 2 " + mark + "\n\t\t}\n\t}"), "cluster_subscribers needs broker redis_cluster"},
		{"cluster_subscribers zero", global("\twsgate {\n\t\tbroker redis_cluster a:1 b:1 {\n\t\t\tcluster_subscribers 0 " + mark + "\n\t\t}\n\t}"), `cluster_subscribers "0": want a number of connections per master from 1 to 256`},
		{"cluster_subscribers too many", global("\twsgate {\n\t\tbroker redis_cluster a:1 {\n\t\t\tcluster_subscribers 257 " + mark + "\n\t\t}\n\t}"), `cluster_subscribers "257": want a number of connections per master from 1 to 256`},
		{"cluster_subscribers not a number", global("\twsgate {\n\t\tbroker redis_cluster a:1 {\n\t\t\tcluster_subscribers four " + mark + "\n\t\t}\n\t}"), `cluster_subscribers "four": want a number`},
		{"cluster_subscribers without a value", global("\twsgate {\n\t\tbroker redis_cluster a:1 {\n\t\t\tcluster_subscribers " + mark + "\n\t\t}\n\t}"), "wrong argument count"},
		{"cluster_subscribers twice", global("\twsgate {\n\t\tbroker redis_cluster a:1 {\n\t\t\tcluster_subscribers 2\n\t\t\tcluster_subscribers 4 " + mark + "\n\t\t}\n\t}"), "duplicate cluster_subscribers"},
		{"history pattern with a claim", global("\twsgate {\n\t\thistory chat:{claims.org}:* " + mark + "\n\t}"), "cannot name claims"},
		{"history pattern malformed", global("\twsgate {\n\t\thistory chat:**:x " + mark + "\n\t}"), `history pattern "chat:**:x"`},
		{"history without pattern", global("\twsgate {\n\t\thistory { " + mark + "\n\t\t\tsize 10\n\t\t}\n\t}"), "history needs one channel pattern"},
		{"history size zero", global("\twsgate {\n\t\thistory chat:** {\n\t\t\tsize 0 " + mark + "\n\t\t}\n\t}"), "positive"},
		{"history size too large", global("\twsgate {\n\t\thistory chat:** {\n\t\t\tsize 5000000 " + mark + "\n\t\t}\n\t}"), "size must be at most 1000000"},
		{"history option unknown", global("\twsgate {\n\t\thistory chat:** {\n\t\t\tsizes 10 " + mark + "\n\t\t}\n\t}"), `did you mean "size"`},
		{"history option twice", global("\twsgate {\n\t\thistory chat:** {\n\t\t\tttl 1m\n\t\t\tttl 2m " + mark + "\n\t\t}\n\t}"), `duplicate history option "ttl"`},
		{"presence ttl too short", global("\twsgate {\n\t\tpresence chat:** {\n\t\t\tttl 100ms " + mark + "\n\t\t}\n\t}"), "presence ttl must be at least 1s"},
		{"presence events with an argument", global("\twsgate {\n\t\tpresence chat:** {\n\t\t\tevents on " + mark + "\n\t\t}\n\t}"), "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			want := markedLine(t, tt.input)
			_, _, err := adapt(t, tt.input)
			if err == nil {
				t.Fatalf("adapted without error, want %q at line %d:\n%s", tt.wantErr, want, numbered(tt.input))
			}
			checkAdaptedErrorAt(t, err, tt.input, tt.wantErr, want)
		})
	}
}

// checkAdaptedErrorAt checks that an adapter error mentions wantErr and
// ends with line.
func checkAdaptedErrorAt(t *testing.T, err error, input, wantErr string, line int) {
	t.Helper()
	msg := err.Error()
	if !strings.Contains(msg, wantErr) {
		t.Errorf("error %q does not contain %q", msg, wantErr)
	}
	m := adaptedLine.FindStringSubmatch(msg)
	if m == nil {
		t.Fatalf("error %q does not end with its line", msg)
	}
	if m[1] != fmt.Sprint(line) {
		t.Errorf("error %q points at line %s, want line %d:\n%s", msg, m[1], line, numbered(input))
	}
}

// TestCaddyfileTypoSuggestions checks that a misspelt name is answered
// with the closest known one, in every block, and that a name close to
// nothing gets no suggestion.
func TestCaddyfileTypoSuggestions(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
	}{
		{"subdirective", site("\twsgate ws://a:1 {\n\t\torgins https://a.test " + mark + "\n\t}"), `unrecognized subdirective "orgins", did you mean "origins"?`},
		{"subdirective with a swapped letter", site("\twsgate ws://a:1 {\n\t\tpnog_timeout 5s " + mark + "\n\t}"), `did you mean "pong_timeout"?`},
		{"nothing close", site("\twsgate ws://a:1 {\n\t\tbrotli on " + mark + "\n\t}"), `unrecognized subdirective "brotli", at`},
		{"tls", site("\twsgate wss://a:1 {\n\t\ttls {\n\t\t\tservername a " + mark + "\n\t\t}\n\t}"), `unrecognized tls subdirective "servername", did you mean "server_name"?`},
		{"rate_limit", site("\twsgate ws://a:1 {\n\t\trate_limit {\n\t\t\tmessage 10/s " + mark + "\n\t\t}\n\t}"), `unrecognized rate_limit subdirective "message", did you mean "messages"?`},
		{"jwt", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tsecret " + testSecret + "\n\t\t\tleway 1s " + mark + "\n\t\t}\n\t}"), `unrecognized jwt subdirective "leway", did you mean "leeway"?`},
		{"issuer", site("\twsgate ws://a:1 {\n\t\tjwt {\n\t\t\tissuer a {\n\t\t\t\taudiance api " + mark + "\n\t\t\t}\n\t\t}\n\t}"), `unrecognized issuer subdirective "audiance", did you mean "audience"?`},
		{"forward_auth", site("\twsgate ws://a:1 {\n\t\tforward_auth http://a/auth {\n\t\t\ttimout 1s " + mark + "\n\t\t}\n\t}"), `unrecognized forward_auth subdirective "timout", did you mean "timeout"?`},
		{"limit_connections", site("\twsgate ws://a:1 {\n\t\tlimit_connections {\n\t\t\tper-ip 5 " + mark + "\n\t\t}\n\t}"), `did you mean "per_ip"?`},
		{"relay_channels", site("\twsgate ws://a:1 {\n\t\tchannels {\n\t\t\tallow * **\n\t\t}\n\t\trelay_channels {\n\t\t\tchanel_field ch " + mark + "\n\t\t}\n\t}"), `unrecognized relay_channels subdirective "chanel_field", did you mean "channel_field"?`},
		{"channel rule", site("\twsgate ws://a:1 {\n\t\tchannels {\n\t\t\talow * ** " + mark + "\n\t\t}\n\t}"), `did you mean "allow"?`},
		{"compression", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\twindow_bit 10 " + mark + "\n\t\t}\n\t}"), `unrecognized compression subdirective "window_bit", did you mean "window_bits"?`},
		{"compression, a swapped letter", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tcontext_takeovre " + mark + "\n\t\t}\n\t}"), `unrecognized compression subdirective "context_takeovre", did you mean "context_takeover"?`},
		{"compression, nothing close", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tlevel 9 " + mark + "\n\t\t}\n\t}"), `unrecognized compression subdirective "level", at`},
		{"compression misspelt", site("\twsgate ws://a:1 {\n\t\tcompresion off " + mark + "\n\t}"), `unrecognized subdirective "compresion", did you mean "compression"?`},
		{"rooms", site("\twsgate {\n\t\trooms {\n\t\t\tmax_subscription 5 " + mark + "\n\t\t}\n\t}"), `unrecognized rooms subdirective "max_subscription", did you mean "max_subscriptions"?`},
		{"wsgate_publish", site("\twsgate_publish {\n\t\tkey 0123456789abcdef\n\t\tmax_bach 5 " + mark + "\n\t}"), `unrecognized subdirective "max_bach", did you mean "max_batch"?`},
		{"global option", global("\twsgate {\n\t\tbrokr memory " + mark + "\n\t}"), `unrecognized wsgate option "brokr", did you mean "broker"?`},
		{"broker kind", global("\twsgate {\n\t\tbroker reddis redis://a:1 " + mark + "\n\t}"), `unknown broker "reddis", did you mean "redis"?`},
		{"broker option", global("\twsgate {\n\t\tbroker redis redis://a:1 {\n\t\t\tprefx app: " + mark + "\n\t\t}\n\t}"), `unrecognized broker option "prefx", did you mean "prefix"?`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := adapt(t, tt.input)
			if err == nil {
				t.Fatalf("adapted without error, want %q", tt.wantErr)
			}
			checkAdaptedErrorAt(t, err, tt.input, tt.wantErr, markedLine(t, tt.input))
		})
	}
}

// TestSuggestionListsMatchParsers checks that every name offered as a
// suggestion is one the block's parser knows.
func TestSuggestionListsMatchParsers(t *testing.T) {
	blocks := []struct {
		block string
		names []string
		input func(name string) string
	}{
		{"wsgate", handlerSubdirectives, func(n string) string { return optionInput(n) }},
		{"tls", tlsSubdirectives, tlsInput},
		{"rate_limit", rateLimitSubdirectives, rateInput},
		{"compression", compressionSubdirectives, func(n string) string { return wsgateBlock("compression {", "\t"+n, "}") }},
		{"rooms", roomsSubdirectives, func(n string) string { return "wsgate {\n\trooms {\n\t\t" + n + "\n\t}\n}" }},
		{"jwt", jwtSubdirectives, func(n string) string { return wsgateBlock("jwt {", "\t"+n, "}") }},
		{"issuer", issuerSubdirectives, func(n string) string { return wsgateBlock("jwt {", "\tissuer a {", "\t\t"+n, "\t}", "}") }},
		{"forward_auth", forwardAuthSubdirectives, func(n string) string { return wsgateBlock("forward_auth http://a/auth {", "\t"+n, "}") }},
		{"limit_connections", limitSubdirectives, func(n string) string { return wsgateBlock("limit_connections {", "\t"+n, "}") }},
		{"relay_channels", relayChannelsSubdirectives, func(n string) string { return relayInput(n) }},
	}
	for _, b := range blocks {
		for _, name := range b.names {
			t.Run(b.block+"/"+name, func(t *testing.T) {
				// without arguments most names are refused, but not as
				// unknown
				_, err := unmarshal(t, b.input(name))
				if err != nil && strings.Contains(err.Error(), "unrecognized") {
					t.Errorf("%s is suggested but refused: %v", name, err)
				}
			})
		}
	}
}

func TestEditDistance(t *testing.T) {
	tests := []struct {
		a, b string
		want int
	}{
		{"", "", 0},
		{"origins", "origins", 0},
		{"orgins", "origins", 1},
		{"", "abc", 3},
		{"kitten", "sitting", 3},
		{"pnog", "pong", 2},
	}
	for _, tt := range tests {
		if got := editDistance(tt.a, tt.b); got != tt.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.a, tt.b, got, tt.want)
		}
		if got := editDistance(tt.b, tt.a); got != tt.want {
			t.Errorf("editDistance(%q, %q) = %d, want %d", tt.b, tt.a, got, tt.want)
		}
	}
}

// observeAdapterLog collects what the Caddyfile parsers log until the test
// ends.
func observeAdapterLog(t *testing.T) *observer.ObservedLogs {
	t.Helper()
	core, logs := observer.New(zapcore.WarnLevel)
	saved := adapterLog
	adapterLog = func() *zap.Logger { return zap.New(core) }
	t.Cleanup(func() { adapterLog = saved })
	return logs
}

// TestCaddyfileWarnings checks that options that can never take effect
// are logged, with their line, when the Caddyfile is adapted, and that
// the same options where they do take effect are not.
func TestCaddyfileWarnings(t *testing.T) {
	tests := []struct {
		name, input, want string // want "" for no warning
	}{
		{"pong_timeout with pings off", site("\twsgate ws://a:1 {\n\t\tping_interval off\n\t\tpong_timeout 5s " + mark + "\n\t}"), "pong_timeout has no effect: ping_interval is off"},
		{"pong_timeout with pings on", site("\twsgate ws://a:1 {\n\t\tping_interval 10s\n\t\tpong_timeout 5s\n\t}"), ""},
		{"claims_header without a token source", site("\twsgate ws://a:1 {\n\t\tclaims_header sub X-User " + mark + "\n\t}"), "claims_header has no effect: without jwt or forward_auth there are no claims"},
		{"claims_header with forward_auth", site("\twsgate ws://a:1 {\n\t\tforward_auth http://a/auth\n\t\tclaims_header sub X-User\n\t}"), ""},
		{"claim template without a token source", site("\twsgate {\n\t\trooms\n\t\tchannels { " + mark + "\n\t\t\tallow subscribe lobby\n\t\t\tallow * org:{claims.org}:*\n\t\t}\n\t}"), "channel rules with {claims.…} never match"},
		{"claim template with jwt", site("\twsgate {\n\t\trooms\n\t\tjwt {\n\t\t\tsecret " + testSecret + "\n\t\t}\n\t\tchannels {\n\t\t\tallow * org:{claims.org}:*\n\t\t}\n\t}"), ""},
		{"channels without claims", site("\twsgate {\n\t\trooms\n\t\tchannels {\n\t\t\tallow * lobby\n\t\t}\n\t}"), ""},
		{"per_subject without a token source", site("\twsgate ws://a:1 {\n\t\tlimit_connections { " + mark + "\n\t\t\tper_subject 2\n\t\t}\n\t}"), "limit_connections per_subject has no effect"},
		{"tls without a wss upstream", site("\twsgate ws://a:1 {\n\t\ttls { " + mark + "\n\t\t\tserver_name a\n\t\t}\n\t}"), "tls has no effect: no upstream is wss://"},
		{"upstream option in rooms mode", site("\twsgate {\n\t\trooms\n\t\tdial_timeout 1s " + mark + "\n\t}"), "dial_timeout has no effect in rooms mode"},
		{"rate_limit upstream in rooms mode", site("\twsgate {\n\t\trooms\n\t\trate_limit {\n\t\t\tmessages 10/s\n\t\t}\n\t\trate_limit upstream { " + mark + "\n\t\t\tmessages 10/s\n\t\t}\n\t}"), "rate_limit upstream has no effect in rooms mode"},
		{"refresh_field in rooms mode", site("\twsgate {\n\t\trooms\n\t\tjwt {\n\t\t\tsecret " + testSecret + "\n\t\t}\n\t\trefresh_field token " + mark + "\n\t}"), "refresh_field has no effect in rooms mode"},
		{"send_queue without fan-out", site("\twsgate ws://a:1 {\n\t\tsend_queue 10 " + mark + "\n\t}"), "send_queue has no effect without rooms or upstream_control"},
		{"lb_policy claim without a token source", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy claim sub " + mark + "\n\t}"), "lb_policy claim has no effect"},
		{"lb_policy claim with jwt", site("\twsgate ws://a:1 ws://b:2 {\n\t\tjwt {\n\t\t\tsecret " + testSecret + "\n\t\t}\n\t\tlb_policy claim sub\n\t}"), ""},
		{"lb_policy cookie without a secret", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy cookie sticky " + mark + "\n\t}"), "lb_policy cookie without a secret"},
		{"lb_policy cookie with a secret", site("\twsgate ws://a:1 ws://b:2 {\n\t\tlb_policy cookie sticky {env.LB_SECRET}\n\t}"), ""},
		{"lb_policy in rooms mode", site("\twsgate {\n\t\trooms\n\t\tlb_policy least_conn " + mark + "\n\t}"), "lb_policy has no effect in rooms mode"},
		{"health checks in rooms mode", site("\twsgate {\n\t\trooms\n\t\thealth_interval 1s " + mark + "\n\t\thealth_uri /h\n\t}"), "active health checking has no effect in rooms mode"},
		{"compression upstream off in rooms mode", site("\twsgate {\n\t\trooms\n\t\tcompression { " + mark + "\n\t\t\tupstream off\n\t\t}\n\t}"), "compression upstream off has no effect in rooms mode"},
		{"compression in rooms mode", site("\twsgate {\n\t\trooms\n\t\tcompression {\n\t\t\tcontext_takeover\n\t\t}\n\t}"), ""},
		{"compression upstream off in relay mode", site("\twsgate ws://a:1 {\n\t\tcompression {\n\t\t\tupstream off\n\t\t}\n\t}"), ""},
		{"send_queue with upstream_control", site("\twsgate ws://a:1 {\n\t\tupstream_control x:\n\t\tsend_queue 10\n\t}"), ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			logs := observeAdapterLog(t)
			if _, _, err := adapt(t, tt.input); err != nil {
				t.Fatalf("adapting: %v", err)
			}
			got := logs.All()
			if tt.want == "" {
				for _, e := range got {
					t.Errorf("unexpected warning %q %v", e.Message, e.ContextMap())
				}
				return
			}
			if len(got) != 1 {
				t.Fatalf("%d warnings %v, want one", len(got), got)
			}
			e := got[0]
			if !strings.Contains(e.Message, tt.want) {
				t.Errorf("warning %q does not contain %q", e.Message, tt.want)
			}
			ctx := e.ContextMap()
			if want := int64(markedLine(t, tt.input)); ctx["file"] != "Caddyfile" || ctx["line"] != want {
				t.Errorf("warning at %v:%v, want Caddyfile:%d:\n%s", ctx["file"], ctx["line"], want, numbered(tt.input))
			}
		})
	}
}

// TestProvisionRefusesJSON checks that what the Caddyfile parsers refuse
// with a line, a JSON config that skips them is still refused at
// provisioning; and that negative timeouts, which have no "off" and the
// Caddyfile cannot express, are errors rather than the default.
func TestProvisionRefusesJSON(t *testing.T) {
	secretKey := `{"secret":"` + testSecret + `"}`
	tests := []struct {
		name, config, wantErr string
	}{
		{"upstream not ws", `{"upstreams":["http://a:1"]}`, "scheme must be ws or wss"},
		{"managed header forwarded", `{"upstreams":["ws://a:1"],"forward_headers":["Sec-WebSocket-Key"]}`, "cannot be forwarded"},
		{"origin without scheme", `{"upstreams":["ws://a:1"],"origins":["app.example.com"]}`, "want scheme://host"},
		{"short secret", `{"upstreams":["ws://a:1"],"jwt":{"issuers":[{"keys":[{"secret":"too-short"}]}]}}`, "at least 32 bytes"},
		{"unknown algorithm", `{"upstreams":["ws://a:1"],"jwt":{"issuers":[{"keys":[{"secret":"` + testSecret + `","algorithms":["HS257"]}]}]}}`, `unknown algorithm "HS257"`},
		{"algorithm that does not fit", `{"upstreams":["ws://a:1"],"jwt":{"issuers":[{"keys":[{"secret":"` + testSecret + `","algorithms":["RS256"]}]}]}}`, "does not fit"},
		{"jwks URL not http", `{"upstreams":["ws://a:1"],"jwt":{"issuers":[{"jwks_url":"idp.test/jwks"}]}}`, "must be http(s)://host"},
		{"two keys without kid", `{"upstreams":["ws://a:1"],"jwt":{"issuers":[{"keys":[` + secretKey + `,` + secretKey + `]}]}}`, "several keys without an id"},
		{"forward_auth URL not http", `{"upstreams":["ws://a:1"],"forward_auth":{"url":"ftp://a/auth"}}`, "must be http(s)://host"},
		{"refresh_field without jwt", `{"upstreams":["ws://a:1"],"refresh_field":"token"}`, "refresh_field needs jwt"},
		{"upstream_control in rooms mode", `{"rooms":{},"upstream_control":"x:"}`, "upstream_control is for relay mode"},
		{"relay_channels without channels", `{"upstreams":["ws://a:1"],"relay_channels":{"channel_field":"ch"}}`, "relay_channels needs a channels block"},
		{"a word mapped to two actions", `{"upstreams":["ws://a:1"],"channels":[{"effect":"allow","actions":["*"],"pattern":"**"}],` +
			`"relay_channels":{"channel_field":"ch","actions":{"subscribe":["join"],"publish":["join"]}}}`, `word "join" maps to both publish and subscribe`},
		{"negative close_timeout", `{"upstreams":["ws://a:1"],"close_timeout":-1}`, "close timeout must not be negative"},
		{"negative pong_timeout", `{"upstreams":["ws://a:1"],"pong_timeout":-1000000000}`, "pong timeout must not be negative"},
		{"negative dial_timeout", `{"upstreams":["ws://a:1"],"dial_timeout":-1}`, "dial timeout must not be negative"},
		{"negative send_queue", `{"upstreams":["ws://a:1"],"send_queue":-1}`, "send queue must not be negative"},
		{"unknown log_connections level", `{"upstreams":["ws://a:1"],"log_connections":"warn"}`, `log_connections must be info, debug or off, not "warn"`},
		{"unknown lb policy", `{"upstreams":["ws://a:1"],"load_balancing":{"selection_policy":{"policy":"weighted"}}}`, `unknown lb_policy "weighted"`},
		{"the engine's key policy", `{"upstreams":["ws://a:1"],"load_balancing":{"selection_policy":{"policy":"key"}}}`, `unknown lb_policy "key"`},
		{"claim policy without a claim", `{"upstreams":["ws://a:1"],"load_balancing":{"selection_policy":{"policy":"claim"}}}`, "needs a claim path"},
		{"header policy without a field", `{"upstreams":["ws://a:1"],"load_balancing":{"selection_policy":{"policy":"header"}}}`, "needs a header name"},
		{"active checks without a probe", `{"upstreams":["ws://a:1"],"health_checks":{"active":{"interval":1000000000}}}`, "need health_uri or health_websocket"},
		{"passive checks without fail_duration", `{"upstreams":["ws://a:1"],"health_checks":{"passive":{"max_fails":2}}}`, "need fail_duration"},
		{"unhealthy close code out of range", `{"upstreams":["ws://a:1"],"health_checks":{"passive":{"fail_duration":1000000000,"unhealthy_close":[70000]}}}`, "want 1000-4999"},
		{"compression window bits out of range", `{"upstreams":["ws://a:1"],"compression":{"window_bits":16}}`, "compression window bits 16: want 8 to 15"},
		{"negative compression min size", `{"upstreams":["ws://a:1"],"compression":{"min_size":-1}}`, "compression min size -1: want at least 0"},
		{"negative drain_timeout", `{"upstreams":["ws://a:1"],"drain_timeout":-1}`, "drain_timeout must not be negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			if err := json.Unmarshal([]byte(tt.config), &h); err != nil {
				t.Fatal(err)
			}
			err := h.Provision(provisionContext(t))
			t.Cleanup(func() { h.Cleanup() })
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Provision error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}

	t.Run("short publish key", func(t *testing.T) {
		p := Publish{Keys: []string{"short"}}
		if err := p.Provision(provisionContext(t)); err == nil || !strings.Contains(err.Error(), "at least 16 characters") {
			t.Errorf("Provision error = %v, want a refusal of the key", err)
		}
	})
	t.Run("redis URL with a bad database", func(t *testing.T) {
		a := App{Broker: &BrokerConfig{Type: "redis", URL: "redis://127.0.0.1:6379/wsgate"}}
		err := a.Provision(provisionContext(t))
		t.Cleanup(func() { a.Cleanup() })
		if err == nil || !strings.Contains(err.Error(), "invalid database number") {
			t.Errorf("Provision error = %v, want a refusal of the URL", err)
		}
	})
	for name, bc := range map[string]BrokerConfig{
		"cluster_subscribers out of range":          {Type: "redis", Cluster: true, Addrs: []string{"127.0.0.1:1"}, ClusterSubscribers: 300},
		"cluster_subscribers on a standalone":       {Type: "redis", URL: "redis://127.0.0.1:1", ClusterSubscribers: 2},
		"cluster_subscribers negative in a cluster": {Type: "redis", Cluster: true, Addrs: []string{"127.0.0.1:1"}, ClusterSubscribers: -1},
	} {
		t.Run(name, func(t *testing.T) {
			a := App{Broker: &bc}
			err := a.Provision(provisionContext(t))
			t.Cleanup(func() { a.Cleanup() })
			if err == nil || !strings.Contains(err.Error(), "redis cluster subscribers") {
				t.Errorf("Provision error = %v, want a refusal of cluster_subscribers", err)
			}
		})
	}
}
