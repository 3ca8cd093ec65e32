package rooms_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"

	"github.com/wsgate/wsgate/rooms"
)

// FuzzParseRequest feeds the codec arbitrary client messages (seeds in
// testdata/fuzz/FuzzParseRequest): it never panics, accepts only known ops
// with what they need, passes data through byte for byte, and every reply
// it leads to is JSON that echoes the id exactly when there was one.
func FuzzParseRequest(f *testing.F) {
	const maxData = 256
	codes := map[string]bool{
		rooms.CodeBadRequest: true, rooms.CodeForbidden: true, rooms.CodeRateLimited: true,
		rooms.CodeTooLarge: true, rooms.CodeUnavailable: true, rooms.CodeNotFound: true,
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		orig := bytes.Clone(msg)
		r, perr := rooms.ParseRequest(msg, maxData)
		if !bytes.Equal(msg, orig) {
			t.Fatal("ParseRequest modified its input")
		}
		if r.HasID && (r.ID < 0 || r.ID > 1<<53-1) {
			t.Fatalf("id %d out of range", r.ID)
		}
		if !r.HasID && r.ID != 0 {
			t.Fatalf("id %d without HasID", r.ID)
		}
		if perr != nil {
			if !codes[perr.Code] {
				t.Fatalf("unknown error code %q", perr.Code)
			}
			checkReply(t, rooms.ErrorReply(r, perr), r, perr)
			return
		}

		// Accepted: a JSON object no deeper than 32, with a known op and
		// the fields it needs.
		if !json.Valid(msg) {
			t.Fatalf("accepted invalid JSON %q", msg)
		}
		if d := jsonDepth(t, msg); d > 32 {
			t.Fatalf("accepted nesting %d", d)
		}
		checkSince(t, msg, r)
		switch r.Op {
		case "subscribe", "unsubscribe", "presence", "presence_count", "history", "ping":
		case "publish":
			if len(r.Data) == 0 || len(r.Data) > maxData || !json.Valid(r.Data) {
				t.Fatalf("publish accepted with data %q", r.Data)
			}
			if !bytes.Contains(msg, r.Data) {
				t.Fatalf("data %q is not the bytes sent", r.Data)
			}
		case "refresh":
			if r.Token == "" {
				t.Fatal("refresh accepted without a token")
			}
		default:
			t.Fatalf("accepted unknown op %q", r.Op)
		}
		checkReply(t, rooms.OK(r), r, nil)
		// Any error the connection may answer an accepted request with.
		checkReply(t, rooms.ErrorReply(r, &rooms.ProtoError{Code: rooms.CodeForbidden, Message: r.Op + " to " + r.Channel + " denied"}),
			r, &rooms.ProtoError{Code: rooms.CodeForbidden, Message: r.Op + " to " + r.Channel + " denied"})
	})
}

// checkSince compares what the codec took from since and limit with what
// encoding/json reads from the same message.
func checkSince(t *testing.T, msg []byte, r rooms.Request) {
	t.Helper()
	var ref struct {
		Since *struct {
			Epoch  string  `json:"epoch"`
			Offset float64 `json:"offset"`
		} `json:"since"`
		Limit *float64 `json:"limit"`
	}
	if err := json.Unmarshal(msg, &ref); err != nil {
		t.Fatalf("accepted %q, which encoding/json refuses: %v", msg, err)
	}
	switch {
	case (ref.Since == nil) != (r.Since == nil):
		t.Fatalf("since %+v, encoding/json reads %+v", r.Since, ref.Since)
	case r.Since != nil && (r.Since.Epoch != ref.Since.Epoch || float64(r.Since.Offset) != ref.Since.Offset):
		t.Fatalf("since %+v, encoding/json reads %+v", *r.Since, *ref.Since)
	case r.Since != nil && (r.Since.Epoch == "" || len(r.Since.Epoch) > 64 || r.Since.Offset > 1<<53-1):
		t.Fatalf("since %+v accepted", *r.Since)
	case r.Limit < 0 || (ref.Limit != nil && float64(r.Limit) != *ref.Limit):
		t.Fatalf("limit %d, encoding/json reads %v", r.Limit, ref.Limit)
	}
}

// jsonDepth is the deepest nesting of valid JSON, read with the standard
// decoder (not the codec's own scanner).
func jsonDepth(t testing.TB, msg []byte) int {
	t.Helper()
	d := json.NewDecoder(bytes.NewReader(msg))
	d.UseNumber() // valid JSON may hold numbers no float64 holds (1E700)
	depth, deepest := 0, 0
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			return deepest
		}
		if err != nil {
			t.Fatalf("decoding valid JSON %q: %v", msg, err)
		}
		switch tok {
		case json.Delim('{'), json.Delim('['):
			depth++
			deepest = max(deepest, depth)
		case json.Delim('}'), json.Delim(']'):
			depth--
		}
	}
}
