package rooms

import (
	"bytes"
	"encoding/json"
	"strconv"

	"github.com/wsgate/wsgate/broker"
)

// Subprotocol is the WebSocket subprotocol of the rooms protocol.
const Subprotocol = "wsgate.v1"

// Error codes of the protocol.
const (
	CodeBadRequest  = "bad_request"
	CodeForbidden   = "forbidden"
	CodeRateLimited = "rate_limited"
	CodeTooLarge    = "too_large"
	CodeUnavailable = "unavailable"
	CodeNotFound    = "not_found"
)

// maxDepth bounds JSON nesting in a request.
const maxDepth = 32

// maxID is the largest id accepted (ids must be integers that JavaScript
// numbers hold exactly).
const maxID = 1<<53 - 1

// Request is one client message.
type Request struct {
	// ID is echoed in the reply; HasID says whether one was given.
	ID    int64
	HasID bool
	Op    string
	// Channel for subscribe, unsubscribe, publish, presence.
	Channel string
	// Data of a publish, byte for byte as sent.
	Data json.RawMessage
	// Token of a refresh.
	Token string
	// Since is the last history position the client saw (subscribe);
	// nil when none was given.
	Since *broker.Position
	// Limit is how many publications a history request asks for (0: the
	// recovery bound).
	Limit int
}

// ProtoError is an error reply.
type ProtoError struct {
	Code    string
	Message string
}

func (e *ProtoError) Error() string { return e.Code + ": " + e.Message }

// ParseRequest decodes a client message. maxData bounds the publish data.
// The id is recovered even from a request that fails later checks, so the
// error reply can carry it.
func ParseRequest(msg []byte, maxData int) (Request, *ProtoError) {
	var r Request
	if depth(msg) > maxDepth {
		return r, &ProtoError{CodeBadRequest, "JSON nested too deeply"}
	}
	var raw struct {
		ID      json.RawMessage `json:"id"`
		Op      *string         `json:"op"`
		Channel *string         `json:"channel"`
		Data    json.RawMessage `json:"data"`
		Token   string          `json:"token"`
		Since   json.RawMessage `json:"since"`
		Limit   json.RawMessage `json:"limit"`
	}
	if err := json.Unmarshal(msg, &raw); err != nil {
		// A field of the wrong type still lets the id be echoed.
		var idOnly struct {
			ID json.RawMessage `json:"id"`
		}
		if json.Unmarshal(msg, &idOnly) == nil {
			if id, ok := parseID(idOnly.ID); ok {
				r.ID, r.HasID = id, true
			}
		}
		return r, &ProtoError{CodeBadRequest, "not a JSON object of the wsgate.v1 protocol"}
	}
	if len(raw.ID) > 0 && string(raw.ID) != "null" {
		id, ok := parseID(raw.ID)
		if !ok {
			return r, &ProtoError{CodeBadRequest, "id must be an integer from 0 to 2^53-1"}
		}
		r.ID, r.HasID = id, true
	}
	if raw.Op == nil || *raw.Op == "" {
		return r, &ProtoError{CodeBadRequest, "missing op"}
	}
	r.Op = *raw.Op
	if raw.Channel != nil {
		r.Channel = *raw.Channel
	}
	r.Data, r.Token = raw.Data, raw.Token
	if len(raw.Since) > 0 && string(raw.Since) != "null" {
		since, ok := parseSince(raw.Since)
		if !ok {
			return r, &ProtoError{CodeBadRequest, `since must be {"epoch":"<epoch>","offset":<integer from 0 to 2^53-1>}`}
		}
		r.Since = &since
	}
	if len(raw.Limit) > 0 && string(raw.Limit) != "null" {
		n, ok := parseID(raw.Limit)
		if !ok {
			return r, &ProtoError{CodeBadRequest, "limit must be an integer from 0 to 2^53-1"}
		}
		r.Limit = int(n)
	}
	switch r.Op {
	case "subscribe", "unsubscribe", "presence", "presence_count", "history":
		if raw.Channel == nil {
			return r, &ProtoError{CodeBadRequest, r.Op + " needs a channel"}
		}
	case "publish":
		if raw.Channel == nil {
			return r, &ProtoError{CodeBadRequest, "publish needs a channel"}
		}
		if len(r.Data) == 0 {
			return r, &ProtoError{CodeBadRequest, "publish needs data"}
		}
		if len(r.Data) > maxData {
			return r, &ProtoError{CodeTooLarge, "data larger than " + strconv.Itoa(maxData) + " bytes"}
		}
	case "refresh":
		if r.Token == "" {
			return r, &ProtoError{CodeBadRequest, "refresh needs a token"}
		}
	case "ping":
	default:
		return r, &ProtoError{CodeNotFound, "unknown op " + strconv.Quote(truncate(r.Op, 32))}
	}
	return r, nil
}

// parseSince reads a history position: {"epoch":"…","offset":N}, with
// nothing else in it.
func parseSince(b []byte) (broker.Position, bool) {
	var raw struct {
		Epoch  *string         `json:"epoch"`
		Offset json.RawMessage `json:"offset"`
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.DisallowUnknownFields()
	if d.Decode(&raw) != nil || raw.Epoch == nil || *raw.Epoch == "" || len(*raw.Epoch) > maxEpoch {
		return broker.Position{}, false
	}
	off, ok := parseID(raw.Offset)
	if !ok {
		return broker.Position{}, false
	}
	return broker.Position{Epoch: *raw.Epoch, Offset: uint64(off)}, true
}

// maxEpoch bounds the epoch a client may send back (the gateway's are 10
// characters).
const maxEpoch = 64

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "…"
	}
	return s
}

func parseID(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 16 {
		return 0, false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	if len(b) > 1 && b[0] == '0' {
		return 0, false
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil || n > maxID {
		return 0, false
	}
	return n, true
}

// depth is the deepest nesting of objects and arrays in msg (strings are
// skipped).
func depth(msg []byte) int {
	d, maxd := 0, 0
	in := false
	for i := 0; i < len(msg); i++ {
		c := msg[i]
		if in {
			switch c {
			case '\\':
				i++
			case '"':
				in = false
			}
			continue
		}
		switch c {
		case '"':
			in = true
		case '{', '[':
			d++
			if d > maxd {
				maxd = d
			}
		case '}', ']':
			d--
		}
	}
	return maxd
}

// OK encodes an ok reply.
func OK(r Request) []byte {
	if !r.HasID {
		return []byte(`{"op":"ok"}`)
	}
	return []byte(`{"id":` + strconv.FormatInt(r.ID, 10) + `,"op":"ok"}`)
}

// okWith encodes an ok reply with more members: extra is written after
// "op":"ok", and must start with a comma.
func okWith(r Request, extra []byte) []byte {
	b := make([]byte, 0, len(extra)+40)
	b = append(b, '{')
	if r.HasID {
		b = append(b, `"id":`...)
		b = strconv.AppendInt(b, r.ID, 10)
		b = append(b, ',')
	}
	b = append(b, `"op":"ok"`...)
	b = append(b, extra...)
	return append(b, '}')
}

// appendPosition appends ,"epoch":…,"offset":… to b.
func appendPosition(b []byte, pos broker.Position) []byte {
	e, _ := json.Marshal(pos.Epoch)
	b = append(b, `,"epoch":`...)
	b = append(b, e...)
	b = append(b, `,"offset":`...)
	return strconv.AppendUint(b, pos.Offset, 10)
}

// ErrorReply encodes an error reply.
func ErrorReply(r Request, e *ProtoError) []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	if r.HasID {
		b.WriteString(`"id":`)
		b.WriteString(strconv.FormatInt(r.ID, 10))
		b.WriteByte(',')
	}
	b.WriteString(`"op":"error","code":`)
	code, _ := json.Marshal(e.Code)
	b.Write(code)
	b.WriteString(`,"message":`)
	m, _ := json.Marshal(e.Message)
	b.Write(m)
	b.WriteByte('}')
	return b.Bytes()
}
