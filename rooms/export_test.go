package rooms

// Fan-out bounds, for tests.
const (
	FanInline = fanInline
	FanQueue  = fanQueue
)

// FanQueue reports how many of channel's publications wait for its
// fan-out, and whether a publisher waits for room in the queue.
func (h *Hub) FanQueue(channel string) (queued int, waiting bool) {
	h.mu.RLock()
	r := h.rooms[channel]
	h.mu.RUnlock()
	if r == nil {
		return 0, false
	}
	r.qmu.Lock()
	defer r.qmu.Unlock()
	return len(r.queue), r.taken != nil
}
