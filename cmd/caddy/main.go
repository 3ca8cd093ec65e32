// Command caddy is Caddy with its standard modules and wsgate: what
// `xcaddy build --with github.com/wsgate/wsgate@v0.0.0=./path/to/wsgate`
// produces from a checkout (without `@v0.0.0=…` once the module is
// published).
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/wsgate/wsgate"
)

func main() {
	caddycmd.Main()
}
