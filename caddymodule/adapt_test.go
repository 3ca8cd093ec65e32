package caddymodule

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
)

var update = flag.Bool("update", false, "rewrite the expected JSON of testdata/adapt/*.caddyfiletest")

// separator divides a .caddyfiletest file into the Caddyfile and what
// adapting it must give, as in Caddy's caddytest/integration/caddyfile_adapt.
const separator = "----------"

// TestCaddyfileAdapt adapts each testdata/adapt/*.caddyfiletest Caddyfile
// with the real Caddyfile adapter. When the part after the separator is
// JSON, the tab-indented result must equal it; otherwise adapting must fail
// with an error containing that text. -update rewrites the JSON parts only:
// review the diff, the JSON must say what the Caddyfile says.
func TestCaddyfileAdapt(t *testing.T) {
	files, err := filepath.Glob(filepath.Join("testdata", "adapt", "*.caddyfiletest"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/adapt/*.caddyfiletest files")
	}
	for _, file := range files {
		t.Run(strings.TrimSuffix(filepath.Base(file), ".caddyfiletest"), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			text := strings.ReplaceAll(string(data), "\r\n", "\n")
			input, expected, ok := strings.Cut(text, "\n"+separator+"\n")
			if !ok {
				t.Fatalf("%s has no %s line", file, separator)
			}
			input = strings.TrimSpace(input) + "\n"
			expected = strings.TrimSpace(expected)

			adapter := caddyconfig.GetAdapter("caddyfile")
			if adapter == nil {
				t.Fatal("no caddyfile adapter registered")
			}
			result, warnings, err := adapter.Adapt([]byte(input), nil)

			if !strings.HasPrefix(expected, "{") {
				// an expected error
				if err == nil {
					t.Fatalf("adapted without error, want an error containing %q", expected)
				}
				if !strings.Contains(err.Error(), expected) {
					t.Errorf("error %q does not contain %q", err, expected)
				}
				return
			}

			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			// golden inputs are kept formatted and warning-free, so that a
			// warning a change introduces shows up here
			for _, w := range warnings {
				t.Errorf("warning: %s:%d: %s: %s", w.File, w.Line, w.Directive, w.Message)
			}
			var pretty bytes.Buffer
			if err := json.Indent(&pretty, result, "", "\t"); err != nil {
				t.Fatalf("indenting %s: %v", result, err)
			}
			got := pretty.String()

			if *update {
				if got != expected {
					out := input + "\n" + separator + "\n" + got + "\n"
					if err := os.WriteFile(file, []byte(out), 0o644); err != nil {
						t.Fatal(err)
					}
					t.Logf("rewrote %s", file)
				}
				return
			}
			if got != expected {
				t.Errorf("adapted JSON differs from %s (run with -update to rewrite, then review):\n%s",
					file, lineDiff(expected, got))
			}
		})
	}
}

// lineDiff shows the lines where two texts differ, with a little context:
// enough to find the difference in an indented JSON document.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	head := 0
	for head < len(w) && head < len(g) && w[head] == g[head] {
		head++
	}
	tail := 0
	for tail < len(w)-head && tail < len(g)-head && w[len(w)-1-tail] == g[len(g)-1-tail] {
		tail++
	}
	const maxLines = 20
	var b strings.Builder
	for _, l := range w[max(head-3, 0):head] {
		b.WriteString("  " + l + "\n")
	}
	for _, l := range w[head:min(len(w)-tail, head+maxLines)] {
		b.WriteString("- " + l + "\n")
	}
	for _, l := range g[head:min(len(g)-tail, head+maxLines)] {
		b.WriteString("+ " + l + "\n")
	}
	for _, l := range g[len(g)-tail : min(len(g)-tail+3, len(g))] {
		b.WriteString("  " + l + "\n")
	}
	return b.String()
}
