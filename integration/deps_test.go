package integration

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// TestCorePackagesDoNotImportCaddy enforces the dependency direction: only
// caddymodule may import Caddy.
func TestCorePackagesDoNotImportCaddy(t *testing.T) {
	var pkgs []string
	for _, p := range []string{"policy", "proxy", "broker", "rooms"} {
		if _, err := os.Stat("../" + p); err == nil {
			pkgs = append(pkgs, "./"+p+"/...")
		}
	}
	if len(pkgs) == 0 {
		t.Fatal("no core package found")
	}
	cmd := exec.Command("go", append([]string{"list", "-deps"}, pkgs...)...)
	cmd.Dir = ".."
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps printed too little: %q", out)
	}
	for _, d := range deps {
		if strings.Contains(d, "caddyserver") {
			t.Errorf("%v depends on %s", pkgs, d)
		}
	}
}
