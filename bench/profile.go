package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// profile takes CPU profiles of the gateway during extra runs, after the
// measured ones: one throughput run per size for wsgate and stock, and one
// handshake burst each for wsgate, stock and the bad-token refusal. They
// are written to Options.Profile, to be read with `go tool pprof <caddy>
// <file>`.
func (e *env) profile(ctx context.Context, c *caddyProc, tput, hs bool) ([]string, error) {
	if err := os.MkdirAll(e.opt.Profile, 0o755); err != nil {
		return nil, err
	}
	var paths []string
	// take returns a hook that profiles for the length of a run, less a
	// margin so that the profile ends before the run does.
	take := func(name string, secs int) func(context.Context) error {
		path := filepath.Join(e.opt.Profile, name+".pprof")
		paths = append(paths, path)
		return func(ctx context.Context) error { return c.saveProfile(ctx, path, secs) }
	}
	file := func(v string) string { return strings.NewReplacer(" ", "-", ",", "").Replace(v) }
	if tput {
		for _, size := range e.p.tputSizes {
			for _, name := range []string{vWsgate, vStock} {
				hook := take(fmt.Sprintf("throughput-%s-%dB", file(name), size), int(e.p.tputDur.Seconds())-1)
				if _, err := e.tputOnce(ctx, c, e.variant(c, name), size, hook); err != nil {
					return paths, fmt.Errorf("throughput %s %d B: %w", name, size, err)
				}
			}
		}
	}
	if hs {
		for _, name := range []string{vWsgate, vStock, vRejectToken} {
			hook := take("handshakes-"+file(name), int(e.p.hsDur.Seconds())-1)
			if _, err := e.handshakeOnce(ctx, c, e.variant(c, name), hook); err != nil {
				return paths, fmt.Errorf("handshakes %s: %w", name, err)
			}
		}
	}
	e.logf("profiles: %s", strings.Join(paths, " "))
	return paths, nil
}

// profileDuring takes a CPU profile of c, secs long, while run runs; run
// must last longer than the profile.
func (e *env) profileDuring(ctx context.Context, c *caddyProc, name string, secs int, run func() error) (string, error) {
	if err := os.MkdirAll(e.opt.Profile, 0o755); err != nil {
		return "", err
	}
	path := filepath.Join(e.opt.Profile, name+".pprof")
	done := make(chan error, 1)
	go func() { done <- c.saveProfile(ctx, path, secs) }()
	err := run()
	return path, errors.Join(err, <-done)
}

// saveProfile takes a CPU profile of c, secs long (at least 1), into path.
func (c *caddyProc) saveProfile(ctx context.Context, path string, secs int) error {
	b, err := c.get(ctx, fmt.Sprintf("/debug/pprof/profile?seconds=%d", max(1, secs)))
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}
