package caddymodule

import (
	"bytes"
	"fmt"
	"net/http"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
	"github.com/wsgate/wsgate/rooms"
)

// serveRooms serves one wsgate.v1 client.
func (h *Handler) serveRooms(w http.ResponseWriter, r *http.Request, info proxy.RequestInfo, claims policy.Claims) proxy.Outcome {
	id := proxy.NewConnID()
	info.Meta.ID = id
	cfg := rooms.ConnConfig{
		ID:               id,
		PresenceInfo:     presenceInfo(id, claims, h.Rooms.PresenceClaims),
		OnRateLimited:    h.metrics.onPublishLimited,
		MaxSubscriptions: h.Rooms.MaxSubscriptions,
		MaxData:          h.Rooms.MaxData,
		Refresh:          info.Refresh,
		Format:           rooms.FormatProtocol,
		PublishRate:      h.Rooms.PublishRate,
		PublishBurst:     h.Rooms.PublishBurst,
	}
	if h.channels != nil {
		p := h.channels.policy
		cs := h.channels
		cfg.Authorize = func(action, channel string) bool {
			if p.Decide(action, channel, claims) == policy.Allow {
				return true
			}
			cs.countDenied(action)
			return false
		}
	}
	rc := rooms.NewConn(h.hub, cfg)
	info.Refresh, info.RefreshField = nil, "" // the protocol's refresh op replaces the relay's field
	info.Inspect = rc.Handle
	info.OnStart = rc.Attach
	info.OnClose = chain(rc.Close, info.OnClose)
	info.Meta.Channels = rc.Channels
	return h.gw.ServeSession(w, r, info, rooms.Subprotocol)
}

// validate checks what the Caddyfile parser cannot have checked (JSON
// config); a nil config (no rooms) is valid.
func (rc *RoomsConfig) validate() error {
	switch {
	case rc == nil:
		return nil
	case rc.PublishRate < 0 && rc.PublishRate != -1:
		return fmt.Errorf("wsgate rooms: publish_rate must be positive, or -1 for no limit, not %v", rc.PublishRate)
	case rc.PublishBurst < 0:
		return fmt.Errorf("wsgate rooms: publish_burst must not be negative, not %d", rc.PublishBurst)
	case rc.PublishRate == -1 && rc.PublishBurst != 0:
		return fmt.Errorf("wsgate rooms: publish_burst needs a publish_rate (it is -1: no limit)")
	}
	return nil
}

// addUpstreamControl lets the upstream subscribe the connection to
// channels, and keeps clients from forging the prefix.
func (h *Handler) addUpstreamControl(info *proxy.RequestInfo) {
	prefix := []byte(h.UpstreamControl)
	rc := rooms.NewConn(h.hub, rooms.ConnConfig{Format: rooms.FormatRaw, MaxSubscriptions: 1000})
	info.UpstreamControl = rc.Control(prefix)
	info.Meta.Channels = rc.Channels
	info.OnStart = rc.Attach
	info.OnClose = chain(rc.Close, info.OnClose)
	inner := info.Inspect
	info.Inspect = func(msg []byte, text bool) (proxy.Verdict, []byte) {
		if text && bytes.HasPrefix(msg, prefix) {
			return proxy.Drop, nil
		}
		if inner != nil {
			return inner(msg, text)
		}
		return proxy.Pass, nil
	}
}

func chain(first, then func()) func() {
	if then == nil {
		return first
	}
	return func() { first(); then() }
}
