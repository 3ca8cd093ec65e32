package proxy

import (
	"time"

	"github.com/gobwas/ws"
)

// Session is what code outside the relay may do with a live connection.
type Session interface {
	// Enqueue queues a message (shared, not modified) for the client
	// without blocking (written with b's other writes when b is not nil,
	// see Batch), compressed when the client agreed to compression. When the queue is full the client is a slow
	// consumer: the connection is closed with 1013 (or, with SlowConsumer
	// drop, the frame is dropped) and Enqueue returns false. A queued frame
	// never lands inside a message the upstream is sending in fragments:
	// it waits for the message's last fragment.
	Enqueue(b *Batch, m *Message) bool
	// EnqueueAll is Enqueue for several messages in order, written
	// together when the client's writer is idle: with b's other writes
	// when b is not nil (see Batch), else at once.
	EnqueueAll(b *Batch, ms []*Message) bool
	// Close closes the connection with code and reason.
	Close(code uint16, reason string)
	// Extend moves the time the client's credentials expire (a refreshed
	// token; zero: never). A time that has passed is refused, and the
	// expiry stays. It must be called from the Inspect hook, which runs on
	// the client's reader.
	Extend(exp time.Time) error
	// Reply sends a message of the gateway's own to the client (a text
	// frame), in order with what is queued: an answer that must reach the
	// client before frames queued after it. It must be called from the
	// Inspect hook, and is not counted as fan-out.
	Reply(msg []byte) error
}

// Reply implements Session.
func (c *relay) Reply(msg []byte) error { return c.reply(msg) }

// Enqueue implements Session.
func (c *relay) Enqueue(b *Batch, m *Message) bool {
	if c.closing.Load() {
		return false
	}
	if c.client.w.deliver(b, m.frameFor(c.client.z)) {
		c.fanout.add(1, uint64(len(m.Payload())))
		return true
	}
	c.overflow()
	return false
}

// EnqueueAll implements Session.
func (c *relay) EnqueueAll(b *Batch, ms []*Message) bool {
	if c.closing.Load() {
		return false
	}
	var stack [16][]byte
	frames := stack[:0]
	var size uint64
	for _, m := range ms {
		frames = append(frames, m.frameFor(c.client.z))
		size += uint64(len(m.Payload()))
	}
	if c.client.w.deliverAll(b, frames) {
		c.fanout.add(uint64(len(ms)), size)
		return true
	}
	c.overflow()
	return false
}

// reply sends a message of the gateway's own to the client (a policy
// reply, a rooms answer), in order with what is queued for it.
func (c *relay) reply(msg []byte) error {
	var frame []byte
	if z := c.client.z; z.compresses(len(msg)) {
		frame = compressedFrame(ws.Header{Fin: true, OpCode: ws.OpText}, msg, z.huffman)
	}
	if frame == nil {
		frame = EncodeServerFrame(ws.OpText, msg)
	}
	ok, err := c.client.w.message(frame)
	if !ok {
		c.overflow()
	}
	return err
}

// overflow handles a full send queue: with SlowClose the client is a slow
// consumer and the connection is closed with 1013, once the frame being
// written is out (bounded by the closing deadline); with SlowDrop the
// message is dropped.
func (c *relay) overflow() {
	if c.cfg.SlowConsumer == SlowDrop {
		c.countSlow(true)
		return
	}
	if !c.client.w.stopQueue() {
		return
	}
	c.countSlow(false)
	c.g.log.Info("slow consumer: closing with 1013", "remote", c.client.rd.conn.RemoteAddr().String(), "send_queue", c.cfg.SendQueue)
	c.beginClosing()
	go c.shutdown(ws.StatusCode(1013), "slow consumer")
}

// frameHeaderSize is the size of the header of an encoded server frame
// (unmasked).
func frameHeaderSize(frame []byte) int {
	if len(frame) < 2 {
		return len(frame)
	}
	switch frame[1] & 0x7f {
	case 126:
		return 4
	case 127:
		return 10
	}
	return 2
}
