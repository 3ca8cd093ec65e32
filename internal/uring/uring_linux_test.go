package uring

import (
	"bytes"
	"os"
	"syscall"
	"testing"
)

func newRing(t *testing.T, entries uint32) *Ring {
	t.Helper()
	r, err := New(entries)
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// pair is a connected pair of stream sockets, the first non-blocking.
func pair(t *testing.T) (int, int) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	syscall.SetNonblock(fds[0], true)
	t.Cleanup(func() { syscall.Close(fds[0]); syscall.Close(fds[1]) })
	return fds[0], fds[1]
}

func readAll(t *testing.T, fd, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	for got := 0; got < n; {
		k, err := syscall.Read(fd, b[got:])
		if err != nil || k == 0 {
			t.Fatalf("read after %d of %d bytes: %d, %v", got, n, k, err)
		}
		got += k
	}
	return b
}

// TestSend: every send of a submission reaches its socket, and each result
// says what its socket took: all of it, part of it, nothing (a full
// socket: EAGAIN) or an error (a descriptor that is not open).
func TestSend(t *testing.T) {
	r := newRing(t, 8)
	a1, b1 := pair(t)
	a2, b2 := pair(t)
	full, _ := pair(t)
	part, partPeer := pair(t)
	// Fill one socket to the brim, and leave another with a little room.
	chunk := bytes.Repeat([]byte{'x'}, 1<<16)
	for {
		if _, err := syscall.Write(full, chunk); err == syscall.EAGAIN {
			break
		}
	}
	for {
		if _, err := syscall.Write(part, chunk); err == syscall.EAGAIN {
			break
		}
	}
	readAll(t, partPeer, 2<<16) // room for some bytes, not for a large send
	badFD := closedFD(t)

	m1, m2 := []byte("first"), []byte("second message")
	large := bytes.Repeat([]byte{'y'}, 1<<20)
	fds := []int{a1, full, a2, badFD, part}
	bufs := [][]byte{m1, []byte("nowhere"), m2, []byte("closed"), large}
	n := make([]int, len(fds))
	if err := r.Send(fds, bufs, n); err != nil {
		t.Fatal(err)
	}
	if n[0] != len(m1) || n[2] != len(m2) {
		t.Fatalf("results %v: want %d and %d for the sockets with room", n, len(m1), len(m2))
	}
	if n[1] != -int(syscall.EAGAIN) {
		t.Fatalf("full socket: result %d, want -EAGAIN", n[1])
	}
	if n[3] != -int(syscall.EBADF) {
		t.Fatalf("closed descriptor: result %d, want -EBADF", n[3])
	}
	if n[4] <= 0 || n[4] >= len(large) {
		t.Fatalf("socket with a little room: result %d, want part of %d", n[4], len(large))
	}
	if got := readAll(t, b1, len(m1)); !bytes.Equal(got, m1) {
		t.Fatalf("first socket read %q", got)
	}
	if got := readAll(t, b2, len(m2)); !bytes.Equal(got, m2) {
		t.Fatalf("second socket read %q", got)
	}

	// The ring is used again, many times over its size.
	for i := range 100 {
		if err := r.Send(fds[:1], [][]byte{{byte(i)}}, n); err != nil || n[0] != 1 {
			t.Fatalf("send %d: %d, %v", i, n[0], err)
		}
		if got := readAll(t, b1, 1); got[0] != byte(i) {
			t.Fatalf("send %d read %d", i, got[0])
		}
	}
}

// closedFD is a descriptor number that is not open.
func closedFD(t *testing.T) int {
	t.Helper()
	a, _ := pair(t)
	fd, err := syscall.Dup(a)
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(fd)
	return fd
}

// TestSendTooMany: more sends than the ring holds are refused, and
// nothing is written.
func TestSendTooMany(t *testing.T) {
	r := newRing(t, 2)
	a, b := pair(t)
	fds := []int{a, a, a}
	n := make([]int, 3)
	if err := r.Send(fds, [][]byte{{1}, {2}, {3}}, n); err != ErrNotSubmitted {
		t.Fatalf("Send of 3 on a ring of %d: %v, want ErrNotSubmitted", r.Entries(), err)
	}
	if err := r.Send(fds[:2], [][]byte{{1}, {2}}, n); err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, b, 2); !bytes.Equal(got, []byte{1, 2}) {
		t.Fatalf("read %v, want [1 2]", got)
	}
}

// TestSupports: the kernel's list of operations has send, and not an
// operation number past its last.
func TestSupports(t *testing.T) {
	r := newRing(t, 2)
	if !r.supports(opSend) {
		t.Fatal("send not supported")
	}
	if r.supports(250) {
		t.Fatal("operation 250 supported")
	}
}
