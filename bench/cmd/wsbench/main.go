// Command wsbench runs wsgate side by side with stock Caddy's
// reverse_proxy and with the upstream reached directly, and writes
// bench/RESULTS.md. It builds nothing: give it the cmd/caddy binary.
//
//	go build -o caddy ./cmd/caddy
//	go run ./bench/cmd/wsbench            # full run, about 25 minutes on 2 cores
//	go run ./bench/cmd/wsbench -scenarios h  # fan-out with history off and on
//	go run ./bench/cmd/wsbench -scenarios z  # compression: relay, fan-out, idle
//	go run ./bench/cmd/wsbench -scenarios k  # capacity: the model's inputs and a 3-gateway check
//	go run ./bench/cmd/wsbench -scenarios p  # peers: wsgate beside Centrifugo and Nchan (not run by default)
//	go run ./bench/cmd/wsbench -quick     # smoke run, under a minute
//
// Scenario r (refusals with every upstream down) is fairest with the
// gateways and the load generator on different cores:
//
//	go build -o wsbench ./bench/cmd/wsbench
//	taskset -c 1 ./wsbench -scenarios r -gateway-cpus 0
//
// See the bench package for what is measured and how.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/wsgate/wsgate/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	err := bench.Main(ctx, invokedAs(), os.Args[1:], os.Stdout, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "wsbench:", err)
		stop()
		os.Exit(1)
	}
}

// invokedAs is the command as the user typed it: `go run` builds into a
// temporary directory, which is no use in the results file.
func invokedAs() string {
	if strings.Contains(os.Args[0], "go-build") {
		return "go run ./bench/cmd/wsbench"
	}
	return os.Args[0]
}
