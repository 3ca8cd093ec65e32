package wsgate

// backoff is the delay before reconnect attempt n (0 for the first after a
// lost connection): full jitter over [0, min·2ⁿ), the cap bounded by max.
// Full jitter spreads a crowd of clients that lost the same gateway evenly
// over the first window instead of bringing them back in waves.
func backoff(n int, minDelay, maxDelay int64, rnd func() float64) int64 {
	capd := minDelay
	for i := 0; i < n && capd < maxDelay; i++ {
		capd *= 2
	}
	capd = min(capd, maxDelay)
	return int64(rnd() * float64(capd))
}

// terminal reports whether a close code ends the client instead of
// reconnecting: the gateway found the client itself at fault, and the same
// client would be refused again. A 1008 "token expired" is not terminal:
// a new token fixes it.
func terminal(code int, reason string) bool {
	switch code {
	case 1002, 1003, 1007, 1009, 1010:
		return true
	case 1008:
		return reason != "token expired"
	}
	return false
}
