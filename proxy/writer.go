package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gobwas/ws"
)

// writer owns every write to one peer: frames forwarded from the other
// side, the gateway's control frames (pings, pongs, closes) and its own
// messages (policy replies, fan-out). It serialises writes, gives each a
// deadline, stops for good after a write failed or a frame was cut, writes
// nothing after a close frame, and keeps message boundaries: while a
// forwarded message is in progress (its final fragment not yet written),
// the gateway's own messages wait in the queue, so that only control
// frames ever land between the fragments of a message (RFC 6455 §5.4).
type writer struct {
	conn net.Conn
	side side // the peer written to
	c    *relay

	mu     sync.Mutex
	broken bool         // guarded by mu: nothing more can be written
	inMsg  bool         // guarded by mu: a forwarded message is in progress
	dl     atomic.Int64 // written under mu: the write deadline set on conn (mono), 0: none

	closed atomic.Bool // a close frame was written (or the side is gone)
	busy   atomic.Bool // a conn.Write is in progress right now

	// Messages waiting to be written (fan-out, or replies held while a
	// forwarded message is in progress). A goroutine writes them; it
	// exists only while there is something it can write.
	qmu     sync.Mutex
	queue   [][]byte // guarded by qmu
	running bool     // guarded by qmu: the queue goroutine exists
	refuse  bool     // guarded by qmu: nothing more is queued
}

// deadlineSlack is how much longer than WriteTimeout a write deadline may
// be: the deadline is moved only when less than WriteTimeout is left, so
// a connection that writes all the time moves it a few times a second,
// not once per write.
func deadlineSlack(t time.Duration) time.Duration { return min(t/4, 250*time.Millisecond) }

// closeGrace bounds a write made once the closing handshake's time is up
// (a close frame that answers a peer, or the last one of a connection).
const closeGrace = 500 * time.Millisecond

// put writes b (or bufs) to the peer: the one place that writes to a
// socket. It must be called with mu held. A failed write leaves the
// writer broken and is returned as the peer's error.
func (w *writer) put(b []byte, bufs *net.Buffers) error {
	if w.broken {
		return errBroken
	}
	w.arm()
	w.busy.Store(true)
	var err error
	if bufs != nil {
		_, err = bufs.WriteTo(w.conn)
	} else {
		_, err = w.conn.Write(b)
	}
	w.busy.Store(false)
	if err != nil {
		w.broken = true
		w.closed.Store(true)
		return &ioErr{side: w.side, write: true, err: err}
	}
	return nil
}

// arm sets the write deadline for a write that starts now. While the
// connection is open the deadline is WriteTimeout (plus slack) away; once
// it is closing, writes also end by the closing deadline.
func (w *writer) arm() {
	t := w.c.cfg.WriteTimeout
	closeBy := w.c.closeBy.Load()
	if t <= 0 && closeBy == 0 {
		return
	}
	now := mono()
	var dl int64
	if closeBy != 0 {
		dl = max(closeBy, now+int64(closeGrace))
		if t > 0 {
			dl = min(dl, now+int64(t))
		}
		if dl == w.dl.Load() {
			return
		}
	} else {
		if w.dl.Load() >= now+int64(t) {
			return
		}
		dl = now + int64(t+deadlineSlack(t))
	}
	w.dl.Store(dl)
	w.conn.SetWriteDeadline(epoch.Add(time.Duration(dl)))
}

// cut marks the writer broken: a frame to the peer was left unfinished.
// It must be called with mu held.
func (w *writer) cut() {
	w.broken = true
	w.closed.Store(true)
}

// frames writes a run of forwarded frames (data: it holds a data frame,
// open: its last data frame is not final).
func (w *writer) frames(b []byte, data, open bool) error {
	w.mu.Lock()
	if w.closed.Load() {
		w.mu.Unlock()
		return nil
	}
	err := w.put(b, nil)
	ended := false
	if err == nil && data {
		ended = w.inMsg && !open
		w.inMsg = open
	}
	w.mu.Unlock()
	if ended {
		w.resume()
	}
	return err
}

// endFrame is called, with mu held, after the last bytes of a streamed
// frame were written; it reports whether a forwarded message just ended.
func (w *writer) endFrame(h ws.Header) bool {
	if h.OpCode.IsControl() {
		return false
	}
	ended := w.inMsg && h.Fin
	w.inMsg = !h.Fin
	return ended
}

// control writes a control frame. Closes go through close.
func (w *writer) control(op ws.OpCode, payload []byte) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.controlLocked(op, payload)
}

// tryControl writes a control frame unless another write holds the
// writer; it reports whether it wrote.
func (w *writer) tryControl(op ws.OpCode, payload []byte) (bool, error) {
	if !w.mu.TryLock() {
		return false, nil
	}
	defer w.mu.Unlock()
	return true, w.controlLocked(op, payload)
}

func (w *writer) controlLocked(op ws.OpCode, payload []byte) error {
	if w.closed.Load() {
		return nil
	}
	var frame [ws.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	n := w.encode(frame[:], op, payload)
	return w.put(frame[:n], nil)
}

// encode encodes a frame with payload into buf (which must have room for
// the header) for this peer: masked toward an upstream.
func (w *writer) encode(buf []byte, op ws.OpCode, payload []byte) int {
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: w.side == upstreamSide}
	if h.Masked {
		h.Mask = newMask()
	}
	hs := headerSize(h)
	encodeHeader(buf[:hs], h)
	n := hs + copy(buf[hs:], payload)
	if h.Masked {
		ws.Cipher(buf[hs:n], h.Mask, 0)
	}
	return n
}

// close writes a close frame with body, once. It reports whether this
// call wrote it.
func (w *writer) close(body []byte) (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed.Load() {
		return false, nil
	}
	var frame [ws.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte
	n := w.encode(frame[:], ws.OpClose, body)
	err := w.put(frame[:n], nil)
	w.closed.Store(true)
	return err == nil, err
}

// framed writes buf[MaxHeaderSize:] as one final frame of op, encoding
// the header into the headroom in front of it (and masking the payload in
// place toward an upstream).
func (w *writer) framed(op ws.OpCode, buf []byte) error {
	payload := buf[ws.MaxHeaderSize:]
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: w.side == upstreamSide}
	if h.Masked {
		h.Mask = newMask()
		ws.Cipher(payload, h.Mask, 0)
	}
	hs := headerSize(h)
	encodeHeader(buf[ws.MaxHeaderSize-hs:ws.MaxHeaderSize], h)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed.Load() {
		return nil
	}
	return w.put(buf[ws.MaxHeaderSize-hs:], nil)
}

// message writes a whole message of the gateway's own (an encoded server
// frame, see EncodeServerFrame) to the client: at once when nothing is in
// the way, otherwise after what is queued and after the forwarded message
// in progress. It reports false when the queue is full.
func (w *writer) message(frame []byte) (bool, error) {
	if w.mu.TryLock() {
		if !w.inMsg && !w.closed.Load() && w.queueIdle() {
			err := w.put(frame, nil)
			w.mu.Unlock()
			return true, err
		}
		w.mu.Unlock()
	}
	return w.enqueue(frame), nil
}

func (w *writer) queueIdle() bool {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	return !w.running && len(w.queue) == 0
}

// enqueue queues an encoded frame without blocking; false means the queue
// is full or closed.
func (w *writer) enqueue(frame []byte) bool {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	if w.refuse || len(w.queue) >= w.c.cfg.SendQueue {
		return false
	}
	w.queue = append(w.queue, frame)
	if !w.running {
		w.running = true
		go w.writeQueued()
	}
	return true
}

// stopQueue drops what is queued and refuses more; it reports whether
// this call stopped it.
func (w *writer) stopQueue() bool {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	if w.refuse {
		return false
	}
	w.refuse, w.queue = true, nil
	return true
}

// resume restarts the queue goroutine after a forwarded message ended, if
// messages wait for it.
func (w *writer) resume() {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	if !w.running && len(w.queue) > 0 && !w.refuse {
		w.running = true
		go w.writeQueued()
	}
}

// writeQueued writes the queue with vectored writes, then exits. It also
// exits, leaving the queue as it is, while a forwarded message is in
// progress: the writer of its final frame calls resume.
func (w *writer) writeQueued() {
	for {
		w.qmu.Lock()
		if len(w.queue) == 0 || w.refuse {
			w.running, w.queue = false, nil
			w.qmu.Unlock()
			return
		}
		frames := w.queue
		w.queue = nil
		w.qmu.Unlock()

		w.mu.Lock()
		if w.inMsg {
			w.qmu.Lock()
			w.queue = append(frames, w.queue...)
			w.running = false
			w.qmu.Unlock()
			w.mu.Unlock()
			return
		}
		var err error
		if !w.closed.Load() {
			bufs := net.Buffers(frames)
			err = w.put(nil, &bufs)
		}
		w.mu.Unlock()
		if err != nil {
			w.stopQueue()
			w.qmu.Lock()
			w.running = false
			w.qmu.Unlock()
			w.c.fail(err)
			return
		}
	}
}
