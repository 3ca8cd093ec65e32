// Package testports picks the loopback ports that tests listen on: by
// default in 20000–31999, below the ephemeral range, or in the range the
// environment variable WSGATE_TEST_PORTS gives (such as 40000-48000) on a
// machine where that one is taken. It imports only the standard library.
package testports

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
)

// Env is the variable that chooses the range, written low-high (high
// excluded).
const Env = "WSGATE_TEST_PORTS"

const defaultLow, defaultHigh = 20000, 32000

var bounds = sync.OnceValues(func() ([2]int, error) { return parse(os.Getenv(Env)) })

func parse(v string) ([2]int, error) {
	if v == "" {
		return [2]int{defaultLow, defaultHigh}, nil
	}
	lo, hi, ok := strings.Cut(v, "-")
	low, err1 := strconv.Atoi(strings.TrimSpace(lo))
	high, err2 := strconv.Atoi(strings.TrimSpace(hi))
	if !ok || err1 != nil || err2 != nil || low < 1 || high > 65536 || high-low < 100 {
		return [2]int{}, fmt.Errorf("%s=%q: want low-high, such as 20000-32000, with at least 100 ports between 1 and 65535", Env, v)
	}
	return [2]int{low, high}, nil
}

// Random returns a port of the range, at random; whether it is free is for
// the caller to find out. An error says that WSGATE_TEST_PORTS is malformed.
func Random() (int, error) {
	b, err := bounds()
	if err != nil {
		return 0, err
	}
	return b[0] + rand.IntN(b[1]-b[0]), nil
}
