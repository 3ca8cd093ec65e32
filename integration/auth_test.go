package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const iss = "https://idp.test"

// authSite is a relay with a JWT block and extra options.
func authSite(up string, jwtBody string, extra string) string {
	return relaySite(up, fmt.Sprintf("\t\tjwt {\n%s\n\t\t}\n%s", jwtBody, extra))
}

// status dials and returns the HTTP status of the handshake (101 on success).
func status(t *testing.T, g *gateway, path string, h http.Header, protos ...string) (int, *websocket.Conn) {
	t.Helper()
	c, resp, err := dialErr(t, g, path, &websocket.DialOptions{HTTPHeader: h, Subprotocols: protos})
	if err == nil {
		return 101, c
	}
	if resp == nil {
		t.Fatalf("dial %s: %v", path, err)
	}
	return resp.StatusCode, nil
}

// readBody reads and closes a response body, without its final newline.
func readBody(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading the body: %v", err)
	}
	return strings.TrimSuffix(string(b), "\n")
}

func bearerH(tok string) http.Header { return http.Header{"Authorization": {"Bearer " + tok}} }

func TestOriginChecks(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, "\t\torigins https://app.test https://*.apps.test"))
	cases := []struct {
		origin string
		want   int
	}{
		{"https://app.test", 101},
		{"https://a.apps.test", 101},
		{"https://a.b.apps.test", 101},
		{"https://evil.test", 403},
		{"null", 403},
		{"https://APP.test", 403},
		{"HTTPS://app.test", 403},
		{"https://app.test:443", 403},
		{"https://app.test:8443", 403},
		{"http://app.test", 403},
		{"https://app.test.evil", 403},
		{"https://allowed.com.evil", 403},
		{"https://apps.test", 403},
		{"https://evilapps.test", 403},
		{"https://app.test/", 403},
		{g.origin(), 403}, // an allow-list replaces same-origin
	}
	for _, c := range cases {
		t.Run(c.origin, func(t *testing.T) {
			if got, _ := status(t, g, "/ws", http.Header{"Origin": {c.origin}}); got != c.want {
				t.Fatalf("Origin %q: %d, want %d", c.origin, got, c.want)
			}
		})
	}
}

func TestOriginDefaultSameOriginAndMissing(t *testing.T) {
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, ""))
	_, resp, err := dialErr(t, g, "/ws", &websocket.DialOptions{HTTPHeader: http.Header{"Origin": {"http://elsewhere.test"}}})
	if err == nil || resp == nil {
		t.Fatalf("cross-origin: dial %v, want a 403 response", err)
	}
	if body := readBody(t, resp); resp.StatusCode != 403 || body != `{"error":"origin not allowed"}` {
		t.Fatalf("cross-origin: %d %s, want 403 with no hint about allow_missing_origin", resp.StatusCode, body)
	}
	// no Origin at all (raw request: the client library would add none)
	req, _ := http.NewRequest("GET", "http://"+g.addr()+"/ws", nil)
	for k, v := range map[string]string{"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="} {
		req.Header.Set(k, v)
	}
	resp, err = http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	body := readBody(t, resp)
	if resp.StatusCode != 403 || resp.Header.Get("Content-Type") != "application/json" ||
		body != `{"error":"origin not allowed: no Origin header (see allow_missing_origin)"}` {
		t.Fatalf("no Origin: %d %s %s, want 403 JSON naming allow_missing_origin", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	g2 := startGateway(t, relaySite(up.URL, "\t\tallow_missing_origin"))
	req.URL.Host = g2.addr()
	req.Host = g2.addr()
	resp, err = http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 101 {
		t.Fatalf("no Origin with allow_missing_origin: %d, want 101", resp.StatusCode)
	}
}

func TestJWTRefusals(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	t.Setenv("WSGATE_TEST_SECRET", string(k.hmac))
	g := startGatewayWith(t, "", []string{"WSGATE_TEST_SECRET=" + string(k.hmac)}, authSite(up.URL, fmt.Sprintf(`
			issuer %s {
				audience wsgate-test
				secret {env.WSGATE_TEST_SECRET} kid hs
				public_key %s kid rsa
			}
			issuer https://other.test {
				public_key %s kid ec
			}`, iss, k.rsaPEM, k.ec256PE), ""))
	now := time.Now()
	cases := []struct {
		name string
		tok  string
		want int
	}{
		{"valid HS256", k.sign(t, "HS256", "hs", claims(iss, "u1")), 101},
		{"valid RS256", k.sign(t, "RS256", "rsa", claims(iss, "u1")), 101},
		{"missing", "", 401},
		{"expired", k.sign(t, "HS256", "hs", claims(iss, "u1", "exp", now.Add(-time.Minute).Unix())), 401},
		{"not yet valid", k.sign(t, "HS256", "hs", claims(iss, "u1", "nbf", now.Add(time.Hour).Unix())), 401},
		{"wrong audience", k.sign(t, "HS256", "hs", claims(iss, "u1", "aud", "someone-else")), 401},
		{"wrong issuer", k.sign(t, "HS256", "hs", claims("https://unknown.test", "u1")), 401},
		{"bad signature", k.sign(t, "HS256", "hs", claims(iss, "u1"))[:20] + "x" + k.sign(t, "HS256", "hs", claims(iss, "u1"))[21:], 401},
		{"alg none", k.sign(t, "none", "hs", claims(iss, "u1")), 401},
		{"alg none without kid", k.sign(t, "none", "", claims(iss, "u1")), 401},
		{"HS256 signed with the RSA public key", hmacWith(k.rsaPub, "rsa", claims(iss, "u1")), 401},
		{"a critical header extension", hmacHeader(k.hmac, map[string]any{"alg": "HS256", "kid": "hs", "crit": []string{"foo"}, "foo": true}, claims(iss, "u1")), 401},
		{"issuer A with issuer B's kid", k.sign(t, "ES256", "ec", claims(iss, "u1")), 401},
		{"issuer B with its own kid", k.sign(t, "ES256", "ec", claims("https://other.test", "u1", "aud", nil)), 101},
		{"no exp", k.sign(t, "HS256", "hs", claims(iss, "u1", "exp", nil)), 401},
		{"1 MB of dots", strings.Repeat(".", 1<<20), 431},   // over Caddy's 16 KiB header limit: refused before wsgate
		{"12 KB of dots", strings.Repeat(".", 12<<10), 401}, // over max_token_size (8 KiB): refused by length
		{"garbage", "not-a-token", 401},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := http.Header{}
			if c.tok != "" {
				h = bearerH(c.tok)
			}
			start := time.Now()
			got, _ := status(t, g, "/ws", h)
			if got != c.want {
				t.Fatalf("%s: %d, want %d", c.name, got, c.want)
			}
			if el := time.Since(start); strings.Contains(c.name, "dots") && el > 2*time.Second {
				t.Fatalf("a 1 MB token took %v to refuse", el)
			}
		})
	}
	// A 401 says why, for clients, in WWW-Authenticate.
	_, resp, _ := dialErr(t, g, "/ws", &websocket.DialOptions{HTTPHeader: bearerH(cases[3].tok)})
	if wa := resp.Header.Get("WWW-Authenticate"); !strings.HasPrefix(wa, "Bearer ") || !strings.Contains(wa, "expired") {
		t.Fatalf("WWW-Authenticate %q", wa)
	}
}

func TestJWTAlgorithmFamiliesAndSources(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	g := startGateway(t, authSite(up.URL, fmt.Sprintf(`
			issuer %s
			secret %s kid hs
			public_key %s kid rsa alg RS256 PS256
			public_key %s kid es256
			public_key %s kid es384
			public_key %s kid ed
			from header
			from query access_token
			from cookie session_token
			from protocol bearer`, iss, k.hmac, k.rsaPEM, k.ec256PE, k.ec384PE, k.edPEM), "\t\tclaims_header sub X-User-Id"))
	for alg, kid := range map[string]string{"HS256": "hs", "RS256": "rsa", "PS256": "rsa", "ES256": "es256", "ES384": "es384", "EdDSA": "ed"} {
		t.Run(alg, func(t *testing.T) {
			tok := k.sign(t, alg, kid, claims(iss, "user-"+alg))
			if got, _ := status(t, g, "/ws", bearerH(tok)); got != 101 {
				t.Fatalf("%s: %d", alg, got)
			}
			if u := up.lastHeader().Get("X-User-Id"); u != "user-"+alg {
				t.Fatalf("X-User-Id %q", u)
			}
		})
	}
	// an algorithm the key is not configured for
	if got, _ := status(t, g, "/ws", bearerH(k.sign(t, "HS256", "rsa", claims(iss, "u")))); got != 401 {
		t.Fatalf("HS256 with an RSA kid: %d", got)
	}
	tok := k.sign(t, "ES256", "es256", claims(iss, "src-user"))
	t.Run("query", func(t *testing.T) {
		if got, _ := status(t, g, "/ws?x=1&access_token="+tok, nil); got != 101 {
			t.Fatalf("query token: %d", got)
		}
	})
	t.Run("cookie", func(t *testing.T) {
		if got, _ := status(t, g, "/ws", http.Header{"Cookie": {"other=1; session_token=" + tok}}); got != 101 {
			t.Fatalf("cookie token: %d", got)
		}
	})
	t.Run("protocol", func(t *testing.T) {
		got, c := status(t, g, "/ws", nil, "bearer", tok)
		if got != 101 {
			t.Fatalf("protocol token: %d", got)
		}
		if c.Subprotocol() != "bearer" {
			t.Fatalf("accepted subprotocol %q, want the marker, never the token", c.Subprotocol())
		}
		if p := up.lastHeader().Get("Sec-Websocket-Protocol"); strings.Contains(p, tok) || strings.Contains(p, "bearer") {
			t.Fatalf("upstream saw the token protocol: %q", p)
		}
	})
	t.Run("spoofed claim headers are stripped", func(t *testing.T) {
		h := bearerH(tok)
		h.Set("X-User-Id", "admin")
		h["X_User_Id"] = []string{"admin"}
		h["x-user-id"] = []string{"admin"}
		if got, _ := status(t, g, "/ws", h); got != 101 {
			t.Fatalf("%d", got)
		}
		if v := up.lastHeader().Values("X-User-Id"); len(v) != 1 || v[0] != "src-user" {
			t.Fatalf("upstream X-User-Id %q", v)
		}
		if v := up.lastHeader()["X_user_id"]; len(v) != 0 {
			t.Fatalf("underscore variant reached the upstream: %q", v)
		}
	})
}

// TestJWKSRotation serves a JWKS that gains a new key while the gateway
// runs; a token signed with the new kid is accepted without a restart.
func TestJWKSRotation(t *testing.T) {
	k := newKeys(t)
	k2 := newKeys(t)
	var set atomic.Value
	set.Store([]any{jwk("k1", &k.ec256.PublicKey)})
	var fetches atomic.Int32
	idp := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fetches.Add(1)
		json.NewEncoder(w).Encode(map[string]any{"keys": set.Load()})
	}))
	defer idp.Close()
	up := startUpstream(t)
	g := startGateway(t, authSite(up.URL, fmt.Sprintf("\t\t\tissuer %s\n\t\t\tjwks %s/jwks.json", iss, idp.URL), ""))
	if got, _ := status(t, g, "/ws", bearerH(k.sign(t, "ES256", "k1", claims(iss, "u")))); got != 101 {
		t.Fatalf("k1: %d", got)
	}
	before := fetches.Load()
	set.Store([]any{jwk("k1", &k.ec256.PublicKey), jwk("k2", &k2.ec256.PublicKey), jwk("r1", &k.rsa.PublicKey)})
	// A kid the gateway has not seen makes it refetch the JWKS at once.
	if got, _ := status(t, g, "/ws", bearerH(k2.sign(t, "ES256", "k2", claims(iss, "u")))); got != 101 {
		t.Fatalf("k2 after rotation: %d", got)
	}
	if got, _ := status(t, g, "/ws", bearerH(k.sign(t, "RS256", "r1", claims(iss, "u")))); got != 101 {
		t.Fatalf("rotated RSA key: %d", got)
	}
	// Unknown kids are refused, and do not make the gateway hammer the IdP.
	for i := 0; i < 5; i++ {
		if got, _ := status(t, g, "/ws", bearerH(k2.sign(t, "ES256", fmt.Sprint("unknown-", i), claims(iss, "u")))); got != 401 {
			t.Fatalf("unknown kid: %d", got)
		}
	}
	if n := fetches.Load() - before; n < 1 || n > 2 {
		t.Fatalf("JWKS fetched %d times after rotation, want 1 (rate-limited)", n)
	}
	// The IdP goes down: the last good set keeps working.
	idp.Close()
	if got, _ := status(t, g, "/ws", bearerH(k2.sign(t, "ES256", "k2", claims(iss, "u")))); got != 101 {
		t.Fatalf("k2 with the IdP down: %d", got)
	}
	t.Logf("JWKS fetched %d times", fetches.Load())
}

func TestForwardAuth(t *testing.T) {
	var calls atomic.Int32
	auth := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		c, err := r.Cookie("session")
		if err != nil || c.Value != "good" {
			w.WriteHeader(401)
			return
		}
		w.Header().Set("X-Auth-Org", "acme")
		json.NewEncoder(w).Encode(map[string]any{"sub": "cookie-user"})
	}))
	defer auth.Close()
	up := startUpstream(t)
	g := startGateway(t, relaySite(up.URL, fmt.Sprintf(`		forward_auth %s/check {
			cache 1m
			claims_from_body
			claim_header X-Auth-Org org
		}
		claims_header sub X-User-Id
		claims_header org X-Org`, auth.URL)))
	if got, _ := status(t, g, "/ws", http.Header{"Cookie": {"session=good"}}); got != 101 {
		t.Fatalf("good cookie: %d", got)
	}
	h := up.lastHeader()
	if h.Get("X-User-Id") != "cookie-user" || h.Get("X-Org") != "acme" {
		t.Fatalf("claims headers: %v", h)
	}
	if got, _ := status(t, g, "/ws", http.Header{"Cookie": {"session=good"}}); got != 101 {
		t.Fatalf("good cookie again: %d", got)
	}
	if n := calls.Load(); n != 1 {
		t.Fatalf("auth service called %d times, want 1 (cached)", n)
	}
	if got, _ := status(t, g, "/ws", http.Header{"Cookie": {"session=bad"}}); got != 401 {
		t.Fatalf("bad cookie: %d", got)
	}
	if got, _ := status(t, g, "/ws", nil); got != 401 {
		t.Fatalf("no cookie: %d", got)
	}
	auth.Close()
	if got, _ := status(t, g, "/ws", http.Header{"Cookie": {"session=other"}}); got != 503 {
		t.Fatalf("auth service down: %d, want 503", got)
	}
}

func TestConnectionLimits(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	g := startGateway(t, authSite(up.URL, fmt.Sprintf("\t\t\tsecret %s", k.hmac),
		"\t\tlimit_connections {\n\t\t\tper_ip 4\n\t\t\tper_subject 2\n\t\t}"))
	alice := bearerH(k.sign(t, "HS256", "", claims("", "alice")))
	var open []*websocket.Conn
	for i := 0; i < 2; i++ {
		got, c := status(t, g, "/ws", alice)
		if got != 101 {
			t.Fatalf("alice #%d: %d", i, got)
		}
		open = append(open, c)
	}
	if got, _ := status(t, g, "/ws", alice); got != 429 {
		t.Fatalf("alice #3: %d, want 429 per subject", got)
	}
	bob := bearerH(k.sign(t, "HS256", "", claims("", "bob")))
	for i := 0; i < 2; i++ {
		if got, c := status(t, g, "/ws", bob); got != 101 {
			t.Fatalf("bob #%d: %d", i, got)
		} else {
			open = append(open, c)
		}
	}
	carol := bearerH(k.sign(t, "HS256", "", claims("", "carol")))
	if got, _ := status(t, g, "/ws", carol); got != 429 {
		t.Fatalf("5th from one IP: %d, want 429 per IP", got)
	}
	// Closing releases exactly one slot each.
	open[0].Close(websocket.StatusNormalClosure, "")
	eventually(t, 5*time.Second, "a released slot", func() bool {
		got, c := status(t, g, "/ws", carol)
		if c != nil {
			open[0] = c
		}
		return got == 101
	})
	if got, _ := status(t, g, "/ws", carol); got != 429 {
		t.Fatalf("after one release: %d, want 429 again", got)
	}
}

// TestTokenExpiryAndRefresh: a real 2-second token closes its connection
// with 1008 within a second of exp; one refreshed in band stays open.
func TestTokenExpiryAndRefresh(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	g := startGateway(t, authSite(up.URL, fmt.Sprintf("\t\t\tsecret %s", k.hmac), "\t\trefresh_field wsgate_refresh"))
	short := func(sub string, d time.Duration) (string, time.Time) {
		exp := time.Now().Add(d).Truncate(time.Second)
		return k.sign(t, "HS256", "", claims("", sub, "exp", exp.Unix())), exp
	}

	tok, exp := short("u1", 2*time.Second+500*time.Millisecond)
	_, c := status(t, g, "/ws", bearerH(tok))
	ctx := ctxT(t, 10*time.Second)

	tok2, exp2 := short("u2", 2*time.Second+500*time.Millisecond)
	_, c2 := status(t, g, "/ws", bearerH(tok2))

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, _, err := c.Read(ctx)
		closedAt := time.Now()
		if code, reason := closeOf(err); code != websocket.StatusPolicyViolation || reason != "token expired" {
			t.Errorf("expired connection: %v, want 1008 token expired", err)
		}
		if late := closedAt.Sub(exp); late > time.Second || late < -100*time.Millisecond {
			t.Errorf("closed %v after exp, want within 1 s", late)
		}
	}()

	// c2 refreshes before its exp with a token valid for a minute…
	fresh := k.sign(t, "HS256", "", claims("", "u2"))
	msg, _ := json.Marshal(map[string]string{"wsgate_refresh": fresh})
	if err := c2.Write(ctx, websocket.MessageText, msg); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	// …and is still open and working after its first token expired.
	<-time.After(time.Until(exp2.Add(time.Second)))
	if err := c2.Write(ctx, websocket.MessageText, []byte("still open")); err != nil {
		t.Fatal(err)
	}
	_, m, err := c2.Read(ctx)
	if err != nil || string(m) != "still open" {
		t.Fatalf("refreshed connection: %v %q", err, m)
	}
	// The refresh message itself never reached the upstream.
	for len(up.received) > 0 {
		if strings.Contains(string(<-up.received), "wsgate_refresh") {
			t.Fatal("the refresh message was forwarded")
		}
	}
	// A refresh for another subject is refused.
	other, _ := json.Marshal(map[string]string{"wsgate_refresh": k.sign(t, "HS256", "", claims("", "mallory"))})
	c2.Write(ctx, websocket.MessageText, other)
	if _, _, err := c2.Read(ctx); closeStatus(err) != websocket.StatusPolicyViolation {
		t.Fatalf("refresh for another subject: %v, want 1008", err)
	}
}

// TestTokensNeverLogged sends tokens in every place a client can put one,
// down every refusal path and in every order of checks, to a gateway that
// also writes Caddy's access log to a file, and finds none of them in any
// log.
func TestTokensNeverLogged(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	accessLog := filepath.Join(t.TempDir(), "access.log")
	site := fmt.Sprintf("\tlog {\n\t\toutput file %s\n\t}\n", accessLog) +
		authSite(up.URL, fmt.Sprintf("\t\t\tsecret %s\n\t\t\tfrom header\n\t\t\tfrom header X-Token\n\t\t\tfrom query access_token\n\t\t\tfrom protocol bearer", k.hmac),
			"\t\torigins http://app.test")
	g := startGateway(t, site)
	good := k.sign(t, "HS256", "", claims("", "u"))
	bad := k.sign(t, "HS256", "", claims("", "u", "exp", time.Now().Add(-time.Hour).Unix()))
	app, foreign := http.Header{"Origin": {"http://app.test"}}, http.Header{"Origin": {"http://evil.test"}}
	with := func(h http.Header, kv ...string) http.Header {
		h = h.Clone()
		for i := 0; i < len(kv); i += 2 {
			h.Add(kv[i], kv[i+1])
		}
		return h
	}
	cases := []struct {
		name   string
		path   string
		header http.Header
		protos []string
		want   int
	}{
		{"a query token on a foreign Origin", "/ws?access_token=" + good, foreign, nil, 403},
		{"a bad header token before a good query token", "/ws?access_token=" + good, with(app, "Authorization", "Bearer "+bad), nil, 401},
		{"a good query token under another name", "/ws?token=" + good, app, nil, 401},
		{"a protocol token without the marker", "/ws", app, []string{"chat", good}, 401},
		{"a protocol token on a foreign Origin", "/ws", foreign, []string{"bearer", good}, 403},
		{"a custom header token on a foreign Origin", "/ws", with(foreign, "X-Token", "Bearer "+good), nil, 403},
		{"an Authorization token on a foreign Origin", "/ws", with(foreign, "Authorization", "Bearer "+good), nil, 403},
		{"an expired query token", "/ws?access_token=" + bad, app, nil, 401},
		{"a good query token", "/ws?access_token=" + good, app, nil, 101},
		{"a good protocol token", "/ws", app, []string{"bearer", good}, 101},
	}
	for _, c := range cases {
		c1, resp, err := dialErr(t, g, c.path, &websocket.DialOptions{HTTPHeader: c.header, Subprotocols: c.protos})
		got := 101
		if err != nil {
			if resp == nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			got = resp.StatusCode
		} else {
			c1.Close(websocket.StatusNormalClosure, "")
		}
		if got != c.want {
			t.Fatalf("%s: %d, want %d", c.name, got, c.want)
		}
	}
	eventually(t, 5*time.Second, "every request in a log", func() bool {
		return strings.Count(g.logs.String(), "websocket refused") >= 8 &&
			strings.Count(g.logs.String(), "token redacted") >= 2
	})
	g.stop()
	access, err := os.ReadFile(accessLog)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(access), `"uri"`) {
		t.Fatalf("the access log has no request: %s", access)
	}
	for name, l := range map[string]string{"the process's log": g.logs.String(), "the access log": string(access)} {
		if leaks := tokenLeaks(l); len(leaks) != 0 {
			t.Errorf("%d tokens in %s:\n%s", len(leaks), name, l)
		}
	}
}

// TestClaimPlaceholders: verified claims fill {http.wsgate.claims.*} for
// other handlers and logs (here Caddy's access log, through log_append).
func TestClaimPlaceholders(t *testing.T) {
	k := newKeys(t)
	up := startUpstream(t)
	g := startGateway(t, fmt.Sprintf(`	log
	log_append wsgate_user {http.wsgate.claims.sub}
	log_append wsgate_org {http.wsgate.claims.org.id}
%s`, authSite(up.URL, fmt.Sprintf("\t\t\tsecret %s", k.hmac), "")))
	tok := k.sign(t, "HS256", "", claims("", "alice", "org", map[string]any{"id": "acme"}))
	if got, _ := status(t, g, "/ws", bearerH(tok)); got != 101 {
		t.Fatalf("dial: %d", got)
	}
	eventually(t, 5*time.Second, "the access log entry with the claims", func() bool {
		l := g.logs.String()
		return strings.Contains(l, `"wsgate_user":"alice"`) && strings.Contains(l, `"wsgate_org":"acme"`)
	})
}
