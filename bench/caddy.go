package bench

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Benchmark traffic identifies itself with these; the wsgate routes allow
// goodOrigin and the tokens' org, so every benchmark message passes every
// check (and is still read by each of them).
const (
	goodOrigin = "https://app.bench.test"
	badOrigin  = "https://evil.bench.test"
	benchPath  = "/bench"
	roomsPath  = "/rooms"   // the wsgate.v1 (rooms mode) route
	pubPath    = "/publish" // the wsgate_publish route of the fan-out gateways
	// publishKey is the fan-out gateways' wsgate_publish bearer key.
	publishKey = "bench-publish-key-0123456789abcdef"
)

// Ports are picked in [portLow, portHigh): below 32768 as the project
// requires, and away from 20000–32000 where the integration tests pick
// theirs, so the two can run at the same time.
const (
	portLow  = 12000
	portHigh = 20000
)

// caddyProc is a running `caddy run` with a benchmark Caddyfile.
type caddyProc struct {
	cmd       *exec.Cmd
	dir       string
	admin     string // host:port of the admin endpoint
	esPort    int    // wsgate: Origin + ES256 JWT + rate limit + channel policy
	hsPort    int    // the same with an HS256 secret
	stockPort int    // stock reverse_proxy
	roomsPort int    // wsgate rooms mode (wsgate.v1) on roomsPath
	zPort     int    // compressCaddy: the wsgate route (as esPort's) with compression
	// The tlsCaddy ports.
	esTLSPort    int // the wsgate (ES256) route over HTTPS
	stockTLSPort int // stock reverse_proxy over HTTPS
	wssPort      int // the wsgate (ES256) route on plain HTTP, to the wss:// upstream
	refusePort   int // scenario r: the one site, whose upstreams are all down (or stock's respond 502)
	kind         caddyKind
	metrics      bool // Caddy's `metrics` option is on
	history      bool // the fan-out gateway keeps fanHistPattern's history
	// clientTLS trusts this Caddy's own CA (tlsCaddy only), once it is
	// ready.
	clientTLS *tls.Config
	logPath   string
	exited    chan struct{}
	http      *http.Client
}

// caddyKind is which configuration a Caddy runs.
type caddyKind int

const (
	// benchCaddy serves every relay variant and a rooms route, each on its
	// own port, with the default (in-process) broker.
	benchCaddy caddyKind = iota
	// fanoutCaddy is one of the two fan-out gateways: the Redis broker, a
	// rooms route and wsgate_publish on one port.
	fanoutCaddy
	// fanoutHistCaddy is a fan-out gateway of scenario h: fanoutCaddy with
	// history kept for the channels of fanHistPattern.
	fanoutHistCaddy
	// tlsCaddy serves the TLS variants of the idle scenario: the wsgate
	// route and stock reverse_proxy over HTTPS, and the wsgate route to
	// the wss:// upstream.
	tlsCaddy
	// metricsCaddy is benchCaddy with Caddy's metrics on (scenario m).
	metricsCaddy
	// baselineCaddy is benchCaddy run from Options.Baseline (scenario m).
	baselineCaddy
	// compressCaddy serves scenario z: the wsgate route without
	// compression (esPort) and with it (zPort), and a rooms route with
	// compression and wsgate_publish (roomsPort).
	compressCaddy
	// refuseActiveCaddy, refusePassiveCaddy and refuseStockCaddy are the
	// gateways of scenario r, with Caddy's metrics on: wsgate with three
	// upstreams that are all down, set aside by active or passive health
	// checks, and stock Caddy answering every request with 502.
	refuseActiveCaddy
	refusePassiveCaddy
	refuseStockCaddy
	// peersCaddy is scenario p's wsgate: a rooms route with
	// wsgate_publish, the default in-process broker.
	peersCaddy
)

// roomsSite is the rooms-mode site: wsgate.v1 on roomsPath, and (for the
// fan-out gateways) backend publishing on pubPath. No JWT: a rooms
// connection's cost is measured without a token's claims, and with the
// default publish rate. On the fan-out gateways the wsgate.v1 publisher
// is the load generator, so the publish rate is not limited there. extra
// is more lines for the wsgate handler (scenario z's compression).
func roomsSite(port int, publish bool, extra string) string {
	var b strings.Builder
	rooms := "rooms"
	if publish {
		rooms = "rooms {\n\t\t\t\tpublish_rate off\n\t\t\t}"
	}
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n\troute {\n", port)
	fmt.Fprintf(&b, "\t\twsgate %s {\n\t\t\t%s\n\t\t\torigins %s\n%s\t\t}\n", roomsPath, rooms, goodOrigin, extra)
	if publish {
		fmt.Fprintf(&b, "\t\twsgate_publish %s {\n\t\t\tkey %s\n\t\t}\n", pubPath, publishKey)
	}
	b.WriteString("\t\trespond 404\n\t}\n}\n")
	return b.String()
}

// fanoutCaddyfile is the configuration of a fan-out gateway.
func (e *env) fanoutCaddyfile(c *caddyProc) string {
	history := ""
	if c.history {
		history = fmt.Sprintf("\t\thistory %s {\n\t\t\tsize %d\n\t\t\tttl %s\n\t\t}\n", fanHistPattern, fanHistSize, fanHistTTL)
	}
	return fmt.Sprintf("{\n\tadmin %s\n\tpersist_config off\n\tauto_https off\n\twsgate {\n\t\tbroker redis %s\n%s\t}\n}\n\n%s",
		c.admin, e.redis.url(), history, roomsSite(c.roomsPort, true, ""))
}

// relayRoute is the wsgate handler with every check on, relaying to
// upstream (a ws:// or wss:// URL); extra, when set, is more lines for
// it: the upstream's `tls` block, or scenario z's `compression`.
func relayRoute(upstream, extra, jwt string) string {
	return fmt.Sprintf(`	wsgate {
		upstream %s
%s		origins %s
		jwt {
%s
		}
		rate_limit {
			messages 10000000/s burst 10000000
			bytes 1GiB/s burst 1GiB
		}
		channels {
			allow publish org:{claims.org}:*
		}
		relay_channels {
			action_field type
			channel_field room
			action publish say
		}
	}
`, upstream, extra, goodOrigin, jwt)
}

// caddyfile is the benchmark configuration: one site per route so that
// no variant pays for another's matchers.
func (e *env) caddyfile(c *caddyProc) string {
	upstream := e.up.addr()
	wsgate := func(jwt string) string { return relayRoute("ws://"+upstream, "", jwt) }
	var b strings.Builder
	metrics := ""
	if c.metrics {
		metrics = "\tmetrics\n"
	}
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tpersist_config off\n\tauto_https off\n%s}\n\n", c.admin, metrics)
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n%s}\n\n", c.esPort,
		wsgate(fmt.Sprintf("\t\t\tpublic_key %s alg ES256", e.pemPath)))
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n%s}\n\n", c.hsPort,
		wsgate(fmt.Sprintf("\t\t\tsecret %s alg HS256", e.hmacSecret)))
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n\treverse_proxy %s\n}\n\n", c.stockPort, upstream)
	b.WriteString(roomsSite(c.roomsPort, false, ""))
	return b.String()
}

// tlsCaddyfile is the configuration of the TLS variants, apart from the
// others so that theirs stays as it was. The HTTPS sites get their
// certificate from `tls internal`: this Caddy's own CA, created in its
// data directory (the run's, see tryStartCaddy). skip_install_trust keeps
// that CA's root out of the system trust store, and local_certs keeps
// every site off ACME, so nothing needs the internet. Automatic HTTPS has
// to stay on (with `auto_https off` no certificate is managed at all),
// but without its redirects, which would listen on port 80. Its listeners
// (HTTP/3's UDP sockets included) are bound to 127.0.0.1 only.
func (e *env) tlsCaddyfile(c *caddyProc) string {
	jwt := fmt.Sprintf("\t\t\tpublic_key %s alg ES256", e.pemPath)
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tpersist_config off\n\tauto_https disable_redirects\n\tlocal_certs\n\tskip_install_trust\n\tdefault_bind 127.0.0.1\n}\n\n", c.admin)
	fmt.Fprintf(&b, "https://127.0.0.1:%d {\n\ttls internal\n%s}\n\n", c.esTLSPort, relayRoute("ws://"+e.up.addr(), "", jwt))
	fmt.Fprintf(&b, "https://127.0.0.1:%d {\n\ttls internal\n\treverse_proxy %s\n}\n\n", c.stockTLSPort, e.up.addr())
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n%s}\n", c.wssPort,
		relayRoute("wss://"+e.up.tlsAddr(), fmt.Sprintf("\t\ttls {\n\t\t\tca_file %s\n\t\t}\n", e.upCAPath), jwt))
	return b.String()
}

// compressCaddyfile is scenario z's configuration: the wsgate route of
// benchCaddy twice, without and with `compression` (its defaults: no
// context takeover, min_size 128, offered to the upstream too), and the
// rooms route with `compression` and wsgate_publish.
func (e *env) compressCaddyfile(c *caddyProc) string {
	jwt := fmt.Sprintf("\t\t\tpublic_key %s alg ES256", e.pemPath)
	var b strings.Builder
	fmt.Fprintf(&b, "{\n\tadmin %s\n\tpersist_config off\n\tauto_https off\n}\n\n", c.admin)
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n%s}\n\n", c.esPort, relayRoute("ws://"+e.up.addr(), "", jwt))
	fmt.Fprintf(&b, "http://127.0.0.1:%d {\n%s}\n\n", c.zPort, relayRoute("ws://"+e.up.addr(), "\t\tcompression\n", jwt))
	b.WriteString(roomsSite(c.roomsPort, true, "\t\t\tcompression\n"))
	return b.String()
}

// startCaddy starts a fresh Caddy; a port taken between picking it and
// Caddy binding it (by another program on the machine) costs a retry.
func (e *env) startCaddy(ctx context.Context) (*caddyProc, error) {
	return e.startCaddyKind(ctx, benchCaddy)
}

func (e *env) startCaddyKind(ctx context.Context, kind caddyKind) (*caddyProc, error) {
	c, err := tryThrice(ctx, func() (*caddyProc, error) { return e.tryStartCaddy(ctx, kind) })
	if err != nil {
		return nil, fmt.Errorf("starting caddy: %w", err)
	}
	return c, nil
}

// tryThrice runs start up to three times (a free port picked beforehand
// can be taken before the process binds it) and joins the errors.
func tryThrice[T any](ctx context.Context, start func() (T, error)) (T, error) {
	var errs []error
	for range 3 {
		v, err := start()
		if err == nil {
			return v, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	var zero T
	return zero, errors.Join(errs...)
}

func (e *env) tryStartCaddy(ctx context.Context, kind caddyKind) (*caddyProc, error) {
	e.caddyN++
	dir := filepath.Join(e.dir, "caddy-"+strconv.Itoa(e.caddyN))
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ports, err := freePorts(5)
	if err != nil {
		return nil, err
	}
	c := &caddyProc{
		kind:    kind,
		dir:     dir,
		admin:   "127.0.0.1:" + strconv.Itoa(ports[0]),
		logPath: filepath.Join(dir, "caddy.log"),
		exited:  make(chan struct{}),
		// No keep-alive: an admin connection held open between two
		// snapshots would itself show up as a goroutine and a descriptor.
		http: &http.Client{Timeout: 60 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}},
	}
	var cfg func(*caddyProc) string
	switch kind {
	case benchCaddy, metricsCaddy, baselineCaddy:
		c.roomsPort, c.esPort, c.hsPort, c.stockPort = ports[1], ports[2], ports[3], ports[4]
		c.metrics = kind == metricsCaddy
		cfg = e.caddyfile
	case peersCaddy:
		c.roomsPort = ports[1]
		cfg = e.peersCaddyfile
	case fanoutCaddy, fanoutHistCaddy:
		c.roomsPort = ports[1]
		c.history = kind == fanoutHistCaddy
		cfg = e.fanoutCaddyfile
	case tlsCaddy:
		c.esTLSPort, c.stockTLSPort, c.wssPort = ports[1], ports[2], ports[3]
		cfg = e.tlsCaddyfile
	case compressCaddy:
		c.esPort, c.zPort, c.roomsPort = ports[1], ports[2], ports[3]
		cfg = e.compressCaddyfile
	case refuseActiveCaddy, refusePassiveCaddy, refuseStockCaddy:
		c.refusePort = ports[1]
		cfg = e.refuseCaddyfile
	}
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(cfg(c)), 0o600); err != nil {
		return nil, err
	}
	logf, err := os.Create(c.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child holds its own descriptor
	bin := e.opt.Caddy
	if kind == baselineCaddy {
		bin = e.opt.Baseline
	}
	args := []string{bin, "run", "--config", cfgPath, "--adapter", "caddyfile"}
	if e.opt.GatewayCPUs != "" {
		// taskset sets the affinity and execs Caddy: the process (and its
		// pid) is Caddy's, and its Go runtime sizes GOMAXPROCS to the list.
		args = append([]string{"taskset", "-c", e.opt.GatewayCPUs}, args...)
	}
	c.cmd = exec.Command(args[0], args[1:]...)
	c.cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	c.cmd.Stdout, c.cmd.Stderr = logf, logf
	// A harness killed without a chance to clean up takes Caddy with it.
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("running %s: %w", bin, err)
	}
	e.procs = append(e.procs, c)
	go func() { c.cmd.Wait(); close(c.exited) }()
	if err := c.waitReady(ctx); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

func (c *caddyProc) pid() int { return c.cmd.Process.Pid }

// waitReady waits for the admin endpoint and every site. An HTTPS site is
// ready once a TLS handshake verifies against this Caddy's root: the
// listener is up before its certificate has been issued.
func (c *caddyProc) waitReady(ctx context.Context) error {
	var notYet error // why the last check failed, for a timeout
	ready := func() (bool, error) {
		select {
		case <-c.exited:
			return false, fmt.Errorf("caddy exited early:\n%s", c.logTail())
		default:
		}
		resp, err := c.http.Get("http://" + c.admin + "/config/")
		if err != nil {
			notYet = err
			return false, nil
		}
		resp.Body.Close()
		for _, p := range []int{c.esPort, c.hsPort, c.stockPort, c.roomsPort, c.wssPort, c.zPort, c.refusePort} {
			if p == 0 {
				continue
			}
			conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(p))
			if err != nil {
				notYet = err
				return false, nil
			}
			conn.Close()
		}
		if c.esTLSPort == 0 {
			return true, nil
		}
		if c.clientTLS == nil {
			if c.clientTLS, err = c.trustRoot(); err != nil {
				notYet = err
				return false, nil
			}
		}
		for _, p := range []int{c.esTLSPort, c.stockTLSPort} {
			d := &net.Dialer{Timeout: 5 * time.Second}
			conn, err := tls.DialWithDialer(d, "tcp", "127.0.0.1:"+strconv.Itoa(p), c.clientTLS)
			if err != nil {
				notYet = err
				return false, nil
			}
			conn.Close()
		}
		return true, nil
	}
	if err := poll(ctx, 30*time.Second, "caddy to serve", ready); err != nil {
		if notYet != nil {
			err = fmt.Errorf("%w (last: %v)", err, notYet)
		}
		return fmt.Errorf("%w\n%s", err, c.logTail())
	}
	return nil
}

// trustRoot is a client TLS configuration that trusts only the root of
// this Caddy's local CA (`tls internal`), read from its data directory,
// and offers HTTP/1.1 only: WebSockets need it, and Caddy would pick h2.
func (c *caddyProc) trustRoot() (*tls.Config, error) {
	path := filepath.Join(c.dir, "caddy", "pki", "authorities", "local", "root.crt")
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("no certificate in %s yet", path)
	}
	return &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.1"}}, nil
}

// stop ends Caddy gracefully (SIGINT), and kills it if it lingers.
func (c *caddyProc) stop() {
	stopProcess(c.cmd.Process, c.exited, os.Interrupt, func() { c.cmd.Process.Kill() })
}

// stopProcess sends p sig, and runs kill if p has not exited (closed
// exited) within 15 s; it returns once p has exited.
func stopProcess(p *os.Process, exited <-chan struct{}, sig os.Signal, kill func()) {
	select {
	case <-exited:
		return
	default:
	}
	p.Signal(sig)
	t := time.NewTimer(15 * time.Second)
	defer t.Stop()
	select {
	case <-exited:
	case <-t.C:
		kill()
		<-exited
	}
}

func (c *caddyProc) logTail() string {
	b, _ := os.ReadFile(c.logPath)
	if len(b) > 4000 {
		b = b[len(b)-4000:]
	}
	return string(b)
}

func (c *caddyProc) get(ctx context.Context, path string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, "GET", "http://"+c.admin+path, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("admin %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != 200 {
		err = fmt.Errorf("admin %s: %s", path, resp.Status)
	}
	return b, err
}

// procSnapshot is what the gateway process holds at one moment, taken
// right after a forced GC so that the heap is live objects only.
type procSnapshot struct {
	rss        int64 // bytes
	heap       int64 // HeapAlloc after GC, bytes
	stack      int64 // StackInuse, bytes
	goroutines int
	fds        int
}

func (c *caddyProc) snapshot(ctx context.Context) (procSnapshot, error) {
	var s procSnapshot
	// The heap profile handler runs a GC first when asked (gc=1); Caddy's
	// admin offers no other way to trigger one.
	if _, err := c.get(ctx, "/debug/pprof/heap?gc=1"); err != nil {
		return s, err
	}
	b, err := c.get(ctx, "/debug/vars")
	if err != nil {
		return s, err
	}
	var v struct {
		Memstats struct{ HeapAlloc, StackInuse int64 }
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return s, fmt.Errorf("admin /debug/vars: %w", err)
	}
	s.heap, s.stack = v.Memstats.HeapAlloc, v.Memstats.StackInuse
	if s.goroutines, err = c.goroutines(ctx); err != nil {
		return s, err
	}
	if s.rss, err = procRSS(c.pid()); err != nil {
		return s, err
	}
	s.fds, err = procFDs(c.pid())
	return s, err
}

func (c *caddyProc) goroutines(ctx context.Context) (int, error) {
	b, err := c.get(ctx, "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	// "goroutine profile: total N"
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) == 0 {
		return 0, fmt.Errorf("goroutine profile: %q", line)
	}
	n, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		return 0, fmt.Errorf("goroutine profile: %q", line)
	}
	return n, nil
}

// procRSS is VmRSS of pid in bytes.
func procRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

// userHZ is the unit of utime and stime in /proc/PID/stat: USER_HZ, 100
// on every Linux architecture Go supports.
const userHZ = 100

// procCPU is the user+system CPU time pid has used, all threads included.
func procCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses; fields resume
	// after the last ')'. utime and stime are fields 14 and 15.
	i := bytes.LastIndexByte(b, ')')
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("short /proc/%d/stat", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(ut+st) * time.Second / userHZ, nil
}

func procFDs(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// freePorts picks n distinct ports that are free right now. Caddy binds
// them a moment later; startCaddy retries if one was taken meanwhile.
func freePorts(n int) ([]int, error) {
	var ports []int
	seen := map[int]bool{}
	for tries := 0; len(ports) < n; tries++ {
		if tries > 500 {
			return nil, errors.New("no free port")
		}
		p := portLow + rand.IntN(portHigh-portLow)
		if seen[p] {
			continue
		}
		seen[p] = true
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		ports = append(ports, p)
	}
	return ports, nil
}

// reservePorts takes n free ports in the benchmark's range that refuse
// every connection: each is a socket bound to 127.0.0.1 that never
// listens, held until release, so that no other process (a test running
// beside the benchmark) can take the port and answer on it.
func reservePorts(n int) (ports []int, release func(), err error) {
	var fds []int
	release = func() {
		for _, fd := range fds {
			syscall.Close(fd)
		}
	}
	for tries := 0; len(ports) < n; tries++ {
		if tries > 500 {
			release()
			return nil, nil, errors.New("no free port")
		}
		p := portLow + rand.IntN(portHigh-portLow)
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			release()
			return nil, nil, err
		}
		if syscall.Bind(fd, &syscall.SockaddrInet4{Port: p, Addr: [4]byte{127, 0, 0, 1}}) != nil {
			syscall.Close(fd)
			continue
		}
		fds = append(fds, fd)
		ports = append(ports, p)
	}
	return ports, release, nil
}

// listenFree opens a listener on a free port in the benchmark's range.
func listenFree() (net.Listener, error) {
	for range 500 {
		p := portLow + rand.IntN(portHigh-portLow)
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err == nil {
			return ln, nil
		}
	}
	return nil, errors.New("no free port")
}

// poll checks cond until it holds, fails, or within passes.
func poll(ctx context.Context, within time.Duration, what string, cond func() (bool, error)) error {
	deadline := time.Now().Add(within)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %v waiting for %s", within, what)
		}
		t.Reset(10 * time.Millisecond)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}

// pause waits d unless ctx ends first. It holds a load for a set time; it
// is never used to wait for a condition (poll does that).
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
