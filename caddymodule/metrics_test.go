package caddymodule

import (
	"encoding/json"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestMetricsAcrossConfigs checks that the collectors go into every
// config's registry once (handlers of one config share it, and each
// reload brings a new registry), that the pedantic registry Caddy uses
// accepts what they collect, and that a handler's series carry its
// name and survive a new config.
func TestMetricsAcrossConfigs(t *testing.T) {
	gather := func(reg *prometheus.Registry) map[string]*dto.MetricFamily {
		t.Helper()
		fams, err := reg.Gather()
		if err != nil {
			t.Fatalf("gather: %v", err)
		}
		out := map[string]*dto.MetricFamily{}
		for _, f := range fams {
			out[f.GetName()] = f
		}
		return out
	}
	hasHandler := func(f *dto.MetricFamily, name string) bool {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "handler" && l.GetValue() == name {
					return true
				}
			}
		}
		return false
	}
	for i := range 2 { // two configs: a reload
		ctx := provisionContext(t)
		for range 2 { // two handlers of one config
			var h Handler
			if err := json.Unmarshal([]byte(`{"upstreams":["ws://a:1"],"name":"metrics-test"}`), &h); err != nil {
				t.Fatal(err)
			}
			if err := h.Provision(ctx); err != nil {
				t.Fatalf("config %d: %v", i, err)
			}
			t.Cleanup(func() { h.Cleanup() })
		}
		fams := gather(ctx.GetMetricsRegistry())
		for _, name := range []string{"wsgate_connections_open", "wsgate_upgrades_total", "wsgate_messages_total",
			"wsgate_handshake_duration_seconds", "wsgate_closes_total", "wsgate_upstream_dial_duration_seconds"} {
			if f := fams[name]; f == nil || !hasHandler(f, "metrics-test") {
				t.Errorf("config %d: %s has no series for handler metrics-test", i, name)
			}
		}
		if f := fams["wsgate_broker_up"]; f == nil || f.GetMetric()[0].GetGauge().GetValue() != 1 {
			t.Errorf("config %d: wsgate_broker_up %v, want 1", i, f)
		}
	}
}
