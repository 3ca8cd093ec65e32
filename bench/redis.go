package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// redisProc is the redis-server the fan-out gateways share, started by
// the harness on a free port of its range.
type redisProc struct {
	cmd     *exec.Cmd
	port    int
	logPath string
	exited  chan struct{}
}

// errNoRedis is returned when scenario d or h cannot run for want of Redis.
var errNoRedis = errors.New("scenarios d and h need redis-server on PATH (apt-get install redis-server)")

func (e *env) startRedis(ctx context.Context) (*redisProc, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, errNoRedis
	}
	r, err := tryThrice(ctx, func() (*redisProc, error) { return e.tryStartRedis(ctx, bin) })
	if err != nil {
		return nil, fmt.Errorf("starting redis-server: %w", err)
	}
	return r, nil
}

func (e *env) tryStartRedis(ctx context.Context, bin string) (*redisProc, error) {
	dir, err := os.MkdirTemp(e.dir, "redis-")
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	r := &redisProc{port: ports[0], logPath: filepath.Join(dir, "redis.log"), exited: make(chan struct{})}
	logf, err := os.Create(r.logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	r.cmd = exec.Command(bin, "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", dir, "--daemonize", "no")
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("running %s: %w", bin, err)
	}
	go func() { r.cmd.Wait(); close(r.exited) }()
	err = poll(ctx, 10*time.Second, "redis-server to answer PING", func() (bool, error) {
		select {
		case <-r.exited:
			b, _ := os.ReadFile(r.logPath)
			return false, fmt.Errorf("redis-server exited early:\n%s", b)
		default:
		}
		got, err := r.do("PING")
		return err == nil && got == "PONG", nil
	})
	if err != nil {
		r.stop()
		return nil, err
	}
	return r, nil
}

func (r *redisProc) url() string  { return "redis://" + r.addr() }
func (r *redisProc) addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }
func (r *redisProc) pid() int     { return r.cmd.Process.Pid }

func (r *redisProc) stop() {
	select {
	case <-r.exited:
		return
	default:
	}
	r.cmd.Process.Kill()
	<-r.exited
}

// do sends one command on a fresh connection and returns its reply: a
// simple string, an integer or a bulk string, as text.
func (r *redisProc) do(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", r.addr(), 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := io.WriteString(c, b.String()); err != nil {
		return "", err
	}
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		return "", err
	}
	line = strings.TrimRight(line, "\r\n")
	if line == "" {
		return "", errors.New("redis: empty reply")
	}
	switch line[0] {
	case '+', ':':
		return line[1:], nil
	case '-':
		return "", fmt.Errorf("redis: %s", line[1:])
	case '$':
		n, err := strconv.Atoi(line[1:])
		if err != nil || n < 0 {
			return "", fmt.Errorf("redis: bad bulk length %q", line)
		}
		p := make([]byte, n+2)
		if _, err := io.ReadFull(br, p); err != nil {
			return "", err
		}
		return string(p[:n]), nil
	}
	return "", fmt.Errorf("redis: unexpected reply %q", line)
}

// commandCalls is how many times Redis has executed each command so far,
// from INFO commandstats (cmdstat_<name>:calls=N,...), lower-case names
// as Redis spells them ("publish", "evalsha", "xadd", "script|load").
// Commands run by a Lua script count as well as those sent by clients,
// so a PUBLISH inside an EVALSHA shows as one of each.
func (r *redisProc) commandCalls() (map[string]int64, error) {
	info, err := r.do("INFO", "commandstats")
	if err != nil {
		return nil, err
	}
	return parseCommandStats(info)
}

func parseCommandStats(info string) (map[string]int64, error) {
	out := map[string]int64{}
	for line := range strings.SplitSeq(info, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_")
		if !ok {
			continue
		}
		name, fields, ok := strings.Cut(rest, ":")
		if !ok {
			return nil, fmt.Errorf("redis: bad commandstats line %q", line)
		}
		found := false
		for f := range strings.SplitSeq(fields, ",") {
			if v, ok := strings.CutPrefix(f, "calls="); ok {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return nil, fmt.Errorf("redis: bad commandstats line %q", line)
				}
				out[name], found = n, true
			}
		}
		if !found {
			return nil, fmt.Errorf("redis: no calls in %q", line)
		}
	}
	return out, nil
}
