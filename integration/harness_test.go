package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/poll"
	"github.com/wsgate/wsgate/internal/testports"
)

// caddyBin is the gateway binary built once for the whole run.
var caddyBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "wsgate-it-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	caddyBin = filepath.Join(dir, "caddy")
	build := exec.Command("go", "build", "-o", caddyBin, "github.com/wsgate/wsgate/cmd/caddy")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building cmd/caddy:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var portMu sync.Mutex
var usedPorts = map[int]bool{}

// freePort finds a free TCP port on 127.0.0.1 in the tests' range
// (testports: by default below the ephemeral range, away from the machine's
// standard services).
func freePort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	for i := 0; i < 200; i++ {
		p, err := testports.Random()
		if err != nil {
			t.Fatal(err)
		}
		if usedPorts[p] {
			continue
		}
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		ln.Close()
		usedPorts[p] = true
		return p
	}
	t.Fatal("no free port")
	return 0
}

// listen opens a listener on a free port of the tests' range.
func listen(t testing.TB) net.Listener {
	t.Helper()
	for i := 0; i < 50; i++ {
		p := freePort(t)
		ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err == nil {
			return ln
		}
	}
	t.Fatal("cannot listen")
	return nil
}

// gateway is a running cmd/caddy process.
type gateway struct {
	t         testing.TB
	global    string // extra global options
	env       []string
	cmd       *exec.Cmd
	dir       string
	adminAddr string
	port      int
	logs      *syncBuffer
	exited    chan struct{}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startGateway runs Caddy with a site on a free port. site is the body of
// the site block (what goes inside `http://127.0.0.1:PORT { … }`).
func startGateway(t testing.TB, site string) *gateway {
	t.Helper()
	return startGatewayWith(t, "", nil, site)
}

// startGatewayWith is startGateway with extra global options and
// environment variables for the process.
func startGatewayWith(t testing.TB, global string, env []string, site string) *gateway {
	t.Helper()
	return startGatewayFull(t, 0, global, env, site)
}

// startGatewayOnPort starts a gateway on a port chosen beforehand.
func startGatewayOnPort(t testing.TB, port int, site string) *gateway {
	t.Helper()
	return startGatewayFull(t, port, "", nil, site)
}

func startGatewayFull(t testing.TB, port int, global string, env []string, site string) *gateway {
	t.Helper()
	g := &gateway{t: t, global: global, env: env, dir: t.TempDir(), logs: &syncBuffer{}, exited: make(chan struct{})}
	g.port = port
	if g.port == 0 {
		g.port = freePort(t)
	}
	g.adminAddr = "127.0.0.1:" + strconv.Itoa(freePort(t))
	g.run(g.writeCaddyfile(site))
	return g
}

// startGatewayFromText runs Caddy with a whole Caddyfile whose site listens
// on port and whose admin endpoint is adminAddr (both polled until ready).
func startGatewayFromText(t testing.TB, port int, adminAddr, caddyfile string) *gateway {
	t.Helper()
	g := &gateway{t: t, dir: t.TempDir(), logs: &syncBuffer{}, exited: make(chan struct{}), port: port, adminAddr: adminAddr}
	path := filepath.Join(g.dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(caddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	g.run(path)
	return g
}

// run starts Caddy with the Caddyfile at path and waits until it is ready;
// the test's cleanup stops it.
func (g *gateway) run(path string) {
	t := g.t
	t.Helper()
	g.cmd = exec.Command(caddyBin, "run", "--config", path, "--adapter", "caddyfile")
	g.cmd.Env = append(os.Environ(), "HOME="+g.dir, "XDG_DATA_HOME="+g.dir, "XDG_CONFIG_HOME="+g.dir)
	g.cmd.Env = append(g.cmd.Env, g.env...)
	g.cmd.Stdout, g.cmd.Stderr = g.logs, g.logs
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { g.cmd.Wait(); close(g.exited) }()
	t.Cleanup(g.stop)
	g.waitReady()
}

func (g *gateway) caddyfile(site string) string {
	return fmt.Sprintf("{\n\tadmin %s\n\tpersist_config off\n\tlog {\n\t\tlevel DEBUG\n\t}\n%s\n}\n\nhttp://127.0.0.1:%d {\n%s\n}\n",
		g.adminAddr, g.global, g.port, site)
}

func (g *gateway) writeCaddyfile(site string) string {
	path := filepath.Join(g.dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(g.caddyfile(site)), 0o600); err != nil {
		g.t.Fatal(err)
	}
	return path
}

func (g *gateway) waitReady() {
	g.t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-g.exited:
			g.t.Fatalf("caddy exited early:\n%s", g.logs)
		default:
		}
		resp, err := http.Get("http://" + g.adminAddr + "/config/")
		if err == nil {
			resp.Body.Close()
			c, err := net.Dial("tcp", g.addr())
			if err == nil {
				c.Close()
				return
			}
		}
		pollPause()
	}
	g.t.Fatalf("caddy not ready:\n%s", g.logs)
}

func (g *gateway) addr() string { return "127.0.0.1:" + strconv.Itoa(g.port) }

// url of a WebSocket path on the gateway.
func (g *gateway) url(path string) string { return "ws://" + g.addr() + path }

// origin is the gateway's own origin (same-origin requests).
func (g *gateway) origin() string { return "http://" + g.addr() }

// reload loads a new site config through the admin API.
func (g *gateway) reload(site string) {
	g.t.Helper()
	req, _ := http.NewRequest("POST", "http://"+g.adminAddr+"/load", strings.NewReader(g.caddyfile(site)))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		g.t.Fatalf("reload: %d %s", resp.StatusCode, body)
	}
}

// signal sends sig and waits for the process to exit.
func (g *gateway) terminate(sig syscall.Signal, within time.Duration) {
	g.t.Helper()
	g.cmd.Process.Signal(sig)
	select {
	case <-g.exited:
	case <-time.After(within):
		g.cmd.Process.Kill()
		g.t.Fatalf("caddy did not exit within %v", within)
	}
}

func (g *gateway) stop() {
	select {
	case <-g.exited:
	default:
		g.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-g.exited:
		case <-time.After(15 * time.Second):
			g.cmd.Process.Kill()
			<-g.exited
		}
	}
	// Whatever a test did, no token it minted may appear in the logs.
	if leaks := tokenLeaks(g.logs.String()); len(leaks) > 0 {
		g.t.Errorf("%d token(s) found in the gateway's logs", len(leaks))
	}
}

// goroutines reads the gateway's goroutine count from the admin pprof endpoint.
func (g *gateway) goroutines() int {
	g.t.Helper()
	resp, err := http.Get("http://" + g.adminAddr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	line, _ := io.ReadAll(io.LimitReader(resp.Body, 200))
	// Read the rest, so that the next poll reuses this connection: a new
	// one each time would make the count of open files flicker.
	io.Copy(io.Discard, resp.Body)
	// "goroutine profile: total N"
	f := strings.Fields(strings.SplitN(string(line), "\n", 2)[0])
	n, err := strconv.Atoi(f[len(f)-1])
	if err != nil {
		g.t.Fatalf("goroutine profile: %q", line)
	}
	return n
}

// openFiles counts the gateway process's open file descriptors.
func (g *gateway) openFiles() int {
	g.t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", g.cmd.Process.Pid))
	if err != nil {
		g.t.Fatal(err)
	}
	return len(ents)
}

type memStats struct {
	HeapAlloc  uint64
	HeapInuse  uint64
	TotalAlloc uint64
	Sys        uint64
}

// memstats reads runtime.MemStats from the admin expvar endpoint.
func (g *gateway) memstats() memStats {
	g.t.Helper()
	resp, err := http.Get("http://" + g.adminAddr + "/debug/vars")
	if err != nil {
		g.t.Fatal(err)
	}
	defer resp.Body.Close()
	var v struct{ Memstats memStats }
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		g.t.Fatal(err)
	}
	return v.Memstats
}

// eventually polls cond until it holds or within has passed.
func eventually(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	poll.Until(t, within, what, cond)
}

// pollPause is the interval between two polls of a condition.
func pollPause() { <-time.After(10 * time.Millisecond) }

func ctxT(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// rss is the gateway process's resident set size in bytes.
func (g *gateway) rss() int64 {
	g.t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", g.cmd.Process.Pid))
	if err != nil {
		g.t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024
		}
	}
	g.t.Fatal("no VmRSS")
	return 0
}
