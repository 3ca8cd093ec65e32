package proxy

import (
	"errors"
	"io"
	"net"
	"os"

	"github.com/gobwas/ws"
)

// side names a peer of a connection, or the gateway itself.
type side uint8

const (
	noSide       side = iota // a closeErr made by a reader: the side it reads
	clientSide               // the client
	upstreamSide             // the upstream app
	gatewaySide              // the gateway's own decision (shutdown, slow consumer)
)

func (s side) String() string {
	switch s {
	case clientSide:
		return "client"
	case upstreamSide:
		return "upstream"
	}
	return "gateway"
}

// closeErr ends a connection. side caused it and is told code and reason,
// unless gone: it can no longer be written to (its connection failed, or
// it stopped reading). The other side is told what other says.
type closeErr struct {
	side    side
	code    ws.StatusCode
	reason  string
	gone    bool
	timeout bool  // gone: a write to it lasted its deadline
	err     error // the I/O error behind it, if any
}

func (e *closeErr) Error() string {
	if e.err != nil {
		return e.side.String() + ": " + e.reason + ": " + e.err.Error()
	}
	return e.side.String() + ": " + e.reason
}

// other is the close code and reason for the side that did not cause e.
func (e *closeErr) other() (ws.StatusCode, string) {
	switch {
	case e.side == clientSide && e.gone:
		return ws.StatusGoingAway, e.reason
	case e.side == upstreamSide && e.gone:
		return ws.StatusInternalServerError, e.reason
	case e.side == upstreamSide:
		return ws.StatusInternalServerError, "upstream error: " + e.reason
	}
	return e.code, e.reason
}

// ioErr is a failed write to a side.
type ioErr struct {
	side  side
	write bool
	err   error
}

func (e *ioErr) Error() string { return e.side.String() + " write: " + e.err.Error() }
func (e *ioErr) Unwrap() error { return e.err }

var (
	// errBroken is a write to a side whose connection already failed.
	errBroken = errors.New("wsgate: connection broken")
	// errGotClose ends a reader after its side's close frame.
	errGotClose = errors.New("wsgate: close frame received")
	// errClosing ends a wait because the connection is closing.
	errClosing = errors.New("wsgate: connection is closing")
)

// gone is the closeErr for a side that can no longer be written to; a
// timeout means it stopped reading.
func gone(s side, err error) *closeErr {
	reason := s.String() + " went away"
	timeout := errors.Is(err, os.ErrDeadlineExceeded)
	if timeout {
		reason = s.String() + " not reading"
	}
	return &closeErr{side: s, gone: true, timeout: timeout, reason: reason, err: err}
}

// asCloseErr turns an error that ended src's reader (or any goroutine's
// write) into the reason the connection ends. It returns nil when the
// connection ends normally: src's close frame arrived, or it was closing
// anyway. readFailed says the error came from reading src.
func asCloseErr(src side, err error, closing bool) (e *closeErr, readFailed bool) {
	var ce *closeErr
	var ie *ioErr
	switch {
	case err == nil, err == errGotClose, err == errClosing:
		return nil, false
	case errors.As(err, &ce):
		if ce.side == noSide {
			ce.side = src
		}
		return ce, false
	case errors.As(err, &ie):
		return gone(ie.side, ie.err), false
	case closing:
		return nil, true
	}
	return &closeErr{side: src, gone: true, reason: src.String() + " went away", err: err}, true
}

// isExpected reports whether a read error is an ordinary end of a
// connection rather than something worth logging.
func isExpected(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.Is(err, errClosing)
}
