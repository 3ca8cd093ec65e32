package integration

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// quickStartClient returns the arguments of the client command the README's
// quick start gives (the line that runs examples/wsclient), after the
// package path.
func quickStartClient(t *testing.T) []string {
	t.Helper()
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(string(readme)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 3 && f[0] == "go" && f[1] == "run" && f[2] == "./examples/wsclient" {
			return f[3:]
		}
	}
	t.Fatal("README.md has no `go run ./examples/wsclient …` line")
	return nil
}

// TestQuickStart runs the README's quick start as written, on free ports:
// the echo app, Caddy with Caddyfile.example, and the client command the
// README gives, which must print the message it sent.
func TestQuickStart(t *testing.T) {
	args := quickStartClient(t)
	var messages []string
	for i := len(args) - 1; i >= 0 && !strings.HasPrefix(args[i], "ws://") && !strings.HasPrefix(args[i], "-"); i-- {
		messages = append([]string{args[i]}, messages...)
	}
	if len(messages) == 0 {
		t.Fatalf("the README's client command %q sends no message", args)
	}

	bin := t.TempDir()
	build := exec.Command("go", "build", "-o", bin+string(filepath.Separator),
		"github.com/wsgate/wsgate/examples/echo", "github.com/wsgate/wsgate/examples/wsclient")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the examples: %v\n%s", err, out)
	}

	example, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	site, admin, echo := freePort(t), freePort(t), freePort(t)
	// the example's fixed addresses, moved to free ports
	moves := map[string]string{
		"127.0.0.1:8080": "127.0.0.1:" + strconv.Itoa(site),
		"127.0.0.1:2999": "127.0.0.1:" + strconv.Itoa(admin),
		"127.0.0.1:9001": "127.0.0.1:" + strconv.Itoa(echo),
	}
	caddyfile := string(example)
	for from, to := range moves {
		if !strings.Contains(caddyfile, from) {
			t.Fatalf("Caddyfile.example does not name %s, which the quick start uses", from)
		}
		caddyfile = strings.ReplaceAll(caddyfile, from, to)
	}
	for i, a := range args {
		for from, to := range moves {
			args[i] = strings.ReplaceAll(a, from, to)
			a = args[i]
		}
	}

	app := exec.Command(filepath.Join(bin, "echo"), "-addr", moves["127.0.0.1:9001"])
	appLogs := &syncBuffer{}
	app.Stdout, app.Stderr = appLogs, appLogs
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { app.Wait(); close(exited) }()
	t.Cleanup(func() { app.Process.Kill(); <-exited })
	eventually(t, 10*time.Second, "the echo app listens", func() bool {
		c, err := net.Dial("tcp", moves["127.0.0.1:9001"])
		if err != nil {
			return false
		}
		c.Close()
		return true
	})

	g := startGatewayFromText(t, site, moves["127.0.0.1:2999"], caddyfile)

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	client := exec.CommandContext(ctx, filepath.Join(bin, "wsclient"), args...)
	var stderr strings.Builder
	client.Stderr = &stderr
	out, err := client.Output()
	if err != nil {
		t.Fatalf("wsclient %q: %v\n%s\ngateway logs:\n%s\necho app logs:\n%s", args, err, stderr.String(), g.logs, appLogs)
	}
	if want := strings.Join(messages, "\n") + "\n"; string(out) != want {
		t.Fatalf("wsclient %q printed %q, want %q", args, out, want)
	}

	// Without the Origin the README asks for, the client says why it was refused.
	var bare []string
	for i := 0; i < len(args); i++ {
		if args[i] == "-origin" {
			i++
			continue
		}
		bare = append(bare, args[i])
	}
	client = exec.CommandContext(ctx, filepath.Join(bin, "wsclient"), bare...)
	out, err = client.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "403") || !strings.Contains(string(out), "allow_missing_origin") {
		t.Fatalf("wsclient %q without an Origin: %v, printed %q; want a 403 naming allow_missing_origin", bare, err, out)
	}
}
