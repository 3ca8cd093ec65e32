//go:build !linux

package proxy

import "errors"

// poller is Linux-only (epoll); elsewhere connections never park.
type poller struct{}

func getPoller() *poller { return nil }

func (p *poller) usable() bool                            { return false }
func (p *poller) register(wake func()) uint64             { return 0 }
func (p *poller) arm(id uint64, fd int, added bool) error { return errNoPoller }
func (p *poller) forget(id uint64, fd int, added bool)    {}

var errNoPoller = errors.New("parking needs epoll")

// peekSocket never runs where sides do not park.
func peekSocket(fd int, token *[8]byte) int { return holdsOther }
