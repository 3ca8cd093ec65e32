package wsgate

import "sync"

// dispatcher runs callbacks one at a time, in the order they were pushed,
// on its own goroutine, so that a handler may wait for a reply that the
// reader goroutine has yet to read.
type dispatcher struct {
	mu   sync.Mutex
	q    []func()
	wake chan struct{}
	stop chan struct{}
}

func newDispatcher() *dispatcher {
	return &dispatcher{wake: make(chan struct{}, 1), stop: make(chan struct{})}
}

func (d *dispatcher) push(f func()) {
	d.mu.Lock()
	d.q = append(d.q, f)
	d.mu.Unlock()
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// run delivers until stop is closed, then delivers what is left and returns.
func (d *dispatcher) run() {
	for {
		if d.drain() > 0 {
			continue
		}
		select {
		case <-d.wake:
		case <-d.stop:
			d.drain()
			return
		}
	}
}

// drain runs what is queued and says how much that was.
func (d *dispatcher) drain() int {
	d.mu.Lock()
	q := d.q
	d.q = nil
	d.mu.Unlock()
	for _, f := range q {
		f()
	}
	return len(q)
}
