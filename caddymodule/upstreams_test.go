package caddymodule

import (
	"encoding/json"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

// TestUpstreamsAcrossReload checks what the metrics and the admin API say
// of a handler's upstreams: each configured one, healthy, with its
// connections; after a reload that drops one, only the other.
func TestUpstreamsAcrossReload(t *testing.T) {
	provision := func(config string) (*Handler, *prometheus.Registry) {
		t.Helper()
		ctx := provisionContext(t)
		var h Handler
		if err := json.Unmarshal([]byte(config), &h); err != nil {
			t.Fatal(err)
		}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		return &h, ctx.GetMetricsRegistry()
	}
	gauges := func(reg *prometheus.Registry, name string) map[string]float64 {
		t.Helper()
		fams, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, f := range fams {
			if f.GetName() != name {
				continue
			}
			for _, m := range f.GetMetric() {
				if label(m, "handler") == "upstreams-test" {
					out[label(m, "upstream")] = m.GetGauge().GetValue()
				}
			}
		}
		return out
	}

	old, reg := provision(`{"name":"upstreams-test","upstreams":["ws://a:1","ws://b:2"],
		"load_balancing":{"selection_policy":{"policy":"least_conn"}}}`)
	if got := gauges(reg, "wsgate_upstream_healthy"); len(got) != 2 || got["ws://a:1"] != 1 || got["ws://b:2"] != 1 {
		t.Fatalf("healthy gauges %v", got)
	}
	if got := gauges(reg, "wsgate_upstream_connections"); len(got) != 2 || got["ws://a:1"] != 0 {
		t.Fatalf("connection gauges %v", got)
	}
	list := localUpstreams("upstreams-test")
	if len(list) != 2 || list[0].URL != "ws://a:1" || !list[0].Healthy || list[1].URL != "ws://b:2" {
		t.Fatalf("admin listing %+v", list)
	}

	// the reload: the new config is provisioned, then the old cleaned up
	h, reg := provision(`{"name":"upstreams-test","upstreams":["ws://b:2"]}`)
	t.Cleanup(func() { h.Cleanup() })
	old.Cleanup()
	if got := gauges(reg, "wsgate_upstream_healthy"); len(got) != 1 || got["ws://b:2"] != 1 {
		t.Fatalf("after the reload, healthy gauges %v", got)
	}
	if list := localUpstreams("upstreams-test"); len(list) != 1 || list[0].URL != "ws://b:2" || list[0].Handler != "upstreams-test" {
		t.Fatalf("after the reload, admin listing %+v", list)
	}
}

func label(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
