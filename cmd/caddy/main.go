// Command caddy is Caddy with its standard modules and wsgate: what
// `xcaddy build --with github.com/wsgate/wsgate` produces.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/wsgate/wsgate"
)

func main() {
	caddycmd.Main()
}
