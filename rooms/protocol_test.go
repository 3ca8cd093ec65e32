package rooms_test

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"
	"testing"

	"github.com/wsgate/wsgate/rooms"
)

// nested is a publish whose data nests n arrays (the request object adds
// one more level).
func nested(n int) string {
	return `{"op":"publish","channel":"c","data":` + strings.Repeat("[", n) + strings.Repeat("]", n) + `}`
}

func TestParseRequest(t *testing.T) {
	const maxData = 64
	for _, tc := range []struct {
		name    string
		msg     string
		code    string // "" for a valid request
		id      int64
		hasID   bool
		op      string
		channel string
		data    string
		token   string
		since   string
		reply   string // exact reply, when it is worth pinning
	}{
		// Every op.
		{name: "subscribe", msg: `{"id":1,"op":"subscribe","channel":"chat:acme:42"}`, id: 1, hasID: true, op: "subscribe", channel: "chat:acme:42", reply: `{"id":1,"op":"ok"}`},
		{name: "subscribe since", msg: `{"id":1,"op":"subscribe","channel":"c","since":{"epoch":"abc","offset":17}}`, id: 1, hasID: true, op: "subscribe", channel: "c", since: "abc/17"},
		{name: "subscribe since offset 0", msg: `{"op":"subscribe","channel":"c","since":{"offset":0,"epoch":"e"}}`, op: "subscribe", channel: "c", since: "e/0"},
		{name: "subscribe since null", msg: `{"op":"subscribe","channel":"c","since":null}`, op: "subscribe", channel: "c"},
		{name: "since a string", msg: `{"id":2,"op":"subscribe","channel":"c","since":"17"}`, code: rooms.CodeBadRequest, id: 2, hasID: true, op: "subscribe", channel: "c"},
		{name: "since without epoch", msg: `{"op":"subscribe","channel":"c","since":{"offset":3}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since empty epoch", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"","offset":3}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since without offset", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e"}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since negative offset", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e","offset":-1}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since fractional offset", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e","offset":1.5}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since offset past 2^53", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e","offset":9007199254740992}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since offset a string", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e","offset":"3"}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since unknown member", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"e","offset":3,"x":1}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "since epoch too long", msg: `{"op":"subscribe","channel":"c","since":{"epoch":"` + strings.Repeat("e", 65) + `","offset":3}}`, code: rooms.CodeBadRequest, op: "subscribe", channel: "c"},
		{name: "history", msg: `{"id":3,"op":"history","channel":"c","limit":20}`, id: 3, hasID: true, op: "history", channel: "c"},
		{name: "history bad limit", msg: `{"op":"history","channel":"c","limit":-2}`, code: rooms.CodeBadRequest, op: "history", channel: "c"},
		{name: "history without channel", msg: `{"op":"history"}`, code: rooms.CodeBadRequest, op: "history"},
		{name: "presence_count", msg: `{"op":"presence_count","channel":"c"}`, op: "presence_count", channel: "c"},
		{name: "presence_count without channel", msg: `{"op":"presence_count"}`, code: rooms.CodeBadRequest, op: "presence_count"},
		{name: "unsubscribe", msg: `{"id":2,"op":"unsubscribe","channel":"chat:acme:42"}`, id: 2, hasID: true, op: "unsubscribe", channel: "chat:acme:42"},
		{name: "publish", msg: `{"id":3,"op":"publish","channel":"chat:acme:42","data":{"text":"hi"}}`, id: 3, hasID: true, op: "publish", channel: "chat:acme:42", data: `{"text":"hi"}`},
		{name: "presence", msg: `{"id":4,"op":"presence","channel":"chat:acme:42"}`, id: 4, hasID: true, op: "presence", channel: "chat:acme:42"},
		{name: "ping", msg: `{"id":5,"op":"ping"}`, id: 5, hasID: true, op: "ping", reply: `{"id":5,"op":"ok"}`},
		{name: "ping without id", msg: `{"op":"ping"}`, op: "ping", reply: `{"op":"ok"}`},
		{name: "refresh", msg: `{"id":6,"op":"refresh","token":"eyJ.x.y"}`, id: 6, hasID: true, op: "refresh", token: "eyJ.x.y"},
		{name: "key order and whitespace", msg: " {\n\"channel\" : \"c\" , \"op\":\"subscribe\",\t\"id\" : 9 } ", id: 9, hasID: true, op: "subscribe", channel: "c"},
		{name: "unknown fields ignored", msg: `{"op":"ping","extra":{"deep":[1]}}`, op: "ping"},

		// Ids.
		{name: "id 0", msg: `{"id":0,"op":"ping"}`, id: 0, hasID: true, op: "ping", reply: `{"id":0,"op":"ok"}`},
		{name: "id 2^53-1", msg: `{"id":9007199254740991,"op":"ping"}`, id: 1<<53 - 1, hasID: true, op: "ping", reply: `{"id":9007199254740991,"op":"ok"}`},
		{name: "id null", msg: `{"id":null,"op":"ping"}`, op: "ping", reply: `{"op":"ok"}`},
		{name: "id 2^53", msg: `{"id":9007199254740992,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id negative", msg: `{"id":-1,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id minus zero", msg: `{"id":-0,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id fractional", msg: `{"id":1.5,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id integral float", msg: `{"id":1.0,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id exponent", msg: `{"id":1e3,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id exponent upper", msg: `{"id":1E3,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id huge", msg: `{"id":123456789012345678901234567890,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id int64 overflow", msg: `{"id":9223372036854775808,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id string", msg: `{"id":"1","op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id leading zero", msg: `{"id":01,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id true", msg: `{"id":true,"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id array", msg: `{"id":[1],"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "id object", msg: `{"id":{},"op":"ping"}`, code: rooms.CodeBadRequest},
		{name: "bad id on a bad op", msg: `{"id":-1,"op":"dance"}`, code: rooms.CodeBadRequest},

		// Not a request.
		{name: "empty", msg: ``, code: rooms.CodeBadRequest},
		{name: "not JSON", msg: `subscribe chat`, code: rooms.CodeBadRequest},
		{name: "truncated", msg: `{"id":1,"op":"ping"`, code: rooms.CodeBadRequest},
		{name: "trailing garbage", msg: `{"id":1,"op":"ping"} {}`, code: rooms.CodeBadRequest},
		{name: "array", msg: `[{"id":1,"op":"ping"}]`, code: rooms.CodeBadRequest},
		{name: "string", msg: `"ping"`, code: rooms.CodeBadRequest},
		{name: "number", msg: `42`, code: rooms.CodeBadRequest},
		{name: "null", msg: `null`, code: rooms.CodeBadRequest},
		{name: "true", msg: `true`, code: rooms.CodeBadRequest},
		{name: "op not a string", msg: `{"op":1}`, code: rooms.CodeBadRequest},

		// Ops and their fields.
		{name: "unknown op", msg: `{"id":7,"op":"dance"}`, code: rooms.CodeNotFound, id: 7, hasID: true, op: "dance"},
		{name: "op case matters", msg: `{"id":7,"op":"PING"}`, code: rooms.CodeNotFound, id: 7, hasID: true, op: "PING"},
		{name: "missing op", msg: `{"id":8,"channel":"c"}`, code: rooms.CodeBadRequest, id: 8, hasID: true, channel: ""},
		{name: "empty op", msg: `{"id":8,"op":""}`, code: rooms.CodeBadRequest, id: 8, hasID: true},
		{name: "null op", msg: `{"id":8,"op":null}`, code: rooms.CodeBadRequest, id: 8, hasID: true},
		{name: "subscribe without channel", msg: `{"id":10,"op":"subscribe"}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "subscribe"},
		{name: "unsubscribe without channel", msg: `{"id":10,"op":"unsubscribe"}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "unsubscribe"},
		{name: "presence without channel", msg: `{"id":10,"op":"presence"}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "presence"},
		{name: "publish without channel", msg: `{"id":10,"op":"publish","data":1}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "publish", data: "1"},
		{name: "publish without data", msg: `{"id":10,"op":"publish","channel":"c"}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "publish", channel: "c"},
		{name: "refresh without token", msg: `{"id":10,"op":"refresh"}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "refresh"},
		{name: "refresh empty token", msg: `{"id":10,"op":"refresh","token":""}`, code: rooms.CodeBadRequest, id: 10, hasID: true, op: "refresh"},

		// Nesting: the request object is one level.
		{name: "depth 32", msg: nested(31), op: "publish", channel: "c", data: strings.Repeat("[", 31) + strings.Repeat("]", 31)},
		{name: "depth 33", msg: nested(32), code: rooms.CodeBadRequest},
		{name: "depth 1000", msg: nested(1000), code: rooms.CodeBadRequest},
		{name: "deep outside data", msg: `{"op":"ping","x":` + strings.Repeat(`{"a":`, 40) + `1` + strings.Repeat(`}`, 40) + `}`, code: rooms.CodeBadRequest},
		{name: "brackets in strings do not nest", msg: `{"op":"publish","channel":"c","data":"` + strings.Repeat(`[{`, 20) + `"}`, op: "publish", channel: "c", data: `"` + strings.Repeat(`[{`, 20) + `"`},

		// Data size.
		{name: "data at the limit", msg: `{"op":"publish","channel":"c","data":"` + strings.Repeat("x", maxData-2) + `"}`, op: "publish", channel: "c", data: `"` + strings.Repeat("x", maxData-2) + `"`},
		{name: "data over the limit", msg: `{"id":11,"op":"publish","channel":"c","data":"` + strings.Repeat("x", maxData-1) + `"}`, code: rooms.CodeTooLarge, id: 11, hasID: true, op: "publish", channel: "c", data: `"` + strings.Repeat("x", maxData-1) + `"`},

		// Data byte for byte.
		{name: "data whitespace kept", msg: `{"op":"publish","channel":"c","data": { "a" : [ 1 ,2 ] }  }`, op: "publish", channel: "c", data: `{ "a" : [ 1 ,2 ] }`},
		{name: "data unicode escapes kept", msg: `{"op":"publish","channel":"c","data":"\u00e9\ud83c\udf89\/"}`, op: "publish", channel: "c", data: `"\u00e9\ud83c\udf89\/"`},
		{name: "data raw unicode", msg: `{"op":"publish","channel":"c","data":"héllo 🎉"}`, op: "publish", channel: "c", data: `"héllo 🎉"`},
		{name: "data number form kept", msg: `{"op":"publish","channel":"c","data":-1.50e+003}`, op: "publish", channel: "c", data: `-1.50e+003`},
		{name: "data null", msg: `{"op":"publish","channel":"c","data":null}`, op: "publish", channel: "c", data: `null`},
		{name: "data false", msg: `{"op":"publish","channel":"c","data":false}`, op: "publish", channel: "c", data: `false`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, perr := rooms.ParseRequest([]byte(tc.msg), maxData)
			switch {
			case tc.code == "" && perr != nil:
				t.Fatalf("refused: %v", perr)
			case tc.code != "" && perr == nil:
				t.Fatalf("accepted %+v, want %s", r, tc.code)
			case perr != nil && perr.Code != tc.code:
				t.Fatalf("code %s (%s), want %s", perr.Code, perr.Message, tc.code)
			}
			if r.HasID != tc.hasID || r.ID != tc.id {
				t.Errorf("id %d (HasID %v), want %d (HasID %v)", r.ID, r.HasID, tc.id, tc.hasID)
			}
			since := ""
			if r.Since != nil {
				since = r.Since.Epoch + "/" + strconv.FormatUint(r.Since.Offset, 10)
			}
			if r.Op != tc.op || r.Channel != tc.channel || string(r.Data) != tc.data || r.Token != tc.token || since != tc.since {
				t.Errorf("got op=%q channel=%q data=%q token=%q since=%q\nwant op=%q channel=%q data=%q token=%q since=%q",
					r.Op, r.Channel, r.Data, r.Token, since, tc.op, tc.channel, tc.data, tc.token, tc.since)
			}
			var reply []byte
			if perr == nil {
				reply = rooms.OK(r)
			} else {
				reply = rooms.ErrorReply(r, perr)
			}
			if tc.reply != "" && string(reply) != tc.reply {
				t.Errorf("reply %s, want %s", reply, tc.reply)
			}
			checkReply(t, reply, r, perr)
		})
	}
}

// checkReply checks that a reply is a JSON object with the right op, code
// and id (echoed exactly when the request had one).
func checkReply(t testing.TB, reply []byte, r rooms.Request, perr *rooms.ProtoError) {
	t.Helper()
	if !json.Valid(reply) {
		t.Fatalf("reply is not JSON: %q", reply)
	}
	var got struct {
		ID      *json.Number `json:"id"`
		Op      string       `json:"op"`
		Code    string       `json:"code"`
		Message *string      `json:"message"`
	}
	d := json.NewDecoder(bytes.NewReader(reply))
	d.UseNumber()
	if err := d.Decode(&got); err != nil {
		t.Fatalf("reply %s: %v", reply, err)
	}
	switch {
	case r.HasID && (got.ID == nil || got.ID.String() != strconv.FormatInt(r.ID, 10)):
		t.Errorf("reply %s does not echo id %d", reply, r.ID)
	case !r.HasID && got.ID != nil:
		t.Errorf("reply %s has an id the request did not give", reply)
	}
	if perr == nil {
		if got.Op != "ok" || got.Code != "" || got.Message != nil {
			t.Errorf("ok reply is %s", reply)
		}
		return
	}
	var wantMessage string // the message as JSON carries it (invalid UTF-8 replaced)
	m, _ := json.Marshal(perr.Message)
	json.Unmarshal(m, &wantMessage)
	if got.Op != "error" || got.Code != perr.Code || got.Message == nil || *got.Message != wantMessage {
		t.Errorf("error reply %s for %s: %s", reply, perr.Code, perr.Message)
	}
}

func TestParseRequestUnknownOpMessage(t *testing.T) {
	op := strings.Repeat("x", 200) + `"\`
	_, perr := rooms.ParseRequest([]byte(`{"op":`+strconv.Quote(op)+`}`), 64)
	if perr == nil || perr.Code != rooms.CodeNotFound {
		t.Fatalf("got %v, want not_found", perr)
	}
	if len(perr.Message) > 64 {
		t.Errorf("message of %d bytes echoes the whole op: %s", len(perr.Message), perr.Message)
	}
}

func TestParseRequestDataIsACopy(t *testing.T) {
	// The proxy reuses its read buffers; the data must outlive them.
	msg := []byte(`{"op":"publish","channel":"c","data":{"a":"b"}}`)
	r, perr := rooms.ParseRequest(msg, 1024)
	if perr != nil {
		t.Fatal(perr)
	}
	for i := range msg {
		msg[i] = 'X'
	}
	if string(r.Data) != `{"a":"b"}` {
		t.Fatalf("data changed with the message buffer: %s", r.Data)
	}
}

func TestParseRequestWrongTypeKeepsID(t *testing.T) {
	// ParseRequest documents that the id is recovered even from a request
	// that fails later checks, so the client can match the error.
	for _, msg := range []string{
		`{"id":7,"op":"subscribe","channel":5}`,
		`{"id":7,"op":"refresh","token":{}}`,
		`{"id":7,"op":["publish"]}`,
	} {
		r, perr := rooms.ParseRequest([]byte(msg), 1024)
		if perr == nil || perr.Code != rooms.CodeBadRequest {
			t.Fatalf("%s: got %v, want bad_request", msg, perr)
		}
		if !r.HasID || r.ID != 7 {
			t.Fatalf("regression: rooms/protocol.go:69-71 ParseRequest returns before reading the id when a field has the "+
				"wrong JSON type (%s → %s without id 7), so the client cannot match the error; fix: on a "+
				"*json.UnmarshalTypeError still parse raw.ID (encoding/json fills the fields it could), or decode "+
				"the id on its own first", msg, rooms.ErrorReply(r, perr))
		}
	}
}

func TestReplies(t *testing.T) {
	for _, tc := range []struct {
		r    rooms.Request
		e    *rooms.ProtoError
		want string
	}{
		{rooms.Request{}, nil, `{"op":"ok"}`},
		{rooms.Request{ID: 0, HasID: true}, nil, `{"id":0,"op":"ok"}`},
		{rooms.Request{ID: 1<<53 - 1, HasID: true}, nil, `{"id":9007199254740991,"op":"ok"}`},
		{rooms.Request{ID: 3, HasID: true}, &rooms.ProtoError{Code: rooms.CodeForbidden, Message: "publish to chat:acme:42 denied"},
			`{"id":3,"op":"error","code":"forbidden","message":"publish to chat:acme:42 denied"}`},
		{rooms.Request{}, &rooms.ProtoError{Code: rooms.CodeBadRequest, Message: "x"}, `{"op":"error","code":"bad_request","message":"x"}`},
		{rooms.Request{ID: 1, HasID: true}, &rooms.ProtoError{Code: rooms.CodeNotFound, Message: "quote \" backslash \\ newline \n é <tag> \x00"},
			`{"id":1,"op":"error","code":"not_found","message":"quote \" backslash \\ newline \n é \u003ctag\u003e \u0000"}`},
	} {
		var got []byte
		if tc.e == nil {
			got = rooms.OK(tc.r)
		} else {
			got = rooms.ErrorReply(tc.r, tc.e)
		}
		if string(got) != tc.want {
			t.Errorf("got  %s\nwant %s", got, tc.want)
		}
		checkReply(t, got, tc.r, tc.e)
	}
}
