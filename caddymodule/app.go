package caddymodule

import (
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/rooms"
)

func init() {
	caddy.RegisterModule(App{})
	httpcaddyfile.RegisterGlobalOption("wsgate", parseApp)
}

// App holds what every wsgate handler of the process shares: the broker
// and the local subscription hub. They are keyed by the broker config and
// kept across config reloads, so live subscriptions survive a reload that
// keeps the same broker.
type App struct {
	// Broker configures fan-out between nodes. Default: memory (one node).
	Broker *BrokerConfig `json:"broker,omitempty"`

	// ReleaseMemory says whether the stacks that idle connections gave up
	// are handed back to the system at once (a forced garbage collection,
	// debug.FreeOSMemory, at most every 10 s, only after at least 1,024
	// connection sides have parked since the last one). Off, the Go
	// runtime keeps that memory and returns it gradually, so the process
	// stays larger after a wave of connections. It acts on the whole
	// process. Default: true.
	ReleaseMemory *bool `json:"release_memory,omitempty"`

	// History keeps the latest publications of matching channels, for
	// recovery after a reconnect; the first pattern that matches a channel
	// decides. Default: none.
	History []HistoryConfig `json:"history,omitempty"`
	// Presence keeps who is subscribed to matching channels; the first
	// pattern that matches decides. Default: none.
	Presence []PresenceConfig `json:"presence,omitempty"`

	hub  *sharedHub
	key  string
	keep *keeper
}

// defaultPrefix is the broker's Prefix when none is configured.
const defaultPrefix = "wsgate:"

// BrokerConfig selects and configures the broker.
type BrokerConfig struct {
	// Type is "memory" or "redis". Default: memory.
	Type string `json:"type,omitempty"`
	// URL of a standalone Redis: redis://[[user]:password@]host:port[/db],
	// or rediss:// for TLS.
	URL string `json:"url,omitempty"`
	// Addrs of Sentinel or Cluster nodes.
	Addrs []string `json:"addrs,omitempty"`
	// MasterName selects Sentinel.
	MasterName string `json:"master_name,omitempty"`
	// Cluster selects Redis Cluster (sharded pub/sub).
	Cluster bool `json:"cluster,omitempty"`
	// Username and Password for Redis; placeholders such as {env.REDIS_PASSWORD} work.
	Username string `json:"username,omitempty"`
	Password string `json:"password,omitempty"`
	// Prefix is put in front of channel names on Redis. Default: "wsgate:".
	Prefix string `json:"prefix,omitempty"`
	// ClusterSubscribers is the number of sharded pub/sub connections each
	// node keeps to each cluster master (1 to 256); a channel uses
	// connection (hash slot mod n) of its slot's master. Cluster only.
	// Default: 1.
	ClusterSubscribers int `json:"cluster_subscribers,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "wsgate", New: func() caddy.Module { return new(App) }}
}

// sharedHub is a hub and its broker, shared through hubs.
type sharedHub struct {
	hub    *rooms.Hub
	broker broker.Broker
}

func (s *sharedHub) Destruct() error {
	running.forget(s)
	return s.broker.Close()
}

// running lists the hubs of the started wsgate apps, the last started
// last. The admin API asks the last one: after a reload, the new config's;
// after a reload that failed to start, the old config's again (the new
// hub is destroyed, the old one stays).
var running hubList

type hubList struct {
	mu   sync.Mutex
	hubs []*sharedHub
}

// started moves s to the end of the list.
func (l *hubList) started(s *sharedHub) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hubs = append(slices.DeleteFunc(l.hubs, func(h *sharedHub) bool { return h == s }), s)
}

func (l *hubList) forget(s *sharedHub) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.hubs = slices.DeleteFunc(l.hubs, func(h *sharedHub) bool { return h == s })
}

// currentHub is the hub of the last started wsgate app still running, or
// the default one.
func currentHub() *sharedHub {
	running.mu.Lock()
	defer running.mu.Unlock()
	if n := len(running.hubs); n > 0 {
		return running.hubs[n-1]
	}
	return defaultHub
}

// hubs keeps hubs across config reloads, keyed by broker config.
var hubs = caddy.NewUsagePool()

// Provision connects the broker (or takes the one a previous config made).
func (a *App) Provision(ctx caddy.Context) error {
	var err error
	if a.keep, err = newKeeper(a.History, a.Presence); err != nil {
		return fmt.Errorf("wsgate: %w", err)
	}
	bc := a.Broker
	if bc == nil {
		bc = &BrokerConfig{Type: "memory"}
	}
	repl := caddy.NewReplacer()
	resolved := *bc
	resolved.Password = repl.ReplaceKnown(bc.Password, "")
	if resolved.Prefix == "" {
		resolved.Prefix = defaultPrefix
	}
	if resolved.Cluster && resolved.ClusterSubscribers == 0 {
		// the same broker whether the default is written out or not
		resolved.ClusterSubscribers = broker.DefaultClusterSubscribers
	}
	keyb, _ := json.Marshal(resolved)
	a.key = string(keyb)
	v, _, err := hubs.LoadOrNew(a.key, func() (caddy.Destructor, error) {
		return newSharedHub(ctx, resolved)
	})
	if err != nil {
		return fmt.Errorf("wsgate broker: %w", err)
	}
	a.hub = v.(*sharedHub)
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("wsgate metrics: %w", err)
	}
	return nil
}

func newSharedHub(ctx caddy.Context, bc BrokerConfig) (*sharedHub, error) {
	h := rooms.NewHub()
	h.OnPublish = observePublish
	var b broker.Broker
	switch bc.Type {
	case "", "memory":
		b = broker.NewMemory(h.Handle)
	case "redis":
		r, err := broker.NewRedis(broker.RedisOptions{
			URL: bc.URL, Addrs: bc.Addrs, MasterName: bc.MasterName, Cluster: bc.Cluster, ClusterSubscribers: bc.ClusterSubscribers,
			Username: bc.Username, Password: bc.Password, Prefix: bc.Prefix, Logger: ctx.Slogger(),
			Answer: answerer(h), Reconnected: h.Resync,
		}, h.Handle)
		if err != nil {
			return nil, err
		}
		b = r
	default:
		return nil, fmt.Errorf("unknown broker type %q: want memory or redis", bc.Type)
	}
	h.SetBroker(b)
	return &sharedHub{hub: h, broker: b}, nil
}

// Start makes this app's hub the one the admin API asks, and its history
// and presence config the hub's. The broker connects lazily.
func (a *App) Start() error {
	a.hub.hub.SetChannelOptions(a.keep.options)
	running.started(a.hub)
	return nil
}

// Stop is a no-op: connections are closed by the handlers on exit.
func (a *App) Stop() error { return nil }

// Cleanup releases this config's hold on the shared hub.
func (a *App) Cleanup() error {
	if a.key != "" {
		_, err := hubs.Delete(a.key)
		return err
	}
	return nil
}

// defaultHub serves handlers when no wsgate app is configured.
var defaultHub = func() *sharedHub {
	h := rooms.NewHub()
	h.OnPublish = observePublish
	b := broker.NewMemory(h.Handle)
	h.SetBroker(b)
	return &sharedHub{hub: h, broker: b}
}()

// releaseMemory is the wsgate app's release_memory, or its default.
func releaseMemory(ctx caddy.Context) bool {
	v, err := ctx.AppIfConfigured("wsgate")
	if err != nil || v == nil || v.(*App).ReleaseMemory == nil {
		return true
	}
	return *v.(*App).ReleaseMemory
}

// hubFor finds the hub of the configured wsgate app, or the default one.
func hubFor(ctx caddy.Context) (*rooms.Hub, broker.Broker, error) {
	v, err := ctx.AppIfConfigured("wsgate")
	if err != nil || v == nil {
		return defaultHub.hub, defaultHub.broker, nil
	}
	a := v.(*App)
	return a.hub.hub, a.hub.broker, nil
}

// parseApp reads the global option:
//
//	wsgate {
//	    broker memory
//	    broker redis <url> {
//	        prefix      <prefix>
//	        username    <user>
//	        password    <password>
//	    }
//	    broker redis_cluster <addrs...> {
//	        prefix              <prefix>
//	        username            <user>
//	        password            <password>
//	        cluster_subscribers <n>       # 1 to 256, default 1
//	    }
//	    broker redis_sentinel <master> <addrs...> { … }
//	    release_memory on|off
//	    history <pattern> { size <n>; ttl <d>; meta_ttl <d>; recover_max <n> }
//	    presence <pattern> { ttl <d>; events }
//	}
func parseApp(d *caddyfile.Dispenser, _ any) (any, error) {
	d.Next() // option name
	app := new(App)
	for d.NextBlock(0) {
		switch d.Val() {
		case "broker":
		case "history":
			hc, err := parseHistory(d)
			if err != nil {
				return nil, err
			}
			app.History = append(app.History, hc)
			continue
		case "presence":
			pc, err := parsePresence(d)
			if err != nil {
				return nil, err
			}
			app.Presence = append(app.Presence, pc)
			continue
		case "release_memory":
			if app.ReleaseMemory != nil {
				return nil, d.Err("duplicate release_memory")
			}
			var v string
			if !d.AllArgs(&v) || (v != "on" && v != "off") {
				return nil, d.Errf("release_memory takes on or off")
			}
			on := v == "on"
			app.ReleaseMemory = &on
			continue
		default:
			return nil, unknownName(d, "wsgate option", []string{"broker", "history", "presence", "release_memory"})
		}
		if app.Broker != nil {
			return nil, d.Err("duplicate broker")
		}
		if !d.NextArg() {
			return nil, d.ArgErr()
		}
		bc := &BrokerConfig{}
		switch kind := d.Val(); kind {
		case "memory":
			bc.Type = "memory"
			if d.NextArg() {
				return nil, d.ArgErr()
			}
		case "redis":
			bc.Type = "redis"
			if !d.AllArgs(&bc.URL) {
				return nil, d.Errf("broker redis needs one URL")
			}
			if err := broker.CheckRedisURL(bc.URL); err != nil {
				return nil, d.Err(err.Error())
			}
		case "redis_cluster":
			bc.Type, bc.Cluster = "redis", true
			bc.Addrs = d.RemainingArgs()
			if len(bc.Addrs) == 0 {
				return nil, d.ArgErr()
			}
		case "redis_sentinel":
			bc.Type = "redis"
			args := d.RemainingArgs()
			if len(args) < 2 {
				return nil, d.Errf("broker redis_sentinel needs a master name and sentinel addresses")
			}
			bc.MasterName, bc.Addrs = args[0], args[1:]
		default:
			kinds := []string{"memory", "redis", "redis_cluster", "redis_sentinel"}
			if s := closest(kind, kinds); s != "" {
				return nil, d.Errf("unknown broker %q, did you mean %q?", kind, s)
			}
			return nil, d.Errf("unknown broker %q: want memory, redis, redis_cluster or redis_sentinel", kind)
		}
		for nesting := d.Nesting(); d.NextBlock(nesting); {
			var dst *string
			switch d.Val() {
			case "prefix":
				dst = &bc.Prefix
			case "username":
				dst = &bc.Username
			case "password":
				dst = &bc.Password
			case "cluster_subscribers":
				if err := parseClusterSubscribers(d, bc); err != nil {
					return nil, err
				}
				continue
			default:
				return nil, unknownName(d, "broker option", []string{"prefix", "username", "password", "cluster_subscribers"})
			}
			if !d.AllArgs(dst) {
				return nil, d.ArgErr()
			}
		}
		app.Broker = bc
	}
	return httpcaddyfile.App{Name: "wsgate", Value: caddyconfig.JSON(app, nil)}, nil
}

// parseClusterSubscribers reads `cluster_subscribers <n>` in a broker block.
func parseClusterSubscribers(d *caddyfile.Dispenser, bc *BrokerConfig) error {
	if !bc.Cluster {
		return d.Err("cluster_subscribers needs broker redis_cluster")
	}
	if bc.ClusterSubscribers != 0 {
		return d.Err("duplicate cluster_subscribers")
	}
	var v string
	if !d.AllArgs(&v) {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > broker.MaxClusterSubscribers {
		return d.Errf("cluster_subscribers %q: want a number of connections per master from 1 to %d", v, broker.MaxClusterSubscribers)
	}
	bc.ClusterSubscribers = n
	return nil
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
	_ caddy.Destructor   = (*sharedHub)(nil)
)
