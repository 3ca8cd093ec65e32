package integration

import (
	"fmt"
	"net"
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
