package proxy

import (
	"crypto/tls"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// BenchmarkIdleConnMemory opens idle relayed connections through a Gateway
// and reports what each costs: heap in use plus goroutine stacks (after
// runtime.GC), and goroutines. Both peers are raw sockets that keep
// nothing but the net.Conn once the handshake is done, so the figures are
// the gateway's, plus the two test-side net.Conns (≈ 0.5 KB). It asserts
// nothing. Run it with -benchtime=1x; WSGATE_BENCH_CONNS sets the number of
// connections (default 2000; capped by the open file limit). "parked" waits
// until every connection has given up its goroutines (park.go); "awake"
// has parking off; "parked-tls" serves the clients over TLS, and
// "parked-wss" has a wss:// upstream (what crypto/tls keeps per connection
// while idle is counted in).
func BenchmarkIdleConnMemory(b *testing.B) {
	b.Run("parked", func(b *testing.B) { benchIdleConnMemory(b, time.Millisecond, false, false) })
	b.Run("awake", func(b *testing.B) { benchIdleConnMemory(b, -1, false, false) })
	b.Run("parked-tls", func(b *testing.B) { benchIdleConnMemory(b, time.Millisecond, true, false) })
	b.Run("parked-wss", func(b *testing.B) { benchIdleConnMemory(b, time.Millisecond, false, true) })
}

func benchIdleConnMemory(b *testing.B, parkAfter time.Duration, clientTLS, upstreamTLS bool) {
	n := 2000
	if s := os.Getenv("WSGATE_BENCH_CONNS"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n <= 0 {
			b.Fatalf("WSGATE_BENCH_CONNS=%q", s)
		}
	}

	// Each relayed connection takes four descriptors in this process
	// (client, gateway's two sides, upstream).
	var lim syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && uint64(4*n+100) > lim.Cur {
		n = int(lim.Cur-100) / 4
		b.Logf("open file limit %d: measuring %d connections", lim.Cur, n)
	}

	// An upstream that answers the handshake by hand and keeps only the
	// socket: no goroutine, no buffer.
	var mu sync.Mutex
	var upConns []net.Conn
	upSrv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		resp := "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
			"Sec-WebSocket-Accept: " + wantAccept(r.Header.Get("Sec-WebSocket-Key")) + "\r\n\r\n"
		conn.Write([]byte(resp))
		mu.Lock()
		upConns = append(upConns, conn)
		mu.Unlock()
	}))
	defer upSrv.Close()
	cfg := Config{Upstreams: []string{"ws://" + upSrv.Listener.Addr().String()}, ParkAfter: parkAfter}
	if upstreamTLS {
		upSrv.StartTLS()
		cfg.Upstreams[0] = "wss://" + upSrv.Listener.Addr().String()
		cfg.TLS = &tls.Config{InsecureSkipVerify: true}
	} else {
		upSrv.Start()
	}
	if err := prepareTestConfig(&cfg); err != nil {
		b.Fatal(err)
	}
	g := New(cfg, nil, nil)
	tg := serveGateway(b, g, func(w http.ResponseWriter, r *http.Request) { g.ServeHTTP(w, r, RequestInfo{}) }, clientTLS)
	addr := tg.addr()
	dial := func() (*rawClient, error) { return dialRawErr(addr, nil) }
	if clientTLS {
		dial = func() (*rawClient, error) { return dialRawTLS(addr) }
	}

	var m0, m1 runtime.MemStats
	for range b.N {
		b.StopTimer()
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&m0)
		g0 := runtime.NumGoroutine()
		b.StartTimer()

		clients := make([]net.Conn, 0, n)
		for i := 0; i < n; i++ {
			rc, err := dial()
			if err != nil {
				b.Fatalf("connection %d: %v", i, err)
			}
			if rc.br.Buffered() != 0 {
				b.Fatal("bytes after the handshake")
			}
			clients = append(clients, rc.conn) // the bufio.Reader is dropped
		}
		deadline := time.Now().Add(waitFor)
		for g.Registry().Len() != n {
			if time.Now().After(deadline) {
				b.Fatalf("%d connections registered", g.Registry().Len())
			}
			<-time.After(5 * time.Millisecond)
		}
		if parkAfter > 0 && getPoller() != nil {
			for !allParked(g.Registry()) {
				if time.Now().After(deadline) {
					b.Fatal("connections did not park")
				}
				<-time.After(5 * time.Millisecond)
			}
		}
		// Let the HTTP servers' per-connection goroutines (which end after
		// the hijack) go: wait until the count holds still.
		for last, same := -1, 0; same < 5 && time.Now().Before(deadline); {
			<-time.After(10 * time.Millisecond)
			if c := runtime.NumGoroutine(); c == last {
				same++
			} else {
				last, same = c, 0
			}
		}

		b.StopTimer()
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&m1)
		goroutines := runtime.NumGoroutine() - g0
		heap := int64(m1.HeapInuse) - int64(m0.HeapInuse)
		stack := int64(m1.StackInuse) - int64(m0.StackInuse)
		b.ReportMetric(float64(heap+stack)/float64(n), "heap+stack-B/conn")
		b.ReportMetric(float64(heap)/float64(n), "heap-B/conn")
		b.ReportMetric(float64(stack)/float64(n), "stack-B/conn")
		b.ReportMetric(float64(goroutines)/float64(n), "goroutines/conn")

		for _, c := range clients {
			c.Close()
		}
		mu.Lock()
		for _, c := range upConns {
			c.Close()
		}
		upConns = nil
		mu.Unlock()
		deadline = time.Now().Add(waitFor)
		for g.Registry().Len() != 0 {
			if time.Now().After(deadline) {
				b.Fatalf("%d connections still registered", g.Registry().Len())
			}
			<-time.After(5 * time.Millisecond)
		}
		b.StartTimer()
	}
}

// allParked reports whether both sides of every connection in r are parked.
func allParked(r *Registry) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for c := range r.conns {
		if c.client.pstate.Load() != sideParked || c.upstream.pstate.Load() != sideParked {
			return false
		}
	}
	return true
}
