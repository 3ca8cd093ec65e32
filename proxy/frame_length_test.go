package proxy

import (
	"encoding/binary"
	"testing"
	"time"
)

// TestFrameLengthOverflow: a frame whose length is under 2^63 but with its
// header comes to more (the most a 64-bit length may say) is refused with
// 1009, and the connection ends. Header and length used to be added up
// into a negative count of bytes left: after its close frame the gateway
// re-read the same header forever, a core spinning for the life of the
// process, on 14 bytes from a client.
func TestFrameLengthOverflow(t *testing.T) {
	for _, length := range []uint64{1<<63 - 1, 1<<63 - 14, 1<<63 - 15} {
		up := startUpstream(t, nil, nil)
		tg := startGateway(t, up.url, func(c *Config) { c.CloseTimeout = 100 * time.Millisecond })
		rc := dialRaw(t, tg.addr(), nil)
		up.next(t)
		frame := []byte{0x82, 0xff}
		frame = binary.BigEndian.AppendUint64(frame, length)
		frame = append(frame, 1, 2, 3, 4) // the mask; no payload follows
		rc.write(frame)
		expectClose(t, rc, 1009)
		rc.expectEOF()
		poll(t, "the connection to leave the registry", func() bool { return tg.g.Registry().Len() == 0 })
	}
}
