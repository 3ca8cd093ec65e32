package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

var adminSecret = []byte("admin-test-secret-0123456789abcdef")

// adminSite serves wsgate.v1 on /ws for clients with a token, and health
// on /healthz.
func adminSite() string {
	return fmt.Sprintf(`	route {
		wsgate_health /healthz
		wsgate /ws {
			name chat
			rooms
			jwt {
				secret %s
			}
		}
		respond 404
	}`, adminSecret)
}

// adminCall sends a request to the gateway's admin endpoint and decodes
// the JSON answer.
func adminCall(t testing.TB, g *gateway, method, path, body string) (int, map[string]any) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+g.adminAddr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatalf("%s %s: %d %q is not JSON", method, path, resp.StatusCode, b)
	}
	return resp.StatusCode, out
}

// getHealth reads /healthz.
func getHealth(t testing.TB, g *gateway) (int, map[string]any) {
	t.Helper()
	resp, err := http.Get("http://" + g.addr() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatalf("/healthz %d: %v", resp.StatusCode, err)
	}
	return resp.StatusCode, out
}

// TestAdminAcrossNodes: two nodes on one Redis. The admin API of node A
// lists a subject connected on node B, with its channels; disconnecting
// that subject from node A closes its socket on B with the code and reason
// given, within 1 s, and leaves the other connections alone.
func TestAdminAcrossNodes(t *testing.T) {
	rs := startRedis(t)
	a := startGatewayWith(t, redisGlobal(rs.url()), nil, adminSite())
	b := startGatewayWith(t, redisGlobal(rs.url()), nil, adminSite())
	eventually(t, 10*time.Second, "both nodes on the control channel", func() bool {
		_, r := adminCall(t, a, "GET", "/wsgate/connections?count", "")
		return r["nodes"] == 2.0 && r["answered"] == 2.0
	})

	token := func(sub string) http.Header { return bearerH(hmacWith(adminSecret, "", claims("", sub))) }
	target := dialRoomsWith(t, b, token("u-42"))
	target.subscribe("room:1")
	other := dialRoomsWith(t, a, token("u-7"))
	other.subscribe("room:1")
	other.subscribe("room:2")

	code, r := adminCall(t, a, "GET", "/wsgate/connections?subject=u-42", "")
	list, _ := r["connections"].([]any)
	if code != 200 || len(list) != 1 || r["nodes"] != 2.0 || r["answered"] != 2.0 {
		t.Fatalf("listing u-42 from node A: %d %v", code, r)
	}
	entry := list[0].(map[string]any)
	if entry["subject"] != "u-42" || entry["handler"] != "chat" || entry["mode"] != "rooms" || entry["remote"] != "127.0.0.1" ||
		fmt.Sprint(entry["channels"]) != "[room:1]" || len(entry["id"].(string)) != 32 {
		t.Fatalf("u-42 listed as %v", entry)
	}
	_, all := adminCall(t, a, "GET", "/wsgate/connections", "")
	nodes := map[string]bool{}
	for _, c := range all["connections"].([]any) {
		nodes[c.(map[string]any)["node"].(string)] = true
	}
	if len(all["connections"].([]any)) != 2 || len(nodes) != 2 {
		t.Fatalf("node A lists %v: want both connections, one per node", all)
	}
	code, r = adminCall(t, a, "GET", "/wsgate/channels", "")
	if got := fmt.Sprint(r["channels"]); code != 200 || got != "[map[channel:room:1 subscribers:2] map[channel:room:2 subscribers:1]]" {
		t.Fatalf("channels from node A: %d %s", code, got)
	}

	// Bad input is a 400 with a JSON error, and closes nothing.
	code, r = adminCall(t, a, "POST", "/wsgate/disconnect", `{"subject":"u-42","code":1001}`)
	if msg, _ := r["error"].(string); code != 400 || !strings.Contains(msg, "want 1000 or 3000-4999") {
		t.Fatalf("disconnect with code 1001: %d %v", code, r)
	}
	target.call(map[string]any{"op": "ping"})

	start := time.Now()
	code, r = adminCall(t, a, "POST", "/wsgate/disconnect", `{"subject":"u-42","code":4001,"reason":"account disabled"}`)
	answered := time.Since(start)
	if code != 200 || r["disconnected"] != 1.0 || r["nodes"] != 2.0 || r["answered"] != 2.0 {
		t.Fatalf("disconnect u-42 from node A: %d %v", code, r)
	}
	var err error
	select {
	case err = <-target.errs:
	case <-time.After(5 * time.Second):
		t.Fatal("u-42's socket on node B still open 5 s after the disconnect")
	}
	closed := time.Since(start)
	t.Logf("disconnect answered in %v; socket on the other node closed %v after the request", answered.Round(time.Millisecond), closed.Round(time.Millisecond))
	var ce websocket.CloseError
	if !errors.As(err, &ce) || ce.Code != 4001 || ce.Reason != "account disabled" {
		t.Fatalf("u-42 ended with %v, want close 4001 \"account disabled\"", err)
	}
	if closed > time.Second {
		t.Fatalf("u-42's socket closed %v after the request, want within 1s", closed)
	}

	if r := other.call(map[string]any{"op": "ping"}); r["op"] != "ok" {
		t.Fatalf("the other connection after the disconnect: %v", r)
	}
	eventually(t, 5*time.Second, "u-42 to leave the listing", func() bool {
		_, r := adminCall(t, a, "GET", "/wsgate/connections?count&subject=u-42", "")
		return r["count"] == 0.0
	})
	_, r = adminCall(t, b, "GET", "/wsgate/connections", "")
	if list := r["connections"].([]any); len(list) != 1 || list[0].(map[string]any)["subject"] != "u-7" {
		t.Fatalf("node B lists %v after the disconnect, want u-7 only", r)
	}
}

// TestHealthFollowsRedis: health answers 503 within 2 s of Redis going
// down and 200 within 2 s of its return, with the node's connections.
func TestHealthFollowsRedis(t *testing.T) {
	rs := startRedis(t)
	g := startGatewayWith(t, redisGlobal(rs.url()), nil, adminSite())
	c := dialRoomsWith(t, g, bearerH(hmacWith(adminSecret, "", claims("", "u-1"))))
	c.call(map[string]any{"op": "ping"}) // the connection is live
	code, h := getHealth(t, g)
	want := map[string]any{"status": "ok", "broker": "redis", "broker_reachable": true, "connections": 1.0}
	if code != 200 || fmt.Sprint(h) != fmt.Sprint(want) {
		t.Fatalf("health with Redis up: %d %v, want 200 %v", code, h, want)
	}

	var took []time.Duration
	for _, step := range []struct {
		what   string
		change func()
		status int
	}{
		{"Redis killed", rs.kill, 503},
		{"Redis back", rs.start, 200},
		{"Redis killed again", rs.kill, 503},
		{"Redis back again", rs.start, 200},
	} {
		step.change()
		since := time.Now()
		for {
			code, h = getHealth(t, g)
			if code == step.status {
				break
			}
			if time.Since(since) > 10*time.Second {
				t.Fatalf("%s: health still %d %v after 10 s", step.what, code, h)
			}
			pollPause()
		}
		d := time.Since(since)
		took = append(took, d)
		if d > 2*time.Second {
			t.Errorf("%s: health answered %d after %v, want within 2s", step.what, step.status, d)
		}
		wantStatus := map[int]string{200: "ok", 503: "broker_unreachable"}[step.status]
		if h["status"] != wantStatus || h["broker_reachable"] != (step.status == 200) || h["connections"] != 1.0 {
			t.Errorf("%s: health body %v", step.what, h)
		}
	}
	t.Logf("health followed Redis in %v", took)
}
