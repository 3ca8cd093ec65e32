package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// upstream is the echo app behind every variant: raw gobwas/ws on a plain
// listener (no net/http), one goroutine per connection, echoing each frame
// as it came (fragments stay fragments). Its replies are flushed only when
// no more input is buffered, so pipelined load is answered in batches.
type upstream struct {
	ln     net.Listener
	active atomic.Int64 // connections past the upgrade and not yet closed
	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

// maxEcho bounds what the upstream holds for one frame.
const maxEcho = 1 << 20

func startUpstream() (*upstream, error) {
	ln, err := listenFree()
	if err != nil {
		return nil, fmt.Errorf("echo upstream: %w", err)
	}
	u := &upstream{ln: ln, conns: map[net.Conn]struct{}{}}
	u.wg.Add(1)
	go u.serve()
	return u, nil
}

func (u *upstream) addr() string { return u.ln.Addr().String() }

func (u *upstream) serve() {
	defer u.wg.Done()
	for {
		c, err := u.ln.Accept()
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

// close stops the listener, closes every connection and waits for them.
func (u *upstream) close() {
	u.ln.Close()
	u.mu.Lock()
	for c := range u.conns {
		c.Close()
	}
	u.mu.Unlock()
	u.wg.Wait()
}
