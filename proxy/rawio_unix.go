//go:build unix

package proxy

import "syscall"

// rawIO says whether plain TCP sockets are read and written directly
// (RawConn with read and write system calls), which lets an idle reader
// wait without a buffer and a fan-out write a frame without a goroutine.
const rawIO = true

func sysRead(fd uintptr, b []byte) (int, error)  { return syscall.Read(int(fd), b) }
func sysWrite(fd uintptr, b []byte) (int, error) { return syscall.Write(int(fd), b) }
