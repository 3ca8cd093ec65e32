package bench

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/gobwas/ws"
)

// roomsSubprotocol is the protocol of wsgate's rooms mode.
const roomsSubprotocol = "wsgate.v1"

// roomsDialer offers wsgate.v1 with the Origin the rooms routes allow.
func roomsDialer() ws.Dialer {
	h := http.Header{"Origin": {goodOrigin}}
	return ws.Dialer{
		Protocols: []string{roomsSubprotocol},
		Header:    ws.HandshakeHeaderHTTP(h),
		Timeout:   10 * time.Second,
	}
}

// idleRoom is the room of idle rooms connection i: one room each.
func idleRoom(i int) string { return "bench:idle:" + strconv.Itoa(i) }

// dialRooms connects to a rooms route (without subscribing), checking
// that wsgate.v1 was agreed on.
func dialRooms(ctx context.Context, url string, bufSize int) (*client, error) {
	conn, br, hs, err := roomsDialer().Dial(ctx, url)
	if err != nil {
		return nil, fmt.Errorf("dialing %s: %w", url, err)
	}
	if hs.Protocol != roomsSubprotocol {
		conn.Close()
		return nil, fmt.Errorf("%s: subprotocol %q agreed, want %s", url, hs.Protocol, roomsSubprotocol)
	}
	c := &client{conn: conn, br: br, bw: bufio.NewWriterSize(conn, bufSize)}
	if c.br == nil {
		c.br = bufio.NewReaderSize(conn, bufSize)
	}
	return c, nil
}

// subscribe subscribes to room and waits for the {"id":1,"op":"ok"}
// reply (the connection's first request).
func (c *client) subscribe(room string) error {
	return c.subscribeWith(1, room, false)
}

// subscribeWith subscribes to room with request id and waits for the
// reply: {"id":<id>,"op":"ok"}, or, when the room keeps history,
// {"id":<id>,"op":"ok","epoch":…,"offset":…}. history says which the
// room must answer, so that a gateway that keeps no history for it (or
// keeps one it should not) fails the run instead of skewing it.
func (c *client) subscribeWith(id int, room string, history bool) error {
	c.conn.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.conn.SetDeadline(time.Time{})
	req := fmt.Sprintf(`{"id":%d,"op":"subscribe","channel":%q}`, id, room)
	if err := c.write(ws.OpText, []byte(req)); err != nil {
		return err
	}
	if err := c.bw.Flush(); err != nil {
		return err
	}
	got, err := c.read(make([]byte, 512))
	if err != nil {
		return fmt.Errorf("subscribing to %s: %w", room, err)
	}
	ok := fmt.Sprintf(`{"id":%d,"op":"ok"`, id)
	rest, found := bytes.CutPrefix(got, []byte(ok))
	if history {
		found = found && bytes.HasPrefix(rest, []byte(`,"epoch":`)) && bytes.Contains(rest, []byte(`,"offset":`))
	} else {
		found = found && string(rest) == "}"
	}
	if !found {
		return fmt.Errorf("subscribing to %s: reply %q", room, got)
	}
	return nil
}
