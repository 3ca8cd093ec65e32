package integration

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// chromiumPath finds Chromium; under CI its absence fails the test.
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium is not installed (.ci/run installs it)")
	}
	t.Skip("chromium is not installed; apt-get install -y chromium")
	return ""
}

// startBrowser starts headless Chromium; it is stopped when the test ends.
// The context returned carries the browser, without a timeout.
func startBrowser(t *testing.T) context.Context {
	t.Helper()
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromiumPath(t)),
		chromedp.Flag("headless", true),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(t.TempDir()),
	)
	actx, cancelA := chromedp.NewExecAllocator(context.Background(), opts...)
	t.Cleanup(cancelA)
	bctx, cancelB := chromedp.NewContext(actx)
	t.Cleanup(cancelB)
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
	return bctx
}

// servePage serves one HTML page that opens a WebSocket to wsURL and
// reports the outcome in document.title.
func servePage(t *testing.T, wsURL string, setCookie bool) string {
	t.Helper()
	ln := listen(t)
	page := fmt.Sprintf(`<!doctype html><title>pending</title><script>
const ws = new WebSocket(%q);
ws.onopen = () => ws.send("hello from the page");
ws.onmessage = (e) => { document.title = "open:" + e.data; };
ws.onclose = (e) => { if (!document.title.startsWith("open")) document.title = "closed:" + e.code; };
</script>`, wsURL)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if setCookie {
			// The victim logs in on the real app: its session cookie is for
			// the host 127.0.0.1, so it goes to the gateway from any port.
			w.Header().Set("Set-Cookie", "session=victim; Path=/")
		}
		w.Header().Set("Content-Type", "text/html")
		w.Write([]byte(page))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return "http://" + ln.Addr().String()
}

// TestBrowserCrossSiteWebSocketHijacking: two pages, one from the allowed
// origin and one from a foreign origin, both open a socket to the gateway
// carrying the same session cookie; only the allowed page's socket opens.
func TestBrowserCrossSiteWebSocketHijacking(t *testing.T) {
	up := startUpstream(t)
	// The forward-auth endpoint accepts the session cookie: a foreign page
	// that rides on it must be stopped by the Origin check alone.
	auth := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if c, err := r.Cookie("session"); err != nil || c.Value != "victim" {
			w.WriteHeader(http.StatusUnauthorized)
		}
	})}
	authLn := listen(t)
	go auth.Serve(authLn)
	t.Cleanup(func() { auth.Close() })

	gwPort := freePort(t)
	wsURL := fmt.Sprintf("ws://127.0.0.1:%d/ws", gwPort)
	allowed := servePage(t, wsURL, true)
	foreign := servePage(t, wsURL, false)
	gw := startGatewayOnPort(t, gwPort, relaySite(up.URL, fmt.Sprintf("\t\torigins %s\n\t\tforward_auth http://%s/check", allowed, authLn.Addr())))

	bctx := startBrowser(t)
	ctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()
	outcome := func(pageURL string) string {
		t.Helper()
		tctx, cancelT := context.WithTimeout(ctx, 30*time.Second)
		defer cancelT()
		tab, cancelTab := chromedp.NewContext(tctx)
		defer cancelTab()
		if err := chromedp.Do(tab, chromedp.Navigate(pageURL)); err != nil {
			t.Fatalf("page %s: %v", pageURL, err)
		}
		if _, err := chromedp.Run(tab, chromedp.Poll[bool](`document.title !== "pending"`, chromedp.WithPollingTimeout(20*time.Second))); err != nil {
			t.Fatalf("page %s: %v", pageURL, err)
		}
		title, err := chromedp.Run(tab, chromedp.Title())
		if err != nil {
			t.Fatalf("page %s: %v", pageURL, err)
		}
		return title
	}
	if got := outcome(allowed); got != "open:hello from the page" {
		t.Fatalf("allowed page: %q, want an open socket echoing", got)
	}
	if got := outcome(foreign); !strings.HasPrefix(got, "closed:") {
		t.Fatalf("foreign page: %q, want the socket refused", got)
	}
	// The gateway refused the foreign page with 403 at the handshake.
	eventually(t, 5*time.Second, "the refusal in the gateway's log", func() bool {
		return strings.Contains(gw.logs.String(), `"status":403`)
	})
	// …and the upstream only ever saw the allowed page, with the cookie.
	if h := up.lastHeader(); h.Get("Origin") != allowed || !strings.Contains(h.Get("Cookie"), "session=victim") {
		t.Fatalf("upstream handshake: Origin %q Cookie %q", h.Get("Origin"), h.Get("Cookie"))
	}
}

// readmeExample is the "Two nodes on one Redis" example of README.md: its
// Caddyfile, the page's script, and the shell commands.
type readmeExample struct {
	global, site, script string
	commands             [][]string
}

func loadReadmeExample(t *testing.T) readmeExample {
	t.Helper()
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, sec, ok := strings.Cut(string(b), "\n### Two nodes on one Redis\n")
	if !ok {
		t.Fatal(`README.md has no "### Two nodes on one Redis"`)
	}
	sec, _, _ = strings.Cut(sec, "\n### ")
	block := func(lang string) string {
		t.Helper()
		_, rest, ok := strings.Cut(sec, "\n```"+lang+"\n")
		if !ok {
			t.Fatalf("README example: no %s block", lang)
		}
		body, _, _ := strings.Cut(rest, "\n```")
		return body
	}
	var ex readmeExample
	caddyfile := block("caddyfile")
	global, site, ok := strings.Cut(caddyfile, "\n}\n")
	if !ok || !strings.HasPrefix(global, "{\n") {
		t.Fatalf("README example: no global options block in\n%s", caddyfile)
	}
	ex.global = strings.TrimPrefix(global, "{\n")
	_, site, ok = strings.Cut(site, "chat.example.com {\n")
	if !ok || !strings.HasSuffix(site, "\n}") {
		t.Fatalf("README example: no chat.example.com site in\n%s", caddyfile)
	}
	ex.site = strings.TrimSuffix(site, "\n}")
	ex.script = block("js")
	for _, line := range strings.Split(block("sh"), "\n") {
		if strings.HasPrefix(line, "caddy ") {
			ex.commands = append(ex.commands, shellWords(t, line))
		}
	}
	return ex
}

// shellWords splits a command line as sh would, for the words, spaces and
// single quotes the README's commands use.
func shellWords(t *testing.T, line string) []string {
	t.Helper()
	var words []string
	var w strings.Builder
	inWord, quoted := false, false
	for _, r := range line {
		switch {
		case r == '\'':
			quoted, inWord = !quoted, true
		case r == ' ' && !quoted:
			if inWord {
				words = append(words, w.String())
				w.Reset()
				inWord = false
			}
		case strings.ContainsRune(`"$\`+"`", r) && !quoted:
			t.Fatalf("shellWords cannot read %q", line)
		default:
			w.WriteRune(r)
			inWord = true
		}
	}
	if quoted {
		t.Fatalf("unterminated quote in %q", line)
	}
	if inWord {
		words = append(words, w.String())
	}
	return words
}

// runCaddy runs the gateway binary as a command-line tool and returns its
// standard output.
func runCaddy(t *testing.T, env []string, args ...string) string {
	t.Helper()
	cmd := exec.CommandContext(ctxT(t, 30*time.Second), caddyBin, args...)
	cmd.Env = append(os.Environ(), env...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("caddy %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}

// TestBrowserFanOutReadmeExample runs the README's fan-out example as
// written: its Caddyfile on two nodes sharing one Redis, a token minted
// with its wsgate-token command, its page script in Chromium on node A,
// and its wsgate-publish command sent to node B.
func TestBrowserFanOutReadmeExample(t *testing.T) {
	ex := loadReadmeExample(t)
	if len(ex.commands) != 2 || ex.commands[0][1] != "wsgate-token" || ex.commands[1][1] != "wsgate-publish" {
		t.Fatalf("README example commands %q: want wsgate-token, then wsgate-publish", ex.commands)
	}
	rs := startRedis(t)
	secret := make([]byte, 32)
	rand.Read(secret)
	env := []string{"CHAT_JWT_SECRET=" + hex.EncodeToString(secret), "CHAT_PUBLISH_KEY=" + hex.EncodeToString(secret[:16])}
	global := strings.ReplaceAll(ex.global, "redis://10.0.0.9:6379", rs.url())
	if global == ex.global {
		t.Fatalf("README example: no redis://10.0.0.9:6379 in\n%s", ex.global)
	}
	// Node A also serves the page, so it comes from the gateway's origin
	// as it does from chat.example.com.
	pages := t.TempDir()
	portA := freePort(t)
	site := ex.site + fmt.Sprintf("\n\thandle /page.html {\n\t\troot * %s\n\t\tfile_server\n\t}", pages)
	a := startGatewayFull(t, portA, global, env, site)
	b := startGatewayFull(t, 0, global, env, ex.site)

	token := strings.TrimSpace(runCaddy(t, env, ex.commands[0][1:]...))
	remember(token)
	script := strings.ReplaceAll(ex.script, "wss://chat.example.com/ws", a.url("/ws"))
	if script == ex.script {
		t.Fatalf("README example: no wss://chat.example.com/ws in\n%s", ex.script)
	}
	page := fmt.Sprintf(`<!doctype html><title>pending</title><script>
const token = %q;
%s
const seen = [];
ws.addEventListener("message", (e) => { seen.push(JSON.parse(e.data)); document.title = ws.protocol + " " + JSON.stringify(seen); });
ws.addEventListener("close", (e) => { document.title = "closed " + e.code; });
</script>`, token, script)
	if err := os.WriteFile(filepath.Join(pages, "page.html"), []byte(page), 0o644); err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(startBrowser(t), 60*time.Second)
	defer cancel()
	tab, cancelTab := chromedp.NewContext(ctx)
	defer cancelTab()
	if err := chromedp.Do(tab, chromedp.Navigate(a.origin()+"/page.html")); err != nil {
		t.Fatal(err)
	}
	waitTitle := func(want string) {
		t.Helper()
		_, err := chromedp.Run(tab, chromedp.Poll[bool](fmt.Sprintf(`document.title === %q || document.title.startsWith("closed")`, want),
			chromedp.WithPollingTimeout(20*time.Second)))
		title, _ := chromedp.Run(tab, chromedp.Title())
		if err != nil || title != want {
			t.Fatalf("page title %q (%v), want %q", title, err, want)
		}
	}
	// Subscribed: the reply came over a socket that negotiated wsgate.v1.
	waitTitle(`wsgate.v1 [{"id":1,"op":"ok"}]`)

	publish := ex.commands[1]
	for i, w := range publish {
		publish[i] = strings.ReplaceAll(w, "https://chat.example.com", b.origin())
	}
	if out := runCaddy(t, env, publish[1:]...); out != "{\"accepted\":1,\"duplicates\":0}\n" {
		t.Fatalf("wsgate-publish: %q", out)
	}
	waitTitle(`wsgate.v1 [{"id":1,"op":"ok"},{"op":"message","channel":"org:acme:general","data":{"text":"deploy done"}}]`)
}
