package bench

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"time"
)

// Scenario h is scenario d's fan-out with history on and off in one run:
// the same two gateways, Redis, subscribers and publisher, every
// subscriber in two rooms, one that keeps history (fanHistRoom) and one
// that does not (fanRoom). Each phase publishes on one of them; the
// variants take turns within every round, so that both meet the same
// machine, and the ratios are taken round by round.

// fanVariants are scenario h's variants, indexed as fanPair's arrays.
var fanVariants = [2]string{"history off", "history on"}

// fanPair is one rate of scenario h: the runs of each variant, in round
// order, and the run of each with the median p99.
type fanPair struct {
	rate float64
	dur  time.Duration
	runs [2][]*fanPhase // 0 history off, 1 history on
	med  [2]*fanPhase   // nil when the variant did not run (an earlier run had a problem)
}

// fanHistResult is what scenario h measured.
type fanHistResult struct {
	subs     int
	perGW    [2]int
	payload  [2]int // bytes of a delivered message, history off and on
	baseline *fanPair
	steps    []*fanPair
	stop     string // why the step-up ended
	logLines []string
	logCount int
}

func (e *env) runFanoutHistory(ctx context.Context) (res *fanHistResult, err error) {
	res = &fanHistResult{subs: e.p.fanSubs}
	fs, stop, err := e.startFanout(ctx, fanoutHistCaddy, true, "h")
	if err != nil {
		return nil, err
	}
	defer func() { res.logLines, res.logCount = stop() }()
	if err := fs.connect(ctx); err != nil {
		return res, err
	}
	res.perGW = [2]int{(len(fs.subs) + 1) / 2, len(fs.subs) / 2}
	// Offsets stay under a million in any run: the history-on message is
	// at most this long.
	res.payload = [2]int{len(fanMessage(fanRoom, 0, 0, 0, 0)), len(fanMessage(fanHistRoom, 0, 0, 0, 99999))}

	e.logf("  h %d subscribers (%d on each gateway) on %s and %s (history); baseline %.0f publishes/s for %v", len(fs.subs), len(fs.subs)/2, fanRoom, fanHistRoom, e.p.fanRate, e.p.fanDur)
	for v, hist := range []bool{false, true} {
		warm, err := fs.phase(ctx, e.p.fanRate, e.p.fanWarm, hist)
		if err != nil {
			return res, fmt.Errorf("warm-up, %s: %w", fanVariants[v], err)
		}
		e.logf("  h warm-up: %s", warm)
		if bad := warm.problem(); bad != "" {
			return res, fmt.Errorf("warm-up, %s: the phase %s", fanVariants[v], bad)
		}
	}
	res.baseline, err = fs.pairPhase(ctx, e.p.fanRate, e.p.fanDur)
	if err != nil {
		return res, fmt.Errorf("baseline: %w", err)
	}
	if bad := res.baseline.problem(); bad != "" {
		res.stop = "not stepped up: at the baseline " + bad
		return res, nil
	}
	if res.baseline.med[0].p99 >= fanP99Limit && res.baseline.med[1].p99 >= fanP99Limit {
		res.stop = fmt.Sprintf("not stepped up: p99 reached %v with history off and on at the baseline", fanP99Limit)
		return res, nil
	}
	if len(e.p.fanSteps) > 0 {
		res.stop = fmt.Sprintf("the last step (%s publishes/s) ended", count(e.p.fanSteps[len(e.p.fanSteps)-1]))
	}
	for _, rate := range e.p.fanSteps {
		pr, err := fs.pairPhase(ctx, rate, e.p.fanStepDur)
		if err != nil {
			return res, fmt.Errorf("step %.0f/s: %w", rate, err)
		}
		res.steps = append(res.steps, pr)
		if bad := pr.problem(); bad != "" {
			res.stop = fmt.Sprintf("stopped at %s publishes/s: %s", count(rate), bad)
			break
		}
		if pr.med[0].p99 >= fanP99Limit && pr.med[1].p99 >= fanP99Limit {
			res.stop = fmt.Sprintf("p99 reached %v with history off and on at %s publishes/s", fanP99Limit, count(rate))
			break
		}
	}
	return res, nil
}

// pairPhase runs a phase of each variant once per round (Options.Runs
// rounds), the variants' order rotated every round. A run with a problem
// ends the rounds at once.
func (fs *fanState) pairPhase(ctx context.Context, rate float64, dur time.Duration) (*fanPair, error) {
	pr := &fanPair{rate: rate, dur: dur}
	defer pr.pickMedians()
	for r := range max(1, fs.e.p.runs) {
		for k := range 2 {
			v := (k + r) % 2
			ph, err := fs.phase(ctx, rate, dur, v == 1)
			if err != nil {
				return nil, err
			}
			pr.runs[v] = append(pr.runs[v], ph)
			fs.e.logf("  h %s", ph)
			if ph.problem() != "" {
				return pr, nil
			}
		}
	}
	return pr, nil
}

// pickMedians sets med: a variant's run with a problem if it had one,
// else its run with the median p99, with every run's p99 in runsP99.
func (pr *fanPair) pickMedians() {
	for v, runs := range pr.runs {
		if len(runs) == 0 {
			continue
		}
		if i := slices.IndexFunc(runs, func(ph *fanPhase) bool { return ph.problem() != "" }); i >= 0 {
			pr.med[v] = runs[i]
			continue
		}
		sorted := slices.Clone(runs)
		slices.SortFunc(sorted, func(a, b *fanPhase) int { return cmp.Compare(a.p99, b.p99) })
		med := sorted[(len(sorted)-1)/2]
		med.runsP99 = nil
		for _, ph := range runs {
			med.runsP99 = append(med.runsP99, ph.p99)
		}
		pr.med[v] = med
	}
}

// problem says what makes the pair unfit to go on from, if anything.
func (pr *fanPair) problem() string {
	for v, ph := range pr.med {
		if ph == nil {
			return fanVariants[v] + " did not run"
		}
		if bad := ph.problem(); bad != "" {
			return fanVariants[v] + " " + bad
		}
	}
	return ""
}

// roundRatios are history on ÷ history off of f, round by round (rounds
// in which both variants ran), and their median.
func (pr *fanPair) roundRatios(f func(*fanPhase) float64) (med float64, each []float64) {
	for i := range min(len(pr.runs[0]), len(pr.runs[1])) {
		if off := f(pr.runs[0][i]); off > 0 {
			each = append(each, f(pr.runs[1][i])/off)
		}
	}
	return median(each, ident), each
}

// capacityOf is the phase with the most deliveries/s that kept p99 under
// fanP99Limit with nothing lost, going up the list until a phase reaches
// the limit (at, reached) or has a problem.
func capacityOf(phases []*fanPhase) (best, at *fanPhase, reached bool) {
	for _, ph := range phases {
		if ph == nil {
			continue
		}
		if ph.p99 >= fanP99Limit {
			return best, ph, true
		}
		if ph.problem() != "" {
			return best, nil, false
		}
		if best == nil || ph.perSec > best.perSec {
			best = ph
		}
	}
	return best, nil, false
}

// fanCrossing is the deliveries/s at which p99 reaches fanP99Limit,
// interpolated linearly between best (the last phase under it) and at
// (the first at or over it): the steps are √2 apart, too coarse to tell
// 0.8× from 0.71× on their own. Without an at, it is best's deliveries/s,
// a lower bound (exact false).
func fanCrossing(best, at *fanPhase) (perSec float64, exact bool) {
	switch {
	case at == nil && best == nil:
		return 0, false
	case at == nil:
		return best.perSec, false
	case best == nil || at.p99 <= best.p99:
		return 0, true
	}
	frac := float64(fanP99Limit-best.p99) / float64(at.p99-best.p99)
	return best.perSec + frac*(at.perSec-best.perSec), true
}

// variantPhases are the median phases of variant v, baseline first.
func (f *fanHistResult) variantPhases(v int) []*fanPhase {
	var out []*fanPhase
	for _, pr := range append([]*fanPair{f.baseline}, f.steps...) {
		if pr != nil {
			out = append(out, pr.med[v])
		}
	}
	return out
}

// capacityRatio compares the variants' deliveries/s at p99 = fanP99Limit:
// history on ÷ history off, what kind of figure it is ("=", "≤" or "≥",
// or "" when it cannot be told), and a sentence on each variant.
func (f *fanHistResult) capacityRatio() (ratio float64, rel string, says [2]string) {
	var cross [2]float64
	var exact [2]bool
	for v := range 2 {
		best, at, _ := capacityOf(f.variantPhases(v))
		cross[v], exact[v] = fanCrossing(best, at)
		switch {
		case best == nil && at == nil:
			says[v] = "no rate kept p99 under " + fanP99Limit.String() + " without loss"
		case exact[v] && best == nil:
			says[v] = fmt.Sprintf("p99 over %v from the baseline on (%s)", fanP99Limit, micros(float64(at.p99)))
		case exact[v]:
			says[v] = fmt.Sprintf("%s deliveries/s (interpolated between %s at p99 %s and %s at p99 %s)", count(cross[v]),
				count(best.perSec), micros(float64(best.p99)), count(at.perSec), micros(float64(at.p99)))
		default:
			says[v] = fmt.Sprintf("≥ %s deliveries/s (p99 %s; never reached %v)", count(best.perSec), micros(float64(best.p99)), fanP99Limit)
		}
	}
	switch {
	case cross[0] <= 0:
		return 0, "", says
	case exact[0] && exact[1]:
		rel = "="
	case exact[1]:
		rel = "≤"
	case exact[0]:
		rel = "≥"
	default:
		// Neither reached the limit: both held it up to the same highest
		// rate; the ratio of what each is known to sustain.
		rel = "≥"
	}
	return cross[1] / cross[0], rel, says
}

// callsPerMessage lists the Redis commands of a phase per message
// acknowledged: PUBLISH, EVALSHA and XADD first, then the others.
func (ph *fanPhase) callsPerMessage() string {
	if ph.sent == 0 {
		return "no messages"
	}
	first := []string{"publish", "evalsha", "xadd"}
	var names []string
	for name := range ph.calls {
		if !slices.Contains(first, name) {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	var parts []string
	for _, name := range append(first, names...) {
		n := ph.calls[name]
		if n == 0 && name != "publish" {
			continue
		}
		per := float64(n) / float64(ph.sent)
		if per < 0.005 && n > 0 {
			// A few in all (a connection the gateway's Redis client
			// opened again, say) would read as 0.00 per message.
			parts = append(parts, fmt.Sprintf("%s %d in all", strings.ToUpper(name), n))
			continue
		}
		parts = append(parts, fmt.Sprintf("%s %.2f", strings.ToUpper(name), per))
	}
	return strings.Join(parts, ", ")
}

// ---- report ----

// histTotals sums the runs of variant v over every phase: messages
// acknowledged and Redis commands by name.
func (f *fanHistResult) histTotals(v int) (sent int64, calls map[string]int64) {
	calls = map[string]int64{}
	for _, pr := range append([]*fanPair{f.baseline}, f.steps...) {
		if pr == nil {
			continue
		}
		for _, ph := range pr.runs[v] {
			sent += ph.sent
			for name, n := range ph.calls {
				calls[name] += n
			}
		}
	}
	return sent, calls
}

func (r *report) histTargets(row func(s, target, measured, met, stretch, smet string)) {
	const (
		capName   = "h. fan-out deliveries/s at p99 = 50 ms, history on"
		capTarget = "≥ 0.8× history off"
		callName  = "h. Redis calls per message, history on"
		callTgt   = "1 PUBLISH, in 1 EVALSHA with 1 XADD; history off: 1 PUBLISH, no EVALSHA"
	)
	f := r.hist
	if f == nil || f.baseline == nil {
		row(capName, capTarget, r.missing('h', r.histErr), "—", "", "")
		row(callName, callTgt, r.missing('h', r.histErr), "—", "", "")
		return
	}
	ratio, rel, says := f.capacityRatio()
	if rel == "" {
		row(capName, capTarget, fmt.Sprintf("history off: %s; history on: %s", says[0], says[1]), "—", "", "")
	} else {
		met := metStr(rel != "≤" && ratio >= 0.8)
		if rel == "≤" && ratio >= 0.8 {
			met = "—" // an upper bound above the target tells nothing
		}
		row(capName, capTarget, fmt.Sprintf("%s %.2f×: history on %s; history off %s", rel, ratio, says[1], says[0]), met, "", "")
	}
	offSent, offCalls := f.histTotals(0)
	onSent, onCalls := f.histTotals(1)
	ok := onSent > 0 && onCalls["publish"] == onSent && onCalls["evalsha"] == onSent && onCalls["xadd"] == onSent &&
		offSent > 0 && offCalls["publish"] == offSent && offCalls["evalsha"] == 0 && offCalls["xadd"] == 0
	row(callName, callTgt, fmt.Sprintf("%s PUBLISH, %s EVALSHA, %s XADD for %s messages; history off: %s PUBLISH, %s EVALSHA for %s messages (every run)",
		count(float64(onCalls["publish"])), count(float64(onCalls["evalsha"])), count(float64(onCalls["xadd"])), count(float64(onSent)),
		count(float64(offCalls["publish"])), count(float64(offCalls["evalsha"])), count(float64(offSent))), metStr(ok), "", "")
}

func (r *report) histSection(w writer) {
	w("## h. Fan-out with history off and on\n\n")
	if !r.section(w, 'h', r.histErr) {
		return
	}
	f := r.hist
	w("Scenario d's set-up (two gateways on one `redis-server`, %s subscribers, %s on gateway A and %s on B, the\n",
		count(float64(f.subs)), count(float64(f.perGW[0])), count(float64(f.perGW[1])))
	w("same publisher, schedule, latency and loss accounting), with the gateways' `wsgate` app also keeping\n")
	w("history: `history %s { size %d; ttl %s }`. Every subscriber is in two rooms: `%s`, which\n", fanHistPattern, fanHistSize, fanHistTTL, fanRoom)
	w("keeps no history (**history off**), and `%s` (**history on**; its subscribe reply carries the\n", fanHistRoom)
	w("epoch and offset, which the harness checks). Each phase publishes on one of the two rooms: with history\n")
	w("off a publication is one Redis `PUBLISH`; with history on it is one `EVALSHA` of the gateway's script,\n")
	w("which reads the channel's epoch (`HGET`), counts its offset (`HINCRBY`), appends it to the channel's\n")
	w("stream (`XADD … MAXLEN`), renews")
	w(" the keys' TTLs (`PEXPIRE`) and publishes it with its offset (`PUBLISH`), in one round trip.\n")
	w("Deliveries")
	w(" are %d bytes with history off and up to %d with it on (the `\"offset\":N` member). Every delivery with\n", f.payload[0], f.payload[1])
	w("history on must carry an offset, and none with history off may.\n\n")
	w("The variants take turns: at each rate, %d round(s) of one run of each, their order rotated every\n", max(1, r.p.runs))
	w("round (a warm-up of %v per variant first, not counted). The phases are scenario d's: a baseline of\n", r.p.fanWarm)
	w("%v at %.0f publishes/s, then steps of %v, ×√2 a step, until p99 has reached %v with history off\n", r.p.fanDur, r.p.fanRate, r.p.fanStepDur, fanP99Limit)
	w("and on (or a run loses messages or subscribers, or the load generator cannot send the rate). The\n")
	w("table shows each variant's run with the median p99; the ratios are history on ÷ history off within\n")
	w("each round, and their median; the gateways' CPU per delivery is both gateways' cores ÷ deliveries/s,\n")
	w("less sensitive than latency to other work on the machine. Redis commands per message are the change in `INFO commandstats`\n")
	w("across the run (`INFO` itself left out) ÷ the messages acknowledged. Redis counts a command that a\n")
	w("script runs as a call of that command (checked with Redis 7.0: a `PUBLISH` inside `EVALSHA` adds one\n")
	w("to `cmdstat_publish` and one to `cmdstat_evalsha`), so with history on `PUBLISH 1.00, EVALSHA 1.00,\n")
	w("XADD 1.00` is one round trip per message with one `PUBLISH` and one `XADD` in it.\n\n")
	w("| phase | history | publishes/s asked | publishes/s sent | deliveries/s | p50 | p99 | p99.9 | lost | duplicates | `PUBLISH` / messages | Redis commands per message | gateway A cores | gateway B cores | Redis cores | load generator cores |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	pairs := append([]*fanPair{f.baseline}, f.steps...)
	name := func(i int, pr *fanPair) string {
		if i == 0 {
			return fmt.Sprintf("baseline, %v", pr.dur)
		}
		return fmt.Sprintf("step %d, %v", i, pr.dur)
	}
	for i, pr := range pairs {
		if pr == nil {
			continue
		}
		for v, ph := range pr.med {
			if ph == nil {
				continue
			}
			w("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s | %.2f | %.2f | %.2f | %.2f |\n",
				name(i, pr), strings.TrimPrefix(fanVariants[v], "history "), count(ph.rate), count(ph.achieved), count(ph.perSec),
				micros(float64(ph.p50)), micros(float64(ph.p99)), micros(float64(ph.p999)), count(float64(ph.lost)), count(float64(ph.dups)),
				count(float64(ph.publishes)), count(float64(ph.sent)), ph.callsPerMessage(), ph.cpuA, ph.cpuB, ph.cpuRedis, ph.cpuGen)
		}
	}
	w("\nHistory on ÷ history off, within each round:\n\n")
	w("| phase | deliveries/s | p50 | p99 | p99, each round | gateways' CPU per delivery |\n|---|---|---|---|---|---|\n")
	for i, pr := range pairs {
		if pr == nil {
			continue
		}
		d, _ := pr.roundRatios(func(ph *fanPhase) float64 { return ph.perSec })
		p50, _ := pr.roundRatios(func(ph *fanPhase) float64 { return float64(ph.p50) })
		p99, each := pr.roundRatios(func(ph *fanPhase) float64 { return float64(ph.p99) })
		if len(each) == 0 {
			continue
		}
		var rounds []string
		for _, x := range each {
			rounds = append(rounds, fmt.Sprintf("%.2f×", x))
		}
		cpu, _ := pr.roundRatios(func(ph *fanPhase) float64 {
			if ph.perSec <= 0 {
				return 0
			}
			return (ph.cpuA + ph.cpuB) / ph.perSec
		})
		w("| %s | %.3f× | %.2f× | %.2f× | %s | %.2f× |\n", name(i, pr), d, p50, p99, strings.Join(rounds, ", "), cpu)
	}
	w("\n")
	ratio, rel, says := f.capacityRatio()
	w("Deliveries/s at p99 = %v: history off %s; history on %s.", fanP99Limit, says[0], says[1])
	if rel != "" {
		w(" History on ÷ off: %s %.2f×.", rel, ratio)
	}
	w("\n")
	if f.stop != "" {
		w("Step-up: %s.\n", f.stop)
	}
	w("\n")
	var notes []string
	for i, pr := range pairs {
		if pr == nil {
			continue
		}
		for v, runs := range pr.runs {
			for _, ph := range runs {
				if ph.closed > 0 || ph.pubErrs > 0 {
					notes = append(notes, fmt.Sprintf("%s, %s: %d subscriber connection(s) ended, %d publish(es) failed; first error: %s", name(i, pr), fanVariants[v], ph.closed, ph.pubErrs, ph.firstErr))
				}
				if ph.publishes != ph.sent {
					notes = append(notes, fmt.Sprintf("%s, %s: %s PUBLISH for %s messages", name(i, pr), fanVariants[v], count(float64(ph.publishes)), count(float64(ph.sent))))
				}
			}
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

func (r *report) histAppendix(w writer, list func([]float64, func(float64) string) string) {
	f := r.hist
	if f == nil {
		return
	}
	for i, pr := range append([]*fanPair{f.baseline}, f.steps...) {
		if pr == nil {
			continue
		}
		name := "baseline"
		if i > 0 {
			name = fmt.Sprintf("step %d", i)
		}
		for v, runs := range pr.runs {
			w("| h. %s p99, every run | %s | %s |\n", name, fanVariants[v],
				list(pluck(runs, func(ph *fanPhase) float64 { return float64(ph.p99) }), micros))
		}
	}
}
