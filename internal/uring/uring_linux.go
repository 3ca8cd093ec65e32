package uring

import (
	"errors"
	"fmt"
	"runtime"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ring is an io_uring instance used by one goroutine at a time.
type Ring struct {
	fd      int
	entries uint32
	sqMem   []byte
	cqMem   []byte
	sqeMem  []byte

	sqHead, sqTail, sqMask *uint32
	sqArray                unsafe.Pointer // [entries]uint32
	cqHead, cqTail, cqMask *uint32
	cqes                   unsafe.Pointer // [cq entries]cqe
	sqes                   unsafe.Pointer // [entries]sqe
}

// params is struct io_uring_params.
type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// sqe is struct io_uring_sqe, as a send uses it.
type sqe struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	msgFlags uint32
	userData uint64
	_        [3]uint64
}

// cqe is struct io_uring_cqe.
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

const (
	unknown = -int(syscall.EIO)

	opSend = 26 // IORING_OP_SEND

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	enterGetEvents = 1 // IORING_ENTER_GETEVENTS
)

var (
	// ErrUnsupported is returned by New when the kernel has no io_uring,
	// or refuses it to this process.
	ErrUnsupported = errors.New("uring: io_uring is not available")
	// ErrNotSubmitted is returned by Send when the kernel took none of the
	// sends: nothing was written, and the ring can be used again.
	ErrNotSubmitted = errors.New("uring: the sends were not submitted")
	// ErrFailed is returned by Send when the kernel failed after taking
	// some of the sends: the results not filled in are unknown, and the
	// ring must be closed.
	ErrFailed = errors.New("uring: the submission failed")
)

// New sets up a ring that holds up to entries sends (a power of two).
func New(entries uint32) (*Ring, error) {
	var p params
	fd, _, errno := syscall.RawSyscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	switch errno {
	case 0:
	case syscall.ENOSYS, syscall.EPERM, syscall.EACCES:
		// No io_uring, or refused: kernel.io_uring_disabled, seccomp.
		return nil, fmt.Errorf("%w: %v", ErrUnsupported, errno)
	default:
		return nil, fmt.Errorf("uring: setup: %w", errno) // short of memory or files, for now
	}
	r := &Ring{fd: int(fd), entries: p.sqEntries} // close-on-exec, as io_uring makes it
	if !r.supports(opSend) {
		r.Close()
		return nil, fmt.Errorf("%w: no send operation (Linux before 5.6)", ErrUnsupported)
	}
	var err error
	sqSize := int(p.sqOff.array + p.sqEntries*4)
	cqSize := int(p.cqOff.cqes + p.cqEntries*uint32(unsafe.Sizeof(cqe{})))
	if r.sqMem, err = mmap(r.fd, offSQRing, sqSize); err != nil {
		r.Close()
		return nil, err
	}
	if r.cqMem, err = mmap(r.fd, offCQRing, cqSize); err != nil {
		r.Close()
		return nil, err
	}
	if r.sqeMem, err = mmap(r.fd, offSQEs, int(p.sqEntries)*int(unsafe.Sizeof(sqe{}))); err != nil {
		r.Close()
		return nil, err
	}
	sq, cq := unsafe.Pointer(&r.sqMem[0]), unsafe.Pointer(&r.cqMem[0])
	r.sqHead = (*uint32)(unsafe.Add(sq, p.sqOff.head))
	r.sqTail = (*uint32)(unsafe.Add(sq, p.sqOff.tail))
	r.sqMask = (*uint32)(unsafe.Add(sq, p.sqOff.ringMask))
	r.sqArray = unsafe.Add(sq, p.sqOff.array)
	r.cqHead = (*uint32)(unsafe.Add(cq, p.cqOff.head))
	r.cqTail = (*uint32)(unsafe.Add(cq, p.cqOff.tail))
	r.cqMask = (*uint32)(unsafe.Add(cq, p.cqOff.ringMask))
	r.cqes = unsafe.Add(cq, p.cqOff.cqes)
	r.sqes = unsafe.Pointer(&r.sqeMem[0])
	return r, nil
}

// supports asks the kernel whether it has operation op (IORING_REGISTER_PROBE,
// itself from Linux 5.6 on).
func (r *Ring) supports(op uint8) bool {
	const registerProbe, opSupported, maxOps = 8, 1, 256
	var probe struct {
		lastOp, opsLen uint8
		_              uint16
		_              [3]uint32
		ops            [maxOps]struct {
			op    uint8
			_     uint8
			flags uint16
			_     uint32
		}
	}
	_, _, errno := syscall.RawSyscall6(unix.SYS_IO_URING_REGISTER, uintptr(r.fd), registerProbe, uintptr(unsafe.Pointer(&probe)), maxOps, 0, 0)
	return errno == 0 && op < probe.opsLen && probe.ops[op].flags&opSupported != 0
}

func mmap(fd int, off int64, size int) ([]byte, error) {
	return unix.Mmap(fd, off, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
}

// Entries is how many sends one Send call takes at most.
func (r *Ring) Entries() int { return int(r.entries) }

// Close releases the ring.
func (r *Ring) Close() error {
	for _, m := range [][]byte{r.sqeMem, r.cqMem, r.sqMem} {
		if m != nil {
			unix.Munmap(m)
		}
	}
	return syscall.Close(r.fd)
}

// Send writes bufs[i] to the socket fds[i], each without waiting, all in
// one system call, and stores in n[i] the bytes written or a negative
// errno (-EAGAIN when the socket took nothing). The buffers must stay
// untouched, and the descriptors open, until it returns. At most Entries
// sends at a time (more: ErrNotSubmitted). Its errors are ErrNotSubmitted
// and ErrFailed; a send whose result is unknown has n[i] = -EIO.
func (r *Ring) Send(fds []int, bufs [][]byte, n []int) error {
	count := uint32(len(fds))
	if count == 0 {
		return nil
	}
	if count > r.entries {
		return ErrNotSubmitted
	}
	tail := *r.sqTail // only this goroutine moves the tail
	mask := *r.sqMask
	for i := range count {
		idx := (tail + i) & mask
		e := (*sqe)(unsafe.Add(r.sqes, uintptr(idx)*unsafe.Sizeof(sqe{})))
		*e = sqe{
			opcode:   opSend,
			fd:       int32(fds[i]),
			len:      uint32(len(bufs[i])),
			msgFlags: unix.MSG_DONTWAIT | unix.MSG_NOSIGNAL,
			userData: uint64(i),
		}
		if len(bufs[i]) > 0 {
			e.addr = uint64(uintptr(unsafe.Pointer(&bufs[i][0])))
		}
		*(*uint32)(unsafe.Add(r.sqArray, uintptr(idx)*4)) = idx
	}
	atomic.StoreUint32(r.sqTail, tail+count)

	for i := range n[:count] {
		n[i] = unknown
	}
	submitted, done := uint32(0), uint32(0)
	for done < count {
		got, _, errno := syscall.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(count-submitted), uintptr(count-done), enterGetEvents, 0, 0)
		switch errno {
		case 0:
			submitted += uint32(got)
		case syscall.EINTR, syscall.EAGAIN, syscall.EBUSY:
			// again (EAGAIN, EBUSY: the kernel is short of memory for now)
		default:
			if submitted == 0 {
				atomic.StoreUint32(r.sqTail, tail) // take the entries back
				return ErrNotSubmitted
			}
			r.reap(n)
			return ErrFailed
		}
		done += r.reap(n)
	}
	runtime.KeepAlive(bufs) // the kernel is done with them
	return nil
}

// reap takes the completions waiting in the ring into n.
func (r *Ring) reap(n []int) uint32 {
	head := *r.cqHead
	tail := atomic.LoadUint32(r.cqTail)
	mask := *r.cqMask
	k := uint32(0)
	for ; head+k != tail; k++ {
		c := (*cqe)(unsafe.Add(r.cqes, uintptr((head+k)&mask)*unsafe.Sizeof(cqe{})))
		if i := c.userData; i < uint64(len(n)) {
			n[i] = int(c.res)
		}
	}
	atomic.StoreUint32(r.cqHead, head+k)
	return k
}
