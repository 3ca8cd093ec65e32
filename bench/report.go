package bench

import (
	"debug/buildinfo"
	"fmt"
	"math"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// machine is where the figures were taken.
type machine struct {
	nproc     int
	cpu       string
	kernel    string
	mem       string
	goVersion string // of wsbench
	gateway   string // what the caddy binary is built from
	tree      string // the working tree wsbench runs in, when it is a git checkout
	loadavg   string // at the start of the run
}

func machineInfo(caddyPath string) machine {
	m := machine{nproc: runtime.NumCPU(), goVersion: runtime.Version(), cpu: "unknown", kernel: "unknown"}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		// The machine's cores, not runtime.NumCPU's: under taskset that is
		// only the ones wsbench may use.
		n := 0
		for line := range strings.SplitSeq(string(b), "\n") {
			k, v, ok := strings.Cut(line, ":")
			switch k = strings.TrimSpace(k); {
			case !ok:
			case k == "processor":
				n++
			case k == "model name" && m.cpu == "unknown":
				m.cpu = strings.TrimSpace(v)
			}
		}
		if n > 0 {
			m.nproc = n
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.kernel = "Linux " + strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
				kb, _ := strconv.ParseFloat(f[1], 64)
				m.mem = fmt.Sprintf("%.0f GiB", kb/(1<<20))
			}
		}
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		if f := strings.Fields(string(b)); len(f) >= 3 {
			m.loadavg = strings.Join(f[:3], " ")
		}
	}
	if out, err := exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12").Output(); err == nil {
		m.tree = strings.TrimSpace(string(out))
	}
	m.gateway = "unknown (no build info)"
	if bi, err := buildinfo.ReadFile(caddyPath); err == nil {
		caddyV := "Caddy (version unknown)"
		for _, d := range bi.Deps {
			if d.Path == "github.com/caddyserver/caddy/v2" {
				caddyV = "Caddy " + d.Version
			}
		}
		rev, dirty := "", false
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				dirty = s.Value == "true"
			}
		}
		src := bi.Main.Path
		if rev != "" {
			src += " at " + rev[:min(12, len(rev))]
			if dirty {
				src += " with uncommitted changes"
			}
		}
		m.gateway = fmt.Sprintf("%s + %s, built with %s", caddyV, src, bi.GoVersion)
	}
	return m
}

// report gathers what the scenarios measured and renders RESULTS.md.
type report struct {
	opt     Options
	p       params
	scen    map[byte]bool
	machine machine
	started time.Time
	elapsed time.Duration

	idle       *idleResult
	idleErr    error
	lat        *latResult
	latErr     error
	tput       *tputResult
	tputErr    error
	hs         *hsResult
	hsErr      error
	metrics    *metricsResult
	metricsErr error
	fan        *fanResult
	fanErr     error
	hist       *fanHistResult
	histErr    error
	z          *zResult
	zErr       error
	refuse     *refuseResult
	refuseErr  error
	cap        *capResult
	capErr     error
	peers      *peersResult
	peersErr   error
	profiles   []string
}

func (r *report) markdown() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("# wsgate benchmark results\n\n")
	if r.opt.Quick {
		w("**Smoke run (`-quick`): tiny counts and durations, one run per variant. These figures mean nothing;\n")
		w("the full run is the command without `-quick`.**\n\n")
	}
	w("Written by `bench/cmd/wsbench`. Rerun it after the README's build step\n")
	w("(`go build -o caddy ./cmd/caddy`) with `go run ./bench/cmd/wsbench`; it rewrites this file.\n\n")
	w("| | |\n|---|---|\n")
	w("| date | %s |\n", r.started.UTC().Format("2006-01-02 15:04 MST"))
	w("| command | `%s` |\n", r.opt.CmdLine)
	w("| machine | %d × %s, %s, %s |\n", r.machine.nproc, r.machine.cpu, r.machine.mem, r.machine.kernel)
	w("| load average at start | %s |\n", r.machine.loadavg)
	w("| Go | %s (wsbench) |\n", r.machine.goVersion)
	w("| gateway | %s |\n", r.machine.gateway)
	if r.machine.tree != "" {
		w("| working tree | %s (`git describe --always --dirty`) |\n", r.machine.tree)
	}
	w("| cores | wsbench (load generator, upstreams): `Cpus_allowed_list` %s, GOMAXPROCS %d; Caddy: %s |\n", cpusAllowed("self"), runtime.GOMAXPROCS(0), gatewayCores(r.opt.GatewayCPUs))
	w("| runs | %d per variant, medians shown; variants interleaved, their order rotated every run |\n", r.p.runs)
	w("| duration | %v |\n\n", r.elapsed.Round(time.Second))
	w("Variants: **wsgate** is the `wsgate` handler with every check on: `origins`, an ES256 `jwt`\n")
	w("(`public_key`), a `rate_limit` on messages and bytes set never to trigger, and a `channels` +\n")
	w("`relay_channels` policy that parses every message and allows it. **stock** is Caddy's own\n")
	w("`reverse_proxy` to the same upstream. **direct** is the upstream without Caddy. One `caddy run`\n")
	w("serves each route on its own port. The upstream is an in-process gobwas/ws echo server; the clients\n")
	w("are gobwas/ws too, in the same process, on the same cores as Caddy. Messages are JSON objects of\n")
	w("the stated size naming the channel `org:acme:1`. \"vs stock\" is wsgate ÷ stock (for latency: of\n")
	w("the latency added over direct). **wsgate rooms** is the `wsgate` handler in rooms mode (`rooms`,\n")
	w("`origins`, no JWT; subprotocol `wsgate.v1`): scenario a' (idle rooms connections), d (fan-out)\n")
	w("and h (fan-out with history off and on).\n\n")

	r.targets(w)
	r.idleSection(w)
	r.latSection(w)
	r.tputSection(w)
	r.fanSection(w)
	r.histSection(w)
	r.hsSection(w)
	r.metricsSection(w)
	r.zSection(w)
	r.refuseSection(w)
	r.capSection(w)
	r.peersSection(w)
	if len(r.profiles) > 0 {
		w("CPU profiles of the gateway, from extra runs that are not part of the figures: %s.\n\n", "`"+strings.Join(r.profiles, "`, `")+"`")
	}
	r.appendix(w)
	return b.String()
}

type writer func(format string, args ...any)

// ---- targets ----

func (r *report) targets(w writer) {
	w("## Targets\n\n")
	w("| scenario | target | measured | met | stretch | met |\n|---|---|---|---|---|---|\n")
	row := func(s, target, measured, met, stretch, smet string) {
		w("| %s | %s | %s | %s | %s | %s |\n", s, target, measured, met, stretch, smet)
	}

	// a. idle
	const (
		relayTarget  = "≤ 6.5 KiB and ≤ 2 goroutines (≤ 0.15× stock)"
		relayStretch = "≤ 8 KiB, no goroutine while idle"
		tlsTarget    = "≤ 8 KiB and no goroutine while idle"
	)
	// "No goroutine" is read as fewer than one per hundred connections.
	idleFree := func(m idleSample) bool { return m.goroutines < 0.01 }
	if g, s, ok := r.idleMedians(); ok {
		ratio := g.rss / s.rss
		meas := fmt.Sprintf("%s, %.2f goroutines, %s stock's RSS", kib(g.rss), g.goroutines, times(ratio))
		row("a. idle RSS per relayed connection", relayTarget, meas,
			metStr(g.rss <= 6.5*1024 && g.goroutines <= 2 && ratio <= 0.15),
			relayStretch, metStr(g.rss <= 8*1024 && idleFree(g)))
	} else {
		row("a. idle RSS per relayed connection", relayTarget, r.missing('a', r.idleErr), "—", relayStretch, "—")
	}
	for _, x := range []struct{ name, v, ref string }{
		{"a. idle RSS per relayed connection over TLS (client over HTTPS)", vWsgateTLS, vStockTLS},
		{"a. idle RSS per connection with a wss:// upstream", vWsgateWSS, vStock},
	} {
		m, ok := r.idleMedian(x.v)
		if !ok {
			row(x.name, tlsTarget, r.missing('a', r.idleErr), "—", "", "")
			continue
		}
		meas := fmt.Sprintf("%s, %.2f goroutines", kib(m.rss), m.goroutines)
		if s, ok := r.idleMedian(x.ref); ok {
			meas += fmt.Sprintf(", %s %s's RSS", times(m.rss/s.rss), x.ref)
		}
		row(x.name, tlsTarget, meas, metStr(m.rss <= 8*1024 && idleFree(m)), "", "")
	}
	if m, ok := r.idleMedian(vRooms); ok {
		meas := fmt.Sprintf("%s, %.2f goroutines, heap+stack %s", kib(m.rss), m.goroutines, kib(m.heap+m.stack))
		row("a'. idle RSS per rooms connection", "≤ 8 KiB", meas, metStr(m.rss <= 8*1024), "≤ 4 KiB", metStr(m.rss <= 4*1024))
	} else {
		row("a'. idle RSS per rooms connection", "≤ 8 KiB", r.missing('a', r.idleErr), "—", "≤ 4 KiB", "—")
	}

	// b. latency
	for _, kind := range []string{"ping-pong", "open loop"} {
		name := "b. added echo latency p50 and p99, " + kind
		var m map[string][]latStats
		if r.lat != nil {
			m = r.lat.ping
			if kind == "open loop" {
				m = r.lat.open
			}
		}
		r50, def50, data50 := addedRatio(m, func(s latStats) time.Duration { return s.p50 })
		r99, def99, data99 := addedRatio(m, func(s latStats) time.Duration { return s.p99 })
		switch {
		case !data50 || !data99:
			row(name, "≤ 1.0× stock's added latency", r.missing('b', r.latErr), "—", "≤ 0.7×", "—")
		case !def50 || !def99:
			row(name, "≤ 1.0× stock's added latency", "n/a: stock came out no slower than direct (noise); see below", "—", "≤ 0.7×", "—")
		default:
			meas := fmt.Sprintf("p50 %s, p99 %s", times(r50), times(r99))
			if kind == "open loop" {
				if n := len(r.disturbed()); n > 0 {
					meas += fmt.Sprintf(" (%d disturbed run(s), see b.)", n)
				}
			}
			row(name, "≤ 1.0× stock's added latency", meas, metStr(r50 <= 1.0 && r99 <= 1.0), "≤ 0.7×", metStr(r50 <= 0.7 && r99 <= 0.7))
		}
	}

	// c. throughput
	for _, size := range r.p.tputSizes {
		name := fmt.Sprintf("c. throughput, %s messages, all checks on", sizeStr(size))
		g, s, ok := r.tputMedians(size, vWsgate)
		if !ok {
			row(name, "≥ 1.0× stock", r.missing('c', r.tputErr), "—", "≥ 1.2× stock", "—")
			continue
		}
		ratio := g.rate / s.rate
		row(name, "≥ 1.0× stock", fmt.Sprintf("%s msg/s, %s", count(g.rate), times(ratio)), metStr(ratio >= 1.0), "≥ 1.2× stock", metStr(ratio >= 1.2))
	}

	// m. metrics
	for _, size := range r.p.tputSizes {
		name := fmt.Sprintf("m. throughput with metrics on, %s messages, all checks on", sizeStr(size))
		target := fmt.Sprintf("≥ %.2f× metrics off", metricsTarget)
		on, off, ok := r.metricsMedians(size, vWsgateMetrics)
		if !ok {
			row(name, target, r.missing('m', r.metricsErr), "—", "", "")
			continue
		}
		ratio := on.rate / off.rate
		row(name, target, fmt.Sprintf("%s msg/s, %.3f×", count(on.rate), ratio), metStr(ratio >= metricsTarget), "", "")
	}

	// z. compression
	r.zTargets(row)

	// d. fan-out
	if f := r.fan; f != nil && f.baseline != nil {
		b := f.baseline
		clean := b.lost == 0 && b.dups == 0 && b.closed == 0 && b.pubErrs == 0 && b.publishes == b.sent && b.sent > 0
		full := b.perSec >= 0.97*50000
		meas := fmt.Sprintf("%s deliveries/s: p99 %s (p50 %s), %s lost, %s duplicates, %s PUBLISH for %s messages",
			count(b.perSec), micros(float64(b.p99)), micros(float64(b.p50)), count(float64(b.lost)), count(float64(b.dups)),
			count(float64(b.publishes)), count(float64(b.sent)))
		if !full {
			meas += " (below the 50k deliveries/s asked: see d.)"
		}
		row("d. fan-out 50k deliveries/s", "p99 ≤ 10 ms, 0 lost, 1 PUBLISH per message", meas,
			metStr(clean && full && b.p99 <= 10*time.Millisecond), "p99 ≤ 5 ms", metStr(clean && full && b.p99 <= 5*time.Millisecond))
		best, at, reached := f.capacity()
		var m string
		switch {
		case best == nil:
			m = "no rate kept p99 under 50 ms without loss"
		case reached:
			m = fmt.Sprintf("%s deliveries/s with p99 %s; p99 reached 50 ms at %s deliveries/s (%s)", count(best.perSec), micros(float64(best.p99)), count(at.perSec), micros(float64(at.p99)))
		default:
			m = fmt.Sprintf("≥ %s deliveries/s (p99 %s): p99 never reached 50 ms; %s", count(best.perSec), micros(float64(best.p99)), f.stop)
		}
		v := 0.0
		if best != nil {
			v = best.perSec
		}
		row("d. deliveries/s at p99 = 50 ms", "≥ 100,000", m, metStr(v >= 100000), "≥ 250,000", metStr(v >= 250000))
	} else {
		row("d. fan-out 50k deliveries/s", "p99 ≤ 10 ms, 0 lost, 1 PUBLISH per message", r.missing('d', r.fanErr), "—", "p99 ≤ 5 ms", "—")
		row("d. deliveries/s at p99 = 50 ms", "≥ 100,000", r.missing('d', r.fanErr), "—", "≥ 250,000", "—")
	}

	// h. fan-out with history
	r.histTargets(row)

	// e. handshakes
	stock, okS := r.hsMedian(vStock)
	es, okE := r.hsMedian(vWsgate)
	if okS && okE {
		ratio := es.rate / stock.rate
		row("e. handshakes with ES256 + Origin", "≥ 1.2× stock's plain handshake rate", fmt.Sprintf("%s/s, %s", count(es.rate), times(ratio)), metStr(ratio >= 1.2), "≥ 2×", metStr(ratio >= 2))
	} else {
		row("e. handshakes with ES256 + Origin", "≥ 1.2× stock's plain handshake rate", r.missing('e', r.hsErr), "—", "≥ 2×", "—")
	}
	ro, okO := r.hsMedian(vRejectOrigin)
	rt, okT := r.hsMedian(vRejectToken)
	if okS && okO && okT {
		a, b := ro.rate/stock.rate, rt.rate/stock.rate
		row("e. rejections (bad Origin; bad token)", "≥ 3× stock's plain handshake rate",
			fmt.Sprintf("%s/s, %s; %s/s, %s", count(ro.rate), times(a), count(rt.rate), times(b)), metStr(a >= 3 && b >= 3), "", "")
	} else {
		row("e. rejections (bad Origin; bad token)", "≥ 3× stock's plain handshake rate", r.missing('e', r.hsErr), "—", "", "")
	}
	r.refuseTargets(row)
	w("\n")
}

func (r *report) missing(s byte, err error) string {
	switch {
	case !r.scen[s]:
		return "not run"
	case err != nil:
		return "failed (see below)"
	}
	return "no data"
}

func metStr(ok bool) string {
	if ok {
		return "**met**"
	}
	return "not met"
}

// ---- a. idle ----

func (r *report) idleMedians() (g, s idleSample, ok bool) {
	g, okG := r.idleMedian(vWsgate)
	s, okS := r.idleMedian(vStock)
	return g, s, okG && okS
}

func (r *report) idleMedian(v string) (idleSample, bool) {
	if r.idle == nil || len(r.idle.samples[v]) == 0 {
		return idleSample{}, false
	}
	ss := r.idle.samples[v]
	return idleSample{
		rss:        median(ss, func(x idleSample) float64 { return x.rss }),
		heap:       median(ss, func(x idleSample) float64 { return x.heap }),
		stack:      median(ss, func(x idleSample) float64 { return x.stack }),
		goroutines: noNegativeZero(median(ss, func(x idleSample) float64 { return x.goroutines })),
		fds:        median(ss, func(x idleSample) float64 { return x.fds }),
	}, true
}

func (r *report) idleSection(w writer) {
	w("## a. Idle connections\n\n")
	if !r.section(w, 'a', r.idleErr) {
		return
	}
	w("%s connections opened through each variant (each checked with one echo), then held %v; the\n", count(float64(r.p.idleConns)), r.p.idleHold)
	w("gateway process is measured before and after, each time right after a forced GC, in a fresh Caddy\n")
	w("for every run. RSS is `VmRSS` from `/proc/PID/status`; heap+stack is `HeapAlloc + StackInuse`\n")
	w("(`/debug/vars`); goroutines from `/debug/pprof/goroutine`. Figures are per connection. For direct\n")
	w("there is no gateway, so its cost is zero by definition (the upstream's own is not measured).\n")
	w("KiB are 1,024 bytes, like the kB of `/proc`; the KB targets are read as KiB.\n\n")
	w("**a'. wsgate rooms**: the same for rooms connections (wsgate.v1, default in-process broker, no upstream),\n")
	w("each subscribed to a room of its own (`bench:idle:<i>`, so the hub's per-room entry is counted too) and\n")
	w("its `{\"op\":\"ok\"}` received before the hold. Stock Caddy has no rooms mode: no ratio.\n\n")
	w("**TLS**: **wsgate TLS** and **stock TLS** are the wsgate and stock routes with the client over HTTPS\n")
	w("(HTTP/1.1 by ALPN) and the upstream over plain `ws://`. **wsgate wss upstream** is the wsgate route with\n")
	w("the client over plain HTTP and the upstream over `wss://`: the same echo app, served over TLS with a\n")
	w("P-256 certificate made at start for 127.0.0.1, which wsgate verifies through `tls { ca_file … }`.\n")
	w("These three run in a Caddy configuration of their own, so the plain variants' is unchanged. Its HTTPS\n")
	w("sites use `tls internal`: the certificate comes from Caddy's own CA, created in that Caddy's fresh data\n")
	w("directory; `local_certs` and `skip_install_trust` keep the run off ACME and out of the system trust\n")
	w("store (no internet needed), `auto_https disable_redirects` keeps it off port 80, and\n")
	w("`default_bind 127.0.0.1` keeps its listeners on loopback; the protocols are Caddy's defaults (h1, h2,\n")
	w("h3). The clients verify Caddy's certificate against that CA's root, read from the data directory: no\n")
	w("verification is skipped. The TLS rows' ratios are to stock TLS; wsgate wss upstream's are to stock,\n")
	w("whose client leg is the same (its upstream leg stays plain `ws://`).\n\n")
	w("| variant | RSS | heap+stack (heap / stacks) | goroutines | file descriptors | RSS vs stock | heap+stack vs stock |\n|---|---|---|---|---|---|---|\n")
	// vs is variant v's row, with ratios to ref's figures.
	vs := func(v, ref string) {
		m, ok := r.idleMedian(v)
		if !ok {
			return
		}
		hs := m.heap + m.stack
		rss, heap := "—", "—"
		if s, ok := r.idleMedian(ref); ok {
			rss, heap = times(m.rss/s.rss), times(hs/(s.heap+s.stack))
		}
		w("| %s | %s | %s (%s / %s) | %.2f | %.2f | %s | %s |\n", v, kib(m.rss), kib(hs), kib(m.heap), kib(m.stack),
			m.goroutines, m.fds, rss, heap)
	}
	vs(vWsgate, vStock)
	vs(vStock, vStock)
	if m, ok := r.idleMedian(vRooms); ok {
		w("| wsgate rooms | %s | %s (%s / %s) | %.2f | %.2f | — (stock has no rooms) | — |\n", kib(m.rss), kib(m.heap+m.stack),
			kib(m.heap), kib(m.stack), m.goroutines, m.fds)
	}
	vs(vWsgateTLS, vStockTLS)
	vs(vStockTLS, vStockTLS)
	vs(vWsgateWSS, vStock)
	w("| direct | 0 (no gateway) | — | — | — | — | — |\n\n")
}

// ---- b. latency ----

// added is the latency variant v adds over direct, run by run (each run
// compares with the direct measurement taken beside it).
func added(m map[string][]latStats, v string, f func(latStats) time.Duration) []float64 {
	var out []float64
	for i := 0; i < len(m[v]) && i < len(m[vDirect]); i++ {
		out = append(out, float64(f(m[v][i])-f(m[vDirect][i])))
	}
	return out
}

// addedRatio is wsgate's added latency over stock's (medians over runs).
// It is not defined when stock added nothing measurable.
func addedRatio(m map[string][]latStats, f func(latStats) time.Duration) (ratio float64, defined, data bool) {
	g := added(m, vWsgate, f)
	s := added(m, vStock, f)
	if len(g) == 0 || len(s) == 0 {
		return 0, false, false
	}
	sm := median(s, ident)
	if sm <= 0 {
		return 0, false, true
	}
	return median(g, ident) / sm, true, true
}

func (r *report) latSection(w writer) {
	w("## b. Echo latency\n\n")
	if !r.section(w, 'b', r.latErr) {
		return
	}
	w("**Ping-pong**: one connection per variant, one %d-byte message at a time, %s round trips timed after %d of warm-up;\n", len(payload(64)), count(float64(r.p.pingRounds)), r.p.pingWarm)
	w("the variants take turns every %d round trips, so that they all meet the machine's slow and fast spells.\n", pingPongBlock)
	w("**Open loop**: %d connections sending %s msg/s in all on a fixed schedule (staggered, whatever the\n", r.p.openConns, count(float64(r.p.openRate)))
	w("echoes do) for %v after %v of warm-up; each message carries its send time. Added latency is the\n", r.p.openDur, r.p.openWarm)
	w("variant's percentile minus direct's in the same run.\n\n")
	for _, kind := range []string{"ping-pong", "open loop"} {
		m := r.lat.ping
		if kind == "open loop" {
			m = r.lat.open
		}
		w("%s:\n\n", kind)
		w("| variant | p50 | p99 | p99.9 | added p50 | added p99 | added p99.9 | added vs stock (p50 / p99 / p99.9) |")
		if kind == "open loop" {
			w(" sent msg/s | samples |\n|---|---|---|---|---|---|---|---|---|---|\n")
		} else {
			w("\n|---|---|---|---|---|---|---|---|\n")
		}
		pcts := []func(latStats) time.Duration{
			func(s latStats) time.Duration { return s.p50 },
			func(s latStats) time.Duration { return s.p99 },
			func(s latStats) time.Duration { return s.p999 },
		}
		for _, v := range latVariants {
			if len(m[v]) == 0 {
				continue
			}
			w("| %s ", v)
			for _, f := range pcts {
				w("| %s ", micros(median(m[v], func(s latStats) float64 { return float64(f(s)) })))
			}
			for _, f := range pcts {
				if v == vDirect {
					w("| — ")
					continue
				}
				w("| %s ", micros(median(added(m, v, f), ident)))
			}
			var rs []string
			for _, f := range pcts {
				if v == vDirect {
					rs = append(rs, "—")
					continue
				}
				sm := median(added(m, vStock, f), ident)
				if sm <= 0 {
					rs = append(rs, "n/a")
					continue
				}
				rs = append(rs, times(median(added(m, v, f), ident)/sm))
			}
			w("| %s ", strings.Join(rs, " / "))
			if kind == "open loop" {
				w("| %s | %s ", count(median(m[v], func(s latStats) float64 { return s.rate })),
					count(median(m[v], func(s latStats) float64 { return float64(s.n) })))
			}
			w("|\n")
		}
		w("\n")
	}
	if d := r.disturbed(); len(d) > 0 {
		w("Disturbed open-loop runs, whose sender fell more than 3%% behind its schedule (the machine was busy\n")
		w("elsewhere; their latencies say more about it than about the gateway): %s.\n\n", strings.Join(d, ", "))
	}
}

// disturbed lists the open-loop runs whose sender fell behind its
// schedule: this process was not getting the CPU it needed, so those
// latencies measure the machine as much as the gateway.
func (r *report) disturbed() []string {
	var out []string
	if r.lat == nil {
		return nil
	}
	for _, v := range latVariants {
		for i, s := range r.lat.open[v] {
			if s.rate < 0.97*float64(r.p.openRate) {
				out = append(out, fmt.Sprintf("%s run %d (%s msg/s)", v, i+1, count(s.rate)))
			}
		}
	}
	return out
}

// ---- c. throughput ----

func (r *report) tputMedians(size int, v string) (g, s tputSample, ok bool) {
	if r.tput == nil || len(r.tput.samples[size][v]) == 0 || len(r.tput.samples[size][vStock]) == 0 {
		return g, s, false
	}
	med := func(ss []tputSample) tputSample {
		return tputSample{
			rate:     median(ss, func(x tputSample) float64 { return x.rate }),
			cpuPerM:  median(ss, func(x tputSample) float64 { return x.cpuPerM }),
			cores:    median(ss, func(x tputSample) float64 { return x.cores }),
			genCores: median(ss, func(x tputSample) float64 { return x.genCores }),
		}
	}
	return med(r.tput.samples[size][v]), med(r.tput.samples[size][vStock]), true
}

func (r *report) tputSection(w writer) {
	w("## c. Throughput\n\n")
	if !r.section(w, 'c', r.tputErr) {
		return
	}
	w("%d connections, each keeping %d messages in flight (pipelined echo), for %v after %v of warm-up.\n", r.p.tputConns, r.p.tputWindow, r.p.tputDur, r.p.tputWarm)
	w("msg/s counts echoes received (each message crosses the gateway twice). Caddy's CPU is utime+stime\n")
	w("from `/proc/PID/stat`; the load generator (clients and upstream, one process) shares the same cores.\n\n")
	w("| size | variant | msg/s | vs stock | Caddy CPU-s per 1M msgs | vs stock | Caddy cores | load generator cores |\n|---|---|---|---|---|---|---|---|\n")
	for _, size := range r.p.tputSizes {
		for _, v := range tputVariants {
			g, s, ok := r.tputMedians(size, v)
			if !ok {
				continue
			}
			cpu, cpuRatio, cores := "—", "—", "—"
			if v != vDirect {
				cpu, cpuRatio, cores = fmt.Sprintf("%.2f", g.cpuPerM), times(g.cpuPerM/s.cpuPerM), fmt.Sprintf("%.2f", g.cores)
			}
			w("| %s | %s | %s | %s | %s | %s | %s | %.2f |\n", sizeStr(size), v, count(g.rate), times(g.rate/s.rate), cpu, cpuRatio, cores, g.genCores)
		}
	}
	w("\n")
}

// ---- d. fan-out ----

// capacity is the highest phase that kept p99 under fanP99Limit with
// nothing lost, and the first step at which p99 reached it, if one did.
func (f *fanResult) capacity() (best, at *fanPhase, reached bool) {
	return capacityOf(append([]*fanPhase{f.baseline}, f.steps...))
}

func (r *report) fanSection(w writer) {
	w("## d. Fan-out\n\n")
	if !r.section(w, 'd', r.fanErr) {
		return
	}
	f := r.fan
	w("Two gateways (`caddy run`, each `wsgate { broker redis redis://127.0.0.1:… }` and a site with\n")
	w("`wsgate %s { rooms { publish_rate off }; origins … }` and `wsgate_publish %s { key … }`) share one `redis-server` (`--save \"\"\n", roomsPath, pubPath)
	w("--appendonly no`) started by the harness. %s subscribers (gobwas/ws, subprotocol `wsgate.v1`; %s on\n", count(float64(f.subs)), count(float64(f.perGW[0])))
	w("gateway A, %s on B) each subscribe to the room `%s` and wait for `{\"op\":\"ok\"}`. A publisher sends\n", count(float64(f.perGW[1])), fanRoom)
	w("on a fixed schedule (open loop), alternately an HTTP POST to `%s` on gateway A (%d keep-alive\n", pubPath, fanHTTPWorkers)
	w("connections) and a wsgate.v1 `publish` on one connection to gateway B; each message's data holds its\n")
	w("phase, a sequence number and its send time, and is delivered as %d-byte messages. Latency is receipt\n", f.payload)
	w("minus send time over all deliveries (publisher and subscribers share a clock: one process). Lost =\n")
	w("messages acknowledged × subscribers − distinct deliveries, after waiting for deliveries to stop for\n")
	w("1 s; duplicates are deliveries of a sequence number a subscriber already had. `PUBLISH` is the change\n")
	w("in Redis's `INFO commandstats` `cmdstat_publish` calls across the phase. deliveries/s = distinct\n")
	w("deliveries ÷ the sending window (the schedule's length, or the time the sends took if the publisher\n")
	w("ended more than one period behind it). Cores are CPU time (`/proc/PID/stat`, `getrusage`) ÷ the\n")
	w("sending time; the load generator (publisher and all subscribers) shares the machine's cores with both gateways\n")
	first := 0.0
	if len(r.p.fanSteps) > 0 {
		first = r.p.fanSteps[0]
	}
	w("and Redis. After %v of warm-up at the same rate (not counted), the baseline runs %.0f publishes/s\n", r.p.fanWarm, r.p.fanRate)
	w("for %v; the step-up then runs %v steps from %s\n", r.p.fanDur, r.p.fanStepDur, count(first))
	w("publishes/s, ×√2 a step, until p99 reaches %v (or a step loses messages or subscribers, or the load\n", fanP99Limit)
	w("generator cannot send the rate). The baseline and every step run %d times back to back; the table shows\n", max(1, r.p.runs))
	w("the run with the median p99 (all runs' p99 are under Every run). **Stock Caddy has no fan-out: nothing is\n")
	w("compared with it here.**\n\n")
	w("| phase | publishes/s asked | publishes/s sent | deliveries/s | p50 | p99 | p99.9 | max | lost | duplicates | `PUBLISH` / messages | gateway A cores | gateway B cores | Redis cores | load generator cores | vs stock |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	rowFor := func(name string, ph *fanPhase) {
		w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %.2f | %.2f | %.2f | %.2f | — (no fan-out in stock) |\n",
			name, count(ph.rate), count(ph.achieved), count(ph.perSec), micros(float64(ph.p50)), micros(float64(ph.p99)),
			micros(float64(ph.p999)), micros(float64(ph.max)), count(float64(ph.lost)), count(float64(ph.dups)),
			count(float64(ph.publishes)), count(float64(ph.sent)), ph.cpuA, ph.cpuB, ph.cpuRedis, ph.cpuGen)
	}
	if f.baseline != nil {
		rowFor(fmt.Sprintf("baseline, %v", r.p.fanDur), f.baseline)
	}
	for i, ph := range f.steps {
		rowFor(fmt.Sprintf("step %d, %v", i+1, ph.dur), ph)
	}
	w("\n")
	if b := f.baseline; b != nil {
		w("Baseline by publisher: HTTP POST on gateway A p50 %s, p99 %s; wsgate.v1 publish on gateway B p50 %s, p99 %s.\n",
			micros(float64(b.bySrc[0][0])), micros(float64(b.bySrc[0][1])), micros(float64(b.bySrc[1][0])), micros(float64(b.bySrc[1][1])))
	}
	if f.stop != "" {
		w("Step-up: %s.\n\n", f.stop)
	}
	var notes []string
	for i, ph := range append([]*fanPhase{f.baseline}, f.steps...) {
		if ph == nil {
			continue
		}
		name := "baseline"
		if i > 0 {
			name = fmt.Sprintf("step %d", i)
		}
		if ph.closed > 0 || ph.pubErrs > 0 {
			notes = append(notes, fmt.Sprintf("%s: %d subscriber connection(s) ended, %d publish(es) failed; first error: %s", name, ph.closed, ph.pubErrs, ph.firstErr))
		}
		if ph.publishes != ph.sent {
			notes = append(notes, fmt.Sprintf("%s: %s PUBLISH for %s messages", name, count(float64(ph.publishes)), count(float64(ph.sent))))
		}
	}
	for _, n := range notes {
		w("- %s\n", n)
	}
	if len(notes) > 0 {
		w("\n")
	}
	if f.logCount == 0 {
		w("Gateway logs: no warnings or errors.\n\n")
	} else {
		w("Gateway logs: %d warning/error line(s); the first:\n\n", f.logCount)
		for _, l := range f.logLines {
			w("    %s\n", l)
		}
		w("\n")
	}
}

// ---- e. handshakes ----

func (r *report) hsMedian(v string) (hsSample, bool) {
	if r.hs == nil || len(r.hs.samples[v]) == 0 {
		return hsSample{}, false
	}
	ss := r.hs.samples[v]
	return hsSample{
		rate:    median(ss, func(x hsSample) float64 { return x.rate }),
		cpuPerK: median(ss, func(x hsSample) float64 { return x.cpuPerK }),
	}, true
}

func (r *report) hsSection(w writer) {
	w("## e. Handshakes\n\n")
	if !r.section(w, 'e', r.hsErr) {
		return
	}
	w("%d concurrent loops for %v each: connect, upgrade, send a close frame, wait for the server's close\n", r.p.hsLoops, r.p.hsDur)
	w("frame, disconnect. Each loop takes the next of %d tokens. The refusals go to the ES256 route and\n", tokenPool)
	w("count answers of HTTP 403 (Origin `%s`) or 401 (an ES256 token signed by an unknown key), with\n", badOrigin)
	w("no upgrade. \"vs stock\" compares with stock Caddy's plain handshake rate (no auth).\n\n")
	w("| variant | per second | vs stock | Caddy CPU-ms per 1,000 | failed attempts |\n|---|---|---|---|---|\n")
	stock, okS := r.hsMedian(vStock)
	for _, v := range hsVariants {
		m, ok := r.hsMedian(v)
		if !ok {
			continue
		}
		ratio, cpu := "—", "—"
		if okS {
			ratio = times(m.rate / stock.rate)
		}
		if v != vDirect {
			cpu = fmt.Sprintf("%.0f", m.cpuPerK)
		}
		var failed int64
		for _, s := range r.hs.samples[v] {
			failed += s.failures
		}
		w("| %s | %s | %s | %s | %d |\n", v, count(m.rate), ratio, cpu, failed)
	}
	w("\n")
}

// ---- appendix: every run ----

func (r *report) appendix(w writer) {
	w("## Every run\n\n")
	w("The medians above come from these (in run order).\n\n")
	list := func(xs []float64, f func(float64) string) string {
		var s []string
		for _, x := range xs {
			s = append(s, f(x))
		}
		if len(s) == 0 {
			return "—"
		}
		return strings.Join(s, ", ")
	}
	w("| scenario | variant | runs |\n|---|---|---|\n")
	if r.idle != nil {
		for _, v := range idleVariants {
			w("| a. RSS per connection | %s | %s |\n", v, list(pluck(r.idle.samples[v], func(s idleSample) float64 { return s.rss }), kib))
		}
	}
	if r.lat != nil {
		for _, v := range latVariants {
			w("| b. ping-pong p50 | %s | %s |\n", v, list(pluck(r.lat.ping[v], func(s latStats) float64 { return float64(s.p50) }), micros))
		}
		for _, v := range latVariants {
			w("| b. open loop p99 | %s | %s |\n", v, list(pluck(r.lat.open[v], func(s latStats) float64 { return float64(s.p99) }), micros))
		}
		for _, v := range latVariants {
			w("| b. open loop sent msg/s | %s | %s |\n", v, list(pluck(r.lat.open[v], func(s latStats) float64 { return s.rate }), count))
		}
	}
	if r.tput != nil {
		for _, size := range r.p.tputSizes {
			for _, v := range tputVariants {
				w("| c. %s msg/s | %s | %s |\n", sizeStr(size), v, list(pluck(r.tput.samples[size][v], func(s tputSample) float64 { return s.rate }), count))
			}
		}
	}
	if r.fan != nil {
		var steps []fanPhase
		for _, ph := range r.fan.steps {
			steps = append(steps, *ph)
		}
		w("| d. step-up deliveries/s | wsgate rooms | %s |\n", list(pluck(steps, func(p fanPhase) float64 { return p.perSec }), count))
		w("| d. step-up p99 (median of the runs) | wsgate rooms | %s |\n", list(pluck(steps, func(p fanPhase) float64 { return float64(p.p99) }), micros))
		for i, ph := range append([]*fanPhase{r.fan.baseline}, r.fan.steps...) {
			if ph == nil {
				continue
			}
			name := "baseline"
			if i > 0 {
				name = fmt.Sprintf("step %d", i)
			}
			w("| d. %s p99, every run | wsgate rooms | %s |\n", name, list(pluck(ph.runsP99, func(d time.Duration) float64 { return float64(d) }), micros))
		}
	}
	r.histAppendix(w, list)
	r.zAppendix(w, list)
	r.refuseAppendix(w, list)
	if r.hs != nil {
		for _, v := range hsVariants {
			w("| e. per second | %s | %s |\n", v, list(pluck(r.hs.samples[v], func(s hsSample) float64 { return s.rate }), count))
		}
	}
	if r.metrics != nil {
		for _, size := range r.p.tputSizes {
			for _, v := range r.metrics.variants {
				w("| m. %s msg/s | %s | %s |\n", sizeStr(size), v, list(pluck(r.metrics.samples[size][v], func(s tputSample) float64 { return s.rate }), count))
			}
		}
	}
	w("\n")
}

// section writes the not-run or failed notice; it reports whether there
// are figures to show.
func (r *report) section(w writer, s byte, err error) bool {
	if !r.scen[s] {
		w("Not run (`-scenarios %s`).\n\n", r.opt.Scenarios)
		return false
	}
	if err != nil {
		w("**Failed:** %s\n\n", strings.ReplaceAll(err.Error(), "\n", " "))
	}
	switch s {
	case 'a':
		return r.idle != nil
	case 'b':
		return r.lat != nil
	case 'c':
		return r.tput != nil
	case 'd':
		return r.fan != nil
	case 'e':
		return r.hs != nil
	case 'h':
		return r.hist != nil
	case 'm':
		return r.metrics != nil
	case 'z':
		return r.z != nil
	case 'r':
		return r.refuse != nil
	case 'k':
		return r.cap != nil
	case 'p':
		return r.peers != nil
	}
	return false
}

// ---- numbers ----

func ident(x float64) float64 { return x }

func pluck[T any](xs []T, f func(T) float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = f(x)
	}
	return out
}

// median of f over xs (the mean of the middle two for an even count).
func median[T any](xs []T, f func(T) float64) float64 {
	v := pluck(xs, f)
	if len(v) == 0 {
		return 0
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

func kib(b float64) string { return fmt.Sprintf("%.1f KiB", b/1024) }

func micros(ns float64) string {
	if math.Abs(ns) >= 1e6 {
		return fmt.Sprintf("%.2f ms", ns/1e6)
	}
	return fmt.Sprintf("%.1f µs", ns/1e3)
}

func times(x float64) string { return fmt.Sprintf("%.2f×", x) }

func sizeStr(n int) string {
	if n%1024 == 0 {
		return fmt.Sprintf("%d KiB", n/1024)
	}
	return fmt.Sprintf("%d B", n)
}

// count formats x rounded, with thousands separators.
func count(x float64) string {
	s := strconv.FormatInt(int64(math.Round(x)), 10)
	neg := strings.HasPrefix(s, "-")
	s = strings.TrimPrefix(s, "-")
	var out []byte
	for i := range len(s) {
		if i > 0 && (len(s)-i)%3 == 0 {
			out = append(out, ',')
		}
		out = append(out, s[i])
	}
	if neg {
		return "-" + string(out)
	}
	return string(out)
}

// noNegativeZero is x, or 0 when it would print as -0.00 (a count that
// fell by a few goroutines while thousands of connections were open).
func noNegativeZero(x float64) float64 {
	if x > -0.005 && x < 0.005 {
		return 0
	}
	return x
}

// ---- m. metrics ----

// metricsMedians are the medians of variant v of scenario m and of the
// metrics-off runs at size.
func (r *report) metricsMedians(size int, v string) (g, off tputSample, ok bool) {
	if r.metrics == nil || len(r.metrics.samples[size][v]) == 0 || len(r.metrics.samples[size][vWsgate]) == 0 {
		return g, off, false
	}
	med := func(ss []tputSample) tputSample {
		return tputSample{
			rate:    median(ss, func(x tputSample) float64 { return x.rate }),
			cpuPerM: median(ss, func(x tputSample) float64 { return x.cpuPerM }),
			cores:   median(ss, func(x tputSample) float64 { return x.cores }),
		}
	}
	return med(r.metrics.samples[size][v]), med(r.metrics.samples[size][vWsgate]), true
}

func (r *report) metricsSection(w writer) {
	w("## m. Throughput with metrics on and off\n\n")
	if !r.section(w, 'm', r.metricsErr) {
		return
	}
	w("Scenario c's wsgate runs (%d connections, %d messages in flight each, %v after %v of warm-up), %d\n",
		r.p.tputConns, r.p.tputWindow, r.p.tputDur, r.p.tputWarm, r.p.metricsRuns)
	w("times per variant, interleaved, their order rotated every run. **wsgate** is the shared gateway:\n")
	w("no `metrics` option, never scraped. **wsgate, metrics on** is a second gateway, the same configuration\n")
	w("with Caddy's `metrics` option, its `/metrics` scraped every second during the measured window (%d\n", r.metrics.scrapes)
	w("scrapes, each checked for wsgate's series). wsgate's own counting is in both: it cannot be turned off.\n")
	if len(r.metrics.variants) > 2 {
		w("**wsgate, baseline build** is a third gateway with the first one's configuration, run from `%s`\n", r.opt.Baseline)
		w("(a build without wsgate's metrics), so the cost of the counting itself shows.\n")
	}
	w("\n| size | variant | msg/s | vs metrics off | Caddy CPU-s per 1M msgs | vs metrics off | Caddy cores |\n|---|---|---|---|---|---|---|\n")
	for _, size := range r.p.tputSizes {
		for _, v := range r.metrics.variants {
			g, off, ok := r.metricsMedians(size, v)
			if !ok {
				continue
			}
			w("| %s | %s | %s | %.3f× | %.2f | %.3f× | %.2f |\n", sizeStr(size), v, count(g.rate), g.rate/off.rate,
				g.cpuPerM, g.cpuPerM/off.cpuPerM, g.cores)
		}
	}
	w("\n")
}
