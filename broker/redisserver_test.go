package broker_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/wsgate/wsgate/internal/redistest"
)

// redisServer is a redis-server process owned by a test.
type redisServer struct{ *redistest.Server }

// startRedis starts redis-server on a free port below 32768; the test's
// cleanup stops it.
func startRedis(t testing.TB, extra ...string) *redisServer {
	t.Helper()
	return &redisServer{redistest.Start(t, freePort(t), extra...)}
}

func (r *redisServer) addr() string { return r.Addr() }
func (r *redisServer) url() string  { return r.URL() }
func (r *redisServer) start()       { r.Restart() }
func (r *redisServer) kill()        { r.Kill() }

// respConn is a minimal RESP2 client written apart from go-redis, so a
// test talks to Redis as any other application would.
type respConn struct {
	c net.Conn
	r *bufio.Reader
}

// respError is an error reply.
type respError string

func (e respError) Error() string { return string(e) }

func dialRESP(t testing.TB, addr string) *respConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dialing %s: %v", addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &respConn{c: c, r: bufio.NewReader(c)}
}

// do sends a command and returns its reply: string, int64, []any, nil,
// or respError.
func (c *respConn) do(t testing.TB, args ...string) any {
	t.Helper()
	v, err := c.try(args...)
	if err != nil {
		t.Fatalf("%s: %v", args[0], err)
	}
	return v
}

func (c *respConn) try(args ...string) (any, error) {
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	c.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.c.Write(b.Bytes()); err != nil {
		return nil, err
	}
	return c.read()
}

func (c *respConn) read() (any, error) {
	line, err := c.r.ReadString('\n')
	if err != nil {
		return nil, err
	}
	if len(line) < 3 || !strings.HasSuffix(line, "\r\n") {
		return nil, fmt.Errorf("bad RESP line %q", line)
	}
	kind, rest := line[0], line[1:len(line)-2]
	switch kind {
	case '+':
		return rest, nil
	case '-':
		return respError(rest), nil
	case ':':
		return strconv.ParseInt(rest, 10, 64)
	case '$':
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 {
			return nil, err
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(c.r, buf); err != nil {
			return nil, err
		}
		return string(buf[:n]), nil
	case '*':
		n, err := strconv.Atoi(rest)
		if err != nil || n < 0 {
			return nil, err
		}
		out := make([]any, n)
		for i := range out {
			if out[i], err = c.read(); err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("unknown RESP type %q", kind)
}

// rawPublish runs cmd (PUBLISH or SPUBLISH) on a fresh connection to addr,
// the way a backend that is not wsgate would, and returns the number of
// receivers Redis reports.
func rawPublish(t testing.TB, addr, cmd, name string, payload []byte) int64 {
	t.Helper()
	c := dialRESP(t, addr)
	defer c.c.Close()
	v := c.do(t, cmd, name, string(payload))
	n, ok := v.(int64)
	if !ok {
		t.Fatalf("%s %s: unexpected reply %v", cmd, name, v)
	}
	return n
}

// numsub is the subscriber count of one channel from
// PUBSUB NUMSUB or PUBSUB SHARDNUMSUB (sub is "NUMSUB" or "SHARDNUMSUB").
func numsub(t testing.TB, addr, sub, name string) int64 {
	t.Helper()
	c := dialRESP(t, addr)
	defer c.c.Close()
	v, ok := c.do(t, "PUBSUB", sub, name).([]any)
	if !ok || len(v) != 2 {
		t.Fatalf("PUBSUB %s %s: unexpected reply %v", sub, name, v)
	}
	return v[1].(int64)
}

// commandCalls is the calls count of cmd in INFO commandstats on addr.
func commandCalls(t testing.TB, addr, cmd string) int64 {
	t.Helper()
	c := dialRESP(t, addr)
	defer c.c.Close()
	info, ok := c.do(t, "INFO", "commandstats").(string)
	if !ok {
		t.Fatal("INFO commandstats: not a bulk string")
	}
	for _, line := range strings.Split(info, "\r\n") {
		rest, ok := strings.CutPrefix(line, "cmdstat_"+strings.ToLower(cmd)+":calls=")
		if !ok {
			continue
		}
		n, _, _ := strings.Cut(rest, ",")
		v, err := strconv.ParseInt(n, 10, 64)
		if err != nil {
			t.Fatalf("commandstats line %q: %v", line, err)
		}
		return v
	}
	return 0
}

// redisCluster is three cluster masters owned by a test.
type redisCluster struct {
	nodes []*redisServer
	// owner maps each hash slot to the address of its master.
	owner [16384]string
}

func (c *redisCluster) addrs() []string {
	var a []string
	for _, n := range c.nodes {
		a = append(a, n.addr())
	}
	return a
}

// startCluster starts three masters, joins them with redis-cli and waits
// for cluster_state:ok on every node.
func startCluster(t testing.TB) *redisCluster {
	t.Helper()
	cli := redistest.Bin(t, "redis-cli")
	c := &redisCluster{}
	for i := 0; i < 3; i++ {
		// the config file is in the server's own directory
		r := startRedis(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")
		c.nodes = append(c.nodes, r)
	}
	args := append([]string{"--cluster", "create"}, c.addrs()...)
	args = append(args, "--cluster-replicas", "0", "--cluster-yes")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, cli, args...).CombinedOutput(); err != nil {
		t.Fatalf("redis-cli --cluster create: %v\n%s", err, out)
	}
	for _, n := range c.nodes {
		eventually(t, 30*time.Second, "cluster_state:ok on "+n.addr(), func() bool {
			out, err := exec.CommandContext(ctx, cli, "-p", strconv.Itoa(n.Port), "cluster", "info").Output()
			return err == nil && bytes.Contains(out, []byte("cluster_state:ok"))
		})
	}
	c.loadSlots(t)
	return c
}

// loadSlots reads CLUSTER SLOTS: [[start, end, [host, port, id], …], …].
func (c *redisCluster) loadSlots(t testing.TB) {
	t.Helper()
	conn := dialRESP(t, c.nodes[0].addr())
	defer conn.c.Close()
	ranges, ok := conn.do(t, "CLUSTER", "SLOTS").([]any)
	if !ok {
		t.Fatal("CLUSTER SLOTS: unexpected reply")
	}
	for _, r := range ranges {
		r := r.([]any)
		start, end := r[0].(int64), r[1].(int64)
		master := r[2].([]any)
		addr := net.JoinHostPort(master[0].(string), strconv.FormatInt(master[1].(int64), 10))
		for s := start; s <= end; s++ {
			c.owner[s] = addr
		}
	}
	for s, a := range c.owner {
		if a == "" {
			t.Fatalf("slot %d has no master", s)
		}
	}
}
