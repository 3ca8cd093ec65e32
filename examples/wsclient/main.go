// Command wsclient is a minimal WebSocket client for trying a gateway: it
// sends each message given after the URL as a text message and prints each
// reply on a line of its own.
//
//	go run ./examples/wsclient -origin http://127.0.0.1:8080 ws://127.0.0.1:8080/ws hello
//
// It waits for one reply per message, so it suits an echoing upstream such
// as examples/echo. A refused handshake is reported with the gateway's
// status and body, which say why.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/coder/websocket"
)

func main() {
	origin := flag.String("origin", "", "Origin header to send (wsgate checks it; browsers always send one)")
	token := flag.String("token", "", "bearer token to send in the Authorization header")
	timeout := flag.Duration("timeout", 10*time.Second, "bound on the whole exchange")
	flag.Usage = func() {
		fmt.Fprintln(flag.CommandLine.Output(), "usage: wsclient [flags] ws://host:port/path message...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() < 2 {
		flag.Usage()
		os.Exit(2)
	}
	if err := run(flag.Arg(0), flag.Args()[1:], *origin, *token, *timeout); err != nil {
		fmt.Fprintln(os.Stderr, "wsclient:", err)
		os.Exit(1)
	}
}

func run(url string, messages []string, origin, token string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	h := http.Header{}
	if origin != "" {
		h.Set("Origin", origin)
	}
	if token != "" {
		h.Set("Authorization", "Bearer "+token)
	}
	c, resp, err := websocket.Dial(ctx, url, &websocket.DialOptions{HTTPHeader: h})
	if err != nil {
		if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
			body, _ := io.ReadAll(resp.Body)
			return fmt.Errorf("handshake refused: %s %s", resp.Status, strings.TrimSpace(string(body)))
		}
		return err
	}
	defer c.CloseNow()
	c.SetReadLimit(-1)
	for _, m := range messages {
		if err := c.Write(ctx, websocket.MessageText, []byte(m)); err != nil {
			return fmt.Errorf("sending: %w", err)
		}
		_, reply, err := c.Read(ctx)
		if err != nil {
			return fmt.Errorf("reading the reply: %w", err)
		}
		fmt.Printf("%s\n", reply)
	}
	return c.Close(websocket.StatusNormalClosure, "")
}
