package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestQuickSmoke runs the whole harness in -quick mode against a cmd/caddy
// built for the test, so that it never rots. It asserts nothing about
// speed: only that every scenario completes and is reported, and that
// nothing it started outlives it.
func TestQuickSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds cmd/caddy and runs the benchmark harness")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", bin, "github.com/wsgate/wsgate/cmd/caddy")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building cmd/caddy: %v\n%s", err, out)
	}
	out := filepath.Join(dir, "RESULTS.md")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	start := time.Now()
	_, err := Run(ctx, Options{Caddy: bin, Out: out, Quick: true, Scenarios: "a,b,c,d,e", CmdLine: "TestQuickSmoke", Log: testLog{t}})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("quick run took %v", time.Since(start).Round(100*time.Millisecond))
	if kids := children(t); len(kids) > 0 {
		t.Errorf("processes left running: %v", kids)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	md := string(b)
	for _, want := range []string{
		"## Targets (issue 6)",
		"## a. Idle connections", "| wsgate | ", "| stock | ",
		"## b. Echo latency", "ping-pong:", "open loop:",
		"## c. Throughput", "| 64 B | wsgate |", "| 4 KiB | stock |",
		"## d. Fan-out", "not yet measured: needs rooms/Redis",
		"## e. Handshakes", "| wsgate, bad Origin |", "| wsgate, bad token |", "| wsgate HS256 |",
		"| command | `TestQuickSmoke` |",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("results lack %q", want)
		}
	}
	for _, bad := range []string{"**Failed:**", "Not run", "no data"} {
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
}
