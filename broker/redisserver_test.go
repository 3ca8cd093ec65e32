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
// for cluster_state:ok on every node. extra goes on each server's command
// line (after the defaults, so it may override them).
func startCluster(t testing.TB, extra ...string) *redisCluster {
	t.Helper()
	cli := redistest.Bin(t, "redis-cli")
	c := &redisCluster{}
	for i := 0; i < 3; i++ {
		// the config file is in the server's own directory
		args := append([]string{"--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"}, extra...)
		r := startRedis(t, args...)
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
		c.waitOK(t, n)
	}
	c.loadSlots(t)
	return c
}

// waitOK waits for cluster_state:ok on n.
func (c *redisCluster) waitOK(t testing.TB, n *redisServer) {
	t.Helper()
	eventually(t, 30*time.Second, "cluster_state:ok on "+n.addr(), func() bool {
		conn := dialRESP(t, n.addr())
		defer conn.c.Close()
		info, _ := conn.do(t, "CLUSTER", "INFO").(string)
		return strings.Contains(info, "cluster_state:ok")
	})
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

// subscribers counts, on each master, the connections named name in
// CLIENT LIST and the sharded subscriptions they hold (ssub).
func (c *redisCluster) subscribers(t testing.TB, name string) (conns map[string]int, ssub int) {
	t.Helper()
	conns = map[string]int{}
	for _, n := range c.nodes {
		conn := dialRESP(t, n.addr())
		list, ok := conn.do(t, "CLIENT", "LIST").(string)
		conn.c.Close()
		if !ok {
			t.Fatalf("CLIENT LIST on %s: not a bulk string", n.addr())
		}
		for _, line := range strings.Split(list, "\n") {
			fields := map[string]string{}
			for _, f := range strings.Fields(line) {
				k, v, _ := strings.Cut(f, "=")
				fields[k] = v
			}
			if fields["name"] != name {
				continue
			}
			conns[n.addr()]++
			s, err := strconv.Atoi(fields["ssub"])
			if err != nil {
				t.Fatalf("CLIENT LIST on %s: no ssub count in %q", n.addr(), line)
			}
			ssub += s
		}
	}
	return conns, ssub
}

// migrateSlot moves a hash slot, with its keys, to the master at addr the
// way redis-cli --cluster reshard does: IMPORTING on the target, MIGRATING
// on the source, MIGRATE of each key, then SETSLOT NODE on every master.
func (c *redisCluster) migrateSlot(t testing.TB, slot int, addr string) {
	t.Helper()
	from := c.owner[slot]
	var src, dst *respConn
	ids := map[string]string{}
	for _, n := range c.nodes {
		conn := dialRESP(t, n.addr())
		id, ok := conn.do(t, "CLUSTER", "MYID").(string)
		if !ok {
			t.Fatalf("CLUSTER MYID on %s: unexpected reply", n.addr())
		}
		ids[n.addr()] = id
		switch n.addr() {
		case from:
			src = conn
		case addr:
			dst = conn
		}
	}
	if src == nil || dst == nil || src == dst {
		t.Fatalf("cannot move slot %d from %s to %s", slot, from, addr)
	}
	s := strconv.Itoa(slot)
	ok := func(conn *respConn, args ...string) {
		t.Helper()
		if v := conn.do(t, args...); v != "OK" {
			t.Fatalf("%v: %v", args, v)
		}
	}
	ok(dst, "CLUSTER", "SETSLOT", s, "IMPORTING", ids[from])
	ok(src, "CLUSTER", "SETSLOT", s, "MIGRATING", ids[addr])
	host, port, _ := net.SplitHostPort(addr)
	for {
		keys, _ := src.do(t, "CLUSTER", "GETKEYSINSLOT", s, "100").([]any)
		if len(keys) == 0 {
			break
		}
		for _, k := range keys {
			ok(src, "MIGRATE", host, port, k.(string), "0", "5000")
		}
	}
	// The target first, then the source (which drops the slot's sharded
	// subscribers), then the others.
	ok(dst, "CLUSTER", "SETSLOT", s, "NODE", ids[addr])
	ok(src, "CLUSTER", "SETSLOT", s, "NODE", ids[addr])
	for _, n := range c.nodes {
		if a := n.addr(); a != from && a != addr {
			ok(dialRESP(t, a), "CLUSTER", "SETSLOT", s, "NODE", ids[addr])
		}
	}
	c.owner[slot] = addr
}
