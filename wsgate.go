// Package wsgate registers the wsgate Caddy modules. Build Caddy with it:
//
//	xcaddy build --with github.com/wsgate/wsgate
//
// The modules live in caddymodule; the engine in proxy.
package wsgate

import _ "github.com/wsgate/wsgate/caddymodule"
