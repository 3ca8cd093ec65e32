package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/rooms"
)

const testPublishKey = "publish-key-0123456789"

// received keeps what a hub delivers to one subscriber.
type received struct {
	mu   sync.Mutex
	data []string
}

func (r *received) Deliver(p *rooms.Publication) {
	r.mu.Lock()
	r.data = append(r.data, p.Channel+" "+string(p.Data))
	r.mu.Unlock()
}

func (r *received) all() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.data...)
}

// downBroker is a memory broker whose publishes and claims fail as a
// Redis broker's do while Redis is down.
type downBroker struct{ *broker.Memory }

func (downBroker) Publish(context.Context, string, []byte) error {
	return fmt.Errorf("%w: connection refused", broker.ErrUnavailable)
}

func (downBroker) Claim(context.Context, []string, time.Duration) ([]bool, error) {
	return nil, fmt.Errorf("%w: connection refused", broker.ErrUnavailable)
}

// publishFixture is a provisioned-like Publish on its own hub, with one
// subscriber on each of the channels a, b and c:d.
type publishFixture struct {
	p   *Publish
	hub *rooms.Hub
	got *received
}

func newPublishFixture(t *testing.T, down bool) *publishFixture {
	t.Helper()
	hub := rooms.NewHub()
	var b broker.Broker = broker.NewMemory(hub.Handle)
	if down {
		b = downBroker{b.(*broker.Memory)}
	}
	hub.SetBroker(b)
	t.Cleanup(func() { b.Close() })
	f := &publishFixture{
		p: &Publish{MaxBody: 1 << 10, MaxBatch: 3, IdempotencyWindow: caddy.Duration(time.Minute),
			keys: [][]byte{[]byte(testPublishKey)}, hub: hub, logger: zap.NewNop()},
		hub: hub, got: &received{},
	}
	for _, ch := range []string{"a", "b", "c:d"} {
		if err := hub.Subscribe(context.Background(), ch, f.got); err != nil {
			t.Fatal(err)
		}
	}
	return f
}

// post sends body with the publish key and extra headers (name, value, …).
func (f *publishFixture) post(t *testing.T, body string, header ...string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(http.MethodPost, "/publish", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+testPublishKey)
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Add(header[i], header[i+1])
	}
	rec := httptest.NewRecorder()
	if err := f.p.ServeHTTP(rec, req, nil); err != nil {
		t.Fatal(err)
	}
	return rec.Code, rec.Body.String()
}

// errorOf decodes {"error":…}.
func errorOf(t *testing.T, body string) string {
	t.Helper()
	var e struct{ Error string }
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == "" {
		t.Fatalf("body %q is not {\"error\":…}", body)
	}
	return e.Error
}

func TestPublishRefusesBadInput(t *testing.T) {
	long := strings.Repeat("k", 256)
	for _, tc := range []struct {
		name, body string
		header     []string
		status     int
		want       string // in the error
	}{
		{"not JSON", `hello`, nil, 400, "must be a JSON object"},
		{"empty body", ``, nil, 400, "must be a JSON object"},
		{"truncated object", `{"channel":"a","data":`, nil, 400, "not valid JSON"},
		{"two objects", `{"channel":"a","data":1}{"channel":"a","data":2}`, nil, 400, "not valid JSON"},
		{"not an object", `"a"`, nil, 400, "must be a JSON object"},
		{"invalid UTF-8 in data", "{\"channel\":\"a\",\"data\":\"\xff\xfe\"}", nil, 400, "not valid UTF-8"},
		{"invalid UTF-8 in channel", "{\"channel\":\"a\xff\",\"data\":1}", nil, 400, "not valid UTF-8"},
		{"data missing", `{"channel":"a"}`, nil, 400, "missing data"},
		{"channel missing", `{"data":1}`, nil, 400, "missing channel"},
		{"channel not a string", `{"channel":7,"data":1}`, nil, 400, "channel must be a string"},
		{"channel null", `{"channel":null,"data":1}`, nil, 400, "invalid channel name"},
		{"bad channel", `{"channel":"a b","data":1}`, nil, 400, "invalid channel name"},
		{"empty segment", `{"channel":"a::b","data":1}`, nil, 400, "invalid channel name"},
		{"unknown field", `{"channel":"a","data":1,"idempotencyKey":"x"}`, nil, 400, `unknown field "idempotencyKey"`},
		{"key not a string", `{"channel":"a","data":1,"idempotency_key":5}`, nil, 400, "idempotency_key must be a string"},
		{"key empty", `{"channel":"a","data":1,"idempotency_key":""}`, nil, 400, "idempotency_key: must be 1 to 255"},
		{"key too long", `{"channel":"a","data":1,"idempotency_key":"` + long + `"}`, nil, 400, "idempotency_key: must be 1 to 255"},
		{"key with a control character", `{"channel":"a","data":1,"idempotency_key":"a\nb"}`, nil, 400, "printable ASCII"},
		{"header and field differ", `{"channel":"a","data":1,"idempotency_key":"x"}`, []string{"Idempotency-Key", "y"}, 400, "differ"},
		{"header twice", `{"channel":"a","data":1}`, []string{"Idempotency-Key", "x", "Idempotency-Key", "y"}, 400, "more than one"},
		{"header badly quoted", `{"channel":"a","data":1}`, []string{"Idempotency-Key", `"a\q"`}, 400, "bad quoted string"},
		{"header on a batch", `[{"channel":"a","data":1}]`, []string{"Idempotency-Key", "x"}, 400, "for a single publication"},
		{"empty batch", `[]`, nil, 400, "1 to 3 publications, not 0"},
		{"batch over max_batch", `[` + strings.TrimSuffix(strings.Repeat(`{"channel":"a","data":1},`, 4), ",") + `]`, nil, 400, "1 to 3 publications, not 4"},
		{"batch not JSON", `[{"channel":"a","data":1},]`, nil, 400, "not a valid JSON array"},
		{"batch item bad UTF-8", "[{\"channel\":\"a\",\"data\":1},{\"channel\":\"b\",\"data\":\"\xc3\"}]", nil, 400, "publication 1: not valid UTF-8"},
		{"batch item without data", `[{"channel":"a","data":1},{"channel":"b","data":2},{"channel":"c:d"}]`, nil, 400, "publication 2: missing data"},
		{"batch item bad channel", `[{"channel":"a","data":1},{"channel":"","data":2}]`, nil, 400, "publication 1: invalid channel name"},
		{"batch item not an object", `[{"channel":"a","data":1},[1]]`, nil, 400, "publication 1: must be a JSON object"},
		{"too large", `{"channel":"a","data":"` + strings.Repeat("x", 1<<10) + `"}`, nil, 413, "larger than 1024 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newPublishFixture(t, false)
			status, body := f.post(t, tc.body, tc.header...)
			if status != tc.status {
				t.Fatalf("status %d %s, want %d", status, body, tc.status)
			}
			if e := errorOf(t, body); !strings.Contains(e, tc.want) {
				t.Errorf("error %q, want it to contain %q", e, tc.want)
			}
			if got := f.got.all(); len(got) != 0 {
				t.Errorf("refused request delivered %q", got)
			}
		})
	}
}

func TestPublishRefusesWithoutKey(t *testing.T) {
	f := newPublishFixture(t, false)
	for _, auth := range []string{"", "Bearer wrong-key-0123456789", "Basic " + testPublishKey} {
		req := httptest.NewRequest(http.MethodPost, "/publish", strings.NewReader(`{"channel":"a","data":1}`))
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		rec := httptest.NewRecorder()
		f.p.ServeHTTP(rec, req, nil)
		if rec.Code != 401 || rec.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("Authorization %q: %d %q, want 401 with WWW-Authenticate", auth, rec.Code, rec.Body)
		}
	}
	if got := f.got.all(); len(got) != 0 {
		t.Errorf("unauthorized requests delivered %q", got)
	}
}

func TestPublishIdempotencyKey(t *testing.T) {
	type step struct {
		body   string
		header []string
		want   string // response body
	}
	for _, tc := range []struct {
		name      string
		steps     []step
		delivered []string
	}{
		{
			name: "no key: each publish is delivered",
			steps: []step{
				{`{"channel":"a","data":1}`, nil, `{"accepted":1,"duplicates":0}`},
				{`{"channel":"a","data":1}`, nil, `{"accepted":1,"duplicates":0}`},
			},
			delivered: []string{"a 1", "a 1"},
		},
		{
			name: "same key and channel: delivered once",
			steps: []step{
				{`{"channel":"a","data":1,"idempotency_key":"k1"}`, nil, `{"accepted":1,"duplicates":0}`},
				{`{"channel":"a","data":1,"idempotency_key":"k1"}`, nil, `{"accepted":0,"duplicates":1}`},
				{`{"channel":"a","data":2,"idempotency_key":"k1"}`, nil, `{"accepted":0,"duplicates":1}`},
			},
			delivered: []string{"a 1"},
		},
		{
			name: "same key on another channel is another publication",
			steps: []step{
				{`{"channel":"a","data":1,"idempotency_key":"k1"}`, nil, `{"accepted":1,"duplicates":0}`},
				{`{"channel":"b","data":1,"idempotency_key":"k1"}`, nil, `{"accepted":1,"duplicates":0}`},
			},
			delivered: []string{"a 1", "b 1"},
		},
		{
			name: "header, bare or quoted, and field are one key",
			steps: []step{
				{`{"channel":"a","data":1}`, []string{"Idempotency-Key", "k2"}, `{"accepted":1,"duplicates":0}`},
				{`{"channel":"a","data":1}`, []string{"Idempotency-Key", `"k2"`}, `{"accepted":0,"duplicates":1}`},
				{`{"channel":"a","data":1,"idempotency_key":"k2"}`, nil, `{"accepted":0,"duplicates":1}`},
				{`{"channel":"a","data":1,"idempotency_key":"k2"}`, []string{"Idempotency-Key", "k2"}, `{"accepted":0,"duplicates":1}`},
			},
			delivered: []string{"a 1"},
		},
		{
			name: "batch: repeats within it and of earlier requests are duplicates",
			steps: []step{
				{`{"channel":"b","data":0,"idempotency_key":"e0"}`, nil, `{"accepted":1,"duplicates":0}`},
				{`[{"channel":"a","data":1,"idempotency_key":"e1"},{"channel":"b","data":1,"idempotency_key":"e1"},{"channel":"a","data":9,"idempotency_key":"e1"}]`, nil, `{"accepted":2,"duplicates":1}`},
				{`[{"channel":"b","data":0,"idempotency_key":"e0"},{"channel":"c:d","data":2},{"channel":"a","data":1,"idempotency_key":"e1"}]`, nil, `{"accepted":1,"duplicates":2}`},
			},
			delivered: []string{"b 0", "a 1", "b 1", "c:d 2"},
		},
		{
			name: "a refused request claims no key",
			steps: []step{
				{`[{"channel":"a","data":1,"idempotency_key":"k3"},{"channel":"b"}]`, nil, ``},
				{`{"channel":"a","data":1,"idempotency_key":"k3"}`, nil, `{"accepted":1,"duplicates":0}`},
			},
			delivered: []string{"a 1"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newPublishFixture(t, false)
			for i, s := range tc.steps {
				status, body := f.post(t, s.body, s.header...)
				if s.want == "" {
					if status != 400 {
						t.Fatalf("step %d: %d %s, want 400", i, status, body)
					}
					continue
				}
				if status != 200 || strings.TrimSpace(body) != s.want {
					t.Fatalf("step %d: %d %s, want 200 %s", i, status, body, s.want)
				}
			}
			if got := f.got.all(); strings.Join(got, ",") != strings.Join(tc.delivered, ",") {
				t.Errorf("delivered %q, want %q", got, tc.delivered)
			}
		})
	}
}

// TestPublishBrokerDown: while the broker is down a publication reaches
// this node's subscribers and the answer is 503; a retry with the same key
// to the same node is not delivered here again (and is still a 503).
func TestPublishBrokerDown(t *testing.T) {
	f := newPublishFixture(t, true)
	for i, body := range []string{
		`{"channel":"a","data":1,"idempotency_key":"k"}`,
		`{"channel":"a","data":1,"idempotency_key":"k"}`,
		`{"channel":"a","data":2}`,
	} {
		status, resp := f.post(t, body)
		if status != 503 || !strings.Contains(errorOf(t, resp), "delivered to this node's subscribers only") {
			t.Fatalf("publish %d: %d %s, want 503 delivered to this node's subscribers only", i, status, resp)
		}
	}
	if got := f.got.all(); strings.Join(got, ",") != "a 1,a 2" {
		t.Fatalf("delivered %q, want a 1 once (its retry not again), then a 2", got)
	}
}

func TestPublishCaddyfileWindow(t *testing.T) {
	for _, tc := range []struct {
		line    string
		want    time.Duration
		wantErr string
	}{
		{"", 0, ""},
		{"idempotency_window 10m", 10 * time.Minute, ""},
		{"idempotency_window 1s", time.Second, ""},
		{"idempotency_window 24h", 24 * time.Hour, ""},
		{"idempotency_window 500ms", 0, "between 1s and 24h"},
		{"idempotency_window 25h", 0, "between 1s and 24h"},
		{"idempotency_window", 0, "wrong argument count"},
		{"idempotency_window soon", 0, "bad duration"},
		{"idempotency_window 1m\n\tidempotency_window 2m", 0, `duplicate subdirective "idempotency_window"`},
	} {
		t.Run(tc.line, func(t *testing.T) {
			input := "wsgate_publish {\n\tkey " + testPublishKey + "\n\t" + tc.line + "\n}"
			var p Publish
			err := p.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if time.Duration(p.IdempotencyWindow) != tc.want {
				t.Fatalf("window %v, want %v", time.Duration(p.IdempotencyWindow), tc.want)
			}
		})
	}
}
