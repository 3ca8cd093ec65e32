//go:build !unix

package proxy

import "errors"

// rawIO is false where sockets are not file descriptors read and written
// with read and write (Windows): every connection goes through net.Conn.
const rawIO = false

var errNoRawIO = errors.New("raw socket I/O is not supported on this platform")

func sysRead(uintptr, []byte) (int, error)  { return 0, errNoRawIO }
func sysWrite(uintptr, []byte) (int, error) { return 0, errNoRawIO }
