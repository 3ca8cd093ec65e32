package integration

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"golang.org/x/net/http2"
)

// TestHugeHeaderAndFragmentFlood sends a header that declares 2^62 bytes,
// and a flood of 1-byte fragments past max_message: both get 1009, and the
// gateway allocates far less than what was declared or streamed.
func TestHugeHeaderAndFragmentFlood(t *testing.T) {
	up := startUpstream(t)
	const limit = 3 << 20
	g := startGateway(t, relaySite(up.URL, "\t\tmax_message 3MiB"))

	before := g.memstats()
	r := rawDial(t, g, "/ws", nil)
	r.write(frameLen(true, opBinary, []byte("only a few bytes"), 1<<62))
	if code, _ := r.readClose(5 * time.Second); code != 1009 {
		t.Fatalf("2^62 header: close %d, want 1009", code)
	}

	r2 := rawDial(t, g, "/ws", nil)
	closed := make(chan int, 1)
	go func() {
		code, _ := r2.readCloseNoFail(20 * time.Second)
		closed <- code
	}()
	// limit+1 bytes in 1-byte frames, written in batches.
	one := frame(false, opBinary, []byte{'x'})
	cont := frame(false, opCont, []byte{'y'})
	batch := make([]byte, 0, 64<<10)
	for len(batch)+len(cont) <= cap(batch) {
		batch = append(batch, cont...)
	}
	r2.write(one)
	sent := 1
	for sent <= limit {
		if _, err := r2.conn.Write(batch); err != nil {
			break // the gateway closed the connection after 1009
		}
		sent += len(batch) / len(cont)
	}
	if code := <-closed; code != 1009 {
		t.Fatalf("fragment flood: close %d, want 1009", code)
	}
	after := g.memstats()
	grew := int64(after.TotalAlloc) - int64(before.TotalAlloc)
	t.Logf("gateway allocated %d bytes while refusing a 2^62 header and %d 1-byte fragments (heap in use %d → %d)",
		grew, sent, before.HeapInuse, after.HeapInuse)
	if grew > 2<<20 {
		t.Fatalf("gateway allocated %d bytes, want < 2 MB", grew)
	}
}

// readCloseNoFail is readClose for use off the test goroutine: -1 on error.
func (r *rawConn) readCloseNoFail(within time.Duration) (int, string) {
	deadline := time.Now().Add(within)
	for {
		f, err := r.read(time.Until(deadline))
		if err != nil {
			return -1, err.Error()
		}
		if f.op == opClose && len(f.payload) >= 2 {
			return int(f.payload[0])<<8 | int(f.payload[1]), string(f.payload[2:])
		}
	}
}

// TestNoLeaksAfterWaves opens and closes 2,000 connections in waves; the
// gateway's goroutines and open files return to their baseline. Parking is
// off, so that each open connection holds its two reader goroutines
// (TestIdleConnectionsPark covers parked ones).
func TestNoLeaksAfterWaves(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tpark_after off"))
	// warm up once so lazily started goroutines (pools, timers) exist
	dial(t, g, "/ws", nil).Close(websocket.StatusNormalClosure, "")
	eventually(t, 10*time.Second, "warm-up connection to end", func() bool { return g.goroutines() < 100 })
	baseG, baseF, baseRSS := g.goroutines(), g.openFiles(), g.rss()

	const waves, perWave = 4, 500
	ctx := ctxT(t, 60*time.Second)
	for w := 0; w < waves; w++ {
		conns := make([]*websocket.Conn, perWave)
		for i := range conns {
			conns[i] = dial(t, g, "/ws", nil)
		}
		// one goroutine per side: two per relayed connection, no more
		// (a relay's goroutines start just after the client has its 101)
		eventually(t, 10*time.Second, "both relay goroutines of every connection", func() bool {
			return g.goroutines() >= baseG+2*perWave-5
		})
		if got := g.goroutines(); got > baseG+2*perWave+5 {
			t.Fatalf("wave %d: %d goroutines with %d connections open (baseline %d), want 2 per connection", w, got, perWave, baseG)
		}
		if w == 0 {
			t.Logf("%d idle connections: %.2f goroutines and %.1f KB RSS per connection",
				perWave, float64(g.goroutines()-baseG)/perWave, float64(g.rss()-baseRSS)/perWave/1000)
		}
		var wg sync.WaitGroup
		for i, c := range conns {
			wg.Add(1)
			go func() {
				defer wg.Done()
				msg := []byte(fmt.Sprint(i))
				c.Write(ctx, websocket.MessageText, msg)
				c.Read(ctx)
				if i%2 == 0 {
					c.Close(websocket.StatusNormalClosure, "")
				} else {
					c.CloseNow() // abrupt: no closing handshake
				}
			}()
		}
		wg.Wait()
	}
	eventually(t, 30*time.Second, "goroutines and files back to baseline", func() bool {
		return g.goroutines() <= baseG+5 && g.openFiles() <= baseF+5
	})
	t.Logf("baseline %d goroutines, %d files; after %d connections: %d goroutines, %d files",
		baseG, baseF, waves*perWave, g.goroutines(), g.openFiles())
}

func TestTLSUpstream(t *testing.T) {
	cert, caPEM := selfSigned(t)
	up := startTLSUpstream(t, cert)
	ca := filepath.Join(t.TempDir(), "ca.pem")
	os.WriteFile(ca, caPEM, 0o600)
	g := startGateway(t, relaySite(up.URL, fmt.Sprintf("\t\ttls {\n\t\t\tca_file %s\n\t\t\tserver_name upstream.test\n\t\t}", ca)))
	c := dial(t, g, "/ws", nil)
	ctx := ctxT(t, 5*time.Second)
	c.Write(ctx, websocket.MessageText, []byte("over tls"))
	if _, m, err := c.Read(ctx); err != nil || string(m) != "over tls" {
		t.Fatalf("wss upstream: %v %q", err, m)
	}
	// Without the CA the upstream's certificate is refused: 502.
	g2 := startGateway(t, relaySite(up.URL, ""))
	if _, resp, err := dialErr(t, g2, "/ws", nil); err == nil || resp == nil || resp.StatusCode != 502 {
		t.Fatalf("untrusted upstream certificate: %v, want 502", err)
	}
}

func selfSigned(t testing.TB) (tls.Certificate, []byte) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "upstream.test"},
		DNSNames:     []string{"upstream.test"},
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:         true, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	kb, _ := x509.MarshalECPrivateKey(key)
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	return cert, certPEM
}

// TestHTTP2ExtendedConnectRefused: WebSocket over HTTP/2 (RFC 8441) cannot
// be hijacked; when a client tries it the gateway answers 501 at once.
func TestHTTP2ExtendedConnectRefused(t *testing.T) {
	up := startUpstream(t)
	g := startGatewayWith(t, "\tservers {\n\t\tprotocols h1 h2c\n\t}", []string{"GODEBUG=http2xconnect=1"}, relaySite(up.URL, ""))
	tr := &http2.Transport{AllowHTTP: true, DialTLSContext: func(ctx context.Context, network, addr string, _ *tls.Config) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	defer tr.CloseIdleConnections()
	pr, pw := io.Pipe()
	defer pw.Close()
	req, _ := http.NewRequestWithContext(ctxT(t, 10*time.Second), http.MethodConnect, "http://"+g.addr()+"/ws", pr)
	req.Header.Set(":protocol", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Origin", g.origin())
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatalf("extended CONNECT: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.ProtoMajor != 2 || resp.StatusCode != http.StatusNotImplemented || !strings.Contains(string(body), "HTTP/1.1") {
		t.Fatalf("got HTTP/%d %d %q, want HTTP/2 501 asking for HTTP/1.1", resp.ProtoMajor, resp.StatusCode, body)
	}
}

// TestIdleConnectionsPark: with park_after, 500 idle relayed connections
// give up their reader goroutines (the count goes back to the baseline
// while they are open), then every one of them still echoes, three rounds
// over, and ends cleanly, abruptly or not. (Heartbeats and timers of parked
// connections are covered in the proxy package.)
func TestIdleConnectionsPark(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\tpark_after 100ms"))
	dial(t, g, "/ws", nil).Close(websocket.StatusNormalClosure, "")
	eventually(t, 10*time.Second, "warm-up connection to end", func() bool { return g.goroutines() < 100 })
	baseG, baseF := g.goroutines(), g.openFiles()

	const n = 500
	ctx := ctxT(t, 60*time.Second)
	conns := make([]*websocket.Conn, n)
	for i := range conns {
		conns[i] = dial(t, g, "/ws", nil)
	}
	for round := range 3 {
		echoEach(t, ctx, conns, func(i int) string { return fmt.Sprintf("%d/%d", round, i) })
		eventually(t, 20*time.Second, "idle connections to park", func() bool {
			return g.goroutines() <= baseG+10
		})
		if f := g.openFiles(); f < 2*n {
			t.Fatalf("round %d: %d open files, want at least %d (two sockets a connection): connections were closed, not parked", round, f, 2*n)
		}
	}
	t.Logf("%d parked connections: %d goroutines (baseline %d), %d open files (baseline %d)",
		n, g.goroutines(), baseG, g.openFiles(), baseF)
	for i, c := range conns {
		if i%2 == 0 {
			c.Close(websocket.StatusNormalClosure, "")
		} else {
			c.CloseNow()
		}
	}
	eventually(t, 30*time.Second, "goroutines and files back to baseline", func() bool {
		return g.goroutines() <= baseG+5 && g.openFiles() <= baseF+5
	})
}
