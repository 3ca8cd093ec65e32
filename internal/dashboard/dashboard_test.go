package dashboard

import (
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name, expr string
		want       Parsed
		err        string
	}{
		{"bare metric", `wsgate_broker_up`, Parsed{Selectors: []Selector{{Metric: "wsgate_broker_up"}}}, ""},
		{"matchers", `wsgate_upgrades_total{instance=~"$instance", handler=~"$handler", result!="ok"}`,
			Parsed{Selectors: []Selector{{Metric: "wsgate_upgrades_total", Labels: []string{"instance", "handler", "result"}}}}, ""},
		{"aggregation before and after", `sum by (side, code) (rate(wsgate_closes_total{instance=~"$instance"}[$__rate_interval])) + sum(x) without (mode)`,
			Parsed{Selectors: []Selector{{Metric: "wsgate_closes_total", Labels: []string{"instance"}}, {Metric: "x"}}, Grouping: []string{"side", "code", "mode"}}, ""},
		{"histogram quantile", `histogram_quantile(0.95, sum by (le) (rate(wsgate_handshake_duration_seconds_bucket{handler="a,b}"}[5m])))`,
			Parsed{Selectors: []Selector{{Metric: "wsgate_handshake_duration_seconds_bucket", Labels: []string{"handler"}}}, Grouping: []string{"le"}}, ""},
		{"strings hide names", `label_replace(up{job="wsgate_fake"}, "dst", "wsgate_other", "src", "(.*)")`,
			Parsed{Selectors: []Selector{{Metric: "up", Labels: []string{"job"}}}}, ""},
		{"binary operators and keywords", `a / on (instance) group_left b > bool 0 and c offset 5m or d unless e`,
			Parsed{Selectors: []Selector{{Metric: "a"}, {Metric: "b"}, {Metric: "c"}, {Metric: "d"}, {Metric: "e"}}, Grouping: []string{"instance"}}, ""},
		{"selector by __name__", `{__name__="wsgate_x"}`, Parsed{}, "by __name__"},
		{"selector without name", `{job="x"}`, Parsed{}, "without a metric name"},
		{"unterminated string", `a{b="c}`, Parsed{}, "unterminated string"},
		{"unclosed brace", `a{b="c"`, Parsed{}, "unclosed {"},
		{"bad matcher", `a{b}`, Parsed{}, "bad label matcher"},
		{"by without labels", `sum by x`, Parsed{}, "without a label list"},
		{"unexpected character", `a # b`, Parsed{}, "unexpected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(tc.expr)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want one containing %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("got %+v\nwant %+v", got, tc.want)
			}
		})
	}
}

func TestQueries(t *testing.T) {
	const dash = `{
		"panels": [
			{"type": "row", "title": "r", "panels": [
				{"title": "inner", "targets": [{"expr": "a_total"}, {"expr": "b_bucket{x=\"1\"}"}]}
			]},
			{"title": "outer", "targets": [{"expr": "sum(rate(a_total[5m]))"}]}
		],
		"templating": {"list": [
			{"name": "ds", "type": "datasource", "query": "prometheus"},
			{"name": "v1", "type": "query", "query": "label_values(c, instance)"},
			{"name": "v2", "type": "query", "query": {"query": "label_values(d{e=~\"$v1\"}, handler)", "refId": "v2"}}
		]}
	}`
	qs, err := Queries([]byte(dash))
	if err != nil {
		t.Fatal(err)
	}
	want := []Query{
		{Where: "inner", Expr: "a_total"},
		{Where: "inner", Expr: `b_bucket{x="1"}`},
		{Where: "outer", Expr: "sum(rate(a_total[5m]))"},
		{Where: "variable v1", Expr: "c", Labels: []string{"instance"}},
		{Where: "variable v2", Expr: `d{e=~"$v1"}`, Labels: []string{"handler"}},
	}
	if !reflect.DeepEqual(qs, want) {
		t.Fatalf("got %+v\nwant %+v", qs, want)
	}
	names, err := MetricNames([]byte(dash))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"a_total", "b_bucket", "c", "d"}; !slices.Equal(names, want) {
		t.Fatalf("names %q, want %q", names, want)
	}
	for _, bad := range []string{`{"panels": 1}`, `{"templating": {"list": [{"name": "v", "type": "query", "query": "up"}]}}`} {
		if _, err := Queries([]byte(bad)); err == nil {
			t.Fatalf("%s: no error", bad)
		}
	}
}

// specified are the wsgate metrics and their labels, as the metric
// names specification fixes them (README "Operating wsgate"); a dashboard
// query may use nothing else.
var specified = map[string][]string{
	// gauges
	"wsgate_connections_open":    {"handler", "mode"},
	"wsgate_connections_parked":  {"handler"},
	"wsgate_rooms_channels":      nil,
	"wsgate_rooms_subscriptions": nil,
	"wsgate_broker_up":           nil,
	// counters
	"wsgate_upgrades_total":             {"handler", "mode", "result"},
	"wsgate_closes_total":               {"handler", "side", "code"},
	"wsgate_messages_total":             {"handler", "direction"},
	"wsgate_bytes_total":                {"handler", "direction"},
	"wsgate_policy_denials_total":       {"handler", "action"},
	"wsgate_rate_limited_total":         {"handler", "direction", "on_exceed"},
	"wsgate_write_timeouts_total":       {"handler", "side"},
	"wsgate_slow_consumers_total":       {"handler", "result"},
	"wsgate_publications_total":         {"source"},
	"wsgate_deliveries_total":           nil,
	"wsgate_publications_invalid_total": nil,
	"wsgate_broker_reconnects_total":    nil,
	"wsgate_broker_errors_total":        nil,
	"wsgate_token_verifications_total":  {"result"},
	"wsgate_token_cache_hits_total":     nil,
	// histograms
	"wsgate_handshake_duration_seconds":      {"handler", "mode"},
	"wsgate_upstream_dial_duration_seconds":  {"handler", "result"},
	"wsgate_broker_publish_duration_seconds": nil,
}

var histograms = []string{"wsgate_handshake_duration_seconds", "wsgate_upstream_dial_duration_seconds", "wsgate_broker_publish_duration_seconds"}

// scrapeLabels are added by Prometheus to every series.
var scrapeLabels = []string{"instance", "job"}

// labelsOf returns the labels a series of the metric name (a histogram's
// with its suffix) has, and whether the name is specified.
func labelsOf(name string) ([]string, bool) {
	for _, h := range histograms {
		switch name {
		case h + "_bucket":
			return append(slices.Clone(specified[h]), append(scrapeLabels, "le")...), true
		case h + "_sum", h + "_count":
			return append(slices.Clone(specified[h]), scrapeLabels...), true
		}
	}
	labels, ok := specified[name]
	if !ok || slices.Contains(histograms, name) { // a histogram has no series of its bare name
		return nil, false
	}
	return append(slices.Clone(labels), scrapeLabels...), true
}

// TestWsgateDashboard checks examples/grafana/wsgate.json: every query
// parses, selects only specified metrics, filters and groups only by
// labels those metrics have, and every specified metric is on it.
func TestWsgateDashboard(t *testing.T) {
	b, err := os.ReadFile("../../examples/grafana/wsgate.json")
	if err != nil {
		t.Fatal(err)
	}
	qs, err := Queries(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(qs) < len(specified) {
		t.Fatalf("%d queries, fewer than the %d specified metrics", len(qs), len(specified))
	}
	used := map[string]bool{}
	for _, q := range qs {
		t.Run(q.Where+": "+q.Expr, func(t *testing.T) {
			p, err := Parse(q.Expr)
			if err != nil {
				t.Fatal(err)
			}
			if len(p.Selectors) == 0 {
				t.Fatal("selects no metric")
			}
			var all []string // the labels of the expression's series
			for _, s := range p.Selectors {
				labels, ok := labelsOf(s.Metric)
				if !ok {
					t.Fatalf("metric %s is not specified", s.Metric)
				}
				for _, l := range s.Labels {
					if !slices.Contains(labels, l) {
						t.Errorf("%s has no label %q (it has %q)", s.Metric, l, labels)
					}
				}
				all = append(all, labels...)
				base := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSuffix(s.Metric, "_bucket"), "_sum"), "_count")
				if !slices.Contains(histograms, base) {
					base = s.Metric
				}
				used[base] = true
			}
			for _, l := range append(p.Grouping, q.Labels...) {
				if !slices.Contains(all, l) {
					t.Errorf("groups or reads by %q, a label of none of its metrics (%q)", l, all)
				}
			}
		})
	}
	for name := range specified {
		if !used[name] {
			t.Errorf("the dashboard does not show %s", name)
		}
	}
}
