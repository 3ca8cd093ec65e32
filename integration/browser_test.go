package integration

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
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
	chromium := chromiumPath(t)
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

	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chromium),
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
	defer cancelA()
	bctx, cancelB := chromedp.NewContext(actx)
	defer cancelB()
	ctx, cancel := context.WithTimeout(bctx, 60*time.Second)
	defer cancel()

	// Start the browser (without a timeout: it lives as long as ctx).
	if err := chromedp.Do(bctx); err != nil {
		t.Fatalf("starting chromium: %v", err)
	}
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
