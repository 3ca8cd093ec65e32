package caddymodule

import (
	"fmt"
	"net/http"
	"net/netip"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/proxy"
)

// provisionMetrics finds the handler's metrics, registers the collectors
// with the config's registry, and reads log_connections.
func (h *Handler) provisionMetrics(ctx caddy.Context) error {
	h.metrics = metricsFor(h.Name)
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("wsgate metrics: %w", err)
	}
	var actions []string
	for _, r := range h.Channels {
		for _, a := range r.Actions {
			if a != "*" {
				actions = append(actions, a)
			}
		}
	}
	h.metrics.prepare(h.mode(), actions)
	switch h.LogConnections {
	case "", "info":
		h.connLog, h.logConns = zapcore.InfoLevel, true
	case "debug":
		h.connLog, h.logConns = zapcore.DebugLevel, true
	case "off":
		h.logConns = false
	default:
		return fmt.Errorf("wsgate: log_connections must be info, debug or off, not %q", h.LogConnections)
	}
	return nil
}

// connLog is what the line logged when a connection ends needs from its
// request. It lives as long as the connection, so it is kept compact:
// fixed-size addresses and id rather than the strings they come as.
type connLog struct {
	h       *Handler
	subject string
	start   int64          // Unix nanoseconds of the upgrade request
	remote  netip.AddrPort // the peer (invalid: see remoteRaw)
	client  netip.Addr     // the client's IP after trusted proxies
	id      uuid.UUID      // Caddy's request id (zero: none)
	raw     string         // the peer's address when it is not IP:port
}

// connectionLogger makes the hook that logs a connection's end: one line
// with who it was (never the token), what it did and how it closed.
func (h *Handler) connectionLogger(r *http.Request, claims policy.Claims, start time.Time) func(*proxy.ConnEnd) {
	l := &connLog{h: h, subject: claims.Subject(), start: start.UnixNano()}
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		id, _ := repl.GetString("http.request.uuid")
		l.id, _ = uuid.Parse(id)
	}
	var err error
	if l.remote, err = netip.ParseAddrPort(r.RemoteAddr); err != nil {
		l.raw = r.RemoteAddr
	}
	ip, _ := caddyhttp.GetVar(r.Context(), caddyhttp.ClientIPVarKey).(string)
	l.client, _ = netip.ParseAddr(ip)
	return l.log
}

func (l *connLog) log(e *proxy.ConnEnd) {
	ce := l.h.auth.logger.Check(l.h.connLog, "websocket connection closed")
	if ce == nil {
		return
	}
	id, remote, client := "", l.raw, ""
	if l.id != (uuid.UUID{}) {
		id = l.id.String()
	}
	if l.remote.IsValid() {
		remote = l.remote.String()
	}
	if l.client.IsValid() {
		client = l.client.String()
	}
	t := &e.Traffic
	fields := make([]zap.Field, 0, 20)
	fields = append(fields,
		zap.String("request_id", id),
		zap.String("remote", remote),
		zap.String("client_ip", client),
		zap.String("subject", l.subject),
		zap.String("mode", l.h.mode()),
		zap.String("upstream", e.Upstream),
		zap.Duration("duration", time.Duration(time.Now().UnixNano()-l.start)),
		zap.Uint64("client_messages", t.Messages[proxy.ClientToUpstream]),
		zap.Uint64("client_bytes", t.Bytes[proxy.ClientToUpstream]),
		zap.Uint64("upstream_messages", t.Messages[proxy.UpstreamToClient]),
		zap.Uint64("upstream_bytes", t.Bytes[proxy.UpstreamToClient]),
		zap.Uint64("fanout_messages", t.Messages[proxy.Fanout]),
		zap.Uint64("fanout_bytes", t.Bytes[proxy.Fanout]),
		zap.String("closed_first", e.First),
		zap.String("close_code", codeLabel(uint16(e.FirstCode))),
	)
	for _, f := range []struct {
		name  string
		frame *proxy.CloseFrame
	}{
		{"close_from_client", e.FromClient}, {"close_to_client", e.ToClient},
		{"close_from_upstream", e.FromUpstream}, {"close_to_upstream", e.ToUpstream},
	} {
		if f.frame != nil {
			fields = append(fields, zap.Object(f.name, closeFrame{f.frame}))
		}
	}
	ce.Write(fields...)
}

// closeFrame logs a close frame as {"code":1000,"reason":"bye"}.
type closeFrame struct{ *proxy.CloseFrame }

func (f closeFrame) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	enc.AddUint16("code", f.Code)
	enc.AddString("reason", f.Reason)
	return nil
}
