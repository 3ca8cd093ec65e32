package bench

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// fanRoom is the one room of scenario d, and scenario h's room without
// history.
const fanRoom = "bench:fanout"

// fanHistRoom is scenario h's room with history: its gateways keep the
// history of the channels that match fanHistPattern, with these settings.
const (
	fanHistRoom    = "bench:history:fanout"
	fanHistPattern = "bench:history:**"
	fanHistSize    = 100
	fanHistTTL     = "10m"
)

// fanP99Limit is the delivery p99 the step-up looks for.
const fanP99Limit = 50 * time.Millisecond

// fanPhase is one publishing phase of scenario d: the baseline, or one
// step of the step-up.
type fanPhase struct {
	rate  float64       // publishes per second asked for
	hist  bool          // published on fanHistRoom (history on), not fanRoom
	dur   time.Duration // of the publishing schedule
	subs  int           // subscribers at the start
	sched int64         // publishes scheduled

	sent     int64   // publishes acknowledged (HTTP 200 accepted:1, or wsgate.v1 ok)
	pubErrs  int64   // publishes refused or failed
	achieved float64 // publishes per second actually sent
	lag      time.Duration

	expected  int64 // sent × subscribers
	delivered int64 // distinct deliveries
	lost      int64 // expected − delivered, after the drain
	dups      int64 // deliveries of a message a subscriber already had
	closed    int   // subscribers that lost their connection during the phase
	firstErr  string

	p50, p99, p999, max time.Duration
	bySrc               [2][2]time.Duration // p50 and p99 of the HTTP (A) and the wsgate.v1 (B) publications
	perSec              float64             // deliveries per second (delivered ÷ the sending window)

	publishes int64            // Redis PUBLISH calls during the phase (INFO commandstats)
	calls     map[string]int64 // every Redis command during the phase but INFO, by name

	cpuA, cpuB, cpuRedis, cpuGen float64 // cores used during the sending window

	runsP99 []time.Duration // p99 of every run of the phase (this one is the median)
}

// fanResult is what scenario d measured.
type fanResult struct {
	subs     int
	perGW    [2]int
	payload  int // bytes of a delivered message (the wsgate.v1 "message" JSON)
	baseline *fanPhase
	steps    []*fanPhase
	stop     string   // why the step-up ended
	logLines []string // warnings and errors from the gateways' logs
	logCount int
	profiles []string
}

// fanSub is one subscriber connection and what it received.
type fanSub struct {
	subscriber
	gw int

	seen []uint64             // bitset of global sequence numbers received
	got  []int64              // distinct deliveries, by phase
	dup  []int64              // duplicates, by phase
	lat  [][2][]time.Duration // by phase and publisher (HTTP on A, wsgate.v1 on B); taken by the phase's summary
}

// fanState is the running scenario d.
type fanState struct {
	e      *env
	gws    [2]*caddyProc
	redis  *redisProc
	base   time.Time
	hist   bool // scenario h: history on for fanHistRoom, every subscriber in both rooms
	subs   []*fanSub
	nextSq int64
	phases []*fanPhase
	// delivered counts distinct deliveries by phase, for the drain.
	delivered []atomic.Int64
	closing   atomic.Bool

	httpc *http.Client
	pub   *client // wsgate.v1 publisher on gateway B
	pmu   sync.Mutex
	acks  atomic.Int64 // ok replies to the publisher
	nacks atomic.Int64 // error replies
	pubRd chan struct{}
	pErr  atomic.Pointer[error] // the publisher's connection failed
	nack1 atomic.Pointer[string]
}

// maxPhases bounds the phases of one scenario d or h run: warm-ups,
// the baseline's and every step's runs (of each variant), the profiling
// step.
func (p params) maxFanPhases() int {
	return 4 + 2*max(1, p.runs)*(1+len(p.fanSteps))
}

// startFanout starts a Redis and the two gateways of kind for a fan-out
// scenario (tag names it in the log). stop closes the subscribers, stops
// the gateways and Redis, and returns the warnings and errors of the
// gateways' logs.
func (e *env) startFanout(ctx context.Context, kind caddyKind, hist bool, tag string) (fs *fanState, stop func() ([]string, int), err error) {
	rp, err := e.startRedis(ctx)
	if err != nil {
		return nil, nil, err
	}
	e.redis = rp
	fs = &fanState{e: e, redis: rp, hist: hist, base: time.Now(), delivered: make([]atomic.Int64, e.p.maxFanPhases())}
	stopAll := func() {
		for _, c := range fs.gws {
			if c != nil {
				c.stop()
			}
		}
		rp.stop()
		e.redis = nil
	}
	for i := range fs.gws {
		c, err := e.startCaddyKind(ctx, kind)
		if err != nil {
			stopAll()
			return nil, nil, err
		}
		fs.gws[i] = c
	}
	return fs, func() ([]string, int) {
		fs.close()
		lines, count := gatewayLogIssues(fs.gws[:])
		for _, l := range lines {
			e.logf("  %s gateway log: %s", tag, l)
		}
		stopAll()
		return lines, count
	}, nil
}

func (e *env) runFanout(ctx context.Context) (res *fanResult, err error) {
	res = &fanResult{subs: e.p.fanSubs}
	fs, stop, err := e.startFanout(ctx, fanoutCaddy, false, "d")
	if err != nil {
		return nil, err
	}
	defer func() { res.logLines, res.logCount = stop() }()
	if err := fs.connect(ctx); err != nil {
		return res, err
	}
	res.perGW = [2]int{(len(fs.subs) + 1) / 2, len(fs.subs) / 2}
	res.payload = len(fanMessage(fanRoom, 0, 0, 0, 0))

	e.logf("  d %d subscribers (%d on each gateway) on %s; baseline %.0f publishes/s for %v", len(fs.subs), len(fs.subs)/2, fanRoom, e.p.fanRate, e.p.fanDur)
	// Warm-up, not reported: the first publications pay for what the
	// gateways and Redis build lazily.
	warm, err := fs.phase(ctx, e.p.fanRate, e.p.fanWarm, false)
	if err != nil {
		return res, fmt.Errorf("warm-up: %w", err)
	}
	e.logf("  d warm-up: %s", warm)
	if bad := warm.problem(); bad != "" {
		return res, fmt.Errorf("warm-up: the phase %s", bad)
	}
	res.baseline, err = fs.medianPhase(ctx, e.p.fanRate, e.p.fanDur)
	if err != nil {
		return res, fmt.Errorf("baseline: %w", err)
	}
	e.logf("  d baseline: %s", res.baseline)
	if bad := res.baseline.problem(); bad != "" {
		res.stop = "not stepped up: the baseline " + bad
		return res, nil
	}

	if len(e.p.fanSteps) > 0 {
		res.stop = fmt.Sprintf("the last step (%s publishes/s) kept p99 under %v", count(e.p.fanSteps[len(e.p.fanSteps)-1]), fanP99Limit)
	}
	for _, rate := range e.p.fanSteps {
		ph, err := fs.medianPhase(ctx, rate, e.p.fanStepDur)
		if err != nil {
			return res, fmt.Errorf("step %.0f/s: %w", rate, err)
		}
		res.steps = append(res.steps, ph)
		e.logf("  d step: %s", ph)
		if ph.p99 >= fanP99Limit {
			res.stop = fmt.Sprintf("p99 reached %v at %s deliveries/s", fanP99Limit, count(ph.perSec))
			break
		}
		if bad := ph.problem(); bad != "" {
			res.stop = "stopped: at " + count(ph.perSec) + " deliveries/s the step " + bad
			break
		}
	}
	if e.opt.Profile != "" {
		last := res.baseline
		if len(res.steps) > 0 {
			last = res.steps[len(res.steps)-1]
		}
		res.profiles, err = fs.profile(ctx, last.rate)
		if err != nil {
			return res, fmt.Errorf("profiling: %w", err)
		}
	}
	return res, nil
}

// medianPhase runs a phase once per run (Options.Runs) and returns the
// run with the median p99, with every run's p99 in runsP99. A run with a
// problem (loss, a closed subscriber, falling behind) is returned at once.
func (fs *fanState) medianPhase(ctx context.Context, rate float64, dur time.Duration) (*fanPhase, error) {
	var runs []*fanPhase
	for range max(1, fs.e.p.runs) {
		ph, err := fs.phase(ctx, rate, dur, false)
		if err != nil {
			return nil, err
		}
		if ph.problem() != "" {
			ph.runsP99 = []time.Duration{ph.p99}
			return ph, nil
		}
		runs = append(runs, ph)
	}
	slices.SortFunc(runs, func(a, b *fanPhase) int { return cmp.Compare(a.p99, b.p99) })
	med := runs[(len(runs)-1)/2]
	for _, ph := range runs {
		med.runsP99 = append(med.runsP99, ph.p99)
	}
	return med, nil
}

// problem says what makes a phase unfit to go on from, if anything.
func (ph *fanPhase) problem() string {
	switch {
	case ph.closed > 0:
		return fmt.Sprintf("lost %d subscriber connection(s) (%s)", ph.closed, ph.firstErr)
	case ph.lost > 0:
		return fmt.Sprintf("lost %s deliveries", count(float64(ph.lost)))
	case ph.pubErrs > 0:
		return fmt.Sprintf("had %d failed publishes (%s)", ph.pubErrs, ph.firstErr)
	case ph.achieved < 0.9*ph.rate:
		return fmt.Sprintf("fell behind: the load generator sent %.0f of the %.0f publishes/s asked", ph.achieved, ph.rate)
	}
	return ""
}

func (ph *fanPhase) String() string {
	hist := ""
	if ph.hist {
		hist = "history on: "
	}
	return fmt.Sprintf("%s%.0f/s asked, %.0f/s sent (%d), %.0f deliveries/s, p50 %v p99 %v p99.9 %v max %v (HTTP p50 %v p99 %v, wsgate.v1 p50 %v p99 %v), lost %d, dups %d, closed %d, Redis %s, publisher at most %v late, cores A %.2f B %.2f redis %.2f load generator %.2f",
		hist, ph.rate, ph.achieved, ph.sent, ph.perSec, ph.p50, ph.p99, ph.p999, ph.max, ph.bySrc[0][0], ph.bySrc[0][1], ph.bySrc[1][0], ph.bySrc[1][1],
		ph.lost, ph.dups, ph.closed, ph.callsPerMessage(), ph.lag.Round(time.Microsecond), ph.cpuA, ph.cpuB, ph.cpuRedis, ph.cpuGen)
}

// connect opens the subscribers, alternately on gateway A and B, each
// subscribed to fanRoom (and, for scenario h, to fanHistRoom), and the
// wsgate.v1 publisher on B.
func (fs *fanState) connect(ctx context.Context) error {
	n := fs.e.p.fanSubs
	fs.subs = make([]*fanSub, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				gw := i % 2
				cl, err := dialRooms(ctx, fs.roomsURL(gw), 4096)
				if err == nil {
					err = cl.subscribe(fanRoom)
					if err == nil && fs.hist {
						err = cl.subscribeWith(2, fanHistRoom, true)
					}
					if err != nil {
						cl.conn.Close()
					}
				}
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("subscriber %d: %w", i, err))
					mu.Unlock()
					next.Store(int64(n))
					return
				}
				nph := len(fs.delivered)
				s := &fanSub{subscriber: newSubscriber(cl), gw: gw, got: make([]int64, nph), dup: make([]int64, nph),
					lat: make([][2][]time.Duration, nph)}
				fs.subs[i] = s
				go fs.read(s)
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(append(errs, ctx.Err())...); err != nil {
		fs.subs = slices.DeleteFunc(fs.subs, func(s *fanSub) bool { return s == nil })
		return err
	}
	pub, err := dialRooms(ctx, fs.roomsURL(1), 64<<10)
	if err != nil {
		return fmt.Errorf("publisher: %w", err)
	}
	fs.pub = pub
	fs.pubRd = make(chan struct{})
	go fs.readReplies()
	fs.httpc = &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{
		MaxIdleConnsPerHost: fanHTTPWorkers, DisableCompression: true,
	}}
	return nil
}

func (fs *fanState) roomsURL(gw int) string {
	return fmt.Sprintf("ws://127.0.0.1:%d%s", fs.gws[gw].roomsPort, roomsPath)
}

// close ends every connection and waits for the readers.
func (fs *fanState) close() {
	fs.closing.Store(true)
	closeSubscribers(fs.subs)
	if fs.pub != nil {
		fs.pub.conn.Close()
		<-fs.pubRd
	}
	if fs.httpc != nil {
		fs.httpc.CloseIdleConnections()
	}
}

// fanMessage is a delivery as the subscribers get it: the data of one
// publication (see fanData) on channel, with its history offset when the
// channel keeps history (offset > 0).
func fanMessage(channel string, ph int, seq, ts int64, offset uint64) []byte {
	b := []byte(`{"op":"message","channel":"` + channel + `","data":` + string(fanData(ph, seq, ts)))
	if offset > 0 {
		b = append(b, `,"offset":`...)
		b = strconv.AppendUint(b, offset, 10)
	}
	return append(b, '}')
}

// fanData is the data of one publication: phase, global sequence number
// and send time (nanoseconds since the scenario's base), in a fixed order
// that the subscribers parse without a JSON decoder.
func fanData(ph int, seq, ts int64) []byte {
	b := make([]byte, 0, 64)
	b = append(b, `{"ph":`...)
	b = strconv.AppendInt(b, int64(ph), 10)
	b = append(b, `,"seq":`...)
	b = strconv.AppendInt(b, seq, 10)
	b = append(b, `,"ts":`...)
	b = strconv.AppendInt(b, ts, 10)
	return append(b, '}')
}

var (
	fanMsgPrefix     = []byte(`{"op":"message","channel":"` + fanRoom + `","data":{"ph":`)
	fanHistMsgPrefix = []byte(`{"op":"message","channel":"` + fanHistRoom + `","data":{"ph":`)
	fanSeqKey        = []byte(`,"seq":`)
	fanTSKey         = []byte(`,"ts":`)
	fanOffsetKey     = []byte(`},"offset":`)
)

// parseFan reads phase, sequence number and send time from a delivered
// message, and whether it came on fanHistRoom: then it must carry a
// history offset, and fanRoom's must not.
func parseFan(p []byte) (ph int, seq, ts int64, hist, ok bool) {
	rest, ok := bytes.CutPrefix(p, fanMsgPrefix)
	if !ok {
		if rest, ok = bytes.CutPrefix(p, fanHistMsgPrefix); !ok {
			return
		}
		hist = true
	}
	var v int64
	if v, rest, ok = leadingInt(rest); !ok {
		return
	}
	ph = int(v)
	if rest, ok = bytes.CutPrefix(rest, fanSeqKey); !ok {
		return
	}
	if seq, rest, ok = leadingInt(rest); !ok {
		return
	}
	if rest, ok = bytes.CutPrefix(rest, fanTSKey); !ok {
		return
	}
	if ts, rest, ok = leadingInt(rest); !ok {
		return
	}
	if hist {
		var off int64
		if rest, ok = bytes.CutPrefix(rest, fanOffsetKey); !ok {
			return
		}
		if off, rest, ok = leadingInt(rest); !ok {
			return
		}
		ok = off > 0 && string(rest) == "}"
	} else {
		ok = string(rest) == "}}"
	}
	ok = ok && seq >= 0
	return
}

func leadingInt(b []byte) (int64, []byte, bool) {
	var v int64
	i := 0
	for ; i < len(b) && i < 19 && b[i] >= '0' && b[i] <= '9'; i++ {
		v = v*10 + int64(b[i]-'0')
	}
	return v, b[i:], i > 0
}

// read is a subscriber's reader: it times each delivery against the send
// time it carries, and keeps count of what arrived.
func (fs *fanState) read(s *fanSub) {
	s.read(&fs.closing, 1024, fs.base, s.pong, func(p []byte, at time.Duration) error {
		ph, seq, ts, _, ok := parseFan(p)
		if !ok || ph >= len(s.got) {
			return fmt.Errorf("unexpected message %q", p)
		}
		s.mu.Lock()
		w := int(seq / 64)
		if w >= len(s.seen) {
			s.seen = append(s.seen, make([]uint64, max(w+1, 2*len(s.seen))-len(s.seen))...)
		}
		bit := uint64(1) << (seq % 64)
		if s.seen[w]&bit != 0 {
			s.dup[ph]++
		} else {
			s.seen[w] |= bit
			s.got[ph]++
			src := seq % 2 // even: HTTP on A; odd: wsgate.v1 on B
			s.lat[ph][src] = append(s.lat[ph][src], at-time.Duration(ts))
			fs.delivered[ph].Add(1)
		}
		s.mu.Unlock()
		return nil
	})
}

// readReplies reads the wsgate.v1 publisher's replies.
func (fs *fanState) readReplies() {
	defer close(fs.pubRd)
	buf := make([]byte, 4096)
	for {
		h, err := ws.ReadHeader(fs.pub.br)
		if err == nil && h.Length > int64(len(buf)) {
			err = fmt.Errorf("unexpected %d-byte frame", h.Length)
		}
		if err != nil {
			fs.pubFailed(err)
			return
		}
		p := buf[:h.Length]
		if _, err := io.ReadFull(fs.pub.br, p); err != nil {
			fs.pubFailed(err)
			return
		}
		switch {
		case h.OpCode == ws.OpClose:
			fs.pubFailed(closedBy(p))
			return
		case h.OpCode == ws.OpPing:
			fs.pmu.Lock()
			fs.pub.conn.Write(clientFrame(ws.OpPong, p))
			fs.pmu.Unlock()
			continue
		case h.OpCode.IsControl():
			continue
		}
		if bytes.HasSuffix(p, []byte(`"op":"ok"}`)) {
			fs.acks.Add(1)
		} else {
			fs.nacks.Add(1)
			m := string(p)
			fs.nack1.CompareAndSwap(nil, &m)
		}
	}
}

func (fs *fanState) pubFailed(err error) {
	if !fs.closing.Load() {
		fs.pErr.CompareAndSwap(nil, &err)
	}
}

// fanHTTPWorkers send the HTTP publishes, each on its own keep-alive
// connection, so that one slow request does not hold up the schedule.
const fanHTTPWorkers = 8

type fanJob struct {
	seq int64
	at  time.Time // scheduled
}

// phase publishes rate messages per second for dur, alternately with an
// HTTP POST on gateway A and a wsgate.v1 publish on gateway B, each
// carrying its send time, on fanRoom (or on fanHistRoom when hist is set);
// then waits for the deliveries and sums up.
func (fs *fanState) phase(ctx context.Context, rate float64, dur time.Duration, hist bool) (*fanPhase, error) {
	phIdx := len(fs.phases)
	if phIdx >= len(fs.delivered) {
		return nil, errors.New("too many phases")
	}
	room := fanRoom
	if hist {
		room = fanHistRoom
	}
	ph := &fanPhase{rate: rate, dur: dur, hist: hist}
	fs.phases = append(fs.phases, ph)
	closedBefore := fs.closedSubs()
	ph.subs = len(fs.subs) - closedBefore
	n := int64(math.Round(rate * dur.Seconds()))
	ph.sched = n
	period := time.Duration(float64(time.Second) / rate)

	calls0, err := fs.redis.commandCalls()
	if err != nil {
		return nil, err
	}
	cpu0, err := fs.cpu()
	if err != nil {
		return nil, err
	}
	acks0, nacks0 := fs.acks.Load(), fs.nacks.Load()

	httpJobs := make(chan fanJob, n)
	wsJobs := make(chan fanJob, n)
	var httpOK, httpErr atomic.Int64
	var firstErr atomic.Pointer[string]
	setErr := func(err error) {
		m := err.Error()
		firstErr.CompareAndSwap(nil, &m)
	}
	var lagMax atomic.Int64
	var lastSent atomic.Int64 // ns since base
	atLeast := func(a *atomic.Int64, v int64) {
		for {
			old := a.Load()
			if v <= old || a.CompareAndSwap(old, v) {
				return
			}
		}
	}
	noteSent := func(j fanJob, now time.Time) {
		atLeast(&lagMax, int64(now.Sub(j.at)))
		atLeast(&lastSent, int64(now.Sub(fs.base)))
	}
	var workers sync.WaitGroup
	for range fanHTTPWorkers {
		workers.Add(1)
		go func() {
			defer workers.Done()
			url := fmt.Sprintf("http://127.0.0.1:%d%s", fs.gws[0].roomsPort, pubPath)
			for j := range httpJobs {
				now := time.Now()
				noteSent(j, now)
				body := `{"channel":"` + room + `","data":` + string(fanData(phIdx, j.seq, int64(now.Sub(fs.base)))) + `}`
				if err := httpPublish(ctx, fs.httpc, url, body); err != nil {
					httpErr.Add(1)
					setErr(err)
					continue
				}
				httpOK.Add(1)
			}
		}()
	}
	var wsSent, wsWriteErr atomic.Int64
	workers.Add(1)
	go func() {
		defer workers.Done()
		id := int64(0)
		for j := range wsJobs {
			now := time.Now()
			noteSent(j, now)
			id++
			req := `{"id":` + strconv.FormatInt(id, 10) + `,"op":"publish","channel":"` + room + `","data":` +
				string(fanData(phIdx, j.seq, int64(now.Sub(fs.base)))) + `}`
			fs.pmu.Lock()
			err := fs.pub.write(ws.OpText, []byte(req))
			if err == nil && len(wsJobs) == 0 {
				err = fs.pub.bw.Flush()
			}
			fs.pmu.Unlock()
			if err != nil {
				wsWriteErr.Add(1)
				setErr(fmt.Errorf("wsgate.v1 publish: %w", err))
				continue
			}
			wsSent.Add(1)
		}
		fs.pmu.Lock()
		if err := fs.pub.bw.Flush(); err != nil {
			setErr(fmt.Errorf("wsgate.v1 publish: %w", err))
		}
		fs.pmu.Unlock()
	}()

	// The schedule: message k is due at start + k·period, whatever the
	// sends before it did (open loop).
	start := time.Now().Add(5 * time.Millisecond)
	tm := time.NewTimer(time.Hour)
	var schedErr error
	for k := range n {
		at := start.Add(time.Duration(k) * period)
		if d := time.Until(at); d > 0 {
			tm.Reset(d)
			select {
			case <-ctx.Done():
				schedErr = ctx.Err()
			case <-tm.C:
			}
		}
		if schedErr != nil {
			break
		}
		j := fanJob{seq: fs.nextSq, at: at}
		fs.nextSq++
		if k%2 == 0 {
			httpJobs <- j
		} else {
			wsJobs <- j
		}
	}
	tm.Stop()
	close(httpJobs)
	close(wsJobs)
	workers.Wait()
	end := time.Now()
	cpu1, err := fs.cpu()
	if err != nil {
		return nil, err
	}
	if schedErr != nil {
		return nil, schedErr
	}
	// The sending window is the schedule's length, n periods; a publisher
	// that ended more than a period behind it stretches it to what it took.
	window := time.Duration(n) * period
	if took := time.Duration(lastSent.Load()) - start.Sub(fs.base) + period; took > window+period {
		window = took
	}
	window = max(window, period)
	ph.achieved = float64(httpOK.Load()+httpErr.Load()+wsSent.Load()+wsWriteErr.Load()) / window.Seconds()
	ph.lag = time.Duration(lagMax.Load())
	secs := end.Sub(start).Seconds()
	ph.cpuA = (cpu1[0] - cpu0[0]).Seconds() / secs
	ph.cpuB = (cpu1[1] - cpu0[1]).Seconds() / secs
	ph.cpuRedis = (cpu1[2] - cpu0[2]).Seconds() / secs
	ph.cpuGen = (cpu1[3] - cpu0[3]).Seconds() / secs

	// Every wsgate.v1 publish gets a reply.
	wantReplies := wsSent.Load()
	if err := poll(ctx, 30*time.Second, "the publisher's replies", func() (bool, error) {
		if err := fs.pErr.Load(); err != nil {
			return false, fmt.Errorf("wsgate.v1 publisher: %w", *err)
		}
		return fs.acks.Load()-acks0+fs.nacks.Load()-nacks0 >= wantReplies, nil
	}); err != nil {
		return nil, err
	}
	wsOK := fs.acks.Load() - acks0
	wsNack := fs.nacks.Load() - nacks0
	if wsNack > 0 {
		if m := fs.nack1.Load(); m != nil {
			setErr(fmt.Errorf("wsgate.v1 publish refused: %s", *m))
		}
	}
	ph.sent = httpOK.Load() + wsOK
	ph.pubErrs = httpErr.Load() + wsNack + wsWriteErr.Load()
	ph.expected = ph.sent * int64(ph.subs)

	// The drain: until every delivery is in, or none has come for a
	// second (what is missing then is lost).
	last, lastAt := int64(-1), time.Now()
	drainLimit := time.Now().Add(30 * time.Second)
	for {
		got := fs.delivered[phIdx].Load()
		if got >= ph.expected {
			break
		}
		if got != last {
			last, lastAt = got, time.Now()
		}
		if time.Since(lastAt) > time.Second || time.Now().After(drainLimit) {
			break
		}
		if err := pause(ctx, 10*time.Millisecond); err != nil {
			return nil, err
		}
	}
	calls1, err := fs.redis.commandCalls()
	if err != nil {
		return nil, err
	}
	ph.calls = map[string]int64{}
	for name, n := range calls1 {
		if d := n - calls0[name]; d > 0 && name != "info" {
			ph.calls[name] = d
		}
	}
	ph.publishes = ph.calls["publish"]

	var bySrc [2][]time.Duration
	for _, s := range fs.subs {
		s.mu.Lock()
		for src := range bySrc {
			bySrc[src] = append(bySrc[src], s.lat[phIdx][src]...)
		}
		s.lat[phIdx] = [2][]time.Duration{}
		ph.delivered += s.got[phIdx]
		ph.dups += s.dup[phIdx]
		if s.err != nil && ph.firstErr == "" {
			ph.firstErr = s.err.Error()
		}
		s.mu.Unlock()
	}
	if m := firstErr.Load(); m != nil && ph.firstErr == "" {
		ph.firstErr = *m
	}
	ph.closed = fs.closedSubs() - closedBefore
	ph.lost = ph.expected - ph.delivered
	ph.perSec = float64(ph.delivered) / window.Seconds()
	for src, l := range bySrc {
		slices.Sort(l)
		ph.bySrc[src] = [2]time.Duration{percentile(l, 0.5), percentile(l, 0.99)}
	}
	lats := append(bySrc[0], bySrc[1]...)
	bySrc = [2][]time.Duration{}
	slices.Sort(lats)
	ph.p50, ph.p99, ph.p999 = percentile(lats, 0.5), percentile(lats, 0.99), percentile(lats, 0.999)
	if len(lats) > 0 {
		ph.max = lats[len(lats)-1]
	}
	return ph, nil
}

// httpPublish posts body to a wsgate_publish endpoint and checks that
// it was accepted.
func httpPublish(ctx context.Context, httpc *http.Client, url, body string) error {
	req, err := http.NewRequestWithContext(ctx, "POST", url, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+publishKey)
	req.Header.Set("Content-Type", "application/json")
	resp, err := httpc.Do(req)
	if err != nil {
		return fmt.Errorf("HTTP publish: %w", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4096))
	if err != nil {
		return fmt.Errorf("HTTP publish: %w", err)
	}
	if resp.StatusCode != 200 || !bytes.Contains(b, []byte(`"accepted":1`)) {
		return fmt.Errorf("HTTP publish: %s %s", resp.Status, bytes.TrimSpace(b))
	}
	return nil
}

func (fs *fanState) closedSubs() int {
	n := 0
	for _, s := range fs.subs {
		s.mu.Lock()
		if s.err != nil {
			n++
		}
		s.mu.Unlock()
	}
	return n
}

// cpu is the CPU time used so far by gateway A, gateway B, Redis and this
// process.
func (fs *fanState) cpu() ([4]time.Duration, error) {
	var out [4]time.Duration
	var err error
	for i, pid := range []int{fs.gws[0].pid(), fs.gws[1].pid(), fs.redis.pid()} {
		if out[i], err = procCPU(pid); err != nil {
			return out, err
		}
	}
	out[3] = selfCPU()
	return out, nil
}

// profile runs one more (unmeasured) step at rate, long enough for a CPU
// profile of each gateway.
func (fs *fanState) profile(ctx context.Context, rate float64) ([]string, error) {
	e := fs.e
	if err := os.MkdirAll(e.opt.Profile, 0o755); err != nil {
		return nil, err
	}
	dur := max(e.p.fanStepDur, 5*time.Second)
	secs := max(1, int(dur.Seconds())-1)
	var paths []string
	errs := make(chan error, 2)
	for i, c := range fs.gws {
		path := filepath.Join(e.opt.Profile, fmt.Sprintf("fanout-gateway-%c-%.0fps.pprof", 'A'+i, rate))
		paths = append(paths, path)
		go func() { errs <- c.saveProfile(ctx, path, secs) }()
	}
	ph, err := fs.phase(ctx, rate, dur, false)
	err = errors.Join(err, <-errs, <-errs)
	if err != nil {
		return paths, err
	}
	e.logf("  d profiled step: %s", ph)
	e.logf("profiles: %s", strings.Join(paths, " "))
	return paths, nil
}

// benignLog is a warning every benchmark Caddy logs at start: plain HTTP
// listeners skip HTTP/2 and HTTP/3.
func benignLog(line string) bool {
	return strings.Contains(line, `"msg":"HTTP/2 skipped because it requires TLS"`) ||
		strings.Contains(line, `"msg":"HTTP/3 skipped because it requires TLS"`)
}

// gatewayLogIssues returns the warnings and errors in the gateways' logs
// (Caddy's JSON lines at level warn or above, and any line that is not
// Caddy's, such as go-redis's own log), the first few in full, and their
// number.
func gatewayLogIssues(gws []*caddyProc) ([]string, int) {
	var out []string
	n := 0
	for i, c := range gws {
		if c == nil {
			continue
		}
		f, err := os.Open(c.logPath)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := strings.TrimSpace(sc.Text())
			if line == "" {
				continue
			}
			issue := !strings.HasPrefix(line, "{")
			for _, lvl := range []string{`"level":"warn"`, `"level":"error"`, `"level":"panic"`, `"level":"fatal"`} {
				if strings.Contains(line, lvl) {
					issue = true
				}
			}
			if !issue || benignLog(line) {
				continue
			}
			n++
			if len(out) < 5 {
				if len(line) > 300 {
					line = line[:300] + "…"
				}
				out = append(out, fmt.Sprintf("gateway %c: %s", 'A'+i, line))
			}
		}
		f.Close()
	}
	return out, n
}
