//go:build unix

package proxy

import "syscall"

// rawIO says whether plain TCP sockets are read and written directly
// (RawConn with read and write system calls), which lets an idle reader
// wait without a buffer and a fan-out write a frame without a goroutine.
const rawIO = true

// sysRead and sysWrite make one read or write, again if a signal
// interrupted it (EINTR).
func sysRead(fd uintptr, b []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), b)
		if err != syscall.EINTR {
			return n, err
		}
	}
}

func sysWrite(fd uintptr, b []byte) (int, error) {
	for {
		n, err := syscall.Write(int(fd), b)
		if err != syscall.EINTR {
			return n, err
		}
	}
}
