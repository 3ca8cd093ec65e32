// Package redistest runs redis-server processes for tests: each on a port
// the test chooses, in a directory of its own, stopped when the test ends,
// and able to be killed and started again.
package redistest

import (
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/testports"
)

// Bin finds a Redis tool (redis-server, redis-cli). With CI set it must
// be there; elsewhere the test is skipped with the command that installs it.
func Bin(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed (.ci/run installs it)", name)
		}
		t.Skipf("%s is not installed; apt-get install -y redis-server redis-tools", name)
	}
	return p
}

// Server is a redis-server process owned by a test.
type Server struct {
	t    testing.TB
	Port int
	dir  string
	args []string
	cmd  *exec.Cmd
	done chan struct{}
}

// Start starts redis-server on 127.0.0.1:port with extra arguments (a
// relative file name in them is in the server's own directory), waits
// until it answers PING, and stops it when the test ends.
func Start(t testing.TB, port int, extra ...string) *Server {
	t.Helper()
	s := &Server{t: t, Port: port, dir: t.TempDir(), args: extra}
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

var (
	portMu    sync.Mutex
	usedPorts = map[int]bool{}
)

// StartFree is Start on a port of the tests' range (testports: by default
// below the ephemeral range) that is free now and not handed out before in
// this process.
func StartFree(t testing.TB, extra ...string) *Server {
	t.Helper()
	portMu.Lock()
	port := 0
	for i := 0; i < 200 && port == 0; i++ {
		p, err := testports.Random()
		if err != nil {
			portMu.Unlock()
			t.Fatal(err)
		}
		if usedPorts[p] {
			continue
		}
		if ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p)); err == nil {
			ln.Close()
			usedPorts[p] = true
			port = p
		}
	}
	portMu.Unlock()
	if port == 0 {
		t.Fatal("no free port")
	}
	return Start(t, port, extra...)
}

// Addr is host:port.
func (s *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(s.Port) }

// URL is the redis:// URL of the server.
func (s *Server) URL() string { return "redis://" + s.Addr() }

// Restart starts the server again, with the same port, directory and
// arguments, after Kill.
func (s *Server) Restart() {
	s.t.Helper()
	args := append([]string{"--port", strconv.Itoa(s.Port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", s.dir, "--daemonize", "no", "--logfile", filepath.Join(s.dir, "redis.log")}, s.args...)
	s.cmd = exec.Command(Bin(s.t, "redis-server"), args...)
	s.done = make(chan struct{})
	if err := s.cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	done, cmd := s.done, s.cmd
	go func() { cmd.Wait(); close(done) }()
	deadline := time.Now().Add(10 * time.Second)
	for !s.ping() {
		select {
		case <-done:
			log, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
			s.t.Fatalf("redis-server exited: %s", log)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on %s did not answer PING within 10s", s.Addr())
		}
	}
}

func (s *Server) ping() bool {
	c, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	io.WriteString(c, "PING\r\n")
	buf := make([]byte, 16)
	n, _ := c.Read(buf)
	return string(buf[:n]) == "+PONG\r\n"
}

// Kill stops the server abruptly and waits for it to be gone.
func (s *Server) Kill() {
	s.cmd.Process.Kill()
	<-s.done
}

// Freeze stops the server's process (SIGSTOP) and closes nothing: its
// connections stay open and nothing on them is answered, which is how a
// host that lost power or is cut off by a partition looks from the
// network. Thaw resumes it; Kill and Stop work on a frozen server too.
func (s *Server) Freeze() { s.cmd.Process.Signal(syscall.SIGSTOP) }

// Thaw resumes a frozen server (SIGCONT).
func (s *Server) Thaw() { s.cmd.Process.Signal(syscall.SIGCONT) }

// Stop kills the server unless it is gone already.
func (s *Server) Stop() {
	select {
	case <-s.done:
	default:
		s.Kill()
	}
}
