//go:build !linux

package proxy

// writeAll reports false: each write of a batch is made on its own.
func (b *Batch) writeAll() bool { return false }

type batchSys struct{}
