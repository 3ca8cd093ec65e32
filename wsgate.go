// Package wsgate registers the wsgate Caddy modules. Build Caddy with it
// from a checkout (xcaddy needs a version and the path to replace it with):
//
//	xcaddy build --with github.com/wsgate/wsgate@v0.0.0=./path/to/wsgate
//
// or, once the module is published where the Go proxy can fetch it:
//
//	xcaddy build --with github.com/wsgate/wsgate
//
// The modules live in caddymodule; the engine in proxy.
package wsgate

import _ "github.com/wsgate/wsgate/caddymodule"
