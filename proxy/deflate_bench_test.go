package proxy

import (
	"bytes"
	"compress/flate"
	"testing"
)

// BenchmarkDeflate measures what permessage-deflate costs per message, on
// 64 different chat messages of 1 KiB (chatWordsMessage, the benchmark
// harness's): compressing one as the gateway does (compress, a pooled
// compressor), and inflating one that a browser-like peer compressed
// (compress/flate at its default level, no context takeover) as the relay
// does ((*deflate).inflate into pooled buffers, checking UTF-8). It
// reports the compressed size too.
func BenchmarkDeflate(b *testing.B) {
	var msgs, wires [][]byte
	for i := 1; i <= 64; i++ {
		m := chatWordsMessage(uint64(i), 1024)
		msgs = append(msgs, m)
		var z bytes.Buffer
		fw, _ := flate.NewWriter(&z, flate.DefaultCompression)
		fw.Write(m)
		fw.Flush()
		wires = append(wires, bytes.TrimSuffix(z.Bytes(), deflateTail))
	}
	b.Run("compress-1KiB", func(b *testing.B) {
		dst := make([]byte, 0, 2048)
		n, i := 0, 0
		for b.Loop() {
			n += len(compress(dst[:0], msgs[i%len(msgs)], false))
			i++
		}
		b.ReportMetric(float64(n)/float64(i), "B/msg")
	})
	b.Run("inflate-1KiB", func(b *testing.B) {
		d := &deflate{}
		n, i := 0, 0
		for b.Loop() {
			var u utf8State
			w := wires[i%len(wires)]
			buf, pooled, err := d.inflate(w, 1<<20, true, &u)
			if err != nil {
				b.Fatal(err)
			}
			if pooled {
				putMessage(buf)
			}
			n += len(w)
			i++
		}
		b.ReportMetric(float64(n)/float64(i), "B/msg")
	})
}
