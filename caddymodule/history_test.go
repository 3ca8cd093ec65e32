package caddymodule

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

func TestHistoryPresenceAdapt(t *testing.T) {
	input := global("\twsgate {\n\t\thistory chat:** {\n\t\t\tsize 500\n\t\t\tttl 10m\n\t\t\tmeta_ttl 48h\n\t\t\trecover_max 200\n\t\t}\n\t\thistory feed:*\n\t\tpresence chat:* {\n\t\t\tttl 5s\n\t\t\tevents\n\t\t}\n\t}")
	out, warnings, err := adapt(t, input)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("adapt: %v %v", err, warnings)
	}
	var cfg struct {
		Apps struct {
			Wsgate json.RawMessage `json:"wsgate"`
		} `json:"apps"`
	}
	json.Unmarshal(out, &cfg)
	const want = `{"history":[{"pattern":"chat:**","size":500,"ttl":600000000000,"meta_ttl":172800000000000,"recover_max":200},{"pattern":"feed:*"}],"presence":[{"pattern":"chat:*","ttl":5000000000,"events":true}]}`
	if string(cfg.Apps.Wsgate) != want {
		t.Fatalf("wsgate app:\n got %s\nwant %s", cfg.Apps.Wsgate, want)
	}
}

func TestKeeperOptions(t *testing.T) {
	k, err := newKeeper(
		[]HistoryConfig{{Pattern: "chat:vip:**", Size: 5}, {Pattern: "chat:**", RecoverMax: 7}},
		[]PresenceConfig{{Pattern: "chat:*:lobby", Events: true}},
	)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		channel      string
		size         int
		ttl          time.Duration
		recoverMax   int
		presence     bool
		presenceTTL  time.Duration
		presenceEvts bool
	}{
		{"chat:vip:1", 5, time.Hour, 0, false, 0, false},
		{"chat:acme:lobby", 100, time.Hour, 7, true, 30 * time.Second, true},
		{"news:1", 0, 0, 0, false, 0, false},
	} {
		o := k.options(tc.channel)
		size, ttl := 0, time.Duration(0)
		if o.History != nil {
			size, ttl = o.History.Size, o.History.TTL
		}
		if size != tc.size || ttl != tc.ttl || o.RecoverMax != tc.recoverMax || (o.Presence != nil) != tc.presence {
			t.Errorf("%s: history size %d ttl %v recover_max %d presence %v; want %d %v %d %v", tc.channel, size, ttl, o.RecoverMax, o.Presence != nil, tc.size, tc.ttl, tc.recoverMax, tc.presence)
		}
		if o.Presence != nil && (o.Presence.TTL != tc.presenceTTL || o.Presence.Events != tc.presenceEvts) {
			t.Errorf("%s: presence %+v", tc.channel, *o.Presence)
		}
	}
	for _, bad := range []HistoryConfig{{Pattern: "a:{claims.sub}"}, {Pattern: "a", Size: -1}, {Pattern: "a", RecoverMax: -3}} {
		if _, err := newKeeper([]HistoryConfig{bad}, nil); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
	if _, err := newKeeper(nil, []PresenceConfig{{Pattern: "a", TTL: 1}}); err == nil || !strings.Contains(err.Error(), "at least") {
		t.Errorf("presence ttl 1ns: %v", err)
	}
}

func TestPresenceInfo(t *testing.T) {
	got := string(presenceInfo("c1", map[string]any{"sub": "u-7", "name": "Ada", "role": "admin"}, []string{"name", "missing"}))
	if got != `{"claims":{"name":"Ada"},"conn":"c1","subject":"u-7"}` {
		t.Fatalf("info %s", got)
	}
	if got := string(presenceInfo("c2", nil, nil)); got != `{"conn":"c2"}` {
		t.Fatalf("info without claims %s", got)
	}
}
