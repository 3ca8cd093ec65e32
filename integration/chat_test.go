package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"image/png"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// The example chat (examples/chat) in Chromium, on the JavaScript client
// (clients/js) as its page loads it, against gateways started from the
// example's own Caddyfile: a gateway killed and restarted mid-stream, a
// network path that goes silent, a token refreshed in band, and two users
// talking in one room (the screenshot of the README).

// requireChatClient skips (fails under CI) when the JavaScript client has
// not been built: the example's page loads clients/js/dist/wsgate.js.
func requireChatClient(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("../clients/js/dist/wsgate.js"); err != nil {
		const msg = "clients/js/dist/wsgate.js is missing: run `npm ci && npm run build` in clients/js"
		if os.Getenv("CI") != "" {
			t.Fatal(msg + " (.ci/run builds it before go test)")
		}
		t.Skip(msg)
	}
}

// chatSetup runs examples/chat/Caddyfile as a newcomer does, from the
// repository root, with its ports, broker and development secret set
// through the environment, plus a site for POST /publish on its own port
// (the example has none: its messages come from its pages).
type chatSetup struct {
	t       *testing.T
	port    int
	admin   string
	pubPort int
	config  string
	env     []string
}

func newChatSetup(t *testing.T, broker string) *chatSetup {
	t.Helper()
	requireChatClient(t)
	example, err := os.ReadFile("../examples/chat/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	c := &chatSetup{t: t, port: freePort(t), admin: "127.0.0.1:" + strconv.Itoa(freePort(t)), pubPort: freePort(t)}
	text := string(example) + fmt.Sprintf("\nhttp://127.0.0.1:%d {\n\twsgate_publish {\n\t\tkey %s\n\t}\n}\n", c.pubPort, publishKey)
	c.config = filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(c.config, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	c.env = []string{"CHAT_PORT=" + strconv.Itoa(c.port), "CHAT_ADMIN=" + c.admin, "CHAT_DEV_SECRET=" + hex.EncodeToString(secret)}
	if broker != "" {
		c.env = append(c.env, "CHAT_BROKER="+broker)
	}
	return c
}

// start runs the gateway (again, after a kill: same ports and secret).
func (c *chatSetup) start() *gateway {
	c.t.Helper()
	g := &gateway{t: c.t, env: c.env, dir: c.t.TempDir(), logs: &syncBuffer{}, exited: make(chan struct{}), port: c.port, adminAddr: c.admin}
	g.runIn("..", c.config)
	return g
}

// runIn is run with the working directory dir, where the Caddyfile's
// relative paths start.
func (g *gateway) runIn(dir, path string) {
	t := g.t
	t.Helper()
	g.cmd = exec.Command(caddyBin, "run", "--config", path, "--adapter", "caddyfile")
	g.cmd.Dir = dir
	g.cmd.Env = append(os.Environ(), "HOME="+g.dir, "XDG_DATA_HOME="+g.dir, "XDG_CONFIG_HOME="+g.dir)
	g.cmd.Env = append(g.cmd.Env, g.env...)
	g.cmd.Stdout, g.cmd.Stderr = g.logs, g.logs
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { g.cmd.Wait(); close(g.exited) }()
	t.Cleanup(g.stop)
	g.waitReady()
}

// pageURL is the chat page on host with query parameters (name, room, the
// client's options).
func (c *chatSetup) pageURL(host string, params ...string) string {
	q := url.Values{}
	for i := 0; i+1 < len(params); i += 2 {
		q.Set(params[i], params[i+1])
	}
	return "http://" + host + "/?" + q.Encode()
}

// publish sends one publication to POST /publish.
func (c *chatSetup) publish(body string) (int, string, error) {
	return postPublish(fmt.Sprintf("127.0.0.1:%d", c.pubPort), body)
}

// jsPoll waits until the page's expression is truthy. It polls on an
// interval rather than per animation frame, which a tab in the background
// would not get.
func jsPoll(t *testing.T, tab context.Context, expr string, within time.Duration) {
	t.Helper()
	if _, err := chromedp.Run(tab, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(within))); err != nil {
		state, _ := chromedp.Run(tab, chromedp.Evaluate[string](`JSON.stringify(window.chatState ?? null).slice(0, 2000)`))
		t.Fatalf("waiting %v for %s: %v; chatState: %s", within, expr, err, state)
	}
}

// jsEval evaluates an expression of the page and decodes its value.
func jsEval[T any](t *testing.T, tab context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(tab, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("%s: %v", expr, err)
	}
	return v
}

// openChat loads the page in tab and waits until it is subscribed to its room.
func openChat(t *testing.T, tab context.Context, pageURL string) {
	t.Helper()
	if err := chromedp.Do(tab, chromedp.Navigate(pageURL)); err != nil {
		t.Fatalf("%s: %v", pageURL, err)
	}
	jsPoll(t, tab, `window.chatState && chatState.subscribed.length > 0`, 20*time.Second)
	if errs := jsEval[[]string](t, tab, `chatState.errors`); len(errs) > 0 {
		t.Fatalf("the page's errors: %q", errs)
	}
}

// chatEvent is a connection event the page recorded.
type chatEvent struct {
	Type          string
	At            int64 // ms since the epoch
	Code          int
	Reason        string
	WillReconnect bool
}

type chatSubscribed struct {
	First, Recovered bool
	Epoch            string
	Offset           int64
}

// TestChatGatewayKilled: the page follows a room on a gateway with Redis;
// a numbered stream is published through POST /publish, each message with
// an idempotency key and retried while the gateway is down. The gateway is
// killed with -9 mid-stream and started again; Redis keeps the history, the
// client resubscribes with since, and the page ends with every message once
// and in order, its resubscription recovered.
func TestChatGatewayKilled(t *testing.T) {
	rs := startRedis(t)
	c := newChatSetup(t, "redis "+rs.url())
	g := c.start()
	tab := startBrowser(t)
	openChat(t, tab, c.pageURL(g.addr(), "name", "reader", "room", "stream", "minReconnectDelay", "200", "maxReconnectDelay", "1000"))

	const total, killAfter = 600, 150
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type pubResult struct {
		retries int
		dups    []int // answered as duplicates of an earlier attempt
		err     error
	}
	// The kill comes between two requests, never inside one: a gateway
	// killed after claiming a publication's idempotency key in Redis and
	// before publishing it leaves the key claimed, and the retries are then
	// duplicates of a publication nobody got. That is the gateway's window,
	// not the client's; the page must still catch up on what was published
	// but not yet delivered when the gateway died.
	var inFlight sync.Mutex
	pubDone := make(chan pubResult, 1)
	go func() {
		tick := time.NewTicker(5 * time.Millisecond)
		defer tick.Stop()
		retries := 0
		var dups []int
		for seq := 1; seq <= total; seq++ {
			body := fmt.Sprintf(`{"channel":"chat:stream","data":{"seq":%d},"idempotency_key":"chat-%d"}`, seq, seq)
			for {
				select {
				case <-ctx.Done():
					pubDone <- pubResult{retries, dups, ctx.Err()}
					return
				case <-tick.C:
				}
				inFlight.Lock()
				status, resp, err := c.publish(body)
				inFlight.Unlock()
				if err == nil && status == http.StatusOK {
					if strings.Contains(resp, `"duplicates":1`) {
						dups = append(dups, seq)
					}
					break
				}
				if err == nil && status != http.StatusServiceUnavailable {
					pubDone <- pubResult{retries, dups, fmt.Errorf("publish %d: %d %s", seq, status, resp)}
					return
				}
				retries++ // the gateway is down (or not yet ready): the same key again
			}
		}
		pubDone <- pubResult{retries, dups, nil}
	}()

	jsPoll(t, tab, fmt.Sprintf(`chatState.delivered.length >= %d`, killAfter), 30*time.Second)
	inFlight.Lock()
	g.terminate(syscall.SIGKILL, 10*time.Second)
	killed := time.Now()
	inFlight.Unlock()
	shown := jsEval[int](t, tab, `chatState.delivered.length`)
	jsPoll(t, tab, `chatState.events.some((e) => e.type === "disconnected")`, 10*time.Second)
	c.start()
	ready := time.Now()
	jsPoll(t, tab, `chatState.events.filter((e) => e.type === "connected").length >= 2`, 30*time.Second)
	back := jsEval[int64](t, tab, `chatState.events.filter((e) => e.type === "connected")[1].at`)
	res := <-pubDone
	if res.err != nil {
		t.Fatal(res.err)
	}
	_, waitErr := chromedp.Run(tab, chromedp.Poll[chromedp.Void](fmt.Sprintf(`chatState.delivered.length >= %d`, total),
		chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(30*time.Second)))
	seqs := jsEval[[]int](t, tab, `chatState.delivered.map((d) => d.data.seq)`)
	if waitErr != nil {
		got := map[int]bool{}
		for _, s := range seqs {
			got[s] = true
		}
		var missing []int
		for s := 1; s <= total; s++ {
			if !got[s] {
				missing = append(missing, s)
			}
		}
		t.Fatalf("%d of %d messages on the page (%v); missing %v; answered as duplicates: %v", len(seqs), total, waitErr, missing, res.dups)
	}
	offsets := jsEval[[]int64](t, tab, `chatState.delivered.map((d) => d.offset)`)
	for i, seq := range seqs {
		if seq != i+1 {
			t.Fatalf("message %d is seq %d (want every one once, in order); around it: %v", i, seq, seqs[max(0, i-3):min(len(seqs), i+4)])
		}
		if i > 0 && offsets[i] != offsets[i-1]+1 {
			t.Fatalf("offset %d after %d", offsets[i], offsets[i-1])
		}
	}
	if len(seqs) != total {
		t.Fatalf("%d messages, want %d", len(seqs), total)
	}
	if rows := jsEval[int](t, tab, `document.querySelectorAll("#messages .msg").length`); rows != total {
		t.Fatalf("%d messages on screen, want %d", rows, total)
	}
	subs := jsEval[[]chatSubscribed](t, tab, `chatState.subscribed`)
	if len(subs) < 2 || !subs[0].First {
		t.Fatalf("subscribed %+v: want the first and a resubscribe", subs)
	}
	for _, s := range subs[1:] {
		if !s.Recovered {
			t.Fatalf("resubscribe %+v not recovered", s)
		}
	}
	if n := jsEval[int](t, tab, `chatState.resets.length + chatState.reloads`); n != 0 {
		t.Fatalf("%d resets and reloads, want none", n)
	}
	if notice := jsEval[string](t, tab, `document.getElementById("notice").hidden ? "" : document.getElementById("notice").textContent`); notice != "" {
		t.Fatalf("notice shown: %q", notice)
	}
	t.Logf("killed the gateway after %d messages on the page; ready again %v after the kill; the page reconnected %v after the kill; %d publishes retried meanwhile",
		shown, ready.Sub(killed).Round(time.Millisecond), time.UnixMilli(back).Sub(killed).Round(time.Millisecond), res.retries)
	t.Logf("%d messages once and in order (offsets %d..%d); %d resubscribes, all recovered: true", len(seqs), offsets[0], offsets[len(offsets)-1], len(subs)-1)
}

// TestChatLivenessFrozenNetwork: the page reaches the gateway through a
// proxy that then stops forwarding without closing anything. With
// livenessInterval 1 s and livenessTimeout 0.5 s (page parameters), the
// client notices within 1.5 s, reconnects, and recovers the room.
func TestChatLivenessFrozenNetwork(t *testing.T) {
	c := newChatSetup(t, "")
	g := c.start()
	px := startProxy(t, g.addr())
	const interval, timeout = time.Second, 500 * time.Millisecond
	tab := startBrowser(t)
	openChat(t, tab, c.pageURL(px.addr(), "name", "watcher", "room", "live", "minReconnectDelay", "100",
		"livenessInterval", strconv.Itoa(int(interval.Milliseconds())), "livenessTimeout", strconv.Itoa(int(timeout.Milliseconds()))))
	if status, resp, err := c.publish(`{"channel":"chat:live","data":{"seq":1}}`); err != nil || status != http.StatusOK {
		t.Fatalf("publish: %d %s %v", status, resp, err)
	}
	jsPoll(t, tab, `chatState.delivered.length >= 1`, 10*time.Second)

	px.freeze()
	frozen := time.Now()
	jsPoll(t, tab, `chatState.events.some((e) => e.type === "disconnected")`, 10*time.Second)
	d := jsEval[chatEvent](t, tab, `chatState.events.find((e) => e.type === "disconnected")`)
	took := time.UnixMilli(d.At).Sub(frozen)
	t.Logf("frozen path noticed after %v (livenessInterval %v + livenessTimeout %v); disconnected %d %q", took.Round(time.Millisecond), interval, timeout, d.Code, d.Reason)
	if d.Reason != "liveness timeout" || !d.WillReconnect {
		t.Fatalf("disconnected %+v, want a liveness timeout and a reconnect", d)
	}
	// The client pings after interval of silence, and gives up timeout
	// later; the last frame came before the freeze, so no sooner than the
	// timeout and no later than both (the page's clock has ms resolution).
	if slack := 300 * time.Millisecond; took > interval+timeout+slack || took < timeout-5*time.Millisecond {
		t.Fatalf("noticed after %v, want between %v and %v", took, timeout, interval+timeout+slack)
	}

	jsPoll(t, tab, `chatState.subscribed.length >= 2`, 10*time.Second)
	if s := jsEval[chatSubscribed](t, tab, `chatState.subscribed[1]`); !s.Recovered {
		t.Fatalf("resubscribe %+v not recovered", s)
	}
	if status, resp, err := c.publish(`{"channel":"chat:live","data":{"seq":2}}`); err != nil || status != http.StatusOK {
		t.Fatalf("publish: %d %s %v", status, resp, err)
	}
	jsPoll(t, tab, `chatState.delivered.length >= 2`, 10*time.Second)
	if seqs := jsEval[[]int](t, tab, `chatState.delivered.map((d) => d.data.seq)`); len(seqs) != 2 || seqs[1] != 2 {
		t.Fatalf("delivered %v, want [1 2]", seqs)
	}
}

// TestChatTokenRefresh: the page mints tokens that live 4 s (page
// parameter ttl); the client refreshes them in band, so the connection
// outlives its first token, and a message sent from the page afterwards
// goes through the same connection.
func TestChatTokenRefresh(t *testing.T) {
	c := newChatSetup(t, "")
	g := c.start()
	tab := startBrowser(t)
	openChat(t, tab, c.pageURL(g.addr(), "name", "renew", "room", "tok", "ttl", "4"))
	firstExp := jsEval[int64](t, tab, `chatState.tokens[0].exp`)
	// The gateway closes a connection whose token expired within a second
	// of its exp.
	jsPoll(t, tab, fmt.Sprintf(`Date.now() > %d`, firstExp*1000+1500), 15*time.Second)
	jsEval[chromedp.Void](t, tab, `document.getElementById("text").value = "after the first token"; document.getElementById("composer").requestSubmit()`)
	jsPoll(t, tab, `chatState.delivered.some((d) => d.data.text === "after the first token")`, 10*time.Second)

	events := jsEval[[]chatEvent](t, tab, `chatState.events`)
	connected := 0
	for _, e := range events {
		switch e.Type {
		case "disconnected":
			t.Fatalf("disconnected: %+v", e)
		case "connected":
			connected++
		}
	}
	tokens := jsEval[int](t, tab, `chatState.tokens.length`)
	if connected != 1 || tokens < 2 {
		t.Fatalf("connected %d times with %d tokens, want one connection and a refresh", connected, tokens)
	}
	t.Logf("first token expired at %s; %d tokens minted; one connection throughout, alive %v after the first exp",
		time.Unix(firstExp, 0).Format("15:04:05"), tokens, time.Since(time.Unix(firstExp, 0)).Round(time.Millisecond))
}

// TestChatTwoUsersScreenshot: Ada and Lin log in through the page's form in
// two tabs, join the lobby, see each other in its presence list and
// exchange two messages. With WSGATE_WRITE_SCREENSHOT=1 Ada's view is
// written to examples/chat/screenshot.png (the README's picture); otherwise
// it is only taken.
func TestChatTwoUsersScreenshot(t *testing.T) {
	c := newChatSetup(t, "")
	g := c.start()
	bctx := startBrowser(t)
	login := func(tab context.Context, name string) {
		t.Helper()
		if err := chromedp.Do(tab,
			chromedp.EmulateViewport(960, 440),
			chromedp.Navigate("http://"+g.addr()+"/"),
			chromedp.SendKeys(chromedp.CSS("#login-name"), name),
			chromedp.Click(chromedp.CSS("#login button")),
		); err != nil {
			t.Fatalf("logging in %s: %v", name, err)
		}
		jsPoll(t, tab, `chatState.subscribed.length > 0`, 20*time.Second)
	}
	say := func(tab context.Context, text string) {
		t.Helper()
		if err := chromedp.Do(tab, chromedp.SendKeys(chromedp.CSS("#text"), text+"\r")); err != nil {
			t.Fatal(err)
		}
	}
	seen := func(tab context.Context, n int) {
		t.Helper()
		jsPoll(t, tab, fmt.Sprintf(`document.querySelectorAll("#messages .msg").length >= %d`, n), 10*time.Second)
	}
	presence := `[...document.querySelectorAll("#presence li")].map((li) => li.firstChild.textContent).join(",")`

	ada := bctx
	login(ada, "Ada")
	lin, cancel := chromedp.NewContext(bctx)
	defer cancel()
	login(lin, "Lin")
	for _, tab := range []context.Context{ada, lin} {
		jsPoll(t, tab, presence+` === "Ada,Lin"`, 10*time.Second)
	}
	say(ada, "Hi Lin! The deploy went out a minute ago.")
	seen(lin, 1)
	say(lin, "Thanks Ada, everything looks good here.")
	seen(ada, 2)
	say(ada, "Great. I'll keep an eye on the dashboards.")
	seen(lin, 3)
	seen(ada, 3)
	for _, tab := range []context.Context{ada, lin} {
		texts := jsEval[[]string](t, tab, `[...document.querySelectorAll("#messages .msg")].map((m) => m.querySelector(".who").textContent + ": " + m.children[1].textContent)`)
		want := []string{"Ada: Hi Lin! The deploy went out a minute ago.", "Lin: Thanks Ada, everything looks good here.", "Ada: Great. I'll keep an eye on the dashboards."}
		if strings.Join(texts, "\n") != strings.Join(want, "\n") {
			t.Fatalf("messages on screen:\n%s\nwant:\n%s", strings.Join(texts, "\n"), strings.Join(want, "\n"))
		}
	}

	shot, err := chromedp.Run(ada, chromedp.CaptureScreenshot())
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(shot))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	t.Logf("screenshot %dx%d, %d bytes; presence %q", img.Bounds().Dx(), img.Bounds().Dy(), len(shot), jsEval[string](t, ada, presence))
	if os.Getenv("WSGATE_WRITE_SCREENSHOT") == "1" {
		if err := os.WriteFile("../examples/chat/screenshot.png", shot, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Log("wrote examples/chat/screenshot.png")
	}
}
