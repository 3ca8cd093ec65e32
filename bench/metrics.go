package bench

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"
)

// Scenario m: what metrics cost the relay. The throughput run of scenario
// c (wsgate, every check on) is repeated, interleaved, on two gateways:
// the shared one, without Caddy's `metrics` option and never scraped, and
// one whose only difference is the `metrics` option (Caddy's own request
// metrics) and a scrape of /metrics every second during the measured
// window. wsgate's own counting cannot be turned off: it is in both. With
// Options.Baseline, a third gateway runs another build (one without the
// counting) with the same configuration as the first, so that the cost of
// the counting itself shows too.

// Variant names of scenario m; the first is the shared gateway's wsgate
// route (vWsgate).
const (
	vWsgateMetrics  = "wsgate, metrics on"
	vWsgateBaseline = "wsgate, baseline build"
)

// metricsTarget is the least throughput with metrics on, as a share of
// the same run with them off.
const metricsTarget = 0.97

type metricsResult struct {
	variants []string
	samples  map[int]map[string][]tputSample // by size, variant
	scrapes  int                             // of /metrics, every one checked
}

func (e *env) runMetrics(ctx context.Context, off *caddyProc) (*metricsResult, error) {
	on, err := e.startCaddyKind(ctx, metricsCaddy)
	if err != nil {
		return nil, err
	}
	defer on.stop()
	res := &metricsResult{variants: []string{vWsgate, vWsgateMetrics}, samples: map[int]map[string][]tputSample{}}
	var base *caddyProc
	if e.opt.Baseline != "" {
		if base, err = e.startCaddyKind(ctx, baselineCaddy); err != nil {
			return nil, err
		}
		defer base.stop()
		res.variants = append(res.variants, vWsgateBaseline)
	}
	for _, size := range e.p.tputSizes {
		res.samples[size] = map[string][]tputSample{}
		for r := range e.p.metricsRuns {
			for _, name := range order(res.variants, r) {
				c, during := off, (func(context.Context) error)(nil)
				switch name {
				case vWsgateMetrics:
					c, during = on, func(ctx context.Context) error { return e.scrape(ctx, on, &res.scrapes) }
				case vWsgateBaseline:
					c = base
				}
				s, err := e.tputOnce(ctx, c, e.variant(c, vWsgate), size, during)
				if err != nil {
					return res, fmt.Errorf("%s %d B, run %d: %w", name, size, r+1, err)
				}
				e.logf("  m %5d B %-22s run %d: %.0f msg/s, caddy %.2f cores, %.2f CPU-s per 1M",
					size, name, r+1, s.rate, s.cores, s.cpuPerM)
				res.samples[size][name] = append(res.samples[size][name], s)
			}
		}
	}
	return res, nil
}

// scrape reads /metrics every second for the length of a measured window
// (at least once), checking each time that wsgate's series are there.
func (e *env) scrape(ctx context.Context, c *caddyProc, n *int) error {
	end := time.Now().Add(e.p.tputDur - 250*time.Millisecond)
	for {
		b, err := c.get(ctx, "/metrics")
		if err != nil {
			return err
		}
		if !bytes.Contains(b, []byte(`wsgate_messages_total{direction="client_to_upstream",handler="wsgate"}`)) {
			return errors.New("/metrics has no wsgate_messages_total for the wsgate handler")
		}
		*n++
		if time.Until(end) < time.Second {
			return nil
		}
		if err := pause(ctx, time.Second); err != nil {
			return err
		}
	}
}
