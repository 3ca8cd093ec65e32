package proxy

import (
	"net"
	"sync"
	"sync/atomic"
	"syscall"
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
	p *peer // the side written to

	mu     sync.Mutex
	closed atomic.Bool // a close frame was written (or the side is gone)
	broken bool        // guarded by mu: nothing more can be written
	inMsg  bool        // guarded by mu: a forwarded message is in progress

	// Write deadlines. A write records when it began, and the registry's
	// sweeper ends one that has lasted WriteTimeout by moving the socket's
	// write deadline into the past: setting a deadline for every write
	// would change a runtime timer per write, and grow the stack of every
	// goroutine that writes. Once the connection is closing, each write
	// sets its own deadline (dl), bounded by the closing deadline.
	//
	// The sweeper sets expiring before it checks that the write it means
	// is still the one in progress; a write that has ended checks expiring
	// after clearing wstart, and then waits for the sweeper (dmu) and
	// takes the deadline back. So a deadline meant for one write never
	// ends the next one.
	wstart   atomic.Int64 // mono time the write in progress began; 0: none
	expiring atomic.Bool  // the sweeper is moving, or has moved, the deadline into the past
	dmu      sync.Mutex   // the sweeper's expiry against the end of a write
	dl       int64        // guarded by mu: the closing write deadline set on conn (mono)

	// Messages waiting to be written (fan-out, or replies held while a
	// forwarded message is in progress). A goroutine writes them; it
	// exists only while there is something it can write.
	//
	// A fan-out frame for a client whose writer is free is written at
	// once, by the caller, when the socket takes it without waiting
	// (deliver): no goroutine is started for it. writeFD is that write's
	// callback (made once); nb, nw and nerr its frame and results (mu
	// held).
	writeFD func(fd uintptr) bool
	nb      []byte
	nw      int
	nerr    error

	running bool // guarded by qmu: the queue goroutine exists
	refuse  bool // guarded by qmu: nothing more is queued
	qmu     sync.Mutex
	queue   *sendQueue // guarded by qmu; made when first needed
}

// sendQueue holds the frames waiting in a writer's queue.
type sendQueue struct{ frames [][]byte }

// pending is the number of queued frames (qmu held).
func (w *writer) pending() int {
	if w.queue == nil {
		return 0
	}
	return len(w.queue.frames)
}

// closeGrace bounds a write made once the closing handshake's time is up
// (a close frame that answers a peer, or the last one of a connection).
const closeGrace = 500 * time.Millisecond

// put writes b (or bufs) to the peer: the one place that writes to a
// socket. It must be called with mu held. A failed write leaves the
// writer broken and is returned as the peer's error.
func (w *writer) put(b []byte, bufs *net.Buffers) error {
	if w.broken {
		return &ioErr{side: w.p.side, write: true, err: errBroken}
	}
	w.begin()
	var err error
	if bufs != nil {
		_, err = bufs.WriteTo(w.p.rd.conn)
	} else {
		_, err = w.p.rd.conn.Write(b)
	}
	w.wstart.Store(0)
	if w.expiring.Load() {
		// The sweeper ended this write, or is about to end it just as it
		// finished: take the deadline back for the next one.
		w.dmu.Lock()
		w.p.rd.conn.SetWriteDeadline(time.Time{})
		w.expiring.Store(false)
		w.dl = 0
		w.dmu.Unlock()
	}
	if err != nil {
		w.broken = true
		w.closed.Store(true)
		return &ioErr{side: w.p.side, write: true, err: err}
	}
	return nil
}

// begin records a write that starts now (mu held). While the connection
// is open, the sweeper watches it (expire); once it is closing, the write
// ends by the closing deadline, or closeGrace from now once that has
// passed (a close frame answering a peer), and by WriteTimeout.
func (w *writer) begin() {
	now := mono()
	w.wstart.Store(now)
	closeBy := w.p.c.closeBy.Load()
	if closeBy == 0 {
		return
	}
	dl := max(closeBy, now+int64(closeGrace))
	if t := w.p.c.cfg.WriteTimeout; t > 0 {
		dl = min(dl, now+int64(t))
	}
	if dl != w.dl {
		w.dl = dl
		w.p.rd.conn.SetWriteDeadline(epoch.Add(time.Duration(dl)))
	}
}

// expire ends a write that has lasted WriteTimeout by now; the registry's
// sweeper calls it. Writes made while closing have their own deadline.
func (w *writer) expire(now int64) {
	if w.p.rd.conn == nil {
		return // no upstream
	}
	t := w.p.c.cfg.WriteTimeout
	if t <= 0 {
		return
	}
	start := w.wstart.Load()
	if start == 0 || now-start < int64(t) || w.p.c.closeBy.Load() != 0 {
		return
	}
	w.dmu.Lock()
	w.expiring.Store(true)
	if w.wstart.Load() == start {
		w.p.rd.conn.SetWriteDeadline(longAgo)
	} else {
		w.expiring.Store(false) // that write has ended
	}
	w.dmu.Unlock()
}

// writing reports whether a write is in progress right now.
func (w *writer) writing() bool { return w.wstart.Load() != 0 }

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
	frame := controlFrames.Get().(*controlFrame)
	defer controlFrames.Put(frame)
	n := w.encode(frame[:], op, payload)
	return w.put(frame[:n], nil)
}

// controlFrame holds one encoded control frame. A frame handed to the
// socket's Write escapes, so they are pooled: heartbeats make no garbage.
type controlFrame [ws.MaxHeaderSize + ws.MaxControlFramePayloadSize]byte

var controlFrames = sync.Pool{New: func() any { return new(controlFrame) }}

// encode encodes a frame with payload into buf (which must have room for
// the header) for this peer: masked toward an upstream.
func (w *writer) encode(buf []byte, op ws.OpCode, payload []byte) int {
	h := ws.Header{Fin: true, OpCode: op, Length: int64(len(payload)), Masked: w.p.side == upstreamSide}
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
	wrote, err := w.closeLocked(body)
	if wrote {
		w.p.c.closeFrame(w.p, false, body)
	}
	return wrote, err
}

func (w *writer) closeLocked(body []byte) (bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken {
		return false, errBroken
	}
	if w.closed.Load() {
		return false, nil
	}
	frame := controlFrames.Get().(*controlFrame)
	defer controlFrames.Put(frame)
	n := w.encode(frame[:], ws.OpClose, body)
	err := w.put(frame[:n], nil)
	w.closed.Store(true)
	return err == nil, err
}

// data writes buf[MaxHeaderSize:] as one message of op: compressed when
// the peer agreed to compression and the message is large enough and
// shrinks, else plain (see framed).
func (w *writer) data(op ws.OpCode, buf []byte) error {
	if payload := buf[ws.MaxHeaderSize:]; w.p.z.compresses(len(payload)) {
		if sent, err := w.deflated(op, payload); sent || err != nil {
			return err
		}
	}
	return w.framed(op, 0, buf)
}

// deflated writes payload compressed, as one message of op, unless
// compressing does not make it smaller; it reports whether it wrote.
// payload is left as it was.
func (w *writer) deflated(op ws.OpCode, payload []byte) (bool, error) {
	zb := readBufPool.Get().(*[]byte)
	defer readBufPool.Put(zb)
	b := compress((*zb)[:ws.MaxHeaderSize], payload, w.p.z.huffman)
	if len(b)-ws.MaxHeaderSize >= len(payload) {
		return false, nil
	}
	return true, w.framed(op, rsv1, b)
}

// framed writes buf[MaxHeaderSize:] as one final frame of op with the rsv
// bits, encoding the header into the headroom in front of it (and masking
// the payload in place toward an upstream).
func (w *writer) framed(op ws.OpCode, rsv byte, buf []byte) error {
	payload := buf[ws.MaxHeaderSize:]
	h := ws.Header{Fin: true, OpCode: op, Rsv: rsv, Length: int64(len(payload)), Masked: w.p.side == upstreamSide}
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
	return !w.running && w.pending() == 0
}

// deliver sends an encoded fan-out frame without blocking. When nothing
// is queued or being written, no forwarded message is in progress and the
// connection is open, it writes the frame to a plain TCP socket for as
// many bytes as the socket takes (at once, or with the rest of batch b
// when b is not nil); a goroutine writes the rest, holding the writer
// until it is out. Otherwise the frame is queued. False means the queue is
// full or closed.
func (w *writer) deliver(b *Batch, frame []byte) bool {
	if !w.takeIdle() {
		return w.enqueue(frame)
	}
	if b != nil {
		b.add(w, frame, nil)
	} else {
		w.send(frame)
	}
	return true
}

// deliverAll sends several encoded fan-out frames, in order, as deliver
// sends one: when the writer is idle, in one write (the frames end to end
// in a pooled buffer); otherwise queued. False means the queue did not
// take them all.
func (w *writer) deliverAll(b *Batch, frames [][]byte) bool {
	switch len(frames) {
	case 0:
		return true
	case 1:
		return w.deliver(b, frames[0])
	}
	if w.takeIdle() {
		bp := joinPool.Get().(*[]byte)
		joined := (*bp)[:0]
		for _, f := range frames {
			joined = append(joined, f...)
		}
		*bp = joined
		if b != nil {
			b.add(w, joined, bp)
		} else if w.send(joined) {
			putJoined(bp)
		}
		return true
	}
	for _, f := range frames {
		if !w.enqueue(f) {
			return false
		}
	}
	return true
}

// takeIdle locks mu and reports true when a fan-out frame may be written
// at once (see deliver); otherwise it leaves mu unlocked.
func (w *writer) takeIdle() bool {
	if !w.p.rd.direct || w.p.c.closeBy.Load() != 0 || !w.mu.TryLock() {
		return false
	}
	if w.inMsg || w.broken || w.closed.Load() || !w.idleLocked() {
		w.mu.Unlock()
		return false
	}
	return true
}

// joinPool holds deliverAll's buffers; one that grew past joinKeepMax is
// left to the collector.
var joinPool = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

const joinKeepMax = 64 << 10

// putJoined gives a buffer of deliverAll's, no longer in use, back.
func putJoined(bp *[]byte) {
	if cap(*bp) <= joinKeepMax {
		joinPool.Put(bp)
	}
}

// idleLocked reports, with mu held, whether nothing is queued or being
// written and the queue takes frames.
func (w *writer) idleLocked() bool {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	return !w.running && w.pending() == 0 && !w.refuse
}

// send writes b to the socket of an idle writer whose mu the caller holds,
// for as many bytes as the socket takes, and unlocks mu; when the socket
// took only part, a goroutine holds mu until the rest is out. It reports
// whether b is no longer in use.
func (w *writer) send(b []byte) bool {
	if w.writeFD == nil {
		w.writeFD = w.writeNow
	}
	w.nb, w.nw, w.nerr = b, 0, nil
	err := w.p.rd.sock.Write(w.writeFD)
	n := w.nw
	if err == nil {
		err = w.nerr
	}
	w.nb, w.nerr = nil, nil
	return w.sent(b, n, err)
}

// sent finishes a write of b that send (or a batch) made for an idle
// writer whose mu the caller holds: n bytes went out, and err is the
// write's error (EAGAIN: the socket was full). It unlocks mu, or hands it
// to a goroutine that writes the rest, and reports whether b is no longer
// in use.
func (w *writer) sent(b []byte, n int, err error) bool {
	if err != nil && err != syscall.EAGAIN {
		w.broken = true
		w.closed.Store(true)
		w.mu.Unlock()
		go w.p.c.fail(&ioErr{side: w.p.side, write: true, err: err})
		return true
	}
	if n == len(b) {
		w.mu.Unlock()
		return true
	}
	// Nothing may be written before the rest: a goroutine takes the
	// writer, still locked, and writes it.
	go w.finish(b[n:])
	return false
}

// finish writes the rest of a frame deliver began, with mu held on its
// behalf, then lets the queue go on.
func (w *writer) finish(rest []byte) {
	err := w.put(rest, nil)
	w.mu.Unlock()
	if err != nil {
		w.stopQueue()
		w.p.c.fail(err)
	}
}

// writeNow is deliver's raw write callback: one write, never a wait.
func (w *writer) writeNow(fd uintptr) bool {
	n, err := sysWrite(fd, w.nb)
	w.nw, w.nerr = max(n, 0), err
	return true
}

// enqueue queues an encoded frame without blocking; false means the queue
// is full or closed.
func (w *writer) enqueue(frame []byte) bool {
	w.qmu.Lock()
	defer w.qmu.Unlock()
	if w.refuse || w.pending() >= w.p.c.cfg.SendQueue {
		return false
	}
	if w.queue == nil {
		w.queue = new(sendQueue)
	}
	w.queue.frames = append(w.queue.frames, frame)
	w.startLocked()
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
	if w.pending() > 0 && !w.refuse {
		w.startLocked()
	}
}

// startLocked starts the queue goroutine unless it runs (qmu held).
func (w *writer) startLocked() {
	if !w.running {
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
		if w.pending() == 0 || w.refuse {
			w.running, w.queue = false, nil
			w.qmu.Unlock()
			return
		}
		frames := w.queue.frames
		w.queue.frames = nil
		w.qmu.Unlock()

		w.mu.Lock()
		if w.inMsg {
			w.qmu.Lock()
			if w.queue != nil {
				w.queue.frames = append(frames, w.queue.frames...)
			}
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
			w.p.c.fail(err)
			return
		}
	}
}
