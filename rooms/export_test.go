package rooms

// Fan-out bounds, for tests.
const (
	FanInline = fanInline
	FanQueue  = fanQueueMax
	FanBatch  = fanBatchMax
)

// FanQueue reports how many of channel's publications wait for its
// fan-out, and whether a publisher waits for room in the queue.
func (h *Hub) FanQueue(channel string) (queued int, waiting bool) {
	r := h.room(channel)
	if r == nil {
		return 0, false
	}
	q := r.fq.Load()
	if q == nil {
		return 0, false
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.ps), q.taken != nil
}
