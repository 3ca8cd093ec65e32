package integration

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"
)

// redisServer is a redis-server process owned by a test.
type redisServer struct {
	t    testing.TB
	port int
	dir  string
	cmd  *exec.Cmd
	done chan struct{}
}

func redisPath(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("redis-server")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("redis-server is not installed (.ci/run installs it)")
		}
		t.Skip("redis-server is not installed; apt-get install -y redis-server")
	}
	return p
}

// startRedis starts redis-server on a free port below 32768.
func startRedis(t testing.TB, extra ...string) *redisServer {
	t.Helper()
	r := &redisServer{t: t, port: freePort(t), dir: t.TempDir()}
	r.start(extra...)
	t.Cleanup(r.stop)
	return r
}

func (r *redisServer) addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }
func (r *redisServer) url() string  { return "redis://" + r.addr() }

func (r *redisServer) start(extra ...string) {
	r.t.Helper()
	args := append([]string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--dir", r.dir, "--daemonize", "no"}, extra...)
	r.cmd = exec.Command(redisPath(r.t), args...)
	r.done = make(chan struct{})
	if err := r.cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	done, cmd := r.done, r.cmd
	go func() { cmd.Wait(); close(done) }()
	eventually(r.t, 10*time.Second, "redis-server to accept connections", func() bool {
		c, err := net.Dial("tcp", r.addr())
		if err != nil {
			return false
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		fmt.Fprintf(c, "PING\r\n")
		buf := make([]byte, 16)
		n, _ := c.Read(buf)
		return string(buf[:n]) == "+PONG\r\n"
	})
}

// kill stops the server abruptly.
func (r *redisServer) kill() {
	r.cmd.Process.Kill()
	<-r.done
}

func (r *redisServer) stop() {
	select {
	case <-r.done:
	default:
		r.kill()
	}
}

// publish runs a plain PUBLISH (what any app can do) on a raw connection.
func (r *redisServer) publish(t testing.TB, channel, payload string) {
	t.Helper()
	c, err := net.Dial("tcp", r.addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n", len(channel), channel, len(payload), payload)
	buf := make([]byte, 64)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(buf); err != nil {
		t.Fatal(err)
	}
}
