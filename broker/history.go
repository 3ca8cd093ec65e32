package broker

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base32"
	"strconv"
	"time"
)

// Position is a place in a channel's history: the offset of a publication
// within an epoch. Offsets start at 1 and grow by one per publication. An
// epoch names one unbroken history; it changes when the history is lost
// (Redis restarted without persistence, the channel's record expired), and
// offsets of different epochs cannot be compared.
type Position struct {
	Epoch  string
	Offset uint64
}

// Kind says what a Message is.
type Kind uint8

// Kinds of messages.
const (
	// KindPublication is a publication on the channel.
	KindPublication Kind = iota
	// KindJoin and KindLeave are presence events: a subscriber joined or
	// left the channel (Data is its presence info).
	KindJoin
	KindLeave
)

// Message is what a broker hands its handler.
type Message struct {
	Kind Kind
	// Data is the publication (one JSON value, byte for byte as published)
	// or, for joins and leaves, the subscriber's presence info.
	Data []byte
	// Pos is the publication's place in the channel's history. Offset is 0
	// when the channel keeps none, or the publication came from a plain
	// PUBLISH that bypassed it.
	Pos Position
}

// HistoryOptions say how much history a channel keeps.
type HistoryOptions struct {
	// Size is how many of the latest publications are kept.
	Size int
	// TTL is how long a publication is kept.
	TTL time.Duration
	// MetaTTL is how long the channel's epoch and offset counter outlive
	// its last publication; when they are gone the next publication starts
	// a new epoch. Zero: DefaultMetaTTL.
	MetaTTL time.Duration
}

// DefaultMetaTTL is HistoryOptions.MetaTTL when none is set.
const DefaultMetaTTL = 30 * 24 * time.Hour

func (o HistoryOptions) metaTTL() time.Duration {
	if o.MetaTTL <= 0 {
		return DefaultMetaTTL
	}
	return max(o.MetaTTL, o.TTL)
}

// HistoryPub is one publication to a channel that keeps history.
type HistoryPub struct {
	Channel string
	Data    []byte
	Opt     HistoryOptions
}

// HistoryQuery says what History reads.
type HistoryQuery struct {
	// After, unless Latest is set, asks for the publications with offsets
	// greater than After, oldest first.
	After uint64
	// Latest asks for the last Limit publications instead, oldest first.
	Latest bool
	// Limit bounds the publications returned; 0 reads the position only.
	Limit int
	// Opt are the channel's history options: publications older than
	// Opt.TTL are not returned, and a channel without an epoch gets one
	// that lasts Opt.MetaTTL.
	Opt HistoryOptions
}

// Stored is a publication read from history.
type Stored struct {
	Offset uint64
	Data   []byte
}

// HistoryResult is what History read.
type HistoryResult struct {
	// Top is the channel's position now: its epoch, and the offset of its
	// last publication (0 when none was published in this epoch).
	Top Position
	// Pubs are the publications read, in offset order.
	Pubs []Stored
}

// Historian is a broker that keeps channel history. The rooms hub finds it
// by type assertion.
type Historian interface {
	// PublishHistory appends each publication to its channel's history and
	// publishes it with its position to every subscribed node, as one
	// atomic step per publication on the backend (a node never receives a
	// publication that is not in history, nor one whose offset is out of
	// order), all in one round trip where the backend allows. It returns
	// the positions given, in the order of pubs. On an error none, some or
	// all of them may have been published.
	PublishHistory(ctx context.Context, pubs []HistoryPub) ([]Position, error)
	// History reads channel's history (see HistoryQuery). A channel with
	// no epoch yet gets one, so that the position returned stays valid
	// for the publications that follow.
	History(ctx context.Context, channel string, q HistoryQuery) (HistoryResult, error)
}

// PresenceOptions say how a channel's presence is kept.
type PresenceOptions struct {
	// TTL is how long a node's entries outlive the node (a node that dies
	// without removing them): a broker shared by several nodes refreshes
	// its entries at least every TTL/3.
	TTL time.Duration
	// Events publishes a join and a leave event (KindJoin, KindLeave) on
	// the channel, in order with its publications.
	Events bool
}

// Presencer is a broker that knows who is subscribed to channels, across
// nodes. The rooms hub finds it by type assertion.
type Presencer interface {
	// Join records id (a connection) in channel's presence with info (a
	// JSON object). Joining again replaces the info.
	Join(ctx context.Context, channel, id string, info []byte, opt PresenceOptions) error
	// Leave removes id; the leave event carries the info it joined with.
	// Leaving a channel not joined is not an error.
	Leave(ctx context.Context, channel, id string, opt PresenceOptions) error
	// Presence lists the entries of channel, id → info.
	Presence(ctx context.Context, channel string) (map[string][]byte, error)
	// PresenceCount counts them.
	PresenceCount(ctx context.Context, channel string) (int, error)
}

// newEpoch is a random epoch name: 50 bits, in 10 base32 characters.
func newEpoch() string {
	var b [7]byte
	rand.Read(b[:]) // never fails (crypto/rand panics rather)
	return epochEncoding.EncodeToString(b[:])[:10]
}

var epochEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// Payloads on the backend's channel are publications as they are (one JSON
// value, which never starts with '#', so that a plain PUBLISH reaches
// subscribers), or an envelope:
//
//	#p <epoch> <offset>\n<data>   a publication with its history position
//	#j\n<info>                    a presence join
//	#l\n<info>                    a presence leave
const envelopeMark = '#'

// encodeEnvelope frames m for the backend.
func encodeEnvelope(m Message) []byte {
	switch m.Kind {
	case KindJoin:
		return append([]byte("#j\n"), m.Data...)
	case KindLeave:
		return append([]byte("#l\n"), m.Data...)
	}
	if m.Pos.Offset == 0 {
		return m.Data
	}
	b := make([]byte, 0, len(m.Data)+len(m.Pos.Epoch)+24)
	b = append(b, "#p "...)
	b = append(b, m.Pos.Epoch...)
	b = append(b, ' ')
	b = strconv.AppendUint(b, m.Pos.Offset, 10)
	b = append(b, '\n')
	return append(b, m.Data...)
}

// decodeEnvelope reads a payload from the backend. An envelope it cannot
// read is reported as not ok (and dropped by the caller): passed on as a
// plain publication it would break every subscriber's framing.
func decodeEnvelope(p []byte) (Message, bool) {
	if len(p) == 0 || p[0] != envelopeMark {
		return Message{Data: p}, true
	}
	head, data, found := bytes.Cut(p, []byte{'\n'})
	if !found {
		return Message{}, false
	}
	switch string(head) {
	case "#j":
		return Message{Kind: KindJoin, Data: data}, true
	case "#l":
		return Message{Kind: KindLeave, Data: data}, true
	}
	rest, ok := bytes.CutPrefix(head, []byte("#p "))
	if !ok {
		return Message{}, false
	}
	epoch, off, ok := bytes.Cut(rest, []byte{' '})
	if !ok || len(epoch) == 0 {
		return Message{}, false
	}
	n, err := strconv.ParseUint(string(off), 10, 64)
	if err != nil || n == 0 {
		return Message{}, false
	}
	return Message{Data: data, Pos: Position{Epoch: string(epoch), Offset: n}}, true
}
