package caddymodule

import (
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/wsgate/wsgate/policy"
)

// parseJWT reads:
//
//	jwt {
//	    issuer <iss> {                      # one block per issuer, or the
//	        audience   <aud...>             # key lines directly in jwt for one
//	        secret     <value>     [kid <id>] [alg <algs...>]
//	        public_key <pem_file>  [kid <id>] [alg <algs...>]
//	        jwks       <url>       [refresh <duration>] [alg <algs...>]
//	    }
//	    leeway            <duration>
//	    require_claims    <names...>
//	    allow_missing_exp
//	    max_token_size    <size>
//	    from header [<name>] | query <name> | cookie <name> | protocol [<marker>]
//	}
func parseJWT(outer *caddyfile.Dispenser) (*JWT, error) {
	// a dispenser of its own, so that errors about the block as a whole
	// can point at its first line
	d := outer.NewFromNextSegment()
	d.Next() // consume "jwt"
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	j := new(JWT)
	var top JWTIssuer
	topUsed := false
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		switch name {
		case "issuer":
			sub := d.NewFromNextSegment()
			sub.Next() // consume "issuer"
			var iss string
			if !sub.NextArg() {
				return nil, sub.ArgErr()
			}
			iss = sub.Val()
			if sub.NextArg() {
				return nil, sub.ArgErr()
			}
			is := JWTIssuer{Issuer: iss}
			block := false
			for inner := sub.Nesting(); sub.NextBlock(inner); {
				block = true
				if err := parseIssuerLine(sub, &is); err != nil {
					return nil, err
				}
			}
			if block {
				if len(is.Keys) == 0 && is.JWKSURL == "" {
					sub.Reset()
					sub.Next()
					return nil, sub.Errf("jwt issuer %q has no key", is.Issuer)
				}
				j.Issuers = append(j.Issuers, is)
			} else {
				if top.Issuer != "" {
					return nil, d.Errf("duplicate issuer line; use an issuer block per issuer")
				}
				top.Issuer = iss
				topUsed = true
			}
			continue
		case "audience", "secret", "public_key", "jwks":
			if err := parseIssuerLine(d, &top); err != nil {
				return nil, err
			}
			topUsed = true
			continue
		case "from":
			args := d.RemainingArgs()
			if len(args) < 1 || len(args) > 2 {
				return nil, d.Errf("from needs a kind (header, query, cookie, protocol) and maybe a name")
			}
			src := TokenSource{Kind: args[0]}
			if len(args) == 2 {
				src.Name = args[1]
			}
			if _, err := policy.ParseSource(src.Kind, src.Name); err != nil {
				return nil, d.Err(err.Error())
			}
			j.From = append(j.From, src)
			continue
		}
		if seen[name] {
			return nil, d.Errf("duplicate jwt subdirective %q", name)
		}
		seen[name] = true
		switch name {
		case "leeway":
			dur, err := parseDuration(d)
			if err != nil {
				return nil, err
			}
			j.Leeway = dur
		case "require_claims":
			j.RequiredClaims = d.RemainingArgs()
			if len(j.RequiredClaims) == 0 {
				return nil, d.ArgErr()
			}
		case "allow_missing_exp":
			if d.CountRemainingArgs() > 0 {
				return nil, d.ArgErr()
			}
			j.AllowMissingExp = true
		case "max_token_size":
			n, err := parseSize(d, false)
			if err != nil {
				return nil, err
			}
			j.MaxTokenSize = int(n)
		default:
			return nil, unknownName(d, "jwt subdirective", jwtSubdirectives)
		}
	}
	if topUsed {
		j.Issuers = append([]JWTIssuer{top}, j.Issuers...)
	}
	d.Reset()
	d.Next()
	if len(j.Issuers) == 0 {
		return nil, d.Err("jwt needs a key: secret, public_key or jwks (directly or in an issuer block)")
	}
	names := make([]string, len(j.Issuers))
	for i, is := range j.Issuers {
		if len(is.Keys) == 0 && is.JWKSURL == "" {
			return nil, d.Errf("jwt issuer %q has no key", is.Issuer)
		}
		names[i] = is.Issuer
	}
	if err := policy.CheckIssuerNames(names); err != nil {
		return nil, d.Err(err.Error())
	}
	return j, nil
}

var (
	issuerSubdirectives = []string{"audience", "secret", "public_key", "jwks"}
	jwtSubdirectives    = append([]string{"issuer", "from", "leeway", "require_claims", "allow_missing_exp", "max_token_size"},
		issuerSubdirectives...)
)

func parseIssuerLine(d *caddyfile.Dispenser, is *JWTIssuer) error {
	switch d.Val() {
	case "audience":
		args := d.RemainingArgs()
		if len(args) == 0 {
			return d.ArgErr()
		}
		is.Audience = append(is.Audience, args...)
	case "secret", "public_key":
		kind := d.Val()
		if !d.NextArg() {
			return d.ArgErr()
		}
		k := JWTKey{}
		if kind == "secret" {
			k.Secret = d.Val()
		} else {
			k.PublicKeyFile = d.Val()
		}
		for d.NextArg() {
			switch d.Val() {
			case "kid":
				if !d.NextArg() {
					return d.ArgErr()
				}
				k.ID = d.Val()
			case "alg":
				k.Algorithms = algArgs(d, "kid")
				if len(k.Algorithms) == 0 {
					return d.ArgErr()
				}
			default:
				return d.Errf("unexpected %q: want kid <id> or alg <algorithms...>", d.Val())
			}
		}
		// the same checks as provisioning, short of reading the key
		if kind == "secret" && !hasPlaceholder(k.Secret) {
			if err := policy.CheckSecret([]byte(k.Secret)); err != nil {
				return d.Err(err.Error())
			}
		}
		if err := policy.CheckKeyAlgorithms(k.Algorithms, kind == "secret"); err != nil {
			return d.Err(err.Error())
		}
		is.Keys = append(is.Keys, k)
		ids := make([]string, len(is.Keys))
		for i, k := range is.Keys {
			ids[i] = k.ID
		}
		if err := policy.CheckKeyIDs(ids); err != nil {
			return d.Err(err.Error())
		}
	case "jwks":
		if is.JWKSURL != "" {
			return d.Errf("duplicate jwks for issuer %q", is.Issuer)
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		is.JWKSURL = d.Val()
		if err := policy.CheckJWKSURL(is.JWKSURL); err != nil {
			return d.Err(err.Error())
		}
		for d.NextArg() {
			switch d.Val() {
			case "refresh":
				if !d.NextArg() {
					return d.ArgErr()
				}
				dur, err := caddy.ParseDuration(d.Val())
				if err != nil || dur <= 0 {
					return d.Errf("bad refresh duration %q", d.Val())
				}
				is.JWKSRefresh = caddy.Duration(dur)
			case "alg":
				is.JWKSAlgorithms = algArgs(d, "refresh")
				if len(is.JWKSAlgorithms) == 0 {
					return d.ArgErr()
				}
				for _, a := range is.JWKSAlgorithms {
					if err := policy.CheckAlgorithm(a); err != nil {
						return d.Err(err.Error())
					}
				}
			default:
				return d.Errf("unexpected %q: want refresh <duration> or alg <algorithms...>", d.Val())
			}
		}
	default:
		return unknownName(d, "issuer subdirective", issuerSubdirectives)
	}
	return nil
}

// parseForwardAuth reads:
//
//	forward_auth <url> {
//	    copy_headers <names...>
//	    timeout      <duration>
//	    cache        <duration>
//	    claims_from_body
//	    claim_header <reply_header> <claim>
//	}
func parseForwardAuth(d *caddyfile.Dispenser) (*ForwardAuth, error) {
	f := new(ForwardAuth)
	if !d.AllArgs(&f.URL) {
		return nil, d.ArgErr()
	}
	if err := policy.CheckForwardAuthURL(f.URL); err != nil {
		return nil, d.Err(err.Error())
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if name != "claim_header" {
			if seen[name] {
				return nil, d.Errf("duplicate forward_auth subdirective %q", name)
			}
			seen[name] = true
		}
		switch name {
		case "copy_headers":
			f.CopyHeaders = d.RemainingArgs()
			if len(f.CopyHeaders) == 0 {
				return nil, d.ArgErr()
			}
		case "timeout":
			dur, err := parseDuration(d)
			if err != nil {
				return nil, err
			}
			f.Timeout = dur
		case "cache":
			dur, err := parseDuration(d)
			if err != nil {
				return nil, err
			}
			f.CacheTTL = dur
		case "claims_from_body":
			if d.CountRemainingArgs() > 0 {
				return nil, d.ArgErr()
			}
			f.ClaimsFromBody = true
		case "claim_header":
			var hdr, claim string
			if !d.AllArgs(&hdr, &claim) {
				return nil, d.ArgErr()
			}
			for h, c := range f.ClaimHeaders {
				if strings.EqualFold(h, hdr) {
					return nil, d.Errf("duplicate claim_header for header %q", hdr)
				}
				if c == claim {
					return nil, d.Errf("duplicate claim_header for claim %q", claim)
				}
			}
			if f.ClaimHeaders == nil {
				f.ClaimHeaders = map[string]string{}
			}
			f.ClaimHeaders[hdr] = claim
		default:
			return nil, unknownName(d, "forward_auth subdirective", forwardAuthSubdirectives)
		}
	}
	return f, nil
}

var (
	forwardAuthSubdirectives = []string{"copy_headers", "timeout", "cache", "claims_from_body", "claim_header"}
	limitSubdirectives       = []string{"total", "per_ip", "per_subject", "zone"}
)

// parseConnectionLimits reads:
//
//	limit_connections {
//	    total       <n>
//	    per_ip      <n>
//	    per_subject <n>
//	    zone        <name>
//	}
func parseConnectionLimits(outer *caddyfile.Dispenser) (*ConnectionLimits, error) {
	d := outer.NewFromNextSegment()
	d.Next() // consume "limit_connections"
	if d.CountRemainingArgs() > 0 {
		return nil, d.ArgErr()
	}
	l := new(ConnectionLimits)
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return nil, d.Errf("duplicate limit_connections subdirective %q", name)
		}
		seen[name] = true
		if !slices.Contains(limitSubdirectives, name) {
			return nil, unknownName(d, "limit_connections subdirective", limitSubdirectives)
		}
		if name == "zone" {
			if !d.AllArgs(&l.Zone) {
				return nil, d.ArgErr()
			}
			continue
		}
		n, err := parsePositiveInt(d, name)
		if err != nil {
			return nil, err
		}
		switch name {
		case "total":
			l.Total = n
		case "per_ip":
			l.PerIP = n
		case "per_subject":
			l.PerSubject = n
		}
	}
	if l.Total == 0 && l.PerIP == 0 && l.PerSubject == 0 {
		d.Reset()
		d.Next()
		return nil, d.Err("limit_connections needs total, per_ip or per_subject")
	}
	return l, nil
}

// algArgs reads algorithm names up to the end of the line or up to the
// keyword that may follow them (so "alg HS256 kid k1" works too).
func algArgs(d *caddyfile.Dispenser, keyword string) []string {
	var algs []string
	for d.NextArg() {
		if d.Val() == keyword {
			d.Prev()
			break
		}
		algs = append(algs, d.Val())
	}
	return algs
}
