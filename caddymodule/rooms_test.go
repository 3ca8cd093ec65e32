package caddymodule

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/wsgate/wsgate/rooms"
)

// roomsInput puts one rooms subdirective on line 3.
func roomsInput(line string) string {
	return "wsgate {\n\trooms {\n\t\t" + line + "\n\t}\n}"
}

func TestParseRooms(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  RoomsConfig
		json  string
	}{
		{"defaults", "wsgate {\n\trooms\n}", RoomsConfig{}, `{}`},
		{"limits", roomsInput("max_subscriptions 10\n\t\tmax_data 1KiB"), RoomsConfig{MaxSubscriptions: 10, MaxData: 1024}, `{"max_subscriptions":10,"max_data":1024}`},
		{"publish rate", roomsInput("publish_rate 20/s"), RoomsConfig{PublishRate: 20}, `{"publish_rate":20}`},
		{"publish rate with burst", roomsInput("publish_rate 600/1m burst 30"), RoomsConfig{PublishRate: 10, PublishBurst: 30}, `{"publish_rate":10,"publish_burst":30}`},
		{"publish rate off", roomsInput("publish_rate off"), RoomsConfig{PublishRate: -1}, `{"publish_rate":-1}`},
		{"presence claims", roomsInput("presence_claims name org"), RoomsConfig{PresenceClaims: []string{"name", "org"}}, `{"presence_claims":["name","org"]}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h, err := unmarshal(t, tc.input)
			if err != nil {
				t.Fatal(err)
			}
			if h.Rooms == nil || !reflect.DeepEqual(*h.Rooms, tc.want) {
				t.Fatalf("Rooms = %+v, want %+v", h.Rooms, tc.want)
			}
			if err := h.Rooms.validate(); err != nil {
				t.Fatalf("validate: %v", err)
			}
			got, err := json.Marshal(h.Rooms)
			if err != nil || string(got) != tc.json {
				t.Fatalf("JSON %s (%v), want %s", got, err, tc.json)
			}
			full, _ := json.Marshal(h)
			checkRoundTrip(t, full, h)
		})
	}
}

func TestParseRoomsErrors(t *testing.T) {
	tests := []struct {
		name, line, wantErr string
	}{
		{"unknown", "publish_rates 1/s", `unrecognized rooms subdirective "publish_rates"`},
		{"no rate", "publish_rate", "want <amount>/<duration> [burst <amount>]"},
		{"not a rate", "publish_rate fast", `bad rate "fast"`},
		{"zero rate", "publish_rate 0/s", `bad rate "0/s"`},
		{"zero burst", "publish_rate 1/s burst 0", `bad burst "0"`},
		{"off with burst", "publish_rate off burst 5", `bad rate "off"`},
		{"bytes", "publish_rate 1MiB/s", `bad rate "1MiB/s"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			input := roomsInput(tc.line)
			_, err := unmarshal(t, input)
			if err == nil {
				t.Fatalf("%q parsed", tc.line)
			}
			checkErrorAt(t, err, input, tc.wantErr, 3)
		})
	}
	input := roomsInput("publish_rate 1/s\n\t\tpublish_rate 2/s")
	_, err := unmarshal(t, input)
	if err == nil {
		t.Fatal("a repeated publish_rate parsed")
	}
	checkErrorAt(t, err, input, `duplicate rooms subdirective "publish_rate"`, 4)
}

// TestRoomsConfigValidate covers what only the JSON config can say.
func TestRoomsConfigValidate(t *testing.T) {
	tests := []struct {
		name    string
		rc      *RoomsConfig
		wantErr string // empty: valid
	}{
		{"no rooms", nil, ""},
		{"defaults", &RoomsConfig{}, ""},
		{"rate and burst", &RoomsConfig{PublishRate: 0.5, PublishBurst: 3}, ""},
		{"burst alone", &RoomsConfig{PublishBurst: 3}, ""},
		{"off", &RoomsConfig{PublishRate: -1}, ""},
		{"negative rate", &RoomsConfig{PublishRate: -2}, "publish_rate must be positive, or -1 for no limit"},
		{"negative burst", &RoomsConfig{PublishBurst: -1}, "publish_burst must not be negative"},
		{"off with burst", &RoomsConfig{PublishRate: -1, PublishBurst: 5}, "publish_burst needs a publish_rate"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.rc.validate()
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("validate: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("validate error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}

// TestSendQueueDefault: the engine's default queue holds the bursts of ten
// publishers at the rooms' default publish rate.
func TestSendQueueDefault(t *testing.T) {
	h, err := unmarshal(t, "wsgate {\n\trooms\n}")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := h.proxyConfig()
	if err != nil {
		t.Fatal(err)
	}
	if want := 10 * 2 * rooms.DefaultPublishRate; cfg.SendQueue < want {
		t.Fatalf("SendQueue = %d, want at least %d", cfg.SendQueue, want)
	}
}
