package bench

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Scenario r: refusals with every upstream down. A wsgate route has three
// upstreams, all of them ports where nothing listens; once its health
// checks have set every one aside, each upgrade is refused with 502 and
// Retry-After without a dial. The load generator sends refuseRate upgrade
// attempts a second on a fixed schedule (each on a connection of its own,
// whatever the answers do) and times each from its dial to the response's
// headers. The gateway's own answer time comes from Caddy's request
// histogram (caddy_http_request_duration_seconds, the `metrics` option
// on), read before and after each window: the time from the request
// entering the handler chain to the handler's return (it leaves out the
// accept, reading the request and writing the response to the socket).
// wsgate's own upgrade metrics are read too. Stock Caddy answering every
// request with `respond 502` (and a Retry-After header) is the reference.
// Each variant runs in a Caddy process of its own; with
// Options.GatewayCPUs the gateways and the load generator can be put on
// different cores, so that neither waits for the other's turn.

const (
	vRefuseActive  = "wsgate, active checks"
	vRefusePassive = "wsgate, passive checks"
	vRefuseStock   = "stock, respond 502"
)

var refuseVariants = []string{vRefuseActive, vRefusePassive, vRefuseStock}

// refuseLimit is the target: every refusal answered within it.
const refuseLimit = 5 * time.Millisecond

// refuseBucket is the bucket of Caddy's request histogram (its default
// buckets) that holds the answers within refuseLimit.
const refuseBucket = 0.005

// wsgate_handshake_duration_seconds buckets either side of refuseLimit.
const (
	hsBucketBelow = 0.003125
	hsBucketAbove = 0.0078125
)

type refuseSample struct {
	round   int
	loadavg string // at the start of the window
	sent    int
	status  map[int]int
	errs    int
	firstEr string
	// noRetryAfter counts 502s without a valid Retry-After (delta-seconds).
	noRetryAfter int
	// Of the 502s, from the dial to the response's headers.
	p50, p99, p999, max time.Duration
	clientWithin        int // 502s answered within refuseLimit
	lagP99, lagMax      time.Duration
	// Server side: changes across the window.
	caddy502, caddy502Within float64 // caddy_http_request_duration_seconds{code="502"}: count, le="0.005"
	caddyAll                 float64 // every code
	caddyMax                 float64 // the highest bucket bound with a 502 in it (+Inf as math.Inf)
	hs, hsBelow, hsAbove     float64 // wsgate_handshake_duration_seconds: count, le 3.125 ms, le 7.8125 ms
	upstreamRefusals         float64 // wsgate_upgrades_total{result="upstream"}
	cores                    float64 // the gateway's CPU time ÷ the window
}

type refuseResult struct {
	samples    map[string][]refuseSample
	downPorts  []int
	gatewayCPU map[string]string // Cpus_allowed_list of each variant's Caddy
	clientCPU  string            // of this process
	gomaxprocs int
}

func (e *env) runRefuse(ctx context.Context) (*refuseResult, error) {
	// Upstreams that are down: ports held by sockets that never listen.
	downPorts, release, err := reservePorts(3)
	if err != nil {
		return nil, err
	}
	defer release()
	e.downPorts = downPorts
	res := &refuseResult{samples: map[string][]refuseSample{}, downPorts: e.downPorts, gatewayCPU: map[string]string{},
		clientCPU: cpusAllowed("self"), gomaxprocs: runtime.GOMAXPROCS(0)}
	procs := map[string]*caddyProc{}
	for _, v := range refuseVariants {
		c, err := e.startCaddyKind(ctx, refuseKind(v))
		if err != nil {
			return res, fmt.Errorf("%s: %w", v, err)
		}
		defer c.stop()
		procs[v] = c
		res.gatewayCPU[v] = cpusAllowed(strconv.Itoa(c.pid()))
	}
	for r := range e.p.runs {
		for _, v := range order(refuseVariants, r) {
			s, err := e.refuseRound(ctx, procs[v], v != vRefuseStock)
			if err != nil {
				return res, fmt.Errorf("%s, round %d: %w", v, r+1, err)
			}
			s.round = r + 1
			e.logf("  r %-22s round %d: %d sent, %v, p50 %v p99 %v max %v; caddy 502s ≤ 5 ms %.0f of %.0f",
				v, r+1, s.sent, s.status, s.p50, s.p99, s.max, s.caddy502Within, s.caddy502)
			res.samples[v] = append(res.samples[v], s)
		}
	}
	return res, nil
}

func refuseKind(v string) caddyKind {
	switch v {
	case vRefuseActive:
		return refuseActiveCaddy
	case vRefusePassive:
		return refusePassiveCaddy
	}
	return refuseStockCaddy
}

// refuseCaddyfile is the configuration of one gateway of scenario r. The
// wsgate options are those of the integration test of the same case.
func (e *env) refuseCaddyfile(c *caddyProc) string {
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tpersist_config off\n\tauto_https off\n\tmetrics\n}\n\n", c.admin)
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n", c.refusePort)
	if c.kind == refuseStockCaddy {
		b.WriteString("\theader Retry-After 1\n\trespond 502\n}\n")
		return b.String()
	}
	urls := make([]string, len(e.downPorts))
	for i, p := range e.downPorts {
		urls[i] = fmt.Sprintf("ws://127.0.0.1:%d", p)
	}
	checks := "\t\tfail_duration 1s\n"
	if c.kind == refuseActiveCaddy {
		checks = "\t\thealth_uri /health\n\t\thealth_interval 1s\n" + checks
	}
	fmt.Fprintf(&b, "\twsgate {\n\t\tupstream %s\n%s\t\tallow_missing_origin\n\t}\n}\n", strings.Join(urls, " "), checks)
	return b.String()
}

// refuseRound is one measured window on c, after a warm-up at the same
// rate and, for wsgate, once every upstream is set aside.
func (e *env) refuseRound(ctx context.Context, c *caddyProc, wsgate bool) (refuseSample, error) {
	var s refuseSample
	addr := "127.0.0.1:" + strconv.Itoa(c.refusePort)
	if _, _, err := refuseLoad(ctx, addr, e.p.refuseRate, e.p.refuseWarm); err != nil {
		return s, err
	}
	if wsgate {
		if err := e.waitAllDown(ctx, c, addr); err != nil {
			return s, err
		}
	}
	before, err := c.scrape(ctx)
	if err != nil {
		return s, err
	}
	cpu0, err := procCPU(c.pid())
	if err != nil {
		return s, err
	}
	s.loadavg = loadAvg()
	t0 := time.Now()
	att, lags, err := refuseLoad(ctx, addr, e.p.refuseRate, e.p.refuseDur)
	if err != nil {
		return s, err
	}
	window := time.Since(t0)
	cpu1, err := procCPU(c.pid())
	if err != nil {
		return s, err
	}
	s.cores = (cpu1 - cpu0).Seconds() / window.Seconds()
	s.sent = len(att)
	s.status = map[int]int{}
	var lat []time.Duration
	for _, a := range att {
		if a.err != nil {
			if s.errs == 0 {
				s.firstEr = a.err.Error()
			}
			s.errs++
			continue
		}
		s.status[a.status]++
		if a.status != http.StatusBadGateway {
			continue
		}
		lat = append(lat, a.took)
		if !a.retryAfter {
			s.noRetryAfter++
		}
		if a.took <= refuseLimit {
			s.clientWithin++
		}
	}
	slices.Sort(lat)
	s.p50, s.p99, s.p999, s.max = percentile(lat, 0.5), percentile(lat, 0.99), percentile(lat, 0.999), percentile(lat, 1)
	slices.Sort(lags)
	s.lagP99, s.lagMax = percentile(lags, 0.99), percentile(lags, 1)

	// Every answer the client has was counted when its handler returned,
	// before the response left; wait (briefly) for the count all the same.
	answered := float64(s.sent - s.errs)
	var after scrape
	err = poll(ctx, 5*time.Second, "Caddy's request metrics to count every answer", func() (bool, error) {
		var err error
		after, err = c.scrape(ctx)
		if err != nil {
			return false, err
		}
		n, _ := after.histogram("caddy_http_request_duration_seconds", nil, 0)
		m, _ := before.histogram("caddy_http_request_duration_seconds", nil, 0)
		return n-m >= answered, nil
	})
	if err != nil {
		return s, err
	}
	is502 := map[string]string{"code": "502"}
	delta := func(name string, labels map[string]string, le float64) (n, within float64) {
		n1, w1 := after.histogram(name, labels, le)
		n0, w0 := before.histogram(name, labels, le)
		return n1 - n0, w1 - w0
	}
	s.caddy502, s.caddy502Within = delta("caddy_http_request_duration_seconds", is502, refuseBucket)
	s.caddyAll, _ = delta("caddy_http_request_duration_seconds", nil, 0)
	s.caddyMax = after.highestBucket("caddy_http_request_duration_seconds", before, is502)
	if wsgate {
		s.hs, s.hsBelow = delta("wsgate_handshake_duration_seconds", nil, hsBucketBelow)
		_, s.hsAbove = delta("wsgate_handshake_duration_seconds", nil, hsBucketAbove)
		s.upstreamRefusals = after.counter("wsgate_upgrades_total", map[string]string{"result": "upstream"}) -
			before.counter("wsgate_upgrades_total", map[string]string{"result": "upstream"})
	}
	// A window whose attempts mostly fail, or are not refusals, measures
	// something else.
	if s.errs*100 > s.sent {
		return s, fmt.Errorf("%d of %d attempts failed; the first: %s", s.errs, s.sent, s.firstEr)
	}
	if len(s.status) != 1 || s.status[http.StatusBadGateway] == 0 {
		return s, fmt.Errorf("want only 502s, got %v", s.status)
	}
	return s, nil
}

// waitAllDown waits until the gateway's admin API shows every upstream
// set aside, sending an attempt before each look (a passive check only
// learns from client connections).
func (e *env) waitAllDown(ctx context.Context, c *caddyProc, addr string) error {
	var last string
	err := poll(ctx, 15*time.Second, "every upstream to be set aside", func() (bool, error) {
		refuseAttempt(addr)
		b, err := c.get(ctx, "/wsgate/upstreams")
		if err != nil {
			return false, err
		}
		last = string(b)
		var body struct {
			Upstreams []struct {
				Healthy bool `json:"healthy"`
			} `json:"upstreams"`
		}
		if err := json.Unmarshal(b, &body); err != nil {
			return false, fmt.Errorf("admin /wsgate/upstreams: %w", err)
		}
		if len(body.Upstreams) != len(e.downPorts) {
			return false, nil
		}
		for _, u := range body.Upstreams {
			if u.Healthy {
				return false, nil
			}
		}
		return true, nil
	})
	if err != nil {
		return fmt.Errorf("%w (last: %s)", err, last)
	}
	return nil
}

type refuseAnswer struct {
	status     int
	retryAfter bool // a valid Retry-After (delta-seconds)
	took       time.Duration
	err        error
}

// refuseLoad sends rate upgrade attempts a second for d on a fixed
// schedule, each on a goroutine and a connection of its own, and returns
// every answer and how late each attempt started.
func refuseLoad(ctx context.Context, addr string, rate int, d time.Duration) ([]refuseAnswer, []time.Duration, error) {
	n := int(float64(rate) * d.Seconds())
	period := time.Second / time.Duration(rate)
	out := make([]refuseAnswer, n)
	lags := make([]time.Duration, 0, n)
	var wg sync.WaitGroup
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	t0 := time.Now()
	for i := range n {
		due := t0.Add(time.Duration(i) * period)
		if wait := time.Until(due); wait > 0 {
			t.Reset(wait)
			select {
			case <-ctx.Done():
				wg.Wait()
				return nil, nil, ctx.Err()
			case <-t.C:
			}
		}
		lags = append(lags, time.Since(due))
		wg.Go(func() { out[i] = refuseAttempt(addr) })
	}
	wg.Wait()
	return out, lags, ctx.Err()
}

// refuseAttempt is one upgrade request on a new connection, timed from
// the dial to the response's headers. The connection is closed with a
// reset (lingerDial): no TIME_WAIT, so the ports last the whole run.
func refuseAttempt(addr string) (a refuseAnswer) {
	t0 := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	conn, err := lingerDial(ctx, "tcp", addr)
	if err != nil {
		a.err = err
		return a
	}
	defer conn.Close()
	conn.SetDeadline(t0.Add(5 * time.Second))
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: "+addr+"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"+
		"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"); err != nil {
		a.err = err
		return a
	}
	resp, err := http.ReadResponse(bufio.NewReaderSize(conn, 1024), nil)
	if err != nil {
		a.err = err
		return a
	}
	a.took = time.Since(t0)
	a.status = resp.StatusCode
	if n, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && n >= 0 {
		a.retryAfter = true
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		io.Copy(io.Discard, resp.Body)
	}
	return a
}

// scrape is one read of a Caddy's /metrics.
type scrape map[string]*dto.MetricFamily

func (c *caddyProc) scrape(ctx context.Context) (scrape, error) {
	b, err := c.get(ctx, "/metrics")
	if err != nil {
		return nil, err
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("parsing /metrics: %w", err)
	}
	return fams, nil
}

// series are the metrics of family name whose labels include every pair
// of want.
func (s scrape) series(name string, want map[string]string) []*dto.Metric {
	f := s[name]
	if f == nil {
		return nil
	}
	var out []*dto.Metric
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for k, v := range want {
			if have[k] != v {
				continue next
			}
		}
		out = append(out, m)
	}
	return out
}

// histogram sums the sample counts of the matching series of a histogram,
// and their cumulative counts in the bucket whose upper bound is le.
func (s scrape) histogram(name string, want map[string]string, le float64) (n, within float64) {
	for _, m := range s.series(name, want) {
		h := m.GetHistogram()
		n += float64(h.GetSampleCount())
		for _, b := range h.Bucket {
			if math.Abs(b.GetUpperBound()-le) < 1e-12 {
				within += float64(b.GetCumulativeCount())
			}
		}
	}
	return n, within
}

// highestBucket is the upper bound of the lowest bucket that holds every
// observation made between before and s (+Inf when some are beyond the
// last bound, 0 when there are none).
func (s scrape) highestBucket(name string, before scrape, want map[string]string) float64 {
	total, _ := s.histogram(name, want, 0)
	t0, _ := before.histogram(name, want, 0)
	if total-t0 == 0 {
		return 0
	}
	var bounds []float64
	for _, m := range s.series(name, want) {
		for _, b := range m.GetHistogram().Bucket {
			bounds = append(bounds, b.GetUpperBound())
		}
		break
	}
	slices.Sort(bounds)
	for _, le := range bounds {
		_, w1 := s.histogram(name, want, le)
		_, w0 := before.histogram(name, want, le)
		if w1-w0 >= total-t0 {
			return le
		}
	}
	return math.Inf(1)
}

// counter sums the matching series of a counter.
func (s scrape) counter(name string, want map[string]string) float64 {
	var n float64
	for _, m := range s.series(name, want) {
		n += m.GetCounter().GetValue()
	}
	return n
}

// cpusAllowed is Cpus_allowed_list of a process ("self" for this one).
func cpusAllowed(pid string) string {
	b, err := os.ReadFile("/proc/" + pid + "/status")
	if err != nil {
		return "unknown"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == "Cpus_allowed_list" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	if f := strings.Fields(string(b)); len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

// ---- report ----

// gatewayCores says where the gateways ran.
func gatewayCores(cpus string) string {
	if cpus == "" {
		return "not pinned (`-gateway-cpus` not given)"
	}
	return fmt.Sprintf("pinned with `taskset -c %s` (`-gateway-cpus %s`)", cpus, cpus)
}

// refuseTotals sums a variant's rounds.
type refuseTotals struct {
	rounds                       int
	sent, refused, errs, other   int
	noRetryAfter, clientWithin   int
	caddy502, caddyWithin        float64
	p99s, maxes                  []float64
	worstBucket                  float64
	hs, hsBelow, upstreamRefused float64
}

func (r *report) refuseTotals(v string) (refuseTotals, bool) {
	var t refuseTotals
	if r.refuse == nil || len(r.refuse.samples[v]) == 0 {
		return t, false
	}
	for _, s := range r.refuse.samples[v] {
		t.rounds++
		t.sent += s.sent
		t.errs += s.errs
		for code, n := range s.status {
			if code == http.StatusBadGateway {
				t.refused += n
			} else {
				t.other += n
			}
		}
		t.noRetryAfter += s.noRetryAfter
		t.clientWithin += s.clientWithin
		t.caddy502 += s.caddy502
		t.caddyWithin += s.caddy502Within
		t.p99s = append(t.p99s, float64(s.p99))
		t.maxes = append(t.maxes, float64(s.max))
		t.worstBucket = max(t.worstBucket, s.caddyMax)
		t.hs += s.hs
		t.hsBelow += s.hsBelow
		t.upstreamRefused += s.upstreamRefusals
	}
	return t, true
}

// allWithin says whether every one of a variant's 502s was answered
// within refuseLimit, by the server's histogram and by the client's clock.
func (t refuseTotals) allWithin() (server, client bool) {
	clean := t.errs == 0 && t.other == 0 && t.noRetryAfter == 0 && t.refused > 0
	return clean && t.caddy502 > 0 && t.caddyWithin == t.caddy502, clean && t.clientWithin == t.refused
}

func ofStr(n, total float64) string {
	return fmt.Sprintf("%s of %s", count(n), count(total))
}

func (r *report) refuseTargets(row func(s, target, measured, met, stretch, smet string)) {
	const target = "every 502 within 5 ms, each with Retry-After"
	nameS := fmt.Sprintf("r. refusals with every upstream down, %d upgrade attempts/s: answered within 5 ms by the gateway (Caddy's request histogram)", r.p.refuseRate)
	nameC := "r. the same, as the client sees it"
	if r.opt.GatewayCPUs != "" {
		nameC += " (gateway and load generator on separate cores)"
	} else {
		nameC += " (gateway and load generator sharing the cores)"
	}
	a, okA := r.refuseTotals(vRefuseActive)
	p, okP := r.refuseTotals(vRefusePassive)
	st, okS := r.refuseTotals(vRefuseStock)
	if !okA || !okP {
		row(nameS, target, r.missing('r', r.refuseErr), "—", "", "")
		row(nameC, target, r.missing('r', r.refuseErr), "—", "", "")
		return
	}
	sa, ca := a.allWithin()
	sp, cp := p.allWithin()
	retry := "Retry-After on every one"
	if a.noRetryAfter+p.noRetryAfter > 0 {
		retry = fmt.Sprintf("%d without Retry-After", a.noRetryAfter+p.noRetryAfter)
	}
	meas := fmt.Sprintf("active checks %s, passive %s", ofStr(a.caddyWithin, a.caddy502), ofStr(p.caddyWithin, p.caddy502))
	if okS {
		meas += fmt.Sprintf(" (stock respond 502: %s)", ofStr(st.caddyWithin, st.caddy502))
	}
	row(nameS, target, fmt.Sprintf("%s; %s, %d round(s)", meas, retry, a.rounds), metStr(sa && sp), "", "")
	client := func(t refuseTotals) string {
		return fmt.Sprintf("%s within 5 ms, p99 %s (median of rounds), max %s", ofStr(float64(t.clientWithin), float64(t.refused)),
			micros(median(t.p99s, ident)), micros(slices.Max(t.maxes)))
	}
	meas = fmt.Sprintf("active %s; passive %s", client(a), client(p))
	if okS {
		meas += fmt.Sprintf("; stock respond 502: max %s", micros(slices.Max(st.maxes)))
	}
	row(nameC, target, meas, metStr(ca && cp), "", "")
}

func (r *report) refuseSection(w writer) {
	w("## r. Refusals with every upstream down\n\n")
	if !r.section(w, 'r', r.refuseErr) {
		return
	}
	res := r.refuse
	ports := make([]string, len(res.downPorts))
	for i, p := range res.downPorts {
		ports[i] = "ws://127.0.0.1:" + strconv.Itoa(p)
	}
	w("Three Caddy processes, each with Caddy's `metrics` option and one site: **%s** (`wsgate { upstream %s;\n", vRefuseActive, strings.Join(ports, " "))
	w("health_uri /health; health_interval 1s; fail_duration 1s; allow_missing_origin }`), **%s** (the same\n", vRefusePassive)
	w("with `fail_duration 1s` and no active check), whose three upstreams are ports where nothing listens, and\n")
	w("**%s** (`header Retry-After 1` and `respond 502`: Caddy's own handlers, the same binary). Before\n", vRefuseStock)
	w("each window: %v of the same load, not counted, and for wsgate the admin API's `/wsgate/upstreams`\n", r.p.refuseWarm)
	w("showing every upstream set aside. Then %d upgrade attempts/s for %v on a fixed schedule (each on a\n", r.p.refuseRate, r.p.refuseDur)
	w("goroutine and a new connection of its own, closed with a reset), timed from the dial to the response's\n")
	w("headers; the variants take turns, their order rotated every round. **Client side**: percentiles of the\n")
	w("502s, and how many took at most 5 ms. **Server side**: the change across the window of Caddy's\n")
	w("`caddy_http_request_duration_seconds{code=\"502\"}`, its `le=\"0.005\"` bucket against its count: the 502s\n")
	w("that the handler chain answered within 5 ms, timed from the request entering Caddy's handlers to their\n")
	w("return (the accept, reading the request and writing the response to the socket are outside it); \"slowest\n")
	w("bucket\" is the upper bound of the lowest bucket that holds them all. wsgate's own\n")
	w("`wsgate_handshake_duration_seconds` (its buckets either side of 5 ms are 3.125 and 7.8125 ms) and\n")
	w("`wsgate_upgrades_total{result=\"upstream\"}` are read the same way. Generator lag is how late the load\n")
	w("generator started an attempt against its schedule.\n\n")
	var gw []string
	for _, v := range refuseVariants {
		gw = append(gw, fmt.Sprintf("%s %s", v, res.gatewayCPU[v]))
	}
	w("Cores (`Cpus_allowed_list`): load generator (wsbench) %s, GOMAXPROCS %d; gateways: %s.", res.clientCPU, res.gomaxprocs, strings.Join(gw, ", "))
	if r.opt.GatewayCPUs == "" {
		w(" **Not pinned**: the gateways and the load generator share the machine's cores, so a client-side\n")
		w("time includes waits for the load generator's own turn on a core.")
	}
	w("\n\n")
	w("| round | variant | load average | sent | 502 | without Retry-After | p50 | p99 | p99.9 | max | ≤ 5 ms, client | ≤ 5 ms, Caddy's histogram | slowest bucket | wsgate handshake ≤ 3.125 ms | wsgate `upstream` refusals | gateway cores | generator lag p99 / max |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for round := 1; round <= r.p.runs; round++ {
		for _, v := range order(refuseVariants, round-1) {
			for _, s := range res.samples[v] {
				if s.round != round {
					continue
				}
				refused := s.status[http.StatusBadGateway]
				other := s.sent - refused
				r502 := count(float64(refused))
				if other > 0 {
					r502 += fmt.Sprintf(" (%d other answers or errors)", other)
				}
				hs, up := "—", "—"
				if v != vRefuseStock {
					hs, up = ofStr(s.hsBelow, s.hs), count(s.upstreamRefusals)
				}
				w("| %d | %s | %s | %s | %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.2f | %s / %s |\n",
					round, v, s.loadavg, count(float64(s.sent)), r502, s.noRetryAfter,
					micros(float64(s.p50)), micros(float64(s.p99)), micros(float64(s.p999)), micros(float64(s.max)),
					ofStr(float64(s.clientWithin), float64(refused)), ofStr(s.caddy502Within, s.caddy502), bucketStr(s.caddyMax),
					hs, up, s.cores, micros(float64(s.lagP99)), micros(float64(s.lagMax)))
			}
		}
	}
	w("\n| variant | 502s | within 5 ms, server side (Caddy) | within 5 ms, client side | client p99, median of rounds | client max, worst round | every 502 within 5 ms: server side / client side |\n")
	w("|---|---|---|---|---|---|---|\n")
	for _, v := range refuseVariants {
		t, ok := r.refuseTotals(v)
		if !ok {
			continue
		}
		sv, cl := t.allWithin()
		yes := func(b bool) string {
			if b {
				return "yes"
			}
			return "**no**"
		}
		w("| %s | %s | %s | %s | %s | %s | %s / %s |\n", v, count(float64(t.refused)), ofStr(t.caddyWithin, t.caddy502),
			ofStr(float64(t.clientWithin), float64(t.refused)), micros(median(t.p99s, ident)), micros(slices.Max(t.maxes)), yes(sv), yes(cl))
	}
	w("\n")
}

func bucketStr(le float64) string {
	switch {
	case le == 0:
		return "—"
	case math.IsInf(le, 1):
		return "over 10 s"
	}
	return "≤ " + micros(le*1e9)
}

func (r *report) refuseAppendix(w writer, list func([]float64, func(float64) string) string) {
	if r.refuse == nil {
		return
	}
	for _, v := range refuseVariants {
		ss := r.refuse.samples[v]
		w("| r. client p99, every round | %s | %s |\n", v, list(pluck(ss, func(s refuseSample) float64 { return float64(s.p99) }), micros))
		w("| r. client max, every round | %s | %s |\n", v, list(pluck(ss, func(s refuseSample) float64 { return float64(s.max) }), micros))
		var within []string
		for _, s := range ss {
			within = append(within, ofStr(s.caddy502Within, s.caddy502))
		}
		w("| r. 502s within 5 ms by Caddy's histogram, every round | %s | %s |\n", v, strings.Join(within, ", "))
	}
}
