package caddymodule

import (
	"errors"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/proxy"
)

// Metrics go through Caddy's metrics registry, so they appear on the
// /metrics that Caddy's `metrics` option and admin endpoint expose. Each
// config load brings a new registry; the collectors here are made once
// per process and registered into each, so counts go on across reloads.
//
// Nothing on the path of a frame touches them: the engine counts on each
// connection (proxy.Stats) and the rooms hub and broker keep their own
// atomic counters; the collector reads them all when /metrics is scraped.
// Histograms and per-upgrade counters are updated once per connection.

// defaultName is the handler's name when none is configured.
const defaultName = "wsgate"

// upgradeResults are the values of the upgrades counter's result label.
var upgradeResults = []string{"ok", "origin", "token", "forward_auth", "limit", "upstream", "handshake", "shutdown", "config"}

// tokenResults are the values of the token verifications counter's label
// (policy.TokenResult).
var tokenResults = []string{"valid", "expired", "not_yet_valid", "bad_signature", "unknown_issuer", "wrong_issuer",
	"wrong_audience", "missing_claim", "malformed", "too_large", "unknown_key", "missing", "invalid"}

var (
	upgradesTotal = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsgate_upgrades_total",
		Help: "WebSocket upgrade requests, by result: ok, or the reason for the refusal.",
	}, []string{"handler", "mode", "result"})
	policyDenials = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsgate_policy_denials_total",
		Help: "Messages and requests refused by the channel policy, by action.",
	}, []string{"handler", "action"})
	tokenVerifications = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "wsgate_token_verifications_total",
		Help: "JWT verifications at the upgrade and on refresh, by result.",
	}, []string{"result"})
	handshakeDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "wsgate_handshake_duration_seconds",
		Help:    "Time from the upgrade request to the 101 or the refusal.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 10),
	}, []string{"handler", "mode"})
	dialDuration = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name:    "wsgate_upstream_dial_duration_seconds",
		Help:    "Time to dial an upstream and complete its handshake, by result.",
		Buckets: prometheus.ExponentialBuckets(0.0005, 2.5, 10),
	}, []string{"handler", "result"})
	brokerPublishDuration = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "wsgate_broker_publish_duration_seconds",
		Help:    "Time for a publication (or a batch) to be accepted by the broker.",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2.5, 10),
	})

	// tokenCacheHits counts verifications answered from a verifier's cache.
	tokenCacheHits atomic.Uint64

	wsgateCollector = &collector{}
)

// registerMetrics adds the wsgate collectors to a config's registry (once;
// handlers of one config share it).
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{upgradesTotal, policyDenials, tokenVerifications,
		handshakeDuration, dialDuration, brokerPublishDuration, wsgateCollector} {
		if err := reg.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) || are.ExistingCollector != c {
				return err
			}
		}
	}
	return nil
}

func init() {
	for _, r := range tokenResults {
		tokenVerifications.WithLabelValues(r)
	}
}

// handlerMetrics is what the handlers of one name count. It lives
// as long as the process: connections keep the config they started with,
// and what they count after a reload must land in the same series.
type handlerMetrics struct {
	name           string
	stats          *proxy.Stats
	pool           *proxy.Pool   // the upstreams of the handlers of this name
	publishLimited atomic.Uint64 // rooms publishes over publish_rate
	// onPublishLimited counts one; made once, so that connections share it
	onPublishLimited func()
}

var (
	handlerMetricsMu sync.Mutex
	handlerMetricsOf = map[string]*handlerMetrics{}
)

// metricsFor finds or makes the metrics of a handler name.
func metricsFor(name string) *handlerMetrics {
	handlerMetricsMu.Lock()
	defer handlerMetricsMu.Unlock()
	m := handlerMetricsOf[name]
	if m == nil {
		m = &handlerMetrics{name: name, stats: proxy.NewStats(), pool: proxy.NewPool()}
		ok, failed := dialDuration.WithLabelValues(name, "ok"), dialDuration.WithLabelValues(name, "error")
		m.stats.OnDial = func(d time.Duration, success bool) {
			if success {
				ok.Observe(d.Seconds())
			} else {
				failed.Observe(d.Seconds())
			}
		}
		m.onPublishLimited = func() { m.publishLimited.Add(1) }
		handlerMetricsOf[name] = m
	}
	return m
}

func allHandlerMetrics() []*handlerMetrics {
	handlerMetricsMu.Lock()
	defer handlerMetricsMu.Unlock()
	out := make([]*handlerMetrics, 0, len(handlerMetricsOf))
	for _, m := range handlerMetricsOf {
		out = append(out, m)
	}
	return out
}

// prepare makes the series of a handler's mode and policy actions exist
// at zero, so dashboards see them before the first event.
func (m *handlerMetrics) prepare(mode string, actions []string) {
	for _, r := range upgradeResults {
		upgradesTotal.WithLabelValues(m.name, mode, r)
	}
	handshakeDuration.WithLabelValues(m.name, mode)
	for _, a := range actions {
		policyDenials.WithLabelValues(m.name, a)
	}
}

// upgrade counts an upgrade request and how long it took to answer.
func (m *handlerMetrics) upgrade(mode, result string, d time.Duration) {
	upgradesTotal.WithLabelValues(m.name, mode, result).Inc()
	handshakeDuration.WithLabelValues(m.name, mode).Observe(d.Seconds())
}

// denials returns the counter of policy denials of action, for a hook to
// keep (the label lookup is made once, not per message).
func (m *handlerMetrics) denials(action string) prometheus.Counter {
	return policyDenials.WithLabelValues(m.name, action)
}

// collector turns the counts kept by the engine, the hubs and the brokers
// into metrics when they are scraped.
type collector struct{}

func desc(name, help string, labels ...string) *prometheus.Desc {
	return prometheus.NewDesc(name, help, labels, nil)
}

var (
	descOpen   = desc("wsgate_connections_open", "Open WebSocket connections, by mode (relay or rooms).", "handler", "mode")
	descParked = desc("wsgate_connections_parked",
		"Connection sides whose reader goroutine is parked (idle, watched by epoll).", "handler")
	descChannels      = desc("wsgate_rooms_channels", "Channels with local subscribers on this node.")
	descSubscriptions = desc("wsgate_rooms_subscriptions", "Local subscriptions on this node.")
	descBrokerUp      = desc("wsgate_broker_up", "1 when the broker is reachable, else 0.")
	descCloses        = desc("wsgate_closes_total",
		"Connections ended, by the side that closed first and the code of that close (none: it went away without one).",
		"handler", "side", "code")
	descMessages = desc("wsgate_messages_total", "Data messages, by direction.", "handler", "direction")
	descBytes    = desc("wsgate_bytes_total", "Payload bytes of data messages, by direction.", "handler", "direction")
	descLimited  = desc("wsgate_rate_limited_total",
		"Messages over a rate limit, by the side that sent them and what was done (on_exceed).",
		"handler", "direction", "on_exceed")
	descWriteTimeouts = desc("wsgate_write_timeouts_total",
		"Connections dropped because a write to a side lasted write_timeout.", "handler", "side")
	descSlow = desc("wsgate_slow_consumers_total",
		"Slow consumers: connections closed with 1013 (close) and fan-out messages dropped (drop).", "handler", "result")
	descPublications = desc("wsgate_publications_total",
		"Publications received by this node: from rooms clients (ws), wsgate_publish (http), and the broker (redis).", "source")
	descDeliveries = desc("wsgate_deliveries_total", "Publications handed to local subscribers (one per subscriber).")
	descInvalid    = desc("wsgate_publications_invalid_total",
		"Publications from the broker dropped for not being JSON in valid UTF-8.")
	descReconnects = desc("wsgate_broker_reconnects_total", "Returns of the broker after an outage.")
	descErrors     = desc("wsgate_broker_errors_total",
		"Broker failures: commands that failed, and lost connections that revealed an outage.")
	descCacheHits     = desc("wsgate_token_cache_hits_total", "Token verifications answered from the cache of recent ones.")
	descUpstreamConns = desc("wsgate_upstream_connections",
		"Relayed connections open (or being dialled) to each upstream.", "handler", "upstream")
	descUpstreamHealthy = desc("wsgate_upstream_healthy",
		"1 when the upstream takes new connections, 0 while health checks set it aside or after a reload removed it.",
		"handler", "upstream")

	collectorDescs = []*prometheus.Desc{descOpen, descParked, descChannels, descSubscriptions, descBrokerUp,
		descCloses, descMessages, descBytes, descLimited, descWriteTimeouts, descSlow, descPublications,
		descDeliveries, descInvalid, descReconnects, descErrors, descCacheHits,
		descUpstreamConns, descUpstreamHealthy}
)

// Describe implements prometheus.Collector.
func (*collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range collectorDescs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (*collector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	for _, m := range allHandlerMetrics() {
		s := m.stats.Snapshot()
		gauge(descOpen, float64(s.OpenRelay), m.name, "relay")
		gauge(descOpen, float64(s.OpenRooms), m.name, "rooms")
		gauge(descParked, float64(s.Parked), m.name)
		for k, n := range s.Closes {
			counter(descCloses, n, m.name, k.Side, k.Code)
		}
		// Normal closures exist from the start, at zero, like the
		// other series (the codes that occur are not known before).
		for _, k := range []proxy.CloseKey{{Side: "client", Code: "1000"}, {Side: "upstream", Code: "1000"}} {
			if _, ok := s.Closes[k]; !ok {
				counter(descCloses, 0, m.name, k.Side, k.Code)
			}
		}
		for _, d := range []proxy.Direction{proxy.ClientToUpstream, proxy.UpstreamToClient, proxy.Fanout} {
			counter(descMessages, s.Traffic.Messages[d], m.name, d.String())
			counter(descBytes, s.Traffic.Bytes[d], m.name, d.String())
		}
		for i, dir := range []string{"client", "upstream"} {
			for _, o := range []proxy.OnExceed{proxy.ExceedClose, proxy.ExceedDrop, proxy.ExceedThrottle} {
				counter(descLimited, s.RateLimited[i][o], m.name, dir, string(o))
			}
		}
		counter(descLimited, m.publishLimited.Load(), m.name, "client", "publish_rate")
		counter(descWriteTimeouts, s.WriteTimeoutsClient, m.name, "client")
		counter(descWriteTimeouts, s.WriteTimeoutsUpstream, m.name, "upstream")
		counter(descSlow, s.SlowClosed, m.name, "close")
		counter(descSlow, s.SlowDropped, m.name, "drop")
		for _, u := range m.pool.Status(time.Now()) {
			gauge(descUpstreamConns, float64(u.Live), m.name, u.URL)
			healthy := 0.0
			if u.TakesConnections() {
				healthy = 1
			}
			gauge(descUpstreamHealthy, healthy, m.name, u.URL)
		}
	}

	var pubWS, pubHTTP, received, delivered, invalid int64
	var channels, subs int
	up := true
	var reconnects, failures uint64
	for _, sh := range liveHubs() {
		hs := sh.hub.Stats()
		pubWS += hs.PublishedWS
		pubHTTP += hs.PublishedHTTP
		received += hs.Received
		delivered += hs.Delivered
		invalid += hs.Invalid
		channels += hs.Channels
		subs += hs.Subscriptions
		if r, ok := sh.broker.(interface{ Stats() broker.Stats }); ok {
			bs := r.Stats()
			up = up && bs.Up
			reconnects += bs.Reconnects
			failures += bs.Errors
		}
	}
	gauge(descChannels, float64(channels))
	gauge(descSubscriptions, float64(subs))
	upv := 0.0
	if up {
		upv = 1
	}
	gauge(descBrokerUp, upv)
	counter(descPublications, uint64(pubWS), "ws")
	counter(descPublications, uint64(pubHTTP), "http")
	counter(descPublications, uint64(received), "redis")
	counter(descDeliveries, uint64(delivered))
	counter(descInvalid, uint64(invalid))
	counter(descReconnects, reconnects)
	counter(descErrors, failures)
	counter(descCacheHits, tokenCacheHits.Load())
}

// liveHubs lists the hubs in use: those of the wsgate apps of the loaded
// configs, and the default one.
func liveHubs() []*sharedHub {
	out := []*sharedHub{defaultHub}
	hubs.Range(func(_, v any) bool {
		out = append(out, v.(*sharedHub))
		return true
	})
	return out
}

// observePublish is the hubs' OnPublish hook.
func observePublish(d time.Duration) { brokerPublishDuration.Observe(d.Seconds()) }

// codeLabel is a close code as a label value.
func codeLabel(code uint16) string {
	if code == 0 {
		return "none"
	}
	return strconv.Itoa(int(code))
}
