// Package uring submits many non-blocking socket sends in one system call,
// through a Linux io_uring instance: the cost of entering the kernel is paid
// once per batch instead of once per socket. It does only that: each send
// is made with MSG_DONTWAIT, so it completes during the submission (with
// the bytes the socket took, or EAGAIN), and Send never waits for a socket.
package uring
