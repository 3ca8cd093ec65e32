package bench

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Options configure one run of the harness.
type Options struct {
	// Caddy is the cmd/caddy binary to measure. Default "./caddy", what
	// the README's build step produces.
	Caddy string
	// Out is where the Markdown results go. Default "bench/RESULTS.md".
	Out string
	// Quick is the smoke mode: tiny counts and durations, one run per
	// variant, the whole run well under a minute. Its figures mean nothing.
	Quick bool
	// Runs per variant; the report gives medians. Default 3 (1 with Quick).
	Runs int
	// Scenarios to run, from "abcdehkmprz". Default all eleven. Scenarios d
	// (fan-out), h (fan-out with history off and on) and k (capacity)
	// start redis-server, which must be on PATH. Scenario p (peers) runs
	// Centrifugo and Nchan beside wsgate, each if it is installed.
	Scenarios string
	// Centrifugo is the centrifugo binary scenario p runs. Default:
	// centrifugo on PATH, else ~/go/bin/centrifugo.
	Centrifugo string
	// Nginx is the nginx binary scenario p runs Nchan in (Debian's
	// libnginx-mod-nchan must be installed). Default /usr/sbin/nginx.
	Nginx string
	// Baseline, when set, is another cmd/caddy binary (a build without
	// wsgate's metrics) that scenario m also measures, with the same
	// configuration as its metrics-off gateway.
	Baseline string
	// GatewayCPUs, when set, is a CPU list (`taskset -c` syntax, e.g.
	// "0") that every Caddy the harness starts is pinned to, through
	// taskset(1). The harness itself (the load generator) is pinned by
	// running it under taskset too: `taskset -c 1 wsbench -gateway-cpus 0`.
	GatewayCPUs string
	// Profile, when set, is a directory where CPU profiles of the gateway
	// are written, taken during one extra throughput run per variant and
	// size, one extra handshake burst per variant and one extra fan-out
	// step (both gateways) at the last rate stepped to, after the measured
	// ones (so profiling never skews a figure).
	Profile string
	// CmdLine is the command line recorded in the results.
	CmdLine string
	// Log receives progress lines. Default: discarded.
	Log io.Writer
}

// params are the sizes of one run, from the scenarios' targets (or tiny,
// for Quick).
type params struct {
	runs int

	idleConns int
	idleHold  time.Duration

	pingWarm, pingRounds int

	openConns, openRate int
	openWarm, openDur   time.Duration

	tputConns, tputWindow int
	tputSizes             []int
	tputWarm, tputDur     time.Duration

	metricsRuns int // of scenario m, per variant

	hsLoops int
	hsDur   time.Duration

	fanSubs    int           // subscribers, split across the two gateways
	fanRate    float64       // baseline publishes per second
	fanWarm    time.Duration // warm-up at the baseline rate, before it
	fanDur     time.Duration // of the baseline
	fanSteps   []float64     // publishes per second of the step-up
	fanStepDur time.Duration

	zFanRate   float64       // scenario z's publications per second
	zFanDur    time.Duration // of each of its fan-out phases
	refuseRate int           // upgrade attempts per second, scenario r
	refuseWarm time.Duration // at that rate before each measured window
	refuseDur  time.Duration // the measured window

	capConns      int           // scenario k's subscribers on one gateway (twice as many over several)
	capDeliveries float64       // deliveries per second in each of its windows
	capWindow     time.Duration // of each publishing window

	peerIdleConns int           // scenario p's idle subscribed connections per server
	peerIdleHold  time.Duration // sampled every second for this long
	peerHSRate    int           // connect + subscribe handshakes per second
	peerHSDur     time.Duration // of the handshake schedule
	peerTopos     []peerTopo    // fan-out shapes
	peerFanSteps  []float64     // deliveries per second asked, in steps
	peerFanDur    time.Duration // of each publishing window
}

// fanSteps are the step-up's rates: from 100 publishes/s, ×√2 a step.
func fanSteps(n int) []float64 {
	out := make([]float64, n)
	for i := range out {
		out[i] = math.Round(100 * math.Pow(math.Sqrt2, float64(i)))
	}
	return out
}

func fullParams() params {
	return params{
		runs:      3,
		idleConns: 8000, idleHold: 10 * time.Second,
		pingWarm: 500, pingRounds: 5000,
		openConns: 64, openRate: 2000, openWarm: 500 * time.Millisecond, openDur: 5 * time.Second,
		tputConns: 32, tputWindow: 16, tputSizes: []int{64, 4096},
		tputWarm: 500 * time.Millisecond, tputDur: 5 * time.Second,
		metricsRuns: 6,
		hsLoops:     8, hsDur: 3 * time.Second,
		fanSubs: 1000, fanRate: 50, fanWarm: time.Second, fanDur: 10 * time.Second, fanSteps: fanSteps(13), fanStepDur: 4 * time.Second,
		zFanRate: 20, zFanDur: 10 * time.Second,
		refuseRate: 500, refuseWarm: time.Second, refuseDur: 10 * time.Second,
		capConns: 9000, capDeliveries: 30000, capWindow: 10 * time.Second,
		peerIdleConns: 5000, peerIdleHold: 90 * time.Second, peerHSRate: 500, peerHSDur: 5 * time.Second,
		peerTopos: []peerTopo{{1, 1000}, {100, 10}}, peerFanSteps: []float64{20000, 50000, 100000}, peerFanDur: 4 * time.Second,
	}
}

func quickParams() params {
	return params{
		runs:      1,
		idleConns: 200, idleHold: time.Second,
		pingWarm: 50, pingRounds: 300,
		openConns: 64, openRate: 2000, openWarm: 100 * time.Millisecond, openDur: 500 * time.Millisecond,
		tputConns: 32, tputWindow: 16, tputSizes: []int{64, 4096},
		tputWarm: 100 * time.Millisecond, tputDur: 500 * time.Millisecond,
		metricsRuns: 1,
		hsLoops:     8, hsDur: 300 * time.Millisecond,
		fanSubs: 40, fanRate: 50, fanWarm: 200 * time.Millisecond, fanDur: time.Second, fanSteps: []float64{100, 200}, fanStepDur: 500 * time.Millisecond,
		zFanRate: 20, zFanDur: time.Second,
		refuseRate: 500, refuseWarm: 200 * time.Millisecond, refuseDur: time.Second,
		capConns: 200, capDeliveries: 2000, capWindow: time.Second,
		peerIdleConns: 100, peerIdleHold: 2 * time.Second, peerHSRate: 200, peerHSDur: 500 * time.Millisecond,
		peerTopos: []peerTopo{{1, 100}, {10, 10}}, peerFanSteps: []float64{2000, 5000}, peerFanDur: 500 * time.Millisecond,
	}
}

// Main is the wsbench command: it parses args (without the program
// name), runs the benchmark and writes the results. name is how the
// command was invoked, for the record in the results.
func Main(ctx context.Context, name string, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("wsbench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: %s [flags]\n\nRuns wsgate side by side with stock Caddy and the upstream reached directly, and writes the results.\n\n", name)
		fs.PrintDefaults()
	}
	opt := Options{Log: stderr}
	fs.StringVar(&opt.Caddy, "caddy", "./caddy", "the cmd/caddy `binary` to measure (go build -o caddy ./cmd/caddy)")
	fs.StringVar(&opt.Out, "out", "bench/RESULTS.md", "results `file` (Markdown)")
	fs.BoolVar(&opt.Quick, "quick", false, "smoke run: tiny counts and durations, under a minute, figures meaningless")
	fs.IntVar(&opt.Runs, "runs", 0, "runs per variant, medians reported (default 3, 1 with -quick)")
	fs.StringVar(&opt.Scenarios, "scenarios", defaultScenarios, "scenarios to run: a idle (relayed, rooms, relayed over TLS), b latency, c throughput, d fan-out (needs redis-server), e handshakes, h fan-out with history off and on (needs redis-server), m throughput with metrics on and off, k capacity: the model's inputs on one gateway and a check on three (needs redis-server), p peers: wsgate beside Centrifugo and Nchan (each skipped, saying so, when not installed), r refusals with every upstream down, z compression (relay, fan-out, idle)")
	fs.StringVar(&opt.Centrifugo, "centrifugo", "", "the centrifugo `binary` for scenario p (default: centrifugo on PATH, else ~/go/bin/centrifugo)")
	fs.StringVar(&opt.Nginx, "nginx", "/usr/sbin/nginx", "the nginx `binary` for scenario p's Nchan (with Debian's libnginx-mod-nchan)")
	fs.StringVar(&opt.GatewayCPUs, "gateway-cpus", "", "pin every Caddy to these `cpus` with taskset -c (e.g. 0; run wsbench itself under taskset -c 1)")
	fs.StringVar(&opt.Baseline, "baseline", "", "another cmd/caddy `binary` (a build without wsgate's metrics) that scenario m measures too")
	fs.StringVar(&opt.Profile, "profile", "", "`directory` for gateway CPU profiles from extra, unmeasured throughput and handshake runs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	opt.CmdLine = commandLine(name, args)
	res, err := Run(ctx, opt)
	if res != nil {
		fmt.Fprint(stdout, res.Markdown)
	}
	return err
}

// commandLine renders the invocation so that it can be pasted back.
func commandLine(name string, args []string) string {
	parts := []string{name}
	for _, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\"'$\\") {
			a = strconv.Quote(a)
		}
		parts = append(parts, a)
	}
	return strings.Join(parts, " ")
}

// Result is what a run produced.
type Result struct {
	Markdown string // what was written to Options.Out
	Path     string
}

// env is the state of one harness run.
type env struct {
	opt Options
	p   params
	dir string
	up  *upstream

	procs  []*caddyProc // every Caddy started, for the final cleanup
	caddyN int
	redis  *redisProc // while scenario d runs

	peers    []*peerServer     // scenario p's Centrifugo and nginx processes, for the final cleanup
	peerBins map[string]string // scenario p's peer binaries found

	downPorts []int // scenario r's upstreams: ports where nothing listens

	pemPath    string // ES256 public key for the wsgate route
	upCAPath   string // the TLS upstream's self-signed certificate, for wsgate's ca_file
	hmacSecret string // HS256 secret for the other wsgate route
	tokES      []string
	tokHS      []string
	tokBad     []string // ES256, signed by a key the gateway does not know

	start time.Time
}

// tokenPool is how many distinct tokens of each kind clients take turns
// with: enough that a gateway-side cache of verified tokens would show.
const tokenPool = 256

// Run runs the benchmark and writes the results file. When a scenario
// fails, the results gathered so far are still written (the failed
// scenario says why) and the error is returned as well; when ctx ends
// first, nothing is written.
func Run(ctx context.Context, opt Options) (*Result, error) {
	if opt.Caddy == "" {
		opt.Caddy = "./caddy"
	}
	if opt.Out == "" {
		opt.Out = "bench/RESULTS.md"
	}
	if opt.Scenarios == "" {
		opt.Scenarios = defaultScenarios
	}
	if opt.Log == nil {
		opt.Log = io.Discard
	}
	scen, err := parseScenarios(opt.Scenarios)
	if err != nil {
		return nil, err
	}
	p := fullParams()
	if opt.Quick {
		p = quickParams()
	}
	if opt.Runs > 0 {
		p.runs = opt.Runs
	}
	if st, err := os.Stat(opt.Caddy); err != nil || st.IsDir() {
		return nil, fmt.Errorf("no caddy binary at %s (build one with `go build -o caddy ./cmd/caddy`)", opt.Caddy)
	}
	if opt.Caddy, err = filepath.Abs(opt.Caddy); err != nil {
		return nil, err
	}
	if opt.Baseline != "" {
		if st, err := os.Stat(opt.Baseline); err != nil || st.IsDir() {
			return nil, fmt.Errorf("no baseline caddy binary at %s", opt.Baseline)
		}
		if opt.Baseline, err = filepath.Abs(opt.Baseline); err != nil {
			return nil, err
		}
	}
	nofile, err := raiseNoFile()
	if err != nil {
		return nil, err
	}
	// Idle connections hold a client and an upstream socket each in this
	// process.
	if need := uint64(2*p.idleConns + 1000); scen['a'] && nofile < need {
		return nil, fmt.Errorf("open-file limit %d is below the %d that %d idle connections need here", nofile, need, p.idleConns)
	}
	// Fan-out subscribers hold a socket each here, and one in a gateway.
	if need := uint64(p.fanSubs + 1000); (scen['d'] || scen['h']) && nofile < need {
		return nil, fmt.Errorf("open-file limit %d is below the %d that %d fan-out subscribers need here", nofile, need, p.fanSubs)
	}
	// Scenario z: two rooms of fan-out subscribers, and idle connections.
	if need := uint64(max(2*p.fanSubs, 2*p.idleConns) + 1000); scen['z'] && nofile < need {
		return nil, fmt.Errorf("open-file limit %d is below the %d that scenario z needs here", nofile, need)
	}
	if opt.GatewayCPUs != "" {
		if _, err := exec.LookPath("taskset"); err != nil {
			return nil, errors.New("-gateway-cpus needs taskset (util-linux) on PATH")
		}
	}
	// Scenario k's second stage holds twice its first stage's subscribers.
	if need := uint64(2*p.capConns + 1000); scen['k'] && nofile < need {
		return nil, fmt.Errorf("open-file limit %d is below the %d that scenario k needs here", nofile, need)
	}
	// Scenario p holds its idle connections in this process.
	if need := uint64(p.peerIdleConns + 1000); scen['p'] && nofile < need {
		return nil, fmt.Errorf("open-file limit %d is below the %d that scenario p needs here", nofile, need)
	}
	if scen['d'] || scen['h'] || scen['k'] {
		// Fail before anything runs rather than after the other scenarios.
		if _, err := exec.LookPath("redis-server"); err != nil {
			return nil, errNoRedis
		}
	}

	e := &env{opt: opt, p: p, start: time.Now()}
	defer e.close()
	if err := e.setup(); err != nil {
		return nil, err
	}
	rep := &report{opt: opt, p: p, scen: scen, machine: machineInfo(opt.Caddy), started: e.start}
	var errs []error
	fail := func(s byte, err error) {
		err = fmt.Errorf("scenario %c: %w", s, err)
		e.logf("%v", err)
		errs = append(errs, err)
	}

	if scen['a'] {
		e.logf("a. idle: %d connections held %v, %d run(s) per variant", p.idleConns, p.idleHold, p.runs)
		rep.idle, rep.idleErr = e.runIdle(ctx)
		if rep.idleErr != nil {
			fail('a', rep.idleErr)
		}
	}
	var shared *caddyProc
	if (scen['b'] || scen['c'] || scen['e'] || scen['m']) && ctx.Err() == nil {
		// One Caddy for the remaining scenarios: they measure rates and
		// deltas, which a long-lived process does not skew.
		if shared, err = e.startCaddy(ctx); err != nil {
			for _, s := range []byte("bcem") {
				if scen[s] {
					fail(s, err)
				}
			}
		}
	}
	if shared != nil {
		if scen['b'] {
			e.logf("b. echo latency")
			rep.lat, rep.latErr = e.runLatency(ctx, shared)
			if rep.latErr != nil {
				fail('b', rep.latErr)
			}
		}
		if scen['c'] {
			e.logf("c. throughput")
			rep.tput, rep.tputErr = e.runThroughput(ctx, shared)
			if rep.tputErr != nil {
				fail('c', rep.tputErr)
			}
		}
		if scen['m'] {
			e.logf("m. throughput with metrics on and off")
			rep.metrics, rep.metricsErr = e.runMetrics(ctx, shared)
			if rep.metricsErr != nil {
				fail('m', rep.metricsErr)
			}
		}
		if scen['e'] {
			e.logf("e. handshakes")
			rep.hs, rep.hsErr = e.runHandshakes(ctx, shared)
			if rep.hsErr != nil {
				fail('e', rep.hsErr)
			}
		}
		if opt.Profile != "" {
			rep.profiles, err = e.profile(ctx, shared, scen['c'] && rep.tputErr == nil, scen['e'] && rep.hsErr == nil)
			if err != nil {
				errs = append(errs, fmt.Errorf("profiling: %w", err))
			}
		}
		shared.stop()
	}
	if scen['d'] && ctx.Err() == nil {
		e.logf("d. fan-out: 2 gateways on one Redis, %d subscribers", p.fanSubs)
		rep.fan, rep.fanErr = e.runFanout(ctx)
		if rep.fanErr != nil {
			fail('d', rep.fanErr)
		}
		if rep.fan != nil {
			rep.profiles = append(rep.profiles, rep.fan.profiles...)
		}
	}
	if scen['h'] && ctx.Err() == nil {
		e.logf("h. fan-out with history off and on: 2 gateways on one Redis, %d subscribers in two rooms", p.fanSubs)
		rep.hist, rep.histErr = e.runFanoutHistory(ctx)
		if rep.histErr != nil {
			fail('h', rep.histErr)
		}
	}
	if scen['z'] && ctx.Err() == nil {
		e.logf("z. compression: relay, fan-out to %d subscribers per room, idle", p.fanSubs)
		rep.z, rep.zErr = e.runCompression(ctx)
		if rep.zErr != nil {
			fail('z', rep.zErr)
		}
	}
	if scen['r'] && ctx.Err() == nil {
		e.logf("r. refusals with every upstream down: %d upgrade attempts/s for %v, %d round(s)", p.refuseRate, p.refuseDur, p.runs)
		rep.refuse, rep.refuseErr = e.runRefuse(ctx)
		if rep.refuseErr != nil {
			fail('r', rep.refuseErr)
		}
	}
	if scen['k'] && ctx.Err() == nil {
		e.logf("k. capacity: %d subscribers on one gateway, then %d on %d gateways, one Redis", p.capConns, 2*p.capConns, capNodes)
		rep.cap, rep.capErr = e.runCapacity(ctx)
		if rep.capErr != nil {
			fail('k', rep.capErr)
		}
	}
	if scen['p'] && ctx.Err() == nil {
		e.logf("p. peers: wsgate beside Centrifugo and Nchan, %d round(s)", p.runs)
		rep.peers, rep.peersErr = e.runPeers(ctx)
		if rep.peersErr != nil {
			fail('p', rep.peersErr)
		} else if opt.Profile != "" {
			paths, err := e.peerProfiles(ctx)
			rep.profiles = append(rep.profiles, paths...)
			if err != nil {
				errs = append(errs, fmt.Errorf("profiling p: %w", err))
			}
		}
	}
	if err := ctx.Err(); err != nil {
		// An interrupted run keeps the results file it would overwrite.
		return nil, fmt.Errorf("interrupted, %s left as it was: %w", opt.Out, err)
	}
	rep.elapsed = time.Since(e.start)
	md := rep.markdown()
	if old, err := os.ReadFile(opt.Out); err == nil {
		md += keptSection(string(old))
	}
	res := &Result{Markdown: md, Path: opt.Out}
	if dir := filepath.Dir(opt.Out); dir != "" {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return res, err
		}
	}
	if err := os.WriteFile(opt.Out, []byte(md), 0o644); err != nil {
		return res, err
	}
	e.logf("wrote %s (%v)", opt.Out, rep.elapsed.Round(time.Second))
	return res, errors.Join(errs...)
}

// defaultScenarios is every scenario. Scenario p skips a peer server that
// is not installed, saying how to install it.
const defaultScenarios = "a,b,c,d,e,h,k,m,p,r,z"

func parseScenarios(s string) (map[byte]bool, error) {
	m := map[byte]bool{}
	for f := range strings.SplitSeq(s, ",") {
		f = strings.TrimSpace(strings.ToLower(f))
		if len(f) != 1 || (f[0] < 'a' || f[0] > 'e') && !strings.ContainsRune("hkmprz", rune(f[0])) {
			return nil, fmt.Errorf("unknown scenario %q (want letters a to e, h, k, m, p, r or z, comma-separated)", f)
		}
		m[f[0]] = true
	}
	return m, nil
}

// raiseNoFile lifts the open-file soft limit to the hard limit: thousands
// of client and upstream sockets live in this process.
func raiseNoFile() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, fmt.Errorf("reading the open-file limit: %w", err)
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
			return 0, fmt.Errorf("raising the open-file limit: %w", err)
		}
	}
	return lim.Cur, nil
}

func (e *env) setup() error {
	var err error
	if e.dir, err = os.MkdirTemp("", "wsbench-"); err != nil {
		return err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	stranger, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	e.pemPath = filepath.Join(e.dir, "es256.pem")
	if err := os.WriteFile(e.pemPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600); err != nil {
		return err
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	e.hmacSecret = hex.EncodeToString(secret)
	for i := range tokenPool {
		tok, err := mintES256(key, benchClaims(i))
		if err != nil {
			return err
		}
		bad, err := mintES256(stranger, benchClaims(i))
		if err != nil {
			return err
		}
		e.tokES = append(e.tokES, tok)
		e.tokBad = append(e.tokBad, bad)
		e.tokHS = append(e.tokHS, mintHS256([]byte(e.hmacSecret), benchClaims(i)))
	}
	e.upCAPath = filepath.Join(e.dir, "upstream.pem")
	cert, err := selfSigned(e.upCAPath)
	if err != nil {
		return fmt.Errorf("upstream certificate: %w", err)
	}
	e.up, err = startUpstream(cert)
	return err
}

// close stops everything the run started.
func (e *env) close() {
	for _, c := range e.procs {
		c.stop()
	}
	for _, s := range e.peers {
		s.stop()
	}
	if e.redis != nil {
		e.redis.stop()
	}
	if e.up != nil {
		e.up.close()
	}
	if e.dir != "" {
		os.RemoveAll(e.dir)
	}
}

func (e *env) logf(format string, args ...any) {
	fmt.Fprintf(e.opt.Log, "[%6.1fs] %s\n", time.Since(e.start).Seconds(), fmt.Sprintf(format, args...))
}

// order is the variants of run r: rotated each run, so that no variant
// always goes first (or always follows the heaviest one).
func order(vs []string, r int) []string {
	out := slices.Clone(vs)
	k := r % len(out)
	return append(out[k:], out[:k]...)
}

// Go micro-benchmarks (go test -bench) are recorded by hand in RESULTS.md
// between these markers; rewriting the file keeps them.
const (
	keepBegin = "<!-- micro-benchmarks: kept when wsbench rewrites this file -->"
	keepEnd   = "<!-- end of micro-benchmarks -->"
)

// keptSection returns the micro-benchmark section of an old RESULTS.md.
func keptSection(old string) string {
	i := strings.Index(old, keepBegin)
	j := strings.Index(old, keepEnd)
	if i < 0 || j < i {
		return ""
	}
	return "\n" + old[i:j+len(keepEnd)] + "\n"
}
