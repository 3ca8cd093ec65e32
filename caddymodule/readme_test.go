package caddymodule

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// caddyfileBlock is one ```caddyfile fenced block of a Markdown file.
type caddyfileBlock struct {
	line int // line of the block's first line of content, 1-based
	text string
}

// caddyfileBlocks returns the ```caddyfile fenced blocks of a Markdown text.
func caddyfileBlocks(t *testing.T, markdown string) []caddyfileBlock {
	t.Helper()
	var blocks []caddyfileBlock
	var cur *caddyfileBlock
	for i, l := range strings.Split(strings.ReplaceAll(markdown, "\r\n", "\n"), "\n") {
		switch {
		case cur == nil && strings.TrimSpace(l) == "```caddyfile":
			cur = &caddyfileBlock{line: i + 2}
		case cur != nil && strings.HasPrefix(strings.TrimSpace(l), "```"):
			blocks = append(blocks, *cur)
			cur = nil
		case cur != nil:
			cur.text += l + "\n"
		}
	}
	if cur != nil {
		t.Fatalf("```caddyfile block at line %d is not closed", cur.line-1)
	}
	return blocks
}

// handlerDirectives are the directives a README snippet may begin with to
// be placed inside a site block.
var handlerDirectives = map[string]bool{
	"wsgate":         true,
	"wsgate_health":  true,
	"wsgate_publish": true,
}

// wrapSnippet applies the README's convention: a block that begins with `{`
// (global options) or a site address is a whole Caddyfile; one that begins
// with a handler directive goes inside a site block; anything else is a set
// of wsgate subdirectives and goes inside a wsgate block (with an upstream,
// and relay_channels if it uses channels) inside a site block.
func wrapSnippet(text string) (wrapped string, whole bool) {
	first := strings.Fields(text)[0]
	switch {
	case first == "{" || strings.ContainsAny(first, ".:") || strings.HasPrefix(first, "http"):
		return text, true
	case handlerDirectives[first]:
		return ":8080 {\n" + text + "}\n", false
	default:
		inner := "upstream ws://127.0.0.1:9001\n" + text
		if !strings.Contains(text, "jwt") {
			// claims in limits and channel rules need a token to come from
			inner += "jwt {\nsecret 0123456789abcdef0123456789abcdef\n}\n"
		}
		if strings.Contains(text, "channels") && !strings.Contains(text, "relay_channels") {
			inner += "relay_channels {\n}\n"
		}
		return ":8080 {\nwsgate {\n" + inner + "}\n}\n", false
	}
}

// TestReadmeCaddyfiles keeps the README's Caddyfile snippets and
// Caddyfile.example working: each is adapted by the real Caddyfile adapter
// (fragments wrapped as the README says), and each must already be as
// `caddy fmt` writes it, so a copy logs no "not formatted" warning.
func TestReadmeCaddyfiles(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	blocks := caddyfileBlocks(t, string(readme))
	if len(blocks) < 5 {
		t.Fatalf("found %d ```caddyfile blocks in README.md, want at least 5", len(blocks))
	}
	example, err := os.ReadFile(filepath.Join("..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}

	type source struct {
		name, text string
		fragment   bool // may be wrapped
	}
	sources := []source{{name: "Caddyfile.example", text: string(example)}}
	for _, b := range blocks {
		sources = append(sources, source{name: fmt.Sprintf("README.md:%d", b.line), text: b.text, fragment: true})
	}

	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter registered")
	}
	for _, s := range sources {
		t.Run(s.name, func(t *testing.T) {
			if strings.TrimSpace(s.text) == "" {
				t.Fatalf("%s: empty Caddyfile", s.name)
			}
			input, whole := s.text, true
			if s.fragment {
				input, whole = wrapSnippet(s.text)
			}
			if formatted := caddyfile.Format([]byte(s.text)); !bytes.Equal(formatted, []byte(s.text)) {
				t.Errorf("%s: not as `caddy fmt` writes it:\n%s", s.name, lineDiff(s.text, string(formatted)))
			}
			_, warnings, err := adapter.Adapt([]byte(input), map[string]any{"filename": s.name})
			if err != nil {
				if whole {
					t.Fatalf("%s: adapting: %v", s.name, err)
				}
				t.Fatalf("%s: adapting (wrapped as\n%s): %v", s.name, input, err)
			}
			for _, w := range warnings {
				// the wrapped form is not formatted; the snippet itself was checked above
				if !whole && strings.Contains(w.Message, "not formatted") {
					continue
				}
				t.Errorf("%s: warning: line %d: %s: %s", s.name, w.Line, w.Directive, w.Message)
			}
		})
	}
}
