package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestFloodingPublisher: with the default rooms config (no rate options),
// clients send thousands of publishes as fast as they can while three
// subscribers read. No subscriber is closed. Each flooder is limited as
// the README says: a publish over the default rate (50/s, burst 100) gets
// an error reply with code rate_limited and is not delivered, and the
// flooder's connection stays open. Each subscriber gets exactly the
// accepted publishes, in each flooder's order. Ten flooders bursting at
// once still fit in a reader's default send queue.
func TestFloodingPublisher(t *testing.T) {
	tests := []struct {
		name     string
		flooders int
		each     int // publishes per flooder
	}{
		{"one flooder", 1, 20_000},
		{"ten flooders", 10, 2_000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			const room, readers = "room:flood", 3
			g := startGateway(t, roomsSite(""))
			subs := make([]*floodReader, readers)
			for i := range subs {
				subs[i] = startFloodReader(t, dialRooms(t, g), room)
			}
			flooders := make([]*flooder, tc.flooders)
			for i := range flooders {
				flooders[i] = dialFlooder(t, g)
			}
			var wg sync.WaitGroup
			errs := make([]error, tc.flooders)
			for i, f := range flooders {
				wg.Go(func() { errs[i] = f.flood(i, room, tc.each) })
			}
			wg.Wait()
			for i, f := range flooders {
				if errs[i] != nil {
					t.Fatalf("flooder %d: %v", i, errs[i])
				}
				t.Logf("flooder %d: %d publishes written in %v, all answered in %v: %d accepted, %d rate_limited",
					i, tc.each, f.written, f.answered, len(f.accepted), f.limited)
				// The bucket starts full and refills at the default rate.
				const rate, burst = 50, 100
				if most := burst + int(rate*f.answered.Seconds()) + 1; len(f.accepted) < burst || len(f.accepted) > most {
					t.Fatalf("flooder %d: %d publishes accepted in %v; want from %d to %d (50/s, burst 100)",
						i, len(f.accepted), f.answered, burst, most)
				}
				if f.limited != tc.each-len(f.accepted) {
					t.Fatalf("flooder %d: %d rate_limited, want %d", i, f.limited, tc.each-len(f.accepted))
				}
				// Limited, not closed: the connection still answers.
				if err := f.ping(tc.each); err != nil {
					t.Fatalf("flooder %d after the flood: %v", i, err)
				}
			}

			// Every subscriber gets exactly the accepted publishes, in
			// each flooder's order, and is still connected. Each publish
			// was queued to the subscribers before its reply was sent,
			// and a reply to a subscriber comes after what is queued for
			// it: once its ping is answered, it has been sent everything.
			for i, s := range subs {
				select {
				case <-s.done:
					code, reason := closeOf(s.res.err)
					t.Fatalf("subscriber %d closed: close %d %q", i, code, reason)
				default:
				}
				if r := s.c.call(map[string]any{"op": "ping"}); r["op"] != "ok" {
					t.Fatalf("subscriber %d: ping after the flood: %v", i, r)
				}
			}
			for i, s := range subs {
				r := s.stop()
				if r.err != nil {
					code, reason := closeOf(r.err)
					t.Fatalf("subscriber %d closed after %d messages: close %d %q", i, len(r.seqs), code, reason)
				}
				for src, f := range flooders {
					if got, want := fmt.Sprint(r.seqs[src]), fmt.Sprint(f.accepted); got != want {
						t.Fatalf("subscriber %d got %d messages of flooder %d, want the %d accepted, in order:\n got %v\nwant %v",
							i, len(r.seqs[src]), src, len(f.accepted), got, want)
					}
				}
				if len(r.seqs) != len(flooders) {
					t.Fatalf("subscriber %d got messages from %d sources, want %d", i, len(r.seqs), len(flooders))
				}
			}
			if strings.Contains(g.logs.String(), "slow consumer") {
				t.Fatal("the gateway took a subscriber for a slow consumer")
			}
		})
	}
}

// floodData is the data of a flooder's publish.
type floodData struct {
	Src int `json:"src"`
	Seq int `json:"seq"`
}

// floodReader is a subscriber that reads everything it is sent, as fast
// as it comes, and sorts it by source.
type floodReader struct {
	c    *roomsClient
	quit chan struct{}
	done chan struct{} // closed when res is final
	res  floodReceived
}

type floodReceived struct {
	seqs map[int][]int // by flooder
	err  error         // the connection ended
}

func startFloodReader(t *testing.T, c *roomsClient, room string) *floodReader {
	t.Helper()
	c.subscribe(room)
	s := &floodReader{c: c, quit: make(chan struct{}), done: make(chan struct{}), res: floodReceived{seqs: map[int][]int{}}}
	go func() {
		defer close(s.done)
		add := func(m roomsMsg) {
			var d floodData
			json.Unmarshal(m.Data, &d)
			s.res.seqs[d.Src] = append(s.res.seqs[d.Src], d.Seq)
		}
		for {
			select {
			case m, ok := <-c.msgs:
				if !ok {
					s.res.err = <-c.errs
					return
				}
				add(m)
			case <-s.quit:
				// What arrived before the last reply is buffered.
				for len(c.msgs) > 0 {
					add(<-c.msgs)
				}
				return
			}
		}
	}()
	t.Cleanup(func() { s.stop() })
	return s
}

// stop ends the reading and returns what was read.
func (s *floodReader) stop() floodReceived {
	select {
	case <-s.quit:
	default:
		close(s.quit)
	}
	<-s.done
	return s.res
}

// flooder is a wsgate.v1 client that publishes without waiting for replies.
type flooder struct {
	c       *websocket.Conn
	start   time.Time // before the connection (and its bucket) existed
	replies chan floodReply
	readErr chan error

	written, answered time.Duration // since start
	accepted          []int
	limited           int
}

// floodReply is a gateway reply as the flooder reads it.
type floodReply struct {
	ID   *int   `json:"id"`
	Op   string `json:"op"`
	Code string `json:"code"`
}

func dialFlooder(t *testing.T, g *gateway) *flooder {
	t.Helper()
	f := &flooder{start: time.Now(), replies: make(chan floodReply, 64<<10), readErr: make(chan error, 1)}
	f.c = dial(t, g, "/ws", &websocket.DialOptions{Subprotocols: []string{"wsgate.v1"}})
	go func() {
		for {
			_, b, err := f.c.Read(context.Background())
			if err != nil {
				f.readErr <- err
				return
			}
			var r floodReply
			if err := json.Unmarshal(b, &r); err != nil || r.ID == nil {
				f.readErr <- fmt.Errorf("unexpected message %q", b)
				return
			}
			f.replies <- r
		}
	}()
	return f
}

// flood writes n publishes as fast as it can, then reads their replies.
func (f *flooder) flood(src int, room string, n int) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for i := 0; i < n; i++ {
		msg := fmt.Sprintf(`{"id":%d,"op":"publish","channel":%q,"data":{"src":%d,"seq":%d}}`, i, room, src, i)
		if err := f.c.Write(ctx, websocket.MessageText, []byte(msg)); err != nil {
			return fmt.Errorf("write %d: %w", i, err)
		}
	}
	f.written = time.Since(f.start)
	for k := 0; k < n; k++ {
		r, err := f.reply(30 * time.Second)
		if err != nil {
			return fmt.Errorf("after %d of %d replies: %w", k, n, err)
		}
		switch {
		case *r.ID != k:
			return fmt.Errorf("reply %d to request %d", *r.ID, k)
		case r.Op == "ok":
			f.accepted = append(f.accepted, k)
		case r.Op == "error" && r.Code == "rate_limited":
			f.limited++
		default:
			return fmt.Errorf("reply %+v to publish %d; want ok or rate_limited", r, k)
		}
	}
	f.answered = time.Since(f.start)
	return nil
}

// ping sends a ping with id and waits for its ok.
func (f *flooder) ping(id int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := f.c.Write(ctx, websocket.MessageText, []byte(fmt.Sprintf(`{"id":%d,"op":"ping"}`, id))); err != nil {
		return err
	}
	r, err := f.reply(10 * time.Second)
	if err == nil && (*r.ID != id || r.Op != "ok") {
		err = fmt.Errorf("%+v to a ping", r)
	}
	return err
}

func (f *flooder) reply(within time.Duration) (floodReply, error) {
	select {
	case r := <-f.replies:
		return r, nil
	case err := <-f.readErr:
		code, reason := closeOf(err)
		return floodReply{}, fmt.Errorf("connection ended: %v (close %d %q)", err, code, reason)
	case <-time.After(within):
		return floodReply{}, fmt.Errorf("no reply within %v", within)
	}
}
