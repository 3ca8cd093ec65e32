package bench

import (
	"bufio"
	"bytes"
	"context"
	"debug/buildinfo"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gobwas/ws"
)

// Scenario p runs wsgate (rooms mode, the default in-process broker,
// wsgate_publish) beside two peer servers, Centrifugo and Nchan (nginx
// with the Nchan module), each from a configuration the harness writes,
// and drives all three with the same load generator: idle subscribed
// connections, connect + subscribe handshakes at a fixed rate, and fan-out
// from HTTP publishes (and batches, where a server takes them). A peer
// that is not installed is skipped, and the report says how to install it.
// Rounds run the servers in turn, always in the same order; ratios are
// taken within a round.

// Names of the servers of scenario p, in the order every round runs them.
const (
	pWsgate     = "wsgate"
	pCentrifugo = "Centrifugo"
	pNchan      = "Nchan"
)

var peerNames = []string{pWsgate, pCentrifugo, pNchan}

const (
	// peerPing is every server's heartbeat interval: wsgate's
	// ping_interval, Centrifugo's client ping_interval (its default),
	// Nchan's nchan_websocket_ping_interval.
	peerPing = 25 * time.Second
	// peerAPIKey is Centrifugo's HTTP API key.
	peerAPIKey = "bench-api-key-0123456789abcdef"
	// nchanModule is where Debian's libnginx-mod-nchan puts the module.
	nchanModule = "/usr/lib/nginx/modules/ngx_nchan_module.so"
	// nchanWorkers is nginx's worker_processes: one per core of this
	// 2-core machine, as `auto` would pick, the cores a Go server's
	// GOMAXPROCS spreads over.
	nchanWorkers = 2
	// peerHTTPWorkers send the HTTP publishes, each on its own
	// keep-alive connection.
	peerHTTPWorkers = 16
	// peerHSWorkers run the handshakes of the fixed-rate schedule.
	peerHSWorkers = 64
)

// peerTopo is a fan-out shape: channels × subscribers per channel.
type peerTopo struct{ channels, perChan int }

func (t peerTopo) String() string {
	return fmt.Sprintf("%d × %s", t.channels, count(float64(t.perChan)))
}

// peerIdle is one server's idle connections in one round.
type peerIdle struct {
	conns            int
	before           int64   // RSS before connecting, bytes
	least, med, most float64 // RSS growth per connection over the samples, bytes
	samples          int
	pings            float64       // heartbeats each connection received during the hold
	connectIn        time.Duration // to open and subscribe them all
}

// peerHS is one server's fixed-rate handshakes in one round.
type peerHS struct {
	rate     float64 // asked, per second
	done     int64
	failed   int64
	firstErr string
	p50, p99 time.Duration
	cpuPer   time.Duration // server CPU per handshake
}

// peerFan is one publishing window.
type peerFan struct {
	topo      peerTopo
	batch     int     // publications per HTTP request
	asked     float64 // deliveries per second asked
	pubRate   float64 // publications per second sent
	perSec    float64 // deliveries per second
	p50, p99  time.Duration
	cpuPer    time.Duration // server CPU per delivery
	lost      int64
	delivered int64
	note      string // why the steps stopped here, if they did
}

// peerFanKey names a window across servers and rounds.
type peerFanKey struct {
	topo  peerTopo
	batch bool
	asked float64
}

func (f *peerFan) key() peerFanKey { return peerFanKey{f.topo, f.batch > 1, f.asked} }

type peerRound struct {
	idle map[string]*peerIdle
	hs   map[string]*peerHS
	fan  map[string]map[peerFanKey]*peerFan
}

type peersResult struct {
	present  []string
	skipped  []string // why a peer is not measured
	versions map[string]string
	topos    []peerTopo
	rounds   []*peerRound
}

// peerServer is one running server of scenario p.
type peerServer struct {
	name    string
	port    int
	caddy   *caddyProc // wsgate
	cmd     *exec.Cmd  // Centrifugo, nginx (the master)
	dir     string
	logPath string
	exited  chan struct{}
	httpc   *http.Client
}

// peerBinaries finds the peers' programs: it returns the paths of those
// found and, for the others, what to install.
func (o Options) peerBinaries() (found map[string]string, skipped []string) {
	found = map[string]string{}
	c := o.Centrifugo
	if c == "" {
		if p, err := exec.LookPath("centrifugo"); err == nil {
			c = p
		} else if home, err := os.UserHomeDir(); err == nil {
			c = filepath.Join(home, "go", "bin", "centrifugo")
		}
	}
	if st, err := os.Stat(c); err == nil && !st.IsDir() {
		found[pCentrifugo] = c
	} else {
		skipped = append(skipped, fmt.Sprintf("Centrifugo: not found (-centrifugo %s), install with `GOFLAGS=-mod=mod go install github.com/centrifugal/centrifugo/v6@v6.9.1`", c))
	}
	n := o.Nginx
	if n == "" {
		n = "/usr/sbin/nginx"
	}
	_, errN := os.Stat(n)
	_, errM := os.Stat(nchanModule)
	if errN == nil && errM == nil {
		found[pNchan] = n
	} else {
		skipped = append(skipped, fmt.Sprintf("Nchan: nginx (-nginx %s) or %s not found, install with `apt-get install -y nginx libnginx-mod-nchan`", n, nchanModule))
	}
	return found, skipped
}

func peerVersion(name, bin string) string {
	var out []byte
	switch name {
	case pCentrifugo:
		// A `go install` build reports v0.0.0 itself (its version is set
		// by release builds' linker flags); its module version is in the
		// binary's build info.
		if bi, err := buildinfo.ReadFile(bin); err == nil {
			return fmt.Sprintf("%s %s, built with %s", bi.Main.Path, bi.Main.Version, bi.GoVersion)
		}
		out, _ = exec.Command(bin, "version").CombinedOutput()
	case pNchan:
		out, _ = exec.Command(bin, "-v").CombinedOutput()
		if b, err := exec.Command("dpkg-query", "-W", "-f", "${Version}", "libnginx-mod-nchan").Output(); err == nil {
			out = append(bytes.TrimSpace(out), []byte(", libnginx-mod-nchan "+string(b))...)
		}
	}
	return strings.TrimSpace(string(out))
}

func (e *env) runPeers(ctx context.Context) (*peersResult, error) {
	bins, skipped := e.opt.peerBinaries()
	res := &peersResult{present: []string{pWsgate}, skipped: skipped, versions: map[string]string{}, topos: e.p.peerTopos}
	for _, name := range peerNames[1:] {
		if bin, ok := bins[name]; ok {
			res.present = append(res.present, name)
			res.versions[name] = peerVersion(name, bin)
		}
	}
	e.peerBins = bins
	for _, s := range skipped {
		e.logf("  p %s", s)
	}
	for r := range e.p.runs {
		rd := &peerRound{idle: map[string]*peerIdle{}, hs: map[string]*peerHS{}, fan: map[string]map[peerFanKey]*peerFan{}}
		res.rounds = append(res.rounds, rd)
		for _, name := range res.present {
			id, err := e.peerIdleOnce(ctx, name)
			if err != nil {
				return res, fmt.Errorf("idle, %s, round %d: %w", name, r+1, err)
			}
			e.logf("  p round %d idle %-10s: %.1f / %.1f / %.1f KiB per connection (least/median/most of %d samples), %.2f heartbeats each, connected in %v",
				r+1, name, id.least/1024, id.med/1024, id.most/1024, id.samples, id.pings, id.connectIn.Round(time.Millisecond))
			rd.idle[name] = id
		}
		if err := e.peerLoadRound(ctx, res, rd, r); err != nil {
			return res, err
		}
	}
	return res, nil
}

// peerLoadRound runs one round's handshakes and fan-out, on one server of
// each kind started for them.
func (e *env) peerLoadRound(ctx context.Context, res *peersResult, rd *peerRound, r int) error {
	servers := map[string]*peerServer{}
	defer func() {
		for _, s := range servers {
			s.stop()
		}
	}()
	for _, name := range res.present {
		s, err := e.startPeer(ctx, name)
		if err != nil {
			return err
		}
		servers[name] = s
	}
	for _, name := range res.present {
		hs, err := e.peerHandshakes(ctx, servers[name])
		if err != nil {
			return fmt.Errorf("handshakes, %s, round %d: %w", name, r+1, err)
		}
		e.logf("  p round %d handshakes %-10s: %d at %.0f/s (%d failed), p50 %v p99 %v, %v server CPU each",
			r+1, name, hs.done, hs.rate, hs.failed, hs.p50, hs.p99, hs.cpuPer)
		rd.hs[name] = hs
	}
	for _, topo := range e.p.peerTopos {
		for _, name := range res.present {
			fans, err := e.peerFanout(ctx, servers[name], topo)
			if err != nil {
				return fmt.Errorf("fan-out %v, %s, round %d: %w", topo, name, r+1, err)
			}
			if rd.fan[name] == nil {
				rd.fan[name] = map[peerFanKey]*peerFan{}
			}
			for _, f := range fans {
				rd.fan[name][f.key()] = f
			}
		}
	}
	return nil
}

// ---- the servers ----

func newPeerHTTP() *http.Client {
	return &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: peerHTTPWorkers, DisableCompression: true}}
}

// peersCaddyfile is scenario p's wsgate: a rooms route with
// wsgate_publish, the default in-process broker, and peerPing as its
// ping_interval. Like its peers (nginx's access_log off, Centrifugo's log
// level warn) it writes no log line per connection.
func (e *env) peersCaddyfile(c *caddyProc) string {
	return fmt.Sprintf("{\n\tadmin %s\n\tpersist_config off\n\tauto_https off\n}\n\n%s", c.admin,
		roomsSite(c.roomsPort, true, fmt.Sprintf("\t\t\tping_interval %v\n\t\t\tlog_connections off\n", peerPing)))
}

// centrifugoConfig is Centrifugo's configuration: clients connect without
// a token and may subscribe to any channel without a namespace (as
// wsgate's rooms route, which checks the Origin and nothing more), the
// memory engine, the HTTP API with a key, no history.
func centrifugoConfig(port int) string {
	return fmt.Sprintf(`{
  "http_server": {"address": "127.0.0.1", "port": %d},
  "log": {"level": "warn"},
  "usage_stats": {"disabled": true},
  "client": {
    "allowed_origins": [%q],
    "allow_anonymous_connect_without_token": true,
    "ping_interval": "%s",
    "pong_timeout": "8s"
  },
  "channel": {"without_namespace": {"allow_subscribe_for_anonymous": true, "allow_subscribe_for_client": true}},
  "http_api": {"key": %q}
}
`, port, goodOrigin, peerPing, peerAPIKey)
}

// nchanConfig is nginx's configuration: websocket subscribers on
// /sub/<channel>, HTTP publishers on /pub/<channel>, messages not stored
// (wsgate and Centrifugo keep no history here either).
func nchanConfig(dir string, port int) string {
	return fmt.Sprintf(`daemon off;
master_process on;
worker_processes %d;
worker_rlimit_nofile 65536;
pid %[2]s/nginx.pid;
error_log %[2]s/error.log warn;
load_module %[3]s;
events {
    worker_connections 32768;
}
http {
    access_log off;
    client_body_temp_path %[2]s/body;
    proxy_temp_path %[2]s/proxy;
    fastcgi_temp_path %[2]s/fastcgi;
    uwsgi_temp_path %[2]s/uwsgi;
    scgi_temp_path %[2]s/scgi;
    nchan_store_messages off;
    server {
        listen 127.0.0.1:%[5]d;
        location ~ ^/sub/([A-Za-z0-9_-]+)$ {
            nchan_subscriber websocket;
            nchan_channel_id $1;
            nchan_access_control_allow_origin %[6]s;
            nchan_websocket_ping_interval %[4]d;
        }
        location ~ ^/pub/([A-Za-z0-9_-]+)$ {
            nchan_publisher http;
            nchan_channel_id $1;
        }
    }
}
`, nchanWorkers, dir, nchanModule, int(peerPing.Seconds()), port, goodOrigin)
}

func (e *env) startPeer(ctx context.Context, name string) (*peerServer, error) {
	if name == pWsgate {
		c, err := e.startCaddyKind(ctx, peersCaddy)
		if err != nil {
			return nil, err
		}
		return &peerServer{name: name, port: c.roomsPort, caddy: c, httpc: newPeerHTTP()}, nil
	}
	s, err := tryThrice(ctx, func() (*peerServer, error) { return e.tryStartPeer(ctx, name) })
	if err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	return s, nil
}

func (e *env) tryStartPeer(ctx context.Context, name string) (*peerServer, error) {
	dir, err := os.MkdirTemp(e.dir, strings.ToLower(name)+"-")
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	s := &peerServer{name: name, port: ports[0], dir: dir, logPath: filepath.Join(dir, "server.log"), exited: make(chan struct{}), httpc: newPeerHTTP()}
	var args []string
	switch name {
	case pCentrifugo:
		path := filepath.Join(dir, "config.json")
		if err := os.WriteFile(path, []byte(centrifugoConfig(s.port)), 0o600); err != nil {
			return nil, err
		}
		args = []string{e.peerBins[name], "--config", path}
	case pNchan:
		path := filepath.Join(dir, "nginx.conf")
		if err := os.WriteFile(path, []byte(nchanConfig(dir, s.port)), 0o600); err != nil {
			return nil, err
		}
		args = []string{e.peerBins[name], "-p", dir + "/", "-c", path, "-e", filepath.Join(dir, "error.log")}
	}
	logf, err := os.Create(s.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	s.cmd = exec.Command(args[0], args[1:]...)
	s.cmd.Dir = dir
	s.cmd.Env = append(os.Environ(), "HOME="+dir)
	s.cmd.Stdout, s.cmd.Stderr = logf, logf
	// Its own process group, so that nginx's workers can be killed with
	// their master should it linger.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("running %s: %w", args[0], err)
	}
	e.peers = append(e.peers, s)
	go func() { s.cmd.Wait(); close(s.exited) }()
	err = poll(ctx, 30*time.Second, name+" to serve", func() (bool, error) {
		select {
		case <-s.exited:
			return false, fmt.Errorf("%s exited early:\n%s", name, s.logTail())
		default:
		}
		if name == pNchan && len(s.pids()) < 1+nchanWorkers {
			return false, nil
		}
		resp, err := s.httpc.Get(fmt.Sprintf("http://127.0.0.1:%d/", s.port))
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return true, nil
	})
	if err != nil {
		s.stop()
		return nil, err
	}
	return s, nil
}

func (s *peerServer) logTail() string {
	var out []byte
	for _, p := range []string{s.logPath, filepath.Join(s.dir, "error.log")} {
		b, _ := os.ReadFile(p)
		out = append(out, b...)
	}
	if len(out) > 4000 {
		out = out[len(out)-4000:]
	}
	return string(out)
}

// stop ends the server gracefully (SIGTERM; SIGINT for Caddy) and kills
// it, with its process group, if it lingers.
func (s *peerServer) stop() {
	if s.httpc != nil {
		s.httpc.CloseIdleConnections()
	}
	if s.caddy != nil {
		s.caddy.stop()
		return
	}
	stopProcess(s.cmd.Process, s.exited, syscall.SIGTERM, func() { syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL) })
}

// pids are the server's processes: the process started and its children
// (nginx's workers).
func (s *peerServer) pids() []int {
	if s.caddy != nil {
		return []int{s.caddy.pid()}
	}
	pid := s.cmd.Process.Pid
	out := []int{pid}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	for f := range strings.FieldsSeq(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out
}

// rss is the VmRSS of all the server's processes, summed.
func (s *peerServer) rss() (int64, error) {
	var total int64
	for _, pid := range s.pids() {
		n, err := procRSS(pid)
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

// cpu is the CPU time all the server's processes have used.
func (s *peerServer) cpu() (time.Duration, error) {
	var total time.Duration
	for _, pid := range s.pids() {
		d, err := procCPU(pid)
		if err != nil {
			return 0, err
		}
		total += d
	}
	return total, nil
}

func (s *peerServer) fds() (int, error) {
	total := 0
	for _, pid := range s.pids() {
		n, err := procFDs(pid)
		if err != nil {
			return 0, err
		}
		total += n
	}
	return total, nil
}

// dialer sends the Origin every server here allows (and, to wsgate,
// offers wsgate.v1); linger makes closing send a reset (lingerDial).
func (s *peerServer) dialer(linger bool) ws.Dialer {
	d := ws.Dialer{Header: ws.HandshakeHeaderHTTP(http.Header{"Origin": {goodOrigin}}), Timeout: 10 * time.Second}
	if s.name == pWsgate {
		d = roomsDialer()
	}
	if linger {
		d.NetDial = lingerDial
	}
	return d
}

func (s *peerServer) subURL(ch string) string {
	switch s.name {
	case pWsgate:
		return fmt.Sprintf("ws://127.0.0.1:%d%s", s.port, roomsPath)
	case pCentrifugo:
		return fmt.Sprintf("ws://127.0.0.1:%d/connection/websocket", s.port)
	}
	return fmt.Sprintf("ws://127.0.0.1:%d/sub/%s", s.port, ch)
}

// subscribe connects and subscribes to ch: on wsgate until its
// {"op":"ok"}, on Centrifugo (JSON protocol) through the connect reply
// until the subscribe reply, on Nchan until the upgrade (the channel is
// in the URL).
func (s *peerServer) subscribe(ctx context.Context, d ws.Dialer, ch string, bufSize int) (*client, error) {
	conn, br, hs, err := d.Dial(ctx, s.subURL(ch))
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", s.subURL(ch), err)
	}
	c := &client{conn: conn, br: br, bw: bufio.NewWriterSize(conn, bufSize)}
	if c.br == nil {
		c.br = bufio.NewReaderSize(conn, bufSize)
	}
	switch s.name {
	case pWsgate:
		if hs.Protocol != roomsSubprotocol {
			err = fmt.Errorf("subprotocol %q agreed, want %s", hs.Protocol, roomsSubprotocol)
		} else {
			err = c.subscribe(ch)
		}
	case pCentrifugo:
		err = c.centrifugoCommand(1, "connect", `{}`)
		if err == nil {
			err = c.centrifugoCommand(2, "subscribe", `{"channel":"`+ch+`"}`)
		}
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// centrifugoCommand sends one command of Centrifugo's JSON protocol and
// waits for its reply, {"id":<id>,"<method>":…}.
func (c *client) centrifugoCommand(id int, method, params string) error {
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.conn.SetDeadline(time.Time{})
	req := `{"id":` + strconv.Itoa(id) + `,"` + method + `":` + params + `}`
	if err := c.write(ws.OpText, []byte(req)); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	want := []byte(`{"id":` + strconv.Itoa(id) + `,"` + method + `":`)
	got, err := c.read(make([]byte, 4096))
	if err != nil {
		return fmt.Errorf("Centrifugo %s: %w", method, err)
	}
	if !bytes.HasPrefix(got, want) {
		return fmt.Errorf("Centrifugo %s: reply %q", method, got)
	}
	return nil
}

// publish sends one publication per channel of chans (data[i] to
// chans[i]) in one HTTP request: a single publish for one, a batch for
// more (wsgate_publish takes an array, Centrifugo /api/batch; Nchan has
// no batch publish).
func (s *peerServer) publish(ctx context.Context, chans []string, data [][]byte) error {
	var b bytes.Buffer
	var url string
	hdr := http.Header{"Content-Type": {"application/json"}}
	switch s.name {
	case pWsgate:
		url = fmt.Sprintf("http://127.0.0.1:%d%s", s.port, pubPath)
		hdr.Set("Authorization", "Bearer "+publishKey)
		if len(chans) > 1 {
			b.WriteByte('[')
		}
		for i, ch := range chans {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"channel":"%s","data":%s}`, ch, data[i])
		}
		if len(chans) > 1 {
			b.WriteByte(']')
		}
	case pCentrifugo:
		hdr.Set("X-API-Key", peerAPIKey)
		if len(chans) == 1 {
			url = fmt.Sprintf("http://127.0.0.1:%d/api/publish", s.port)
			fmt.Fprintf(&b, `{"channel":"%s","data":%s}`, chans[0], data[0])
			break
		}
		url = fmt.Sprintf("http://127.0.0.1:%d/api/batch", s.port)
		b.WriteString(`{"commands":[`)
		for i, ch := range chans {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"publish":{"channel":"%s","data":%s}}`, ch, data[i])
		}
		b.WriteString(`]}`)
	case pNchan:
		if len(chans) != 1 {
			return errors.New("Nchan has no batch publish")
		}
		url = fmt.Sprintf("http://127.0.0.1:%d/pub/%s", s.port, chans[0])
		b.Write(data[0])
	}
	req, err := http.NewRequestWithContext(ctx, "POST", url, &b)
	if err != nil {
		return err
	}
	req.Header = hdr
	resp, err := s.httpc.Do(req)
	if err != nil {
		return fmt.Errorf("publishing: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("publishing: %w", err)
	}
	ok := resp.StatusCode == 200
	switch s.name {
	case pWsgate:
		ok = ok && bytes.Contains(body, []byte(`"accepted":`+strconv.Itoa(len(chans))+`,`))
	case pCentrifugo:
		ok = ok && !bytes.Contains(body, []byte(`"error"`))
	case pNchan:
		// 201: delivered to subscribers; 202: queued with none.
		ok = resp.StatusCode == 201 || resp.StatusCode == 202
	}
	if !ok {
		return fmt.Errorf("publishing to %s: %s %s", url, resp.Status, bytes.TrimSpace(body[:min(len(body), 300)]))
	}
	return nil
}

// ---- subscribers ----

// peerMaxWindows bounds the publishing windows of one group of
// subscribers (its warm-up included).
const peerMaxWindows = 64

// peerSub is one subscribed connection and what it received.
type peerSub struct {
	subscriber
	pings atomic.Int64

	lat [][]time.Duration // by window
}

// peerSubs is a group of subscribers of one server.
type peerSubs struct {
	s         *peerServer
	base      time.Time
	subs      []*peerSub
	delivered [peerMaxWindows]atomic.Int64
	closing   atomic.Bool
}

// open connects n subscribers, subscriber i to channel(i), each read by a
// goroutine of its own that answers heartbeats: an idle subscriber that
// did not would be dropped by wsgate and Centrifugo.
func (g *peerSubs) open(ctx context.Context, n int, channel func(int) string) error {
	subs := make([]*peerSub, n)
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	d := g.s.dialer(false)
	for range 32 {
		wg.Go(func() {
			for ctx.Err() == nil {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				cl, err := g.s.subscribe(ctx, d, channel(i), 512)
				if err != nil {
					mu.Lock()
					errs = append(errs, fmt.Errorf("subscriber %d: %w", i, err))
					mu.Unlock()
					next.Store(int64(n))
					return
				}
				s := &peerSub{subscriber: newSubscriber(cl), lat: make([][]time.Duration, peerMaxWindows)}
				subs[i] = s
				go g.read(s)
			}
		})
	}
	wg.Wait()
	for _, s := range subs {
		if s != nil {
			g.subs = append(g.subs, s)
		}
	}
	return errors.Join(append(errs, ctx.Err())...)
}

// read times each delivery against the send time it carries, and answers
// heartbeats: WebSocket pings (wsgate, Nchan) and Centrifugo's {}.
func (g *peerSubs) read(s *peerSub) {
	answer := func(f []byte) error {
		s.pings.Add(1)
		return s.write(f)
	}
	s.read(&g.closing, 1<<20, g.base, func(p []byte) error {
		return answer(clientFrame(ws.OpPong, p))
	}, func(p []byte, at time.Duration) error {
		// Centrifugo may put several replies in one frame, a line each.
		for line := range bytes.SplitSeq(p, []byte("\n")) {
			if len(line) == 0 {
				continue
			}
			if string(line) == "{}" {
				if err := answer(clientFrame(ws.OpText, []byte("{}"))); err != nil {
					return err
				}
				continue
			}
			win, ts, ok := parseCap(line)
			if !ok || win < 0 || win >= peerMaxWindows {
				return fmt.Errorf("unexpected message %q", line)
			}
			s.mu.Lock()
			s.lat[win] = append(s.lat[win], at-time.Duration(ts))
			s.mu.Unlock()
			g.delivered[win].Add(1)
		}
		return nil
	})
}

// failed is the first error of a subscriber that lost its connection.
func (g *peerSubs) failed() error {
	for _, s := range g.subs {
		s.mu.Lock()
		err := s.err
		s.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

func (g *peerSubs) close() {
	g.closing.Store(true)
	closeSubscribers(g.subs)
	g.subs = nil
}

// settle waits (at most 10 s) for the server's descriptors to be back
// down to fds0 (a few more allowed: servers open some lazily) after
// connections closed; the server's side of a close comes a moment after
// the client's.
func (s *peerServer) settle(ctx context.Context, fds0 int) error {
	err := poll(ctx, 10*time.Second, "the server to close its sockets", func() (bool, error) {
		n, err := s.fds()
		return n <= fds0+8, err
	})
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err != nil && !strings.Contains(err.Error(), "timed out") {
		return err
	}
	return nil
}

// ---- 1. idle ----

// peerIdleOnce holds peerIdleConns subscribed connections on a fresh
// server for peerIdleHold, each on a channel of its own, and samples the
// server's RSS every second.
func (e *env) peerIdleOnce(ctx context.Context, name string) (*peerIdle, error) {
	s, err := e.startPeer(ctx, name)
	if err != nil {
		return nil, err
	}
	defer s.stop()
	fds0, err := s.fds()
	if err != nil {
		return nil, err
	}
	// Warm-up: the first connections pay for what is built lazily.
	warm := &peerSubs{s: s, base: time.Now()}
	err = warm.open(ctx, 64, func(i int) string { return "warm-" + strconv.Itoa(i) })
	warm.close()
	if err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	if err := s.settle(ctx, fds0); err != nil {
		return nil, err
	}
	res := &peerIdle{conns: e.p.peerIdleConns}
	if res.before, err = s.rss(); err != nil {
		return nil, err
	}
	g := &peerSubs{s: s, base: time.Now()}
	defer g.close()
	t0 := time.Now()
	if err := g.open(ctx, res.conns, func(i int) string { return "idle-" + strconv.Itoa(i) }); err != nil {
		return nil, err
	}
	res.connectIn = time.Since(t0)
	var per []float64
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	end := time.Now().Add(e.p.peerIdleHold)
	for time.Now().Before(end) {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-tick.C:
		}
		rss, err := s.rss()
		if err != nil {
			return nil, err
		}
		per = append(per, float64(rss-res.before)/float64(res.conns))
	}
	if err := g.failed(); err != nil {
		return nil, fmt.Errorf("a connection ended while idle: %w", err)
	}
	var pings int64
	for _, sub := range g.subs {
		pings += sub.pings.Load()
	}
	res.pings = float64(pings) / float64(res.conns)
	res.samples = len(per)
	if len(per) > 0 {
		res.least, res.most = slices.Min(per), slices.Max(per)
		res.med = median(per, ident)
	}
	return res, nil
}

// ---- 2. handshakes ----

// peerHandshakes runs connect + subscribe handshakes on a fixed schedule
// (open loop, peerHSRate a second for peerHSDur), each followed by a
// close, and takes the server's CPU across them all, closes included.
func (e *env) peerHandshakes(ctx context.Context, s *peerServer) (*peerHS, error) {
	res := &peerHS{rate: float64(e.p.peerHSRate)}
	n := int(math.Round(res.rate * e.p.peerHSDur.Seconds()))
	d := s.dialer(true)
	fds0, err := s.fds()
	if err != nil {
		return nil, err
	}
	cpu0, err := s.cpu()
	if err != nil {
		return nil, err
	}
	jobs := make(chan int, n)
	var mu sync.Mutex
	var lat []time.Duration
	var failed atomic.Int64
	var firstErr atomic.Pointer[string]
	var wg sync.WaitGroup
	for range peerHSWorkers {
		wg.Go(func() {
			for i := range jobs {
				t := time.Now()
				c, err := s.subscribe(ctx, d, "hs-"+strconv.Itoa(i%100), 512)
				if err != nil {
					failed.Add(1)
					m := err.Error()
					firstErr.CompareAndSwap(nil, &m)
					continue
				}
				took := time.Since(t)
				c.conn.Close()
				mu.Lock()
				lat = append(lat, took)
				mu.Unlock()
			}
		})
	}
	schedErr := schedule(ctx, n, time.Duration(float64(time.Second)/res.rate), func(k int64) { jobs <- int(k) })
	close(jobs)
	wg.Wait()
	if schedErr != nil {
		return nil, schedErr
	}
	if err := s.settle(ctx, fds0); err != nil {
		return nil, err
	}
	cpu1, err := s.cpu()
	if err != nil {
		return nil, err
	}
	slices.Sort(lat)
	res.done, res.failed = int64(len(lat)), failed.Load()
	if m := firstErr.Load(); m != nil {
		res.firstErr = *m
	}
	res.p50, res.p99 = percentile(lat, 0.5), percentile(lat, 0.99)
	if res.done > 0 {
		res.cpuPer = (cpu1 - cpu0) / time.Duration(res.done)
	}
	if res.failed*100 > res.done+res.failed {
		return res, fmt.Errorf("%d of %d handshakes failed; the first: %s", res.failed, res.done+res.failed, res.firstErr)
	}
	return res, nil
}

// schedule calls send(k) for k in [0, n) at start + k·period (open loop),
// until ctx ends.
func schedule(ctx context.Context, n int, period time.Duration, send func(k int64)) error {
	start := time.Now().Add(5 * time.Millisecond)
	tm := time.NewTimer(time.Hour)
	defer tm.Stop()
	for k := range int64(n) {
		if d := time.Until(start.Add(time.Duration(k) * period)); d > 0 {
			tm.Reset(d)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-tm.C:
			}
		}
		send(k)
	}
	return ctx.Err()
}

// ---- 3. fan-out ----

// peerFanout subscribes topo's subscribers to s and runs the publishing
// windows: single publishes at each step's rate, then (for several
// channels, on a server that takes them) batches of one publication per
// channel. The steps of a kind stop at the first that loses deliveries or
// that the load generator cannot send.
func (e *env) peerFanout(ctx context.Context, s *peerServer, topo peerTopo) ([]*peerFan, error) {
	g := &peerSubs{s: s, base: time.Now()}
	defer g.close()
	channels := make([]string, topo.channels)
	for i := range channels {
		channels[i] = "fan-" + strconv.Itoa(i)
	}
	if err := g.open(ctx, topo.channels*topo.perChan, func(i int) string { return channels[i%topo.channels] }); err != nil {
		return nil, err
	}
	batches := []int{1}
	if topo.channels > 1 && s.name != pNchan {
		batches = append(batches, topo.channels)
	}
	win := 0
	// Warm-up, not reported.
	warm, err := g.window(ctx, win, topo, e.p.peerFanSteps[0], 1, e.p.fanWarm, channels)
	if err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	e.logf("  p %s %v warm-up: %s", s.name, topo, warm)
	var out []*peerFan
	for _, batch := range batches {
		for _, asked := range e.p.peerFanSteps {
			win++
			f, err := g.window(ctx, win, topo, asked, batch, e.p.peerFanDur, channels)
			if err != nil {
				return out, err
			}
			e.logf("  p %s %v: %s", s.name, topo, f)
			out = append(out, f)
			if f.lost > 0 {
				f.note = fmt.Sprintf("lost %s deliveries: later steps not run", count(float64(f.lost)))
			} else if f.pubRate < 0.9*asked/float64(topo.perChan) {
				f.note = "the load generator fell behind: later steps not run"
			}
			if f.note != "" {
				break
			}
		}
	}
	return out, nil
}

func (f *peerFan) String() string {
	return fmt.Sprintf("batch %d, %.0f deliveries/s asked: %.0f publications/s sent, %.0f deliveries/s, p50 %v p99 %v, %v server CPU per delivery, %d lost",
		f.batch, f.asked, f.pubRate, f.perSec, f.p50, f.p99, f.cpuPer, f.lost)
}

// window publishes for dur at asked deliveries per second (asked ÷
// subscribers per channel publications), batch publications a request,
// round robin over channels; then waits for the deliveries and sums up.
func (g *peerSubs) window(ctx context.Context, win int, topo peerTopo, asked float64, batch int, dur time.Duration, channels []string) (*peerFan, error) {
	f := &peerFan{topo: topo, batch: batch, asked: asked}
	pubRate := asked / float64(topo.perChan)
	reqs := int(math.Max(1, math.Round(pubRate*dur.Seconds()/float64(batch))))
	period := time.Duration(float64(time.Second) * float64(batch) / pubRate)
	cpu0, err := g.s.cpu()
	if err != nil {
		return nil, err
	}
	got0 := g.delivered[win].Load()
	jobs := make(chan int64, reqs)
	var sent, failed atomic.Int64
	var firstErr atomic.Pointer[string]
	var wg sync.WaitGroup
	for range peerHTTPWorkers {
		wg.Go(func() {
			chans := make([]string, batch)
			data := make([][]byte, batch)
			for k := range jobs {
				ts := int64(time.Since(g.base))
				for j := range batch {
					chans[j] = channels[(k*int64(batch)+int64(j))%int64(len(channels))]
					data[j] = []byte(capData(win, ts))
				}
				if err := g.s.publish(ctx, chans, data); err != nil {
					failed.Add(1)
					m := err.Error()
					firstErr.CompareAndSwap(nil, &m)
					continue
				}
				sent.Add(int64(batch))
			}
		})
	}
	start := time.Now()
	schedErr := schedule(ctx, reqs, period, func(k int64) { jobs <- k })
	close(jobs)
	wg.Wait()
	took := time.Since(start)
	if schedErr != nil {
		return nil, schedErr
	}
	if n := failed.Load(); n > 0 {
		return nil, fmt.Errorf("%d publish requests failed; the first: %s", n, *firstErr.Load())
	}
	window := max(time.Duration(reqs)*period, took)
	f.pubRate = float64(sent.Load()) / window.Seconds()
	expected := sent.Load() * int64(topo.perChan)
	// The drain: until every delivery is in, or none has come for a
	// second.
	last, lastAt := int64(-1), time.Now()
	err = poll(ctx, 60*time.Second, "the deliveries", func() (bool, error) {
		d := g.delivered[win].Load() - got0
		if d >= expected {
			return true, nil
		}
		if d != last {
			last, lastAt = d, time.Now()
		}
		return time.Since(lastAt) > time.Second, nil
	})
	if err != nil {
		return nil, err
	}
	cpu1, err := g.s.cpu()
	if err != nil {
		return nil, err
	}
	if err := g.failed(); err != nil {
		return nil, fmt.Errorf("a subscriber failed: %w", err)
	}
	var lat []time.Duration
	for _, s := range g.subs {
		s.mu.Lock()
		lat = append(lat, s.lat[win]...)
		s.lat[win] = nil
		s.mu.Unlock()
	}
	slices.Sort(lat)
	f.delivered = int64(len(lat))
	f.lost = expected - f.delivered
	f.perSec = float64(f.delivered) / window.Seconds()
	f.p50, f.p99 = percentile(lat, 0.5), percentile(lat, 0.99)
	if f.delivered > 0 {
		f.cpuPer = (cpu1 - cpu0) / time.Duration(f.delivered)
	}
	return f, nil
}

// ---- report ----

// peersSection is left out of a run that did not ask for scenario p.
func (r *report) peersSection(w writer) {
	if !r.scen['p'] {
		return
	}
	w("## p. Peers: Centrifugo and Nchan\n\n")
	if !r.section(w, 'p', r.peersErr) {
		return
	}
	res := r.peers
	w("wsgate beside two peer servers, each run by the harness from a configuration it writes, driven by the same\n")
	w("load generator (the harness's gobwas/ws clients, in one process on the same cores). **wsgate**: `caddy run`\n")
	w("with a rooms route (`wsgate %s { rooms { publish_rate off }; origins …; ping_interval %v; log_connections off }`),\n", roomsPath, peerPing)
	w("the default in-process broker and `wsgate_publish %s { key … }`. **Centrifugo**: `centrifugo --config` with\n", pubPath)
	w("the memory engine, `client.allow_anonymous_connect_without_token`, `allow_subscribe_for_anonymous` on channels\n")
	w("without a namespace, `client.allowed_origins`, `client.ping_interval` %v (its default), log level `warn` and\n", peerPing)
	w("the HTTP API with a key; clients speak its JSON protocol on `/connection/websocket` (`connect`, then\n")
	w("`subscribe`; its `{}` pings are answered with `{}`). **Nchan**: nginx (`daemon off`, master process and `worker_processes %d`: one per core, as\n", nchanWorkers)
	w("`auto` picks here, the cores a Go server's GOMAXPROCS spreads over) with `nchan_subscriber websocket` on\n")
	w("`/sub/<channel>`, `nchan_publisher` on `/pub/<channel>`, `nchan_websocket_ping_interval %d`,\n", int(peerPing.Seconds()))
	w("`nchan_store_messages off` (no server keeps history here) and `access_log off`. No server writes a line per\n")
	w("connection: wsgate's `log_connections` is off, as nginx's access log is, and Centrifugo logs connections at\n")
	w("`debug`. Every server sends its heartbeat every %v;\n", peerPing)
	w("the clients answer every one. A server's RSS and CPU are those of all its processes (nginx's master and\n")
	w("workers summed: pages they share count once per process), from `/proc/PID/status` (`VmRSS`) and\n")
	w("`/proc/PID/stat` (utime + stime). %d round(s); each round runs wsgate, Centrifugo, Nchan in turn; ratios are\n", len(res.rounds))
	w("wsgate ÷ the other within a round, and the tables show medians over the rounds.\n\n")
	for _, name := range res.present[1:] {
		w("- %s: %s\n", name, res.versions[name])
	}
	for _, s := range res.skipped {
		w("- **Skipped**: %s\n", s)
	}
	w("\n")

	w("**1. Idle subscribed connections.** In a fresh server: 64 connections opened and closed (warm-up), then RSS\n")
	w("read; %s connections opened (32 at a time), each subscribed to a channel of its own and the subscription\n", count(float64(r.p.peerIdleConns)))
	w("confirmed (Nchan: upgraded); then RSS sampled every second for %v. Per connection: (sample − RSS before) ÷\n", r.p.peerIdleHold)
	w("connections; least, median and most over the samples.\n\n")
	w("| server | RSS before | RSS per connection: least | median | most | heartbeats per connection | wsgate ÷ this (median), each round |\n|---|---|---|---|---|---|---|\n")
	for _, name := range res.present {
		var xs []*peerIdle
		var ratios []string
		for _, rd := range res.rounds {
			if x, ok := rd.idle[name]; ok {
				xs = append(xs, x)
				if g, ok := rd.idle[pWsgate]; ok && name != pWsgate {
					ratios = append(ratios, times(g.med/x.med))
				}
			}
		}
		if len(xs) == 0 {
			continue
		}
		w("| %s | %.1f MiB | %s | %s | %s | %.1f | %s |\n", name,
			median(xs, func(x *peerIdle) float64 { return float64(x.before) })/(1<<20),
			kib(median(xs, func(x *peerIdle) float64 { return x.least })),
			kib(median(xs, func(x *peerIdle) float64 { return x.med })),
			kib(median(xs, func(x *peerIdle) float64 { return x.most })),
			median(xs, func(x *peerIdle) float64 { return x.pings }), orDash(ratios))
	}
	w("\n")

	w("**2. Handshakes.** %d a second for %v on a fixed schedule (open loop, %d concurrent at most): connect, upgrade,\n", r.p.peerHSRate, r.p.peerHSDur, peerHSWorkers)
	w("subscribe until confirmed (wsgate's `ok`, Centrifugo's `connect` then `subscribe` replies; Nchan: the upgrade,\n")
	w("its subscription being the URL), then close (a reset: SO_LINGER 0). Latency from dialing to the confirmation;\n")
	w("server CPU across the whole schedule and the closes, ÷ handshakes.\n\n")
	w("| server | handshakes | failed | p50 | p99 | server CPU per handshake | wsgate ÷ this, each round |\n|---|---|---|---|---|---|---|\n")
	for _, name := range res.present {
		var xs []*peerHS
		var ratios []string
		var failed int64
		for _, rd := range res.rounds {
			if x, ok := rd.hs[name]; ok {
				xs = append(xs, x)
				failed += x.failed
				if g, ok := rd.hs[pWsgate]; ok && name != pWsgate && x.cpuPer > 0 {
					ratios = append(ratios, times(float64(g.cpuPer)/float64(x.cpuPer)))
				}
			}
		}
		if len(xs) == 0 {
			continue
		}
		w("| %s | %s | %d | %s | %s | %s | %s |\n", name, count(median(xs, func(x *peerHS) float64 { return float64(x.done) })), failed,
			micros(median(xs, func(x *peerHS) float64 { return float64(x.p50) })),
			micros(median(xs, func(x *peerHS) float64 { return float64(x.p99) })),
			micros(median(xs, func(x *peerHS) float64 { return float64(x.cpuPer) })), orDash(ratios))
	}
	w("\n")

	w("**3. Fan-out.** Subscribers in channels (`channels × subscribers per channel`), all on the one server; HTTP\n")
	w("publishes on a fixed schedule from %d keep-alive connections, round robin over the channels, each carrying its\n", peerHTTPWorkers)
	w("send time; %v windows at each step of deliveries/s asked, after %v of warm-up at the first. **single**: one\n", r.p.peerFanDur, r.p.fanWarm)
	w("publication a request (wsgate_publish, Centrifugo `/api/publish`, Nchan `/pub/<channel>`); **batch**: one\n")
	w("publication per channel in each request (a JSON array to wsgate_publish, Centrifugo `/api/batch`), run with\n")
	w("several channels only. **Nchan has no batch publish: no batch rows for it.** Latency is receipt − send time\n")
	w("over every delivery; server CPU from the window's start until its last delivery, ÷ deliveries. A kind's steps\n")
	w("stop at the first that loses deliveries or that the load generator cannot send.\n\n")
	w("| shape | publishes | deliveries/s asked | server | publications/s sent | deliveries/s | p50 | p99 | server CPU per delivery | lost | wsgate ÷ this: CPU per delivery, each round |\n")
	w("|---|---|---|---|---|---|---|---|---|---|---|\n")
	var notes []string
	for _, topo := range res.topos {
		for _, batch := range []bool{false, true} {
			for _, asked := range r.p.peerFanSteps {
				k := peerFanKey{topo, batch, asked}
				kind := "single"
				if batch {
					kind = fmt.Sprintf("batch of %d", topo.channels)
				}
				for _, name := range res.present {
					var xs []*peerFan
					var ratios []string
					var lost int64
					for i, rd := range res.rounds {
						x, ok := rd.fan[name][k]
						if !ok {
							continue
						}
						xs = append(xs, x)
						lost += x.lost
						if x.note != "" {
							notes = append(notes, fmt.Sprintf("%s, %v, %s, %s deliveries/s, round %d: %s", name, topo, kind, count(asked), i+1, x.note))
						}
						if g, ok := rd.fan[pWsgate][k]; ok && name != pWsgate && x.cpuPer > 0 {
							ratios = append(ratios, times(float64(g.cpuPer)/float64(x.cpuPer)))
						}
					}
					if len(xs) == 0 {
						continue
					}
					w("| %v | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", topo, kind, count(asked), name,
						count(median(xs, func(x *peerFan) float64 { return x.pubRate })),
						count(median(xs, func(x *peerFan) float64 { return x.perSec })),
						micros(median(xs, func(x *peerFan) float64 { return float64(x.p50) })),
						micros(median(xs, func(x *peerFan) float64 { return float64(x.p99) })),
						micros(median(xs, func(x *peerFan) float64 { return float64(x.cpuPer) })),
						count(float64(lost)), orDash(ratios))
				}
			}
		}
	}
	w("\n")
	for _, n := range notes {
		w("- %s\n", n)
	}
	if len(notes) > 0 {
		w("\n")
	}
}

func orDash(xs []string) string {
	if len(xs) == 0 {
		return "—"
	}
	return strings.Join(xs, ", ")
}

// peerProfiles takes CPU profiles of wsgate in extra runs of scenario p
// that are not part of its figures: the handshake schedule, and a fan-out
// window of each shape at its second step (single publishes).
func (e *env) peerProfiles(ctx context.Context) ([]string, error) {
	s, err := e.startPeer(ctx, pWsgate)
	if err != nil {
		return nil, err
	}
	defer s.stop()
	secs := func(d time.Duration) int { return int(d.Seconds()) - 1 }
	var paths []string
	path, err := e.profileDuring(ctx, s.caddy, "peers-handshakes", secs(e.p.peerHSDur), func() error {
		_, err := e.peerHandshakes(ctx, s)
		return err
	})
	paths = append(paths, path)
	if err != nil {
		return paths, err
	}
	asked := e.p.peerFanSteps[min(1, len(e.p.peerFanSteps)-1)]
	for _, topo := range e.p.peerTopos {
		g := &peerSubs{s: s, base: time.Now()}
		channels := make([]string, topo.channels)
		for i := range channels {
			channels[i] = "fan-" + strconv.Itoa(i)
		}
		err := g.open(ctx, topo.channels*topo.perChan, func(i int) string { return channels[i%topo.channels] })
		if err == nil {
			name := fmt.Sprintf("peers-fanout-%dx%d-%.0fps", topo.channels, topo.perChan, asked)
			path, err = e.profileDuring(ctx, s.caddy, name, secs(e.p.peerFanDur), func() error {
				f, err := g.window(ctx, 0, topo, asked, 1, e.p.peerFanDur, channels)
				if err == nil {
					e.logf("  p profiled %s %v: %s", pWsgate, topo, f)
				}
				return err
			})
			paths = append(paths, path)
		}
		g.close()
		if err != nil {
			return paths, err
		}
	}
	e.logf("profiles: %s", strings.Join(paths, " "))
	return paths, nil
}
