package broker

import (
	"bytes"
	"testing"
)

// FuzzDecodeEnvelope: any payload a Redis channel carries is read without
// a panic; what is read encodes back to a payload that reads the same; and
// a plain publication (not starting with '#') passes byte for byte. Its
// seeds are in testdata/fuzz/FuzzDecodeEnvelope.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Fuzz(func(t *testing.T, p []byte) {
		m, ok := decodeEnvelope(p)
		if !ok {
			if len(p) == 0 || p[0] != envelopeMark {
				t.Fatalf("a plain payload %q was refused", p)
			}
			return
		}
		if len(p) > 0 && p[0] != envelopeMark {
			if m.Kind != KindPublication || m.Pos != (Position{}) || !bytes.Equal(m.Data, p) {
				t.Fatalf("plain payload %q read as %+v", p, m)
			}
		}
		if m.Kind == KindPublication && (m.Pos.Offset == 0) != (m.Pos.Epoch == "") {
			t.Fatalf("%q read at %+v: an epoch goes with an offset", p, m.Pos)
		}
		enc := encodeEnvelope(m)
		if m.Kind == KindPublication && m.Pos.Offset == 0 && len(m.Data) > 0 && m.Data[0] == envelopeMark {
			return // data that looks like an envelope only passes inside one
		}
		back, ok := decodeEnvelope(enc)
		if !ok || back.Kind != m.Kind || back.Pos != m.Pos || !bytes.Equal(back.Data, m.Data) {
			t.Fatalf("%q read as %+v, encoded as %q, read back as %+v (%v)", p, m, enc, back, ok)
		}
	})
}

// FuzzEnvelopeRoundTrip: every message a broker encodes reads back the
// same.
func FuzzEnvelopeRoundTrip(f *testing.F) {
	f.Add(uint8(0), "abcdefghij", uint64(1), []byte(`{"a":1}`))
	f.Add(uint8(1), "", uint64(0), []byte(`{"u":"x"}`))
	f.Add(uint8(2), "", uint64(0), []byte("#p a 1\n"))
	f.Add(uint8(0), "e", uint64(1<<63), []byte("\n\n"))
	f.Fuzz(func(t *testing.T, kind uint8, epoch string, off uint64, data []byte) {
		m := Message{Kind: Kind(kind % 3), Data: data}
		if m.Kind == KindPublication {
			if off == 0 || epoch == "" || bytes.ContainsAny([]byte(epoch), " \n") {
				// A publication outside history is data as it is: JSON,
				// which never starts with '#'.
				if len(data) > 0 && data[0] == envelopeMark {
					return
				}
				off, epoch = 0, ""
			}
			m.Pos = Position{epoch, off}
		}
		back, ok := decodeEnvelope(encodeEnvelope(m))
		if !ok || back.Kind != m.Kind || back.Pos != m.Pos || !bytes.Equal(back.Data, m.Data) {
			t.Fatalf("%+v read back as %+v (%v)", m, back, ok)
		}
	})
}
