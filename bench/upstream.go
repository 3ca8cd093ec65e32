package bench

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// upstream is the echo app behind every variant: raw gobwas/ws on a plain
// listener (no net/http), one goroutine per connection, echoing each frame
// as it came (fragments stay fragments). Its replies are flushed only when
// no more input is buffered, so pipelined load is answered in batches.
// The same app is also served over TLS on a second port, for the wss://
// upstream variant.
type upstream struct {
	ln     net.Listener
	tlsLn  net.Listener // the same echo over TLS, with a self-signed certificate
	active atomic.Int64 // connections past the upgrade and not yet closed
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// maxEcho bounds what the upstream holds for one frame.
const maxEcho = 1 << 20

// startUpstream starts the echo app on a plain port and on a TLS port
// that presents cert.
func startUpstream(cert tls.Certificate) (*upstream, error) {
	ln, err := listenFree()
	if err != nil {
		return nil, fmt.Errorf("echo upstream: %w", err)
	}
	raw, err := listenFree()
	if err != nil {
		ln.Close()
		return nil, fmt.Errorf("echo upstream over TLS: %w", err)
	}
	// The handshake happens in handle, on the connection's first read,
	// under the same deadline as the upgrade.
	tlsLn := tls.NewListener(raw, &tls.Config{Certificates: []tls.Certificate{cert}})
	u := &upstream{ln: ln, tlsLn: tlsLn, conns: map[net.Conn]struct{}{}}
	u.wg.Add(2)
	go u.serve(ln)
	go u.serve(tlsLn)
	return u, nil
}

func (u *upstream) addr() string { return u.ln.Addr().String() }

// tlsAddr is where the echo app is served over TLS (for wss:// URLs).
func (u *upstream) tlsAddr() string { return u.tlsLn.Addr().String() }

func (u *upstream) serve(ln net.Listener) {
	defer u.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		u.mu.Lock()
		u.conns[c] = struct{}{}
		u.mu.Unlock()
		u.wg.Add(1)
		go u.handle(c)
	}
}

func (u *upstream) handle(c net.Conn) {
	defer u.wg.Done()
	defer func() {
		c.Close()
		u.mu.Lock()
		delete(u.conns, c)
		u.mu.Unlock()
	}()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := (ws.Upgrader{}).Upgrade(c); err != nil {
		return
	}
	c.SetDeadline(time.Time{})
	u.active.Add(1)
	defer u.active.Add(-1)
	br := bufio.NewReaderSize(c, 8<<10)
	bw := bufio.NewWriterSize(c, 8<<10)
	var buf []byte
	for {
		h, err := ws.ReadHeader(br)
		if err != nil || h.Length > maxEcho {
			return
		}
		n := int(h.Length)
		if cap(buf) < n {
			buf = make([]byte, n)
		}
		p := buf[:n]
		if _, err := io.ReadFull(br, p); err != nil {
			return
		}
		if h.Masked {
			ws.Cipher(p, h.Mask, 0)
		}
		out := ws.Header{Fin: h.Fin, OpCode: h.OpCode, Length: h.Length}
		switch h.OpCode {
		case ws.OpPong:
			continue
		case ws.OpPing:
			out.OpCode = ws.OpPong
		}
		if err := ws.WriteHeader(bw, out); err != nil {
			return
		}
		if _, err := bw.Write(p); err != nil {
			return
		}
		if h.OpCode == ws.OpClose {
			// The server closes the TCP connection first (RFC 6455 7.1.1),
			// so TIME_WAIT stays on this side and client ports are free.
			bw.Flush()
			return
		}
		if br.Buffered() == 0 {
			if err := bw.Flush(); err != nil {
				return
			}
		}
	}
}

// waitConns waits until exactly n upgraded connections are open: the
// clients of the last run have been torn down, or this run's are all up.
func (u *upstream) waitConns(ctx context.Context, n int64, within time.Duration) error {
	err := poll(ctx, within, fmt.Sprintf("%d upstream connections", n), func() (bool, error) {
		return u.active.Load() == n, nil
	})
	if err != nil {
		return fmt.Errorf("%w (%d open)", err, u.active.Load())
	}
	return nil
}

// close stops the listeners, closes every connection and waits for them.
func (u *upstream) close() {
	u.ln.Close()
	u.tlsLn.Close()
	u.mu.Lock()
	for c := range u.conns {
		c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}

// selfSigned makes the TLS upstream's certificate: P-256, valid for
// 127.0.0.1 only, its own issuer. Its PEM is written to caPath, which the
// gateway is told to trust (wsgate's `tls { ca_file … }`), so the relay
// verifies the upstream as it would in production.
func selfSigned(caPath string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return tls.Certificate{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "wsbench echo upstream"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := os.WriteFile(caPath, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
