package caddymodule

import (
	"encoding/json"
	"fmt"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// unmarshal parses input, which must start with the wsgate directive, the
// way the Caddyfile adapter hands a segment to the handler.
func unmarshal(t testing.TB, input string) (*Handler, error) {
	t.Helper()
	h := new(Handler)
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
	return h, err
}

// handlerDiffs lists, field by field, where got differs from want.
// Pointers to structs are compared through, so a wrong rate names the
// rate field rather than the whole RateLimit.
func handlerDiffs(got, want *Handler) []string {
	return fieldDiffs("Handler", reflect.ValueOf(got).Elem(), reflect.ValueOf(want).Elem())
}

func fieldDiffs(path string, got, want reflect.Value) []string {
	switch got.Kind() {
	case reflect.Pointer:
		if got.IsNil() || want.IsNil() {
			if got.IsNil() != want.IsNil() {
				return []string{fmt.Sprintf("%s = %s, want %s", path, show(got), show(want))}
			}
			return nil
		}
		return fieldDiffs(path, got.Elem(), want.Elem())
	case reflect.Struct:
		var diffs []string
		for i := 0; i < got.NumField(); i++ {
			f := got.Type().Field(i)
			if !f.IsExported() {
				continue
			}
			diffs = append(diffs, fieldDiffs(path+"."+f.Name, got.Field(i), want.Field(i))...)
		}
		return diffs
	default:
		if !reflect.DeepEqual(got.Interface(), want.Interface()) {
			return []string{fmt.Sprintf("%s = %s, want %s", path, show(got), show(want))}
		}
		return nil
	}
}

func show(v reflect.Value) string {
	if v.Kind() == reflect.Pointer && !v.IsNil() {
		return fmt.Sprintf("&%+v", v.Elem().Interface())
	}
	return fmt.Sprintf("%#v", v.Interface())
}

// describe shows h with its pointer fields spelled out.
func describe(h *Handler) string {
	return fmt.Sprintf("%+v tls=%s rate_limit=%s rate_limit_upstream=%s", *h,
		show(reflect.ValueOf(h.TLS)), show(reflect.ValueOf(h.RateLimit)), show(reflect.ValueOf(h.RateLimitUpstream)))
}

func dur(d time.Duration) caddy.Duration { return caddy.Duration(d) }

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  Handler
	}{
		{
			name:  "one inline upstream",
			input: `wsgate ws://localhost:9000`,
			want:  Handler{Upstreams: []string{"ws://localhost:9000"}},
		},
		{
			name:  "several inline upstreams",
			input: `wsgate ws://a:1 wss://b:2/chat`,
			want:  Handler{Upstreams: []string{"ws://a:1", "wss://b:2/chat"}},
		},
		{
			name: "upstream repeated in the block, after the inline ones",
			input: `wsgate ws://a:1 {
				upstream ws://b:2
				upstream ws://c:3 ws://d:4
			}`,
			want: Handler{Upstreams: []string{"ws://a:1", "ws://b:2", "ws://c:3", "ws://d:4"}},
		},
		{
			name: "upstream only in the block",
			input: `wsgate {
				upstream ws://b:2
			}`,
			want: Handler{Upstreams: []string{"ws://b:2"}},
		},
		{
			name:  "empty block",
			input: "wsgate ws://a:1 {\n}",
			want:  Handler{Upstreams: []string{"ws://a:1"}},
		},
		{
			name: "name and log_connections",
			input: `wsgate ws://a:1 {
				name chat
				log_connections debug
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, Name: "chat", LogConnections: "debug"},
		},
		{
			name: "log_connections off",
			input: `wsgate ws://a:1 {
				log_connections off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, LogConnections: "off"},
		},
		{
			name: "dial_timeout",
			input: `wsgate ws://a:1 {
				dial_timeout 2.5s
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, DialTimeout: dur(2500 * time.Millisecond)},
		},
		{
			name: "dial_timeout in days",
			input: `wsgate ws://a:1 {
				dial_timeout 1d
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, DialTimeout: dur(24 * time.Hour)},
		},
		{
			name: "tls with every subdirective",
			input: `wsgate wss://a:1 {
				tls {
					ca_file /etc/ca1.pem /etc/ca2.pem
					server_name app.internal
					insecure_skip_verify
					client_certificate /etc/client.pem /etc/client.key
				}
			}`,
			want: Handler{Upstreams: []string{"wss://a:1"}, TLS: &UpstreamTLS{
				CAFiles:            []string{"/etc/ca1.pem", "/etc/ca2.pem"},
				ServerName:         "app.internal",
				InsecureSkipVerify: true,
				ClientCertFile:     "/etc/client.pem",
				ClientKeyFile:      "/etc/client.key",
			}},
		},
		{
			name: "tls alone uses the defaults",
			input: `wsgate wss://a:1 {
				tls
			}`,
			want: Handler{Upstreams: []string{"wss://a:1"}, TLS: &UpstreamTLS{}},
		},
		{
			name: "tls then more subdirectives",
			input: `wsgate wss://a:1 {
				tls {
					server_name app.internal
				}
				dial_timeout 3s
			}`,
			want: Handler{
				Upstreams:   []string{"wss://a:1"},
				TLS:         &UpstreamTLS{ServerName: "app.internal"},
				DialTimeout: dur(3 * time.Second),
			},
		},
		{
			name: "forward_headers",
			input: `wsgate ws://a:1 {
				forward_headers Cookie X-Tenant
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, ForwardHeaders: []string{"Cookie", "X-Tenant"}},
		},
		{
			name: "max_message",
			input: `wsgate ws://a:1 {
				max_message 64KiB
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, MaxMessage: 65536},
		},
		{
			name: "max_message in SI units and plain bytes",
			input: `wsgate ws://a:1 {
				max_message 2MB
				max_message_upstream 1000
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, MaxMessage: 2000000, MaxMessageUpstream: 1000},
		},
		{
			name: "max_message off means unlimited",
			input: `wsgate ws://a:1 {
				max_message off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, MaxMessage: -1},
		},
		{
			name: "max_message_upstream",
			input: `wsgate ws://a:1 {
				max_message_upstream 16MiB
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, MaxMessageUpstream: 16 << 20},
		},
		{
			name: "max_message_upstream off is the unlimited default",
			input: `wsgate ws://a:1 {
				max_message_upstream off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, MaxMessageUpstream: 0},
		},
		{
			name: "rate_limit without a direction limits the client",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 100/s
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{Messages: 100}},
		},
		{
			name: "rate_limit client",
			input: `wsgate ws://a:1 {
				rate_limit client {
					messages 6000/1m burst 50
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{Messages: 100, MessageBurst: 50}},
		},
		{
			name: "rate_limit upstream",
			input: `wsgate ws://a:1 {
				rate_limit upstream {
					bytes 1MiB/s
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimitUpstream: &RateLimit{Bytes: 1048576}},
		},
		{
			name: "rate_limit for both directions",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 10/s
				}
				rate_limit upstream {
					messages 20/s
				}
			}`,
			want: Handler{
				Upstreams:         []string{"ws://a:1"},
				RateLimit:         &RateLimit{Messages: 10},
				RateLimitUpstream: &RateLimit{Messages: 20},
			},
		},
		{
			name: "rate_limit upstream before client",
			input: `wsgate ws://a:1 {
				rate_limit upstream {
					messages 20/s
				}
				rate_limit client {
					messages 10/s
				}
			}`,
			want: Handler{
				Upstreams:         []string{"ws://a:1"},
				RateLimit:         &RateLimit{Messages: 10},
				RateLimitUpstream: &RateLimit{Messages: 20},
			},
		},
		{
			name: "rate_limit with messages, bytes, bursts and on_exceed",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 3600/h burst 5
					bytes 64KiB/s burst 256KiB
					on_exceed throttle
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{
				Messages: 1, MessageBurst: 5,
				Bytes: 65536, ByteBurst: 262144,
				OnExceed: "throttle",
			}},
		},
		{
			name: "rates over minutes, hours and durations",
			input: `wsgate ws://a:1 {
				rate_limit client {
					messages 100/10s
					bytes 120MB/m
				}
				rate_limit upstream {
					messages 7200/2h
					bytes 1KiB/500ms
				}
			}`,
			want: Handler{
				Upstreams:         []string{"ws://a:1"},
				RateLimit:         &RateLimit{Messages: 10, Bytes: 2000000},
				RateLimitUpstream: &RateLimit{Messages: 1, Bytes: 2048},
			},
		},
		{
			name: "fractional message rate",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 1/m
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{Messages: 1.0 / 60}},
		},
		{
			name: "on_exceed close",
			input: `wsgate ws://a:1 {
				rate_limit {
					on_exceed close
					messages 1/s
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{Messages: 1, OnExceed: "close"}},
		},
		{
			name: "on_exceed drop",
			input: `wsgate ws://a:1 {
				rate_limit {
					bytes 10KB/s
					on_exceed drop
				}
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, RateLimit: &RateLimit{Bytes: 10000, OnExceed: "drop"}},
		},
		{
			name: "idle_timeout",
			input: `wsgate ws://a:1 {
				idle_timeout 5m
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, IdleTimeout: dur(5 * time.Minute)},
		},
		{
			name: "ping_interval",
			input: `wsgate ws://a:1 {
				ping_interval 15s
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, PingInterval: dur(15 * time.Second)},
		},
		{
			name: "ping_interval off",
			input: `wsgate ws://a:1 {
				ping_interval off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, PingInterval: -1},
		},
		{
			name: "park_after",
			input: `wsgate ws://a:1 {
				park_after 500ms
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, ParkAfter: dur(500 * time.Millisecond)},
		},
		{
			name: "park_after off",
			input: `wsgate ws://a:1 {
				park_after off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, ParkAfter: -1},
		},
		{
			name: "pong_timeout",
			input: `wsgate ws://a:1 {
				pong_timeout 10s
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, PongTimeout: dur(10 * time.Second)},
		},
		{
			name: "write_timeout",
			input: `wsgate ws://a:1 {
				write_timeout 3s
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, WriteTimeout: dur(3 * time.Second)},
		},
		{
			name: "write_timeout off",
			input: `wsgate ws://a:1 {
				write_timeout off
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, WriteTimeout: -1},
		},
		{
			name: "close_timeout",
			input: `wsgate ws://a:1 {
				close_timeout 1500ms
			}`,
			want: Handler{Upstreams: []string{"ws://a:1"}, CloseTimeout: dur(1500 * time.Millisecond)},
		},
		{
			name: "quoted arguments",
			input: `wsgate "ws://a:1/path with space" {
				forward_headers "X-Odd Name"
			}`,
			want: Handler{Upstreams: []string{"ws://a:1/path with space"}, ForwardHeaders: []string{"X-Odd Name"}},
		},
		{
			name: "every option",
			input: `wsgate ws://a:1 {
				upstream ws://b:2
				dial_timeout 2s
				tls {
					ca_file /ca.pem
					server_name app
					insecure_skip_verify
					client_certificate /c.pem /c.key
				}
				forward_headers Cookie
				max_message 128KiB
				max_message_upstream 4MiB
				rate_limit {
					messages 6000/1m burst 50
					bytes 1MiB/s burst 2MiB
					on_exceed drop
				}
				rate_limit upstream {
					messages 1000/s
					on_exceed throttle
				}
				idle_timeout 10m
				ping_interval 20s
				pong_timeout 5s
				write_timeout 15s
				close_timeout 2s
			}`,
			want: Handler{
				Upstreams:   []string{"ws://a:1", "ws://b:2"},
				DialTimeout: dur(2 * time.Second),
				TLS: &UpstreamTLS{
					CAFiles:            []string{"/ca.pem"},
					ServerName:         "app",
					InsecureSkipVerify: true,
					ClientCertFile:     "/c.pem",
					ClientKeyFile:      "/c.key",
				},
				ForwardHeaders:     []string{"Cookie"},
				MaxMessage:         128 << 10,
				MaxMessageUpstream: 4 << 20,
				RateLimit: &RateLimit{
					Messages: 100, MessageBurst: 50,
					Bytes: 1 << 20, ByteBurst: 2 << 20,
					OnExceed: "drop",
				},
				RateLimitUpstream: &RateLimit{Messages: 1000, OnExceed: "throttle"},
				IdleTimeout:       dur(10 * time.Minute),
				PingInterval:      dur(20 * time.Second),
				PongTimeout:       dur(5 * time.Second),
				WriteTimeout:      dur(15 * time.Second),
				CloseTimeout:      dur(2 * time.Second),
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

// errLine matches the position Caddy's dispenser appends to every error.
var errLine = regexp.MustCompile(`, at Testfile:(\d+)$`)

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string // a substring of the message
		line    int    // the line the error must point at
	}{
		// structure
		{
			name: "unknown subdirective",
			input: `wsgate ws://a:1 {
				dial_timeout 1s
				max_mesage 1MiB
			}`,
			wantErr: `unrecognized subdirective "max_mesage"`,
			line:    3,
		}, {
			name: "log_connections with an unknown level",
			input: `wsgate ws://a:1 {
				log_connections warn
			}`,
			wantErr: `log_connections must be info, debug or off, not "warn"`,
			line:    2,
		},
		{
			name: "name without a value",
			input: `wsgate ws://a:1 {
				name
			}`,
			wantErr: "wrong argument count",
			line:    2,
		},
		{
			name: "name twice",
			input: `wsgate ws://a:1 {
				name a
				name b
			}`,
			wantErr: `duplicate subdirective "name"`,
			line:    3,
		},

		{
			name: "duplicate subdirective",
			input: `wsgate ws://a:1 {
				idle_timeout 1m
				ping_interval 10s
				idle_timeout 2m
			}`,
			wantErr: `duplicate subdirective "idle_timeout"`,
			line:    4,
		},
		{
			name: "duplicate tls block",
			input: `wsgate wss://a:1 {
				tls {
					server_name a
				}
				tls {
					server_name b
				}
			}`,
			wantErr: `duplicate subdirective "tls"`,
			line:    5,
		},
		{
			name: "duplicate max_message after off",
			input: `wsgate ws://a:1 {
				max_message off
				max_message 1MiB
			}`,
			wantErr: `duplicate subdirective "max_message"`,
			line:    3,
		},
		{
			name: "duplicate write_timeout after off",
			input: `wsgate ws://a:1 {
				write_timeout off
				close_timeout 2s
				write_timeout 5s
			}`,
			wantErr: `duplicate subdirective "write_timeout"`,
			line:    4,
		},
		{
			name: "duplicate close_timeout",
			input: `wsgate ws://a:1 {
				close_timeout 2s
				write_timeout 5s
				close_timeout 3s
			}`,
			wantErr: `duplicate subdirective "close_timeout"`,
			line:    4,
		},
		{
			name: "misspelled close_timeout",
			input: `wsgate ws://a:1 {
				write_timeout 5s
				close_timout 3s
			}`,
			wantErr: `unrecognized subdirective "close_timout"`,
			line:    3,
		},
		{
			name:    "no upstream at all",
			input:   `wsgate`,
			wantErr: "wsgate needs at least one upstream",
			line:    1,
		},
		{
			name: "no upstream in a block",
			input: `wsgate {
				dial_timeout 1s
				max_message 1MiB
			}`,
			wantErr: "wsgate needs at least one upstream",
			line:    1,
		},
		{
			name: "upstream without an address",
			input: `wsgate ws://a:1 {
				upstream
			}`,
			wantErr: "wrong argument count",
			line:    2,
		},

		// rate_limit directions
		{
			name: "duplicate rate_limit without direction",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 1/s
				}
				rate_limit {
					messages 2/s
				}
			}`,
			wantErr: "duplicate rate_limit for client",
			line:    5,
		},
		{
			name: "duplicate rate_limit client, once implicit",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 1/s
				}
				rate_limit upstream {
					messages 1/s
				}
				rate_limit client {
					messages 2/s
				}
			}`,
			wantErr: "duplicate rate_limit for client",
			line:    8,
		},
		{
			name: "duplicate rate_limit upstream",
			input: `wsgate ws://a:1 {
				rate_limit upstream {
					messages 1/s
				}
				rate_limit upstream {
					bytes 1KiB/s
				}
			}`,
			wantErr: "duplicate rate_limit for upstream",
			line:    5,
		},
		{
			name: "bad rate_limit direction",
			input: `wsgate ws://a:1 {
				rate_limit server {
					messages 1/s
				}
			}`,
			wantErr: `rate_limit direction must be client or upstream, not "server"`,
			line:    2,
		},
		{
			name: "two rate_limit directions on one line",
			input: `wsgate ws://a:1 {
				rate_limit client upstream {
					messages 1/s
				}
			}`,
			wantErr: "wrong argument count",
			line:    2,
		},
		{
			name: "rate_limit without limits",
			input: `wsgate ws://a:1 {
				rate_limit {
					on_exceed drop
				}
			}`,
			wantErr: "rate_limit needs messages or bytes",
			line:    2,
		},
		{
			name: "rate_limit without a block",
			input: `wsgate ws://a:1 {
				dial_timeout 1s
				rate_limit
			}`,
			wantErr: "rate_limit needs messages or bytes",
			line:    3,
		},
		{
			name: "unknown rate_limit subdirective",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 1/s
					frames 1/s
				}
			}`,
			wantErr: `unrecognized rate_limit subdirective "frames"`,
			line:    4,
		},
		{
			name: "duplicate rate_limit subdirective",
			input: `wsgate ws://a:1 {
				rate_limit {
					messages 1/s
					bytes 1KiB/s
					messages 2/s
				}
			}`,
			wantErr: `duplicate rate_limit subdirective "messages"`,
			line:    5,
		},

		// rates
		{
			name:    "rate without a duration",
			input:   rateInput("messages 100"),
			wantErr: `bad rate "100"`,
			line:    3,
		},
		{
			name:    "rate with zero amount",
			input:   rateInput("messages 0/s"),
			wantErr: `bad rate "0/s": the amount must be a positive number`,
			line:    3,
		},
		{
			name:    "rate with negative amount",
			input:   rateInput("messages -5/s"),
			wantErr: `bad rate "-5/s"`,
			line:    3,
		},
		{
			name:    "rate with a word for the amount",
			input:   rateInput("messages many/s"),
			wantErr: `bad rate "many/s"`,
			line:    3,
		},
		{
			name:    "rate of NaN",
			input:   rateInput("messages NaN/s"),
			wantErr: `bad rate "NaN/s"`,
			line:    3,
		},
		{
			name:    "rate of infinity",
			input:   rateInput("messages Inf/s"),
			wantErr: `bad rate "Inf/s"`,
			line:    3,
		},
		{
			name:    "rate that overflows to infinity",
			input:   rateInput("messages 1e308/1ns"),
			wantErr: `bad rate "1e308/1ns": out of range`,
			line:    3,
		},
		{
			name: "rate that underflows to zero",
			input: `wsgate ws://a:1 {
				rate_limit {
					bytes 1KiB/s
					messages 1e-323/h
				}
			}`,
			wantErr: `bad rate "1e-323/h": out of range`,
			line:    4,
		},
		{
			name:    "rate with an unknown unit",
			input:   rateInput("messages 100/fortnight"),
			wantErr: `bad rate "100/fortnight": the duration must be s, m, h or a positive duration`,
			line:    3,
		},
		{
			name:    "rate over zero time",
			input:   rateInput("messages 100/0s"),
			wantErr: `bad rate "100/0s"`,
			line:    3,
		},
		{
			name:    "rate over negative time",
			input:   rateInput("messages 100/-1s"),
			wantErr: `bad rate "100/-1s"`,
			line:    3,
		},
		{
			name:    "rate with an empty duration",
			input:   rateInput("messages 100/"),
			wantErr: `bad rate "100/"`,
			line:    3,
		},
		{
			name:    "byte rate with a bad size",
			input:   rateInput("bytes lots/s"),
			wantErr: `bad rate "lots/s"`,
			line:    3,
		},
		{
			name:    "byte rate of zero",
			input:   rateInput("bytes 0KiB/s"),
			wantErr: `bad rate "0KiB/s"`,
			line:    3,
		},
		{
			name:    "messages without a rate",
			input:   rateInput("messages"),
			wantErr: "want <amount>/<duration> [burst <amount>]",
			line:    3,
		},
		{
			name:    "burst without an amount",
			input:   rateInput("messages 100/s burst"),
			wantErr: "want <amount>/<duration> [burst <amount>]",
			line:    3,
		},
		{
			name:    "misspelled burst",
			input:   rateInput("messages 100/s brust 5"),
			wantErr: "want <amount>/<duration> [burst <amount>]",
			line:    3,
		},
		{
			name:    "extra argument after burst",
			input:   rateInput("bytes 1MiB/s burst 2MiB 3MiB"),
			wantErr: "want <amount>/<duration> [burst <amount>]",
			line:    3,
		},
		{
			name:    "zero burst",
			input:   rateInput("messages 100/s burst 0"),
			wantErr: `bad burst "0"`,
			line:    3,
		},
		{
			name:    "fractional message burst",
			input:   rateInput("messages 100/s burst 0.5"),
			wantErr: `bad burst "0.5"`,
			line:    3,
		},
		{
			name:    "burst that is a word",
			input:   rateInput("messages 100/s burst some"),
			wantErr: `bad burst "some"`,
			line:    3,
		},
		{
			name:    "byte burst too large",
			input:   rateInput("bytes 1MiB/s burst 4GiB"),
			wantErr: `bad burst "4GiB"`,
			line:    3,
		},
		{
			name:    "on_exceed with an unknown action",
			input:   rateInput("on_exceed explode"),
			wantErr: `on_exceed must be close, drop or throttle, not "explode"`,
			line:    3,
		},
		{
			name:    "on_exceed without an action",
			input:   rateInput("on_exceed"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "on_exceed with two actions",
			input:   rateInput("on_exceed close drop"),
			wantErr: "wrong argument count",
			line:    3,
		},

		// sizes
		{
			name:    "max_message zero",
			input:   optionInput("max_message 0"),
			wantErr: `bad size "0"`,
			line:    3,
		},
		{
			name:    "max_message word",
			input:   optionInput("max_message big"),
			wantErr: `bad size "big"`,
			line:    3,
		},
		{
			name:    "max_message negative",
			input:   optionInput("max_message -1"),
			wantErr: `bad size "-1"`,
			line:    3,
		},
		{
			name:    "max_message with an unknown unit",
			input:   optionInput("max_message 1MiBs"),
			wantErr: `bad size "1MiBs"`,
			line:    3,
		},
		{
			name:    "max_message past int64",
			input:   optionInput("max_message 10EiB"),
			wantErr: `bad size "10EiB"`,
			line:    3,
		},
		{
			name:    "max_message under a byte",
			input:   optionInput("max_message 0.5"),
			wantErr: `bad size "0.5"`,
			line:    3,
		},
		{
			name:    "max_message missing",
			input:   optionInput("max_message"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "max_message extra",
			input:   optionInput("max_message 1MiB 2MiB"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "max_message_upstream zero",
			input:   optionInput("max_message_upstream 0B"),
			wantErr: `bad size "0B"`,
			line:    3,
		},
		{
			name:    "max_message_upstream off with extra",
			input:   optionInput("max_message_upstream off 1MiB"),
			wantErr: "wrong argument count",
			line:    3,
		},

		// durations
		{
			name:    "dial_timeout missing",
			input:   optionInput("dial_timeout"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "dial_timeout extra",
			input:   optionInput("dial_timeout 1s 2s"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "dial_timeout zero",
			input:   optionInput("dial_timeout 0s"),
			wantErr: `duration "0s" must be positive`,
			line:    3,
		},
		{
			name:    "dial_timeout without a unit",
			input:   optionInput("dial_timeout 5"),
			wantErr: `bad duration "5"`,
			line:    3,
		},
		{
			name:    "idle_timeout word",
			input:   optionInput("idle_timeout soon"),
			wantErr: `bad duration "soon"`,
			line:    3,
		},
		{
			name:    "idle_timeout off is not offered",
			input:   optionInput("idle_timeout off"),
			wantErr: `bad duration "off"`,
			line:    3,
		},
		{
			name:    "pong_timeout negative",
			input:   optionInput("pong_timeout -5s"),
			wantErr: `duration "-5s" must be positive`,
			line:    3,
		},
		{
			name:    "ping_interval word",
			input:   optionInput("ping_interval never"),
			wantErr: `bad duration "never"`,
			line:    3,
		},
		{
			name:    "park_after word",
			input:   optionInput("park_after soon"),
			wantErr: `bad duration "soon"`,
			line:    3,
		},
		{
			name:    "park_after two arguments",
			input:   optionInput("park_after 1s 2s"),
			wantErr: `wrong argument count`,
			line:    3,
		},
		{
			name:    "ping_interval zero",
			input:   optionInput("ping_interval 0"),
			wantErr: `duration "0" must be positive`,
			line:    3,
		},
		{
			name:    "ping_interval missing",
			input:   optionInput("ping_interval"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "ping_interval off with extra",
			input:   optionInput("ping_interval off 10s"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "write_timeout word",
			input:   optionInput("write_timeout never"),
			wantErr: `bad duration "never"`,
			line:    3,
		},
		{
			name:    "write_timeout zero",
			input:   optionInput("write_timeout 0s"),
			wantErr: `duration "0s" must be positive`,
			line:    3,
		},
		{
			name:    "write_timeout negative",
			input:   optionInput("write_timeout -1s"),
			wantErr: `duration "-1s" must be positive`,
			line:    3,
		},
		{
			name:    "write_timeout missing",
			input:   optionInput("write_timeout"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "write_timeout off with extra",
			input:   optionInput("write_timeout off 10s"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "close_timeout off is not offered",
			input:   optionInput("close_timeout off"),
			wantErr: `bad duration "off"`,
			line:    3,
		},
		{
			name:    "close_timeout zero",
			input:   optionInput("close_timeout 0"),
			wantErr: `duration "0" must be positive`,
			line:    3,
		},
		{
			name:    "close_timeout negative",
			input:   optionInput("close_timeout -2s"),
			wantErr: `duration "-2s" must be positive`,
			line:    3,
		},
		{
			name:    "close_timeout missing",
			input:   optionInput("close_timeout"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "close_timeout extra",
			input:   optionInput("close_timeout 1s 2s"),
			wantErr: "wrong argument count",
			line:    3,
		},

		// forward_headers
		{
			name:    "forward_headers missing",
			input:   optionInput("forward_headers"),
			wantErr: "wrong argument count",
			line:    3,
		},

		// tls
		{
			name: "tls with an argument",
			input: `wsgate wss://a:1 {
				dial_timeout 1s
				tls insecure {
				}
			}`,
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "unknown tls subdirective",
			input:   tlsInput("verify off"),
			wantErr: `unrecognized tls subdirective "verify"`,
			line:    3,
		},
		{
			name: "duplicate tls subdirective",
			input: `wsgate wss://a:1 {
				tls {
					server_name a
					ca_file /ca.pem
					server_name b
				}
			}`,
			wantErr: `duplicate tls subdirective "server_name"`,
			line:    5,
		},
		{
			name:    "ca_file missing",
			input:   tlsInput("ca_file"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "server_name missing",
			input:   tlsInput("server_name"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "server_name extra",
			input:   tlsInput("server_name a b"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "insecure_skip_verify with an argument",
			input:   tlsInput("insecure_skip_verify true"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "client_certificate without a key",
			input:   tlsInput("client_certificate /c.pem"),
			wantErr: "wrong argument count",
			line:    3,
		},
		{
			name:    "client_certificate extra",
			input:   tlsInput("client_certificate /c.pem /c.key /d.pem"),
			wantErr: "wrong argument count",
			line:    3,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := unmarshal(t, tt.input)
			if err == nil {
				t.Fatalf("no error; parsed %s", describe(h))
			}
			checkErrorAt(t, err, tt.input, tt.wantErr, tt.line)
		})
	}
}

// optionInput puts one wsgate subdirective on line 3, after one that may
// repeat.
func optionInput(line string) string {
	return "wsgate ws://a:1 {\n\tupstream ws://b:2\n\t" + line + "\n\tupstream ws://c:3\n}"
}

// rateInput puts one rate_limit subdirective on line 3. Nothing else is in
// the block, so a line that wrongly parses ends in a different error.
func rateInput(line string) string {
	return "wsgate ws://a:1 {\n\trate_limit {\n\t\t" + line + "\n\t}\n}"
}

// tlsInput puts one tls subdirective on line 3.
func tlsInput(line string) string {
	return "wsgate wss://a:1 {\n\ttls {\n\t\t" + line + "\n\t}\n}"
}

// checkErrorAt checks that err mentions wantErr and ends with the position
// of line in input.
func checkErrorAt(t *testing.T, err error, input, wantErr string, line int) {
	t.Helper()
	msg := err.Error()
	if !strings.Contains(msg, wantErr) {
		t.Errorf("error %q does not contain %q", msg, wantErr)
	}
	m := errLine.FindStringSubmatch(msg)
	if m == nil {
		t.Fatalf("error %q does not end with its position", msg)
	}
	if want := fmt.Sprint(line); m[1] != want {
		t.Errorf("error %q points at line %s, want line %s:\n%s", msg, m[1], want, numbered(input))
	}
}

// checkRoundTrip checks that data, a Handler marshalled to JSON, reads back
// as want.
func checkRoundTrip(t testing.TB, data []byte, want *Handler) {
	t.Helper()
	var back Handler
	if err := json.Unmarshal(data, &back); err != nil {
		t.Fatalf("JSON does not unmarshal: %v (%s)", err, data)
	}
	for _, d := range handlerDiffs(&back, want) {
		t.Errorf("after a JSON round trip: %s", d)
	}
}

func numbered(s string) string {
	var b strings.Builder
	for i, l := range strings.Split(s, "\n") {
		fmt.Fprintf(&b, "%3d  %s\n", i+1, l)
	}
	return b.String()
}

// TestUnmarshalCaddyfileJSON checks that what the parser produces is what
// the JSON config means: the Caddyfile adapter marshals the handler, and
// Caddy unmarshals it again before provisioning.
func TestUnmarshalCaddyfileJSON(t *testing.T) {
	h, err := unmarshal(t, `wsgate ws://a:1 {
		dial_timeout 2s
		max_message off
		rate_limit {
			messages 6000/1m burst 50
			bytes 1MiB/s
		}
		ping_interval off
		write_timeout off
		close_timeout 2s
	}`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	const want = `{"upstreams":["ws://a:1"],"dial_timeout":2000000000,"max_message":-1,` +
		`"rate_limit":{"messages":100,"message_burst":50,"bytes":1048576},"ping_interval":-1,` +
		`"write_timeout":-1,"close_timeout":2000000000}`
	if string(got) != want {
		t.Errorf("JSON\n got %s\nwant %s", got, want)
	}
	checkRoundTrip(t, got, h)
}

// TestUnmarshalCaddyfileProxyConfig checks that parsed values reach the
// proxy engine unchanged and that its validation sees them.
func TestUnmarshalCaddyfileProxyConfig(t *testing.T) {
	h, err := unmarshal(t, `wsgate ws://a:1 {
		upstream wss://b:2/socket
		max_message off
		max_message_upstream 2MiB
		rate_limit upstream {
			bytes 1MiB/s burst 2MiB
			on_exceed throttle
		}
		idle_timeout 1m
		ping_interval 5s
		pong_timeout 3s
		write_timeout 4s
		close_timeout 2s
	}`)
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
	if cfg.Client.MaxMessage != 0 {
		t.Errorf("Client.MaxMessage = %d, want 0 (unlimited, from off)", cfg.Client.MaxMessage)
	}
	if cfg.Upstream.MaxMessage != 2<<20 {
		t.Errorf("Upstream.MaxMessage = %d, want %d", cfg.Upstream.MaxMessage, 2<<20)
	}
	if cfg.Client.Rate != nil {
		t.Errorf("Client.Rate = %+v, want none", cfg.Client.Rate)
	}
	if r := cfg.Upstream.Rate; r == nil || r.Bytes != 1<<20 || r.ByteBurst != 2<<20 || r.OnExceed != "throttle" {
		t.Errorf("Upstream.Rate = %+v, want 1MiB/s, burst 2MiB, throttle", r)
	}
	if cfg.IdleTimeout != time.Minute || cfg.PingInterval != 5*time.Second || cfg.PongTimeout != 3*time.Second {
		t.Errorf("timeouts = idle %v, ping %v, pong %v; want 1m, 5s, 3s", cfg.IdleTimeout, cfg.PingInterval, cfg.PongTimeout)
	}
	if cfg.WriteTimeout != 4*time.Second || cfg.CloseTimeout != 2*time.Second {
		t.Errorf("timeouts = write %v, close %v; want 4s, 2s", cfg.WriteTimeout, cfg.CloseTimeout)
	}
}

// TestWriteAndCloseTimeoutDefaults checks what the engine gets when the
// timeouts are left out, and that write_timeout off stays off (negative)
// rather than turning into the default.
func TestWriteAndCloseTimeoutDefaults(t *testing.T) {
	tests := []struct {
		name         string
		input        string
		write, close time.Duration
	}{
		{"unset", "wsgate ws://a:1", 10 * time.Second, 5 * time.Second},
		{"set", "wsgate ws://a:1 {\n\twrite_timeout 1s\n\tclose_timeout 2s\n}", time.Second, 2 * time.Second},
		{"write_timeout off", "wsgate ws://a:1 {\n\twrite_timeout off\n}", -1, 5 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := unmarshal(t, tt.input)
			if err != nil {
				t.Fatal(err)
			}
			cfg, err := h.proxyConfig()
			if err != nil {
				t.Fatalf("proxyConfig: %v", err)
			}
			if cfg.WriteTimeout != tt.write || cfg.CloseTimeout != tt.close {
				t.Errorf("write %v, close %v; want %v, %v", cfg.WriteTimeout, cfg.CloseTimeout, tt.write, tt.close)
			}
		})
	}
}

// TestUnmarshalCaddyfileRejectedByValidation lists configs that parse but
// that the proxy config conversion must refuse, so Caddy fails at load
// rather than at the first connection: what they get wrong is in a file.
func TestUnmarshalCaddyfileRejectedByValidation(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
	}{
		{"missing CA file", "wsgate wss://a:1 {\n\ttls {\n\t\tca_file testdata/no-such-ca.pem\n\t}\n}", "reading CA file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h, err := unmarshal(t, tt.input)
			if err != nil {
				t.Fatalf("UnmarshalCaddyfile: %v", err)
			}
			_, err = h.proxyConfig()
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("proxyConfig error = %v, want one containing %q", err, tt.wantErr)
			}
		})
	}
}

// FuzzUnmarshalCaddyfile feeds arbitrary text to the parser. Whatever the
// input, parsing must not panic and every error must say where it is; a
// successful parse must have an upstream, must survive the JSON round trip
// the Caddyfile adapter puts it through, and must not panic in the proxy
// config conversion, which validates it. Seeds are in
// testdata/fuzz/FuzzUnmarshalCaddyfile.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	f.Fuzz(func(t *testing.T, input string) {
		// NewTestDispenser ends the process (log.Fatalf) on text the lexer
		// rejects, and expands {$ENV} placeholders before lexing, so such
		// text is the lexer's concern and is skipped here.
		if strings.Contains(input, "{$") {
			return
		}
		if _, err := caddyfile.Tokenize([]byte(input), "Testfile"); err != nil {
			return
		}
		h, err := unmarshal(t, input)
		if err != nil {
			if !errLine.MatchString(err.Error()) {
				t.Fatalf("error %q does not say where it is", err)
			}
			return
		}
		if len(h.Upstreams) == 0 {
			t.Fatalf("parsed without an upstream: %s", describe(h))
		}

		// json.Marshal replaces invalid UTF-8, so only valid text can
		// round-trip exactly
		if utf8.ValidString(input) {
			data, err := json.Marshal(h)
			if err != nil {
				t.Fatalf("parsed config does not marshal: %v (%s)", err, describe(h))
			}
			checkRoundTrip(t, data, h)
		}

		// proxyConfig reads the TLS files; arbitrary paths such as
		// /dev/zero must not be opened, but whether a file is named still
		// matters to validation.
		if h.TLS != nil {
			for i := range h.TLS.CAFiles {
				h.TLS.CAFiles[i] = missingFile
			}
			if h.TLS.ClientCertFile != "" {
				h.TLS.ClientCertFile = missingFile
			}
			if h.TLS.ClientKeyFile != "" {
				h.TLS.ClientKeyFile = missingFile
			}
		}
		cfg, err := h.proxyConfig()
		if err == nil && len(cfg.Upstreams) != len(h.Upstreams) {
			t.Fatalf("proxy config has upstreams %q, want %q", cfg.Upstreams, h.Upstreams)
		}
	})
}

// missingFile stands in for file names in fuzzed configs.
const missingFile = "testdata/fuzz/no-such-file.pem"
