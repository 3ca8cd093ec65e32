package bench

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TestQuickSmoke runs the whole harness in -quick mode against a cmd/caddy
// built for the test, so that it never rots. It asserts nothing about
// speed: only that every scenario completes and is reported, and that
// nothing it started outlives it.
func TestQuickSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/caddy and runs the benchmark harness")
	}
	bin, out := buildCaddy(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// Scenario p has a smoke test of its own (TestQuickPeers).
	scenarios, fanout := "a,b,c,d,e,h,k,m,r,z", true
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server is not installed (.ci/run installs it); scenario d needs it")
		}
		t.Log("redis-server is not installed: scenarios d, h and k skipped; apt-get install -y redis-server")
		scenarios, fanout = "a,b,c,e,m,r,z", false // d, h and k need it
	}
	start := time.Now()
	md := runQuick(ctx, t, Options{Caddy: bin, Out: out, Quick: true, Scenarios: scenarios, CmdLine: "TestQuickSmoke", Log: testLog{t}})
	t.Logf("quick run took %v", time.Since(start).Round(100*time.Millisecond))
	want := []string{
		"## Targets",
		"## a. Idle connections", "| wsgate | ", "| stock | ", "| wsgate rooms | ",
		"| wsgate TLS | ", "| stock TLS | ", "| wsgate wss upstream | ",
		"| a'. idle RSS per rooms connection | ≤ 8 KiB | ",
		"| a. idle RSS per relayed connection over TLS (client over HTTPS) | ≤ 8 KiB and no goroutine while idle | ",
		"| a. idle RSS per connection with a wss:// upstream | ≤ 8 KiB and no goroutine while idle | ",
		"## b. Echo latency", "ping-pong:", "open loop:",
		"## c. Throughput", "| 64 B | wsgate |", "| 4 KiB | stock |",
		"## d. Fan-out",
		"## e. Handshakes", "| wsgate, bad Origin |", "| wsgate, bad token |", "| wsgate HS256 |",
		"## m. Throughput with metrics on and off", "| 64 B | wsgate, metrics on |", "| 4 KiB | wsgate |",
		"| m. throughput with metrics on, 64 B messages, all checks on | ≥ 0.97× metrics off | ",
		"| command | `TestQuickSmoke` |",
		"## r. Refusals with every upstream down", "| 1 | wsgate, active checks | ", "| 1 | wsgate, passive checks | ",
		"| 1 | stock, respond 502 | ",
		"| r. refusals with every upstream down, 500 upgrade attempts/s: answered within 5 ms by the gateway (Caddy's request histogram) | every 502 within 5 ms, each with Retry-After | ",
		"| r. the same, as the client sees it (gateway and load generator sharing the cores) | ",
		"## z. Compression (permessage-deflate)",
		"| plain | ", "| negotiated | ", "| compressed | ",
		"| wsgate, no compression configured | ", "| wsgate compression, client plain | ", "| wsgate compression, negotiated | ",
		"| z. idle RSS per relayed connection, compression negotiated (defaults) | as a.: ≤ 6.5 KiB, no goroutine while idle | ",
		"| z. fan-out bytes per delivery | compressed | ",
	}
	if fanout {
		want = append(want,
			"| d. fan-out 50k deliveries/s | p99 ≤ 10 ms, 0 lost, 1 PUBLISH per message | ",
			"| d. deliveries/s at p99 = 50 ms | ≥ 100,000 | ",
			"| baseline, 1s | 50 | ", "| step 1, 500ms | 100 | ", "— (no fan-out in stock)",
			"Gateway logs: ",
			"## h. Fan-out with history off and on",
			"| baseline, 1s | off | 50 | ", "| baseline, 1s | on | 50 | ", "| step 1, 500ms | on | 100 | ",
			"| h. fan-out deliveries/s at p99 = 50 ms, history on | ≥ 0.8× history off | ",
			"| h. Redis calls per message, history on | 1 PUBLISH, in 1 EVALSHA with 1 XADD; history off: 1 PUBLISH, no EVALSHA | ",
			"PUBLISH 1.00, EVALSHA 1.00, XADD 1.00",
			"| h. baseline p99, every run | history on | ",
			"## k. Capacity: the model's inputs, and a check with several gateways",
			"| Redis, small channels (10 per channel) | 200 | 200 | 2,000 | ",
			"| gateway CPU per delivery (del) | ", "| gateway CPU per handshake (connect + subscribe) | ",
			"| Redis CPU per publish at 200/s, 3 gateways subscribed (stage 2) | ",
			"| 3 | 66")
	}
	for _, want := range want {
		if !strings.Contains(md, want) {
			t.Errorf("results lack %q", want)
		}
	}
	bad := []string{"**Failed:**", "no data", "TODO"}
	if fanout {
		bad = append(bad, "Not run")
	}
	for _, bad := range bad {
		if strings.Contains(md, bad) {
			t.Errorf("results say %q", bad)
		}
	}
	if t.Failed() {
		t.Logf("results:\n%s", md)
	}
}

// buildCaddy builds cmd/caddy into a temporary directory and returns it,
// with the path the results are to be written to beside it.
func buildCaddy(t *testing.T) (bin, results string) {
	t.Helper()
	dir := t.TempDir()
	bin = filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", bin, "github.com/wsgate/wsgate/cmd/caddy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building cmd/caddy: %v\n%s", err, out)
	}
	return bin, filepath.Join(dir, "RESULTS.md")
}

// runQuick runs the harness with opt and returns the results it wrote;
// a process it started that outlives it is an error of t.
func runQuick(ctx context.Context, t *testing.T, opt Options) string {
	t.Helper()
	if _, err := Run(ctx, opt); err != nil {
		t.Fatal(err)
	}
	if kids := children(t); len(kids) > 0 {
		t.Errorf("processes left running: %v", kids)
	}
	b, err := os.ReadFile(opt.Out)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TestQuickPeers runs scenario p in -quick mode with whichever peers are
// installed (CI installs neither: there it measures wsgate alone), and
// checks that every server present is reported, that a missing one is
// reported as skipped with how to install it, and that nothing it started
// outlives it.
func TestQuickPeers(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/caddy and runs wsgate, Centrifugo and Nchan")
	}
	bin, out := buildCaddy(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	opt := Options{Caddy: bin, Out: out, Quick: true, Scenarios: "p", CmdLine: "TestQuickPeers", Log: testLog{t}}
	found, skipped := opt.peerBinaries()
	for _, s := range skipped {
		t.Logf("skipped: %s", s)
	}
	md := runQuick(ctx, t, opt)
	present := []string{pWsgate}
	for _, name := range peerNames[1:] {
		if _, ok := found[name]; ok {
			present = append(present, name)
		} else if !strings.Contains(md, "- **Skipped**: "+name+": not found") && !strings.Contains(md, "- **Skipped**: "+name+": nginx") {
			t.Errorf("results do not say that %s was skipped", name)
		}
	}
	want := []string{"## p. Peers: Centrifugo and Nchan", "**1. Idle subscribed connections.**", "**2. Handshakes.**", "**3. Fan-out.**",
		"| 10 × 10 | batch of 10 | 2,000 | wsgate | "}
	for _, name := range present {
		want = append(want, "| 1 × 100 | single | 2,000 | "+name+" | ")
		// The second step, or the note that says why the steps stopped
		// at the first (a busy machine can keep the load generator from
		// sending the rate asked).
		if !strings.Contains(md, "| 10 × 10 | single | 5,000 | "+name+" | ") &&
			!strings.Contains(md, name+", 10 × 10, single, 2,000 deliveries/s, round 1: the load generator fell behind: later steps not run") {
			t.Errorf("results lack the 10 × 10 single step at 5,000 deliveries/s for %s, and say nothing of why", name)
		}
	}
	if len(present) > 1 {
		want = append(want, "| "+present[1]+" | ") // its idle and handshake rows
	}
	for _, w := range want {
		if !strings.Contains(md, w) {
			t.Errorf("results lack %q", w)
		}
	}
	for _, bad := range []string{"**Failed:**", "| 10 × 10 | batch of 10 | 2,000 | Nchan | "} {
		if strings.Contains(md, bad) {
			t.Errorf("results say %q", bad)
		}
	}
	if t.Failed() {
		t.Logf("results:\n%s", md)
	}
}

// children lists the processes this test process has started and not
// reaped.
func children(t *testing.T) []string {
	t.Helper()
	files, _ := filepath.Glob("/proc/self/task/*/children")
	var out []string
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		out = append(out, strings.Fields(string(b))...)
	}
	return out
}

type testLog struct{ t *testing.T }

func (l testLog) Write(p []byte) (int, error) {
	l.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

func TestPercentile(t *testing.T) {
	d := make([]time.Duration, 1000)
	for i := range d {
		d[i] = time.Duration(i + 1)
	}
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500}, {0.99, 990}, {0.999, 999}, {1, 1000}, {0, 1}} {
		if got := percentile(d, c.q); got != c.want {
			t.Errorf("percentile(%v) = %v, want %v", c.q, got, c.want)
		}
	}
	if got := percentile(nil, 0.5); got != 0 {
		t.Errorf("percentile of nothing = %v", got)
	}
}

func TestMedian(t *testing.T) {
	for _, c := range []struct {
		in   []float64
		want float64
	}{{nil, 0}, {[]float64{3}, 3}, {[]float64{5, 1, 3}, 3}, {[]float64{4, 1, 3, 2}, 2.5}} {
		if got := median(c.in, ident); got != c.want {
			t.Errorf("median(%v) = %v, want %v", c.in, got, c.want)
		}
	}
}

func TestPayloadTimestamp(t *testing.T) {
	for _, size := range []int{64, 4096} {
		p := payload(size)
		if len(p) != size {
			t.Fatalf("payload(%d) has %d bytes", size, len(p))
		}
		putTS(p, 1234567890123)
		if ts, ok := getTS(p); !ok || ts != 1234567890123 {
			t.Errorf("timestamp came back as %d, %v", ts, ok)
		}
		if !strings.HasPrefix(string(p), `{"type":"say","room":"org:acme:1","p":"`) || !strings.HasSuffix(string(p), `"}`) {
			t.Errorf("payload is not the policy's JSON: %q", p)
		}
	}
}

func TestFanMessage(t *testing.T) {
	p := fanMessage(fanRoom, 3, 12345, 987654321012, 0)
	if want := `{"op":"message","channel":"bench:fanout","data":{"ph":3,"seq":12345,"ts":987654321012}}`; string(p) != want {
		t.Fatalf("message %s, want %s", p, want)
	}
	ph, seq, ts, hist, ok := parseFan(p)
	if !ok || ph != 3 || seq != 12345 || ts != 987654321012 || hist {
		t.Errorf("parsed %d %d %d %v %v", ph, seq, ts, hist, ok)
	}
	p = fanMessage(fanHistRoom, 4, 7, 99, 42)
	if want := `{"op":"message","channel":"bench:history:fanout","data":{"ph":4,"seq":7,"ts":99},"offset":42}`; string(p) != want {
		t.Fatalf("message %s, want %s", p, want)
	}
	ph, seq, ts, hist, ok = parseFan(p)
	if !ok || ph != 4 || seq != 7 || ts != 99 || !hist {
		t.Errorf("parsed %d %d %d %v %v", ph, seq, ts, hist, ok)
	}
	for _, bad := range []string{
		`{"op":"message","channel":"bench:other","data":{"ph":3,"seq":1,"ts":2}}`,
		`{"op":"message","channel":"bench:fanout","data":{"ph":3,"seq":1,"ts":2},"x":1}`,
		`{"op":"message","channel":"bench:fanout","data":{"ph":3,"seq":,"ts":2}}`,
		// An offset where history is off, none where it is on.
		`{"op":"message","channel":"bench:fanout","data":{"ph":3,"seq":1,"ts":2},"offset":5}`,
		`{"op":"message","channel":"bench:history:fanout","data":{"ph":3,"seq":1,"ts":2}}`,
		`{"op":"message","channel":"bench:history:fanout","data":{"ph":3,"seq":1,"ts":2},"offset":0}`,
		`{"op":"message","channel":"bench:history:fanout","data":{"ph":3,"seq":1,"ts":2},"offset":5,"x":1}`,
		`{"id":1,"op":"ok"}`,
	} {
		if _, _, _, _, ok := parseFan([]byte(bad)); ok {
			t.Errorf("%s parsed", bad)
		}
	}
}

func TestCommandStats(t *testing.T) {
	info := "# Commandstats\r\n" +
		"cmdstat_evalsha:calls=3,usec=293,usec_per_call=97.67,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_publish:calls=4,usec=11,usec_per_call=2.75,rejected_calls=0,failed_calls=0\r\n" +
		"cmdstat_script|load:calls=1,usec=46,usec_per_call=46.00,rejected_calls=0,failed_calls=0\r\n"
	got, err := parseCommandStats(info)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{"evalsha": 3, "publish": 4, "script|load": 1}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("parsed %v, want %v", got, want)
	}
	if _, err := parseCommandStats("cmdstat_publish:usec=11\r\n"); err == nil {
		t.Error("a line without calls parsed")
	}
	ph := &fanPhase{sent: 4, calls: map[string]int64{"publish": 4, "evalsha": 4, "xadd": 4, "pexpire": 8, "hincrby": 4}}
	if got, want := ph.callsPerMessage(), "PUBLISH 1.00, EVALSHA 1.00, XADD 1.00, HINCRBY 1.00, PEXPIRE 2.00"; got != want {
		t.Errorf("calls per message %q, want %q", got, want)
	}
	ph = &fanPhase{sent: 1000, calls: map[string]int64{"publish": 1000, "hello": 2}}
	if got, want := ph.callsPerMessage(), "PUBLISH 1.00, HELLO 2 in all"; got != want {
		t.Errorf("calls per message %q, want %q", got, want)
	}
	ph = &fanPhase{sent: 2, calls: map[string]int64{"publish": 2}}
	if got, want := ph.callsPerMessage(), "PUBLISH 1.00"; got != want {
		t.Errorf("calls per message %q, want %q", got, want)
	}
}

func TestFanHistoryCapacity(t *testing.T) {
	ph := func(perSec float64, p99 time.Duration) *fanPhase {
		return &fanPhase{rate: 1, achieved: 1, perSec: perSec, p99: p99}
	}
	pair := func(off, on *fanPhase) *fanPair { return &fanPair{med: [2]*fanPhase{off, on}} }
	// Off crosses 50 ms halfway from 400k (30 ms) to 600k (70 ms): 500k;
	// on crosses a quarter of the way from 200k (40 ms) to 400k (80 ms):
	// 250k. On ÷ off = 0.5.
	f := &fanHistResult{baseline: pair(ph(50e3, 5*time.Millisecond), ph(50e3, 6*time.Millisecond)), steps: []*fanPair{
		pair(ph(200e3, 20*time.Millisecond), ph(200e3, 40*time.Millisecond)),
		pair(ph(400e3, 30*time.Millisecond), ph(400e3, 80*time.Millisecond)),
		pair(ph(600e3, 70*time.Millisecond), ph(600e3, 90*time.Millisecond)),
	}}
	ratio, rel, says := f.capacityRatio()
	if rel != "=" || math.Abs(ratio-0.5) > 1e-9 {
		t.Errorf("ratio %s %v (%q)", rel, ratio, says)
	}
	if !strings.HasPrefix(says[0], "500,000 deliveries/s") || !strings.HasPrefix(says[1], "250,000 deliveries/s") {
		t.Errorf("says %q", says)
	}
	// Off never reaches the limit: on's crossing over off's best is an
	// upper bound.
	f.steps[2].med[0] = ph(600e3, 45*time.Millisecond)
	if ratio, rel, _ := f.capacityRatio(); rel != "≤" || math.Abs(ratio-250e3/600e3) > 1e-9 {
		t.Errorf("ratio %s %v", rel, ratio)
	}
	// Neither does: both held it to the same rate.
	f.steps = f.steps[:1]
	if ratio, rel, _ := f.capacityRatio(); rel != "≥" || ratio != 1 {
		t.Errorf("ratio %s %v", rel, ratio)
	}
}

func TestFanPairRounds(t *testing.T) {
	ph := func(perSec float64, p99 time.Duration) *fanPhase {
		return &fanPhase{rate: 1, achieved: 1, perSec: perSec, p99: p99}
	}
	pr := &fanPair{runs: [2][]*fanPhase{
		{ph(100, 10*time.Millisecond), ph(100, 30*time.Millisecond), ph(100, 20*time.Millisecond)},
		{ph(90, 20*time.Millisecond), ph(100, 30*time.Millisecond), ph(80, 10*time.Millisecond)},
	}}
	pr.pickMedians()
	if pr.med[0].p99 != 20*time.Millisecond || pr.med[1].p99 != 20*time.Millisecond {
		t.Errorf("medians %v %v", pr.med[0].p99, pr.med[1].p99)
	}
	if med, each := pr.roundRatios(func(ph *fanPhase) float64 { return float64(ph.p99) }); med != 1 || fmt.Sprint(each) != "[2 1 0.5]" {
		t.Errorf("p99 ratios %v %v", med, each)
	}
	if med, _ := pr.roundRatios(func(ph *fanPhase) float64 { return ph.perSec }); med != 0.9 {
		t.Errorf("deliveries/s ratio %v", med)
	}
	if pr.problem() != "" {
		t.Errorf("problem %q", pr.problem())
	}
	pr.runs[1] = pr.runs[1][:0]
	pr.med[1] = nil
	pr.pickMedians()
	if !strings.Contains(pr.problem(), "history on did not run") {
		t.Errorf("problem %q", pr.problem())
	}
}

func TestFanCapacity(t *testing.T) {
	ph := func(perSec float64, p99 time.Duration, lost int64) *fanPhase {
		return &fanPhase{rate: 1, achieved: 1, perSec: perSec, p99: p99, lost: lost}
	}
	f := &fanResult{baseline: ph(50, 5*time.Millisecond, 0), steps: []*fanPhase{ph(100, 20*time.Millisecond, 0), ph(140, 60*time.Millisecond, 0)}}
	if best, at, reached := f.capacity(); !reached || best.perSec != 100 || at.perSec != 140 {
		t.Errorf("capacity: %v %v %v", best, at, reached)
	}
	f.steps[1] = ph(140, 30*time.Millisecond, 7) // lost messages: not a capacity
	if best, at, reached := f.capacity(); reached || best.perSec != 100 || at != nil {
		t.Errorf("capacity with a loss: %v %v %v", best, at, reached)
	}
	f.baseline = ph(50, 80*time.Millisecond, 0)
	if best, at, reached := f.capacity(); !reached || best != nil || at.perSec != 50 {
		t.Errorf("capacity when the baseline is over: %v %v %v", best, at, reached)
	}
}

func TestCountAndCommandLine(t *testing.T) {
	for in, want := range map[float64]string{0: "0", 999: "999", 1000: "1,000", 1234567.4: "1,234,567", -4321: "-4,321"} {
		if got := count(in); got != want {
			t.Errorf("count(%v) = %q, want %q", in, got, want)
		}
	}
	if got := commandLine("wsbench", []string{"-out", "a b.md", "-quick"}); got != `wsbench -out "a b.md" -quick` {
		t.Errorf("commandLine = %s", got)
	}
	if _, err := parseScenarios("a,x"); err == nil {
		t.Error("scenario x accepted")
	}
	if m, err := parseScenarios(defaultScenarios); err != nil || len(m) != 11 || !m['h'] || !m['k'] || !m['p'] || !m['r'] || !m['z'] {
		t.Errorf("default scenarios %v, %v", m, err)
	}
}

func TestIdleTargets(t *testing.T) {
	const k = 1024
	idle := func(rss, goroutines float64) []idleSample {
		return []idleSample{{rss: rss * k, goroutines: goroutines}}
	}
	stock := idle(100, 4)
	for _, c := range []struct {
		name    string
		samples map[string][]idleSample
		want    []string
	}{
		{
			name: "parked everywhere",
			samples: map[string][]idleSample{
				vWsgate: idle(6, 0), vStock: stock,
				vWsgateTLS: idle(7.5, 0), vStockTLS: idle(150, 4), vWsgateWSS: idle(8, 0),
			},
			want: []string{
				"| a. idle RSS per relayed connection | ≤ 6.5 KiB and ≤ 2 goroutines (≤ 0.15× stock) | 6.0 KiB, 0.00 goroutines, 0.06× stock's RSS | **met** | ≤ 8 KiB, no goroutine while idle | **met** |",
				"| a. idle RSS per relayed connection over TLS (client over HTTPS) | ≤ 8 KiB and no goroutine while idle | 7.5 KiB, 0.00 goroutines, 0.05× stock TLS's RSS | **met** |  |  |",
				"| a. idle RSS per connection with a wss:// upstream | ≤ 8 KiB and no goroutine while idle | 8.0 KiB, 0.00 goroutines, 0.08× stock's RSS | **met** |  |  |",
			},
		},
		{
			name: "over 6.5 KiB, and TLS readers awake",
			samples: map[string][]idleSample{
				vWsgate: idle(7, 0), vStock: stock,
				vWsgateTLS: idle(20, 1.5), vStockTLS: idle(150, 4), vWsgateWSS: idle(7, 1),
			},
			want: []string{
				"| 7.0 KiB, 0.00 goroutines, 0.07× stock's RSS | not met | ≤ 8 KiB, no goroutine while idle | **met** |",
				"| 20.0 KiB, 1.50 goroutines, 0.13× stock TLS's RSS | not met |  |  |",
				"| 7.0 KiB, 1.00 goroutines, 0.07× stock's RSS | not met |  |  |",
			},
		},
		{
			name: "no stock TLS to compare with",
			samples: map[string][]idleSample{
				vWsgate: idle(6, 0), vStock: stock, vWsgateTLS: idle(7, 0),
			},
			want: []string{
				"| 7.0 KiB, 0.00 goroutines | **met** |  |  |",
				"| a. idle RSS per connection with a wss:// upstream | ≤ 8 KiB and no goroutine while idle | no data | — |  |  |",
			},
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := &report{scen: map[byte]bool{'a': true}, idle: &idleResult{samples: c.samples}}
			var b strings.Builder
			r.targets(func(format string, args ...any) { fmt.Fprintf(&b, format, args...) })
			for _, want := range c.want {
				if !strings.Contains(b.String(), want) {
					t.Errorf("targets lack %q:\n%s", want, b.String())
				}
			}
		})
	}
}

// TestScrapeHistogram reads the refusal figures the way scenario r does:
// changes between two scrapes of Caddy's request histogram.
func TestScrapeHistogram(t *testing.T) {
	parse := func(text string) scrape {
		t.Helper()
		parser := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := parser.TextToMetricFamilies(strings.NewReader(text))
		if err != nil {
			t.Fatal(err)
		}
		return fams
	}
	hist := func(n502, in5, in10, n200 int) string {
		return fmt.Sprintf(`# TYPE caddy_http_request_duration_seconds histogram
caddy_http_request_duration_seconds_bucket{code="502",handler="subroute",server="srv0",le="0.005"} %d
caddy_http_request_duration_seconds_bucket{code="502",handler="subroute",server="srv0",le="0.01"} %d
caddy_http_request_duration_seconds_bucket{code="502",handler="subroute",server="srv0",le="+Inf"} %d
caddy_http_request_duration_seconds_sum{code="502",handler="subroute",server="srv0"} 1
caddy_http_request_duration_seconds_count{code="502",handler="subroute",server="srv0"} %d
caddy_http_request_duration_seconds_bucket{code="200",handler="subroute",server="srv0",le="0.005"} %d
caddy_http_request_duration_seconds_bucket{code="200",handler="subroute",server="srv0",le="0.01"} %d
caddy_http_request_duration_seconds_bucket{code="200",handler="subroute",server="srv0",le="+Inf"} %d
caddy_http_request_duration_seconds_sum{code="200",handler="subroute",server="srv0"} 1
caddy_http_request_duration_seconds_count{code="200",handler="subroute",server="srv0"} %d
# TYPE wsgate_upgrades_total counter
wsgate_upgrades_total{handler="wsgate",mode="relay",result="upstream"} %d
wsgate_upgrades_total{handler="wsgate",mode="relay",result="ok"} 7
`, in5, in10, n502, n502, n200, n200, n200, n200, n502)
	}
	before := parse(hist(10, 9, 10, 3))
	is502 := map[string]string{"code": "502"}
	if n, in := before.histogram("caddy_http_request_duration_seconds", is502, refuseBucket); n != 10 || in != 9 {
		t.Errorf("502s: %v, %v within 5 ms; want 10, 9", n, in)
	}
	if n, _ := before.histogram("caddy_http_request_duration_seconds", nil, 0); n != 13 {
		t.Errorf("every code: %v, want 13", n)
	}
	if got := before.counter("wsgate_upgrades_total", map[string]string{"result": "upstream"}); got != 10 {
		t.Errorf("upstream refusals %v, want 10", got)
	}
	// every new 502 within 5 ms, though an old one was not
	after := parse(hist(110, 109, 110, 3))
	if got := after.highestBucket("caddy_http_request_duration_seconds", before, is502); got != 0.005 {
		t.Errorf("slowest bucket %v, want 0.005", got)
	}
	// one new 502 between 5 and 10 ms
	after = parse(hist(110, 108, 110, 3))
	if got := after.highestBucket("caddy_http_request_duration_seconds", before, is502); got != 0.01 {
		t.Errorf("slowest bucket %v, want 0.01", got)
	}
	// one beyond the last bound
	after = parse(hist(110, 108, 109, 3))
	if got := after.highestBucket("caddy_http_request_duration_seconds", before, is502); !math.IsInf(got, 1) {
		t.Errorf("slowest bucket %v, want +Inf", got)
	}
	if got := before.highestBucket("caddy_http_request_duration_seconds", before, is502); got != 0 {
		t.Errorf("slowest bucket of nothing %v, want 0", got)
	}
}

func TestCapMessage(t *testing.T) {
	msg := []byte(`{"op":"message","channel":"cap:big:3","data":` + capData(2, 123456789) + `}`)
	if win, ts, ok := parseCap(msg); !ok || win != 2 || ts != 123456789 {
		t.Errorf("parseCap(%s) = %d, %d, %v", msg, win, ts, ok)
	}
	for _, bad := range []string{`{"op":"message","data":{"t":1}}`, `{"data":{"w":1,"x":2}}`, `{"data":{"w":x,"t":1}}`} {
		if _, _, ok := parseCap([]byte(bad)); ok {
			t.Errorf("parseCap(%s) accepted", bad)
		}
	}
}

// TestCapModel checks the model's algebra on figures made from known
// inputs: del 3 µs, msg 20 µs, pub 50 µs, 4 KiB per connection.
func TestCapModel(t *testing.T) {
	const del, msg, pub = 3 * time.Microsecond, 20 * time.Microsecond, 50 * time.Microsecond
	win := func(sent int64, perChan int, http bool) *capWindowResult {
		cpu := time.Duration(sent) * (msg + time.Duration(perChan)*del)
		if http {
			cpu += time.Duration(sent) * pub
		}
		return &capWindowResult{sent: sent, perChan: perChan, nodeCPU: []time.Duration{cpu}, redisCPU: time.Duration(sent) * 5 * time.Microsecond}
	}
	r := &capResult{one: &capStage{nodes: 1, perNode: []int{1000}, rss: []int64{4096 * 1000}, sockMem: 3000 * 1000,
		hsCPU:   []time.Duration{1000 * 150 * time.Microsecond},
		windows: []*capWindowResult{win(3000, capBig, false), win(30000, capSmall, false), win(30000, capSmall, true)}}}
	r.derive()
	near := func(name string, got, want time.Duration) {
		if d := got - want; d < -time.Nanosecond || d > time.Nanosecond {
			t.Errorf("%s = %v, want %v", name, got, want)
		}
	}
	near("del", r.del, del)
	near("msg", r.msg, msg)
	near("pub", r.pub, pub)
	near("handshake", r.hsPer, 150*time.Microsecond)
	if r.rssPerConn != 4096 || r.sockPerConn != 3000 {
		t.Errorf("memory per connection %v, kernel %v", r.rssPerConn, r.sockPerConn)
	}
	w := &capWindowResult{sent: 1000, perNode: []int64{40000, 30000, 30000}, nodeCPU: []time.Duration{time.Second, time.Second, time.Second}}
	r.many = &capStage{nodes: 3, perNode: []int{4, 3, 3}, rss: []int64{1, 2, 3}, hsCPU: []time.Duration{1, 2, 3}, windows: []*capWindowResult{w}}
	r.predict()
	near("gateway 1", r.predCPU[0], 1000*(msg+pub)+40000*del)
	near("gateway 2", r.predCPU[1], 1000*msg+30000*del)
	if r.predRSS[0] != 4*4096 || r.predHS[2] != 3*150*time.Microsecond {
		t.Errorf("predicted RSS %v, handshakes %v", r.predRSS, r.predHS)
	}
}
