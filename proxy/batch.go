package proxy

import "sync"

// A Batch gathers fan-out frames for several clients and writes them
// together: a room's fan-out hands each subscriber's frames to the same
// batch, and the frames of those whose writers are idle are written when
// the batch is full or ends. On Linux the writes of a batch are made in
// one io_uring submission, one system call for up to batchMax sockets
// instead of one each; where io_uring is missing or refused, and on other
// systems, each is written on its own. A writer in a batch is held (its
// mu locked) until the batch is written, so its frames keep their order
// with everything written to it after.
//
// A batch is used by one goroutine at a time; NewBatch makes one and End
// writes what it holds and releases it.
type Batch struct {
	items []batchItem
	sys   batchSys // what the system's way of writing them needs
}

// batchItem is one idle writer's write, its mu held by the batch.
type batchItem struct {
	w    *writer
	b    []byte
	join *[]byte // the pooled buffer b is (deliverAll), or nil
	fd   int     // the socket, while the batch holds it; -1: not held
	n    int     // bytes written
	err  error
}

// batchMax is how many writes a batch holds before it writes them.
const batchMax = 64

var batches = sync.Pool{New: func() any { return new(Batch) }}

// NewBatch returns an empty batch.
func NewBatch() *Batch { return batches.Get().(*Batch) }

// End writes what the batch holds and releases it; it must not be used
// after.
func (b *Batch) End() {
	b.flush()
	batches.Put(b)
}

// add takes frame for w, an idle writer whose mu the caller holds.
func (b *Batch) add(w *writer, frame []byte, join *[]byte) {
	b.items = append(b.items, batchItem{w: w, b: frame, join: join})
	if len(b.items) == batchMax {
		b.flush()
	}
}

// flush writes what the batch holds and lets the writers go.
func (b *Batch) flush() {
	together := len(b.items) > 1 && b.writeAll()
	for i := range b.items {
		it := &b.items[i]
		var done bool
		if together {
			done = it.w.sent(it.b, it.n, it.err)
		} else {
			done = it.w.send(it.b)
		}
		if done && it.join != nil {
			putJoined(it.join)
		}
	}
	clear(b.items)
	b.items = b.items[:0]
}
