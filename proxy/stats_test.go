package proxy

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/coder/websocket"
)

// TestStatsAndConnEnd checks what a connection reports when it ends (who
// closed first, with which code, the close frames on each side, its
// traffic) and what Stats adds up, for each way a connection can end.
func TestStatsAndConnEnd(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		// run drives the connection: c is the client, uc its upstream.
		run       func(t *testing.T, c *websocket.Conn, uc *upConn)
		first     string
		code      uint16 // FirstCode
		key       CloseKey
		c2u, u2c  uint64 // messages relayed each way
		fromCl    *CloseFrame
		toUp      *CloseFrame
		fromUp    *CloseFrame
		toCl      *CloseFrame
		limitDrop uint64
	}{
		{
			name: "client closes after an exchange",
			run: func(t *testing.T, c *websocket.Conn, uc *upConn) {
				for _, m := range []string{"a", "bc"} {
					c.Write(ctx, websocket.MessageText, []byte(m))
					if _, b, err := c.Read(ctx); err != nil || string(b) != m {
						t.Fatalf("echo %q: %q %v", m, b, err)
					}
				}
				c.Close(websocket.StatusNormalClosure, "bye")
			},
			first: "client", code: 1000, key: CloseKey{"client", "1000"}, c2u: 2, u2c: 2,
			fromCl: &CloseFrame{1000, "bye"}, toUp: &CloseFrame{1000, "bye"},
			fromUp: &CloseFrame{1000, "bye"}, toCl: &CloseFrame{1000, "bye"},
		},
		{
			name: "upstream closes with 4000",
			run: func(t *testing.T, c *websocket.Conn, uc *upConn) {
				go uc.c.Close(4000, "done") // it waits for the answer
				if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != 4000 {
					t.Fatalf("client: %v, want 4000", err)
				}
			},
			first: "upstream", code: 4000, key: CloseKey{"upstream", "4000"},
			fromUp: &CloseFrame{4000, "done"}, toCl: &CloseFrame{4000, "done"},
			fromCl: &CloseFrame{4000, "done"}, toUp: &CloseFrame{4000, "done"},
		},
		{
			name: "client breaks max_message",
			run: func(t *testing.T, c *websocket.Conn, uc *upConn) {
				c.Write(ctx, websocket.MessageText, []byte(strings.Repeat("x", 65)))
				if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusMessageTooBig {
					t.Fatalf("client: %v, want 1009", err)
				}
			},
			first: "client", code: 1009, key: CloseKey{"client", "1009"},
			toCl: &CloseFrame{1009, "message too big"}, fromCl: &CloseFrame{1009, "message too big"},
			toUp: &CloseFrame{1009, "message too big"}, fromUp: &CloseFrame{1009, "message too big"},
		},
		{
			name: "upstream goes away",
			run: func(t *testing.T, c *websocket.Conn, uc *upConn) {
				uc.c.CloseNow()
				if _, _, err := c.Read(ctx); websocket.CloseStatus(err) != websocket.StatusInternalError {
					t.Fatalf("client: %v, want 1011", err)
				}
			},
			first: "upstream", code: 0, key: CloseKey{"upstream", "none"},
			toCl: &CloseFrame{1011, "upstream went away"}, fromCl: &CloseFrame{1011, "upstream went away"},
		},
		{
			name: "a message over the rate limit is dropped",
			run: func(t *testing.T, c *websocket.Conn, uc *upConn) {
				for _, m := range []string{"a", "b"} {
					c.Write(ctx, websocket.MessageText, []byte(m))
				}
				if _, b, err := c.Read(ctx); err != nil || string(b) != "a" {
					t.Fatalf("echo: %q %v", b, err)
				}
				c.Close(websocket.StatusNormalClosure, "")
			},
			first: "client", code: 1000, key: CloseKey{"client", "1000"}, c2u: 1, u2c: 1,
			fromCl: &CloseFrame{1000, ""}, toUp: &CloseFrame{1000, ""},
			fromUp: &CloseFrame{1000, ""}, toCl: &CloseFrame{1000, ""},
			limitDrop: 1,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			up := startUpstream(t, nil, nil)
			stats := NewStats()
			ends := make(chan *ConnEnd, 1)
			tg := startGatewayInfo(t, up.url, func(cfg *Config) {
				cfg.Stats = stats
				cfg.Client.MaxMessage = 64
				cfg.Client.Rate = &RateLimit{Messages: 0.001, MessageBurst: 1, OnExceed: ExceedDrop}
				if tt.limitDrop == 0 {
					cfg.Client.Rate = nil
				}
			}, func() RequestInfo {
				return RequestInfo{OnEnd: func(e *ConnEnd) { ends <- e }}
			})
			c, _, err := websocket.Dial(ctx, tg.url("/"), &websocket.DialOptions{HTTPHeader: http.Header{}})
			if err != nil {
				t.Fatal(err)
			}
			defer c.CloseNow()
			uc := up.next(t)
			// The 101 leaves before the connection is counted open.
			poll(t, "the connection to count as open", func() bool { return stats.Snapshot().OpenRelay == 1 })
			tt.run(t, c, uc)
			var e *ConnEnd
			select {
			case e = <-ends:
			case <-ctx.Done():
			}
			if e == nil {
				t.Fatal("no ConnEnd")
			}
			if e.First != tt.first || uint16(e.FirstCode) != tt.code {
				t.Errorf("closed first %s %d, want %s %d", e.First, e.FirstCode, tt.first, tt.code)
			}
			if e.Upstream != up.url {
				t.Errorf("upstream %q, want %q", e.Upstream, up.url)
			}
			for _, f := range []struct {
				what      string
				got, want *CloseFrame
			}{{"from client", e.FromClient, tt.fromCl}, {"to upstream", e.ToUpstream, tt.toUp},
				{"from upstream", e.FromUpstream, tt.fromUp}, {"to client", e.ToClient, tt.toCl}} {
				if (f.got == nil) != (f.want == nil) || (f.got != nil && *f.got != *f.want) {
					t.Errorf("close %s: %+v, want %+v", f.what, f.got, f.want)
				}
			}
			s := stats.Snapshot()
			if s.OpenRelay != 0 || s.Closes[tt.key] != 1 || len(s.Closes) != 1 {
				t.Errorf("after the end: open %d, closes %v, want 0 and %v once", s.OpenRelay, s.Closes, tt.key)
			}
			if s.Traffic != e.Traffic {
				t.Errorf("stats traffic %+v, the connection's %+v", s.Traffic, e.Traffic)
			}
			if got := e.Traffic.Messages; got[ClientToUpstream] != tt.c2u || got[UpstreamToClient] != tt.u2c || got[Fanout] != 0 {
				t.Errorf("messages %v, want %d %d 0", got, tt.c2u, tt.u2c)
			}
			if got := s.RateLimited[0][ExceedDrop]; got != tt.limitDrop {
				t.Errorf("client messages dropped over the rate limit: %d, want %d", got, tt.limitDrop)
			}
		})
	}
}
