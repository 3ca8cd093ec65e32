package policy

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/MicahParks/jwkset"
	"github.com/MicahParks/keyfunc/v3"
	"github.com/golang-jwt/jwt/v5"
	"golang.org/x/time/rate"
)

// ErrToken is returned (wrapped) for every refused token. Its messages
// never contain the token.
var ErrToken = errors.New("invalid token")

// DefaultMaxTokenSize is the longest token accepted, in bytes.
const DefaultMaxTokenSize = 8 << 10

// jwksRefetchTimeout bounds a JWKS refetch caused by an unknown kid.
const jwksRefetchTimeout = 3 * time.Second

// JWTConfig configures token verification.
type JWTConfig struct {
	// Issuers lists who may issue tokens, each with its own keys. A token's
	// iss claim selects the issuer; its kid is only looked up among that
	// issuer's keys. With one issuer whose Issuer is empty, iss is not
	// checked.
	Issuers []IssuerConfig
	// Leeway tolerates clock skew on exp, nbf and iat.
	Leeway time.Duration
	// RequiredClaims must be present in every token.
	RequiredClaims []string
	// AllowMissingExp accepts tokens without exp (they never expire).
	AllowMissingExp bool
	// MaxTokenSize bounds the token length; default DefaultMaxTokenSize.
	MaxTokenSize int
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// HTTPClient fetches JWKS; nil means a client with a 10 s timeout.
	HTTPClient *http.Client
	// CacheHits, if set, counts tokens answered from the cache of recent
	// verifications (accepted tokens, and refused bad signatures).
	CacheHits *atomic.Uint64
}

// IssuerConfig is one token issuer.
type IssuerConfig struct {
	// Issuer is the exact iss value.
	Issuer string
	// Audience, if set, must intersect the token's aud.
	Audience []string
	// Keys are static verification keys.
	Keys []KeyConfig
	// JWKSURL is fetched for keys (never a URL taken from a token).
	JWKSURL string
	// JWKSRefresh is how often the JWKS is refetched; default 1h. An unknown
	// kid also triggers a refetch, at most once per JWKSMinRefresh.
	JWKSRefresh time.Duration
	// JWKSMinRefresh bounds refetches on unknown kids; default 1m.
	JWKSMinRefresh time.Duration
	// JWKSAlgorithms limits the algorithms accepted with JWKS keys; default
	// all algorithms that fit each key's type.
	JWKSAlgorithms []string
}

// KeyConfig is one static key. Exactly one of Secret and PEM is set.
type KeyConfig struct {
	// ID is matched against the token's kid; a key without ID matches
	// tokens without kid.
	ID string
	// Secret is an HMAC secret.
	Secret []byte
	// PEM is a PEM-encoded public key or certificate (RSA, ECDSA, Ed25519).
	PEM []byte
	// Algorithms accepted with this key; default by key type: HS256 for
	// secrets, RS256 for RSA, ES256/ES384 for P-256/P-384, EdDSA.
	Algorithms []string
}

// Claims are a verified token's claims.
type Claims map[string]any

// Subject is the sub claim, or "".
func (c Claims) Subject() string { s, _ := c["sub"].(string); return s }

// Verifier verifies tokens.
type Verifier struct {
	cfg     JWTConfig
	issuers map[string]*issuer

	// verified tokens, so a client that reconnects with the same token
	// costs a hash, not a signature check
	cacheMu sync.Mutex
	cache   map[[32]byte]cachedToken
}

type cachedToken struct {
	claims Claims
	err    error // a refusal (bad signature) remembered instead
	until  time.Time
}

// errBadSignature marks refusals for a signature that does not verify.
var errBadSignature = errors.New("bad signature")

// Verified tokens are remembered for at most verifiedTTL (and never past
// their exp plus leeway), at most maxVerified of them.
const (
	verifiedTTL = time.Minute
	refusedTTL  = 10 * time.Second
	maxVerified = 10000
)

type issuer struct {
	cfg    IssuerConfig
	keys   []staticKey
	jwks   keyfunc.Keyfunc
	parser *jwt.Parser
	algs   []string
}

type staticKey struct {
	id   string
	key  any
	algs []string
}

var (
	hmacAlgs  = []string{"HS256", "HS384", "HS512"}
	rsaAlgs   = []string{"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
	ecAlgs    = map[string][]string{"P-256": {"ES256"}, "P-384": {"ES384"}, "P-521": {"ES512"}}
	eddsaAlgs = []string{"EdDSA"}
	// publicKeyAlgs are the algorithms of every public key type; also the
	// default for JWKS keys.
	publicKeyAlgs = slices.Concat(rsaAlgs, []string{"ES256", "ES384", "ES512"}, eddsaAlgs)
)

// The checks below need no key material and no network, so a config
// parser can run them on each line; NewVerifier runs them too.

// CheckAlgorithm reports whether alg names a signing algorithm ("none" is
// not one).
func CheckAlgorithm(alg string) error {
	if jwt.GetSigningMethod(alg) == nil || alg == "none" {
		return fmt.Errorf("unknown algorithm %q", alg)
	}
	return nil
}

// CheckKeyAlgorithms checks the algorithms configured for a static key
// before the key is read: each must be known and of the key's family,
// HMAC for a secret and public-key algorithms otherwise.
func CheckKeyAlgorithms(algs []string, secret bool) error {
	fit := publicKeyAlgs
	if secret {
		fit = hmacAlgs
	}
	return checkFit(algs, fit)
}

func checkFit(algs, fit []string) error {
	for _, a := range algs {
		if err := CheckAlgorithm(a); err != nil {
			return err
		}
		if !slices.Contains(fit, a) {
			return fmt.Errorf("algorithm %s does not fit this key (it takes %s)", a, strings.Join(fit, ", "))
		}
	}
	return nil
}

// CheckSecret checks the length of an HMAC secret.
func CheckSecret(secret []byte) error {
	if len(secret) < 32 {
		return errors.New("an HMAC secret needs at least 32 bytes")
	}
	return nil
}

// CheckKeyIDs checks the ids of one issuer's static keys: each names one
// key, and at most one key goes without.
func CheckKeyIDs(ids []string) error {
	seen := map[string]bool{}
	for _, id := range ids {
		if seen[id] {
			if id == "" {
				return errors.New("several keys without an id: give each key an id (kid)")
			}
			return fmt.Errorf("key id %q used twice", id)
		}
		seen[id] = true
	}
	return nil
}

// CheckIssuerNames checks the iss values of the configured issuers: each
// names one issuer, and only a sole issuer may go without.
func CheckIssuerNames(names []string) error {
	seen := map[string]bool{}
	for i, n := range names {
		if n == "" && len(names) > 1 {
			return fmt.Errorf("jwt issuer #%d: several issuers need an issuer name each", i+1)
		}
		if seen[n] {
			return fmt.Errorf("jwt issuer %q: configured twice", n)
		}
		seen[n] = true
	}
	return nil
}

// CheckJWKSURL checks a JWKS URL: http or https, with a host.
func CheckJWKSURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("jwks URL %q must be http(s)://host/…", s)
	}
	return nil
}

// KeyAlgorithms lists the signing algorithms that fit a verification key
// (an HMAC secret as []byte, or an RSA, ECDSA or Ed25519 public key),
// the default first; nil for any other key.
func KeyAlgorithms(key any) []string { return slices.Clone(algsFor(key)) }

// algsFor lists the algorithms that fit a key's type.
func algsFor(key any) []string {
	switch k := key.(type) {
	case []byte:
		return hmacAlgs
	case *rsa.PublicKey:
		return rsaAlgs
	case *ecdsa.PublicKey:
		return ecAlgs[k.Curve.Params().Name]
	case ed25519.PublicKey:
		return eddsaAlgs
	}
	return nil
}

// NewVerifier compiles cfg. ctx ends the JWKS refresh goroutines.
func NewVerifier(ctx context.Context, cfg JWTConfig) (*Verifier, error) {
	if len(cfg.Issuers) == 0 {
		return nil, errors.New("jwt: no issuer configured")
	}
	if cfg.MaxTokenSize <= 0 {
		cfg.MaxTokenSize = DefaultMaxTokenSize
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.HTTPClient == nil {
		cfg.HTTPClient = &http.Client{Timeout: 10 * time.Second}
	}
	v := &Verifier{cfg: cfg, issuers: map[string]*issuer{}, cache: map[[32]byte]cachedToken{}}
	names := make([]string, len(cfg.Issuers))
	for i, ic := range cfg.Issuers {
		names[i] = ic.Issuer
	}
	if err := CheckIssuerNames(names); err != nil {
		return nil, err
	}
	for _, ic := range cfg.Issuers {
		is, err := newIssuer(ctx, cfg, ic)
		if err != nil {
			return nil, fmt.Errorf("jwt issuer %q: %w", ic.Issuer, err)
		}
		v.issuers[ic.Issuer] = is
	}
	return v, nil
}

func newIssuer(ctx context.Context, cfg JWTConfig, ic IssuerConfig) (*issuer, error) {
	is := &issuer{cfg: ic}
	if len(ic.Keys) == 0 && ic.JWKSURL == "" {
		return nil, errors.New("no key and no JWKS URL")
	}
	ids := make([]string, len(ic.Keys))
	for i, kc := range ic.Keys {
		ids[i] = kc.ID
	}
	if err := CheckKeyIDs(ids); err != nil {
		return nil, err
	}
	for _, kc := range ic.Keys {
		sk, err := newStaticKey(kc)
		if err != nil {
			return nil, err
		}
		is.keys = append(is.keys, sk)
		is.algs = append(is.algs, sk.algs...)
	}
	if ic.JWKSURL != "" {
		if err := CheckJWKSURL(ic.JWKSURL); err != nil {
			return nil, err
		}
		refresh := ic.JWKSRefresh
		if refresh <= 0 {
			refresh = time.Hour
		}
		minRefresh := ic.JWKSMinRefresh
		if minRefresh <= 0 {
			minRefresh = time.Minute
		}
		store, err := jwkset.NewStorageFromHTTP(ic.JWKSURL, jwkset.HTTPClientStorageOptions{
			Client:                    cfg.HTTPClient,
			Ctx:                       ctx,
			HTTPTimeout:               cfg.HTTPClient.Timeout,
			NoErrorReturnFirstHTTPReq: true, // an IdP that is down at start must not stop the gateway
			RefreshInterval:           refresh,
			RefreshErrorHandler:       func(context.Context, error) {},
		})
		if err != nil {
			return nil, fmt.Errorf("jwks: %w", err)
		}
		client, err := jwkset.NewHTTPClient(jwkset.HTTPClientOptions{
			HTTPURLs:          map[string]jwkset.Storage{ic.JWKSURL: store},
			RefreshUnknownKID: rate.NewLimiter(rate.Every(minRefresh), 1),
			// Bounds both the wait for the limiter (a wait longer than this
			// fails at once) and the refetch itself.
			RateLimitWaitMax: jwksRefetchTimeout,
		})
		if err != nil {
			return nil, fmt.Errorf("jwks: %w", err)
		}
		is.jwks, err = keyfunc.New(keyfunc.Options{Ctx: ctx, Storage: client})
		if err != nil {
			return nil, fmt.Errorf("jwks: %w", err)
		}
		if len(ic.JWKSAlgorithms) > 0 {
			is.algs = append(is.algs, ic.JWKSAlgorithms...)
		} else {
			is.algs = append(is.algs, publicKeyAlgs...)
		}
	}
	for _, a := range is.algs {
		if err := CheckAlgorithm(a); err != nil {
			return nil, err
		}
	}
	opts := []jwt.ParserOption{
		jwt.WithValidMethods(is.algs),
		jwt.WithLeeway(cfg.Leeway),
		jwt.WithTimeFunc(cfg.Now),
		jwt.WithIssuedAt(),
	}
	if !cfg.AllowMissingExp {
		opts = append(opts, jwt.WithExpirationRequired())
	}
	if ic.Issuer != "" {
		opts = append(opts, jwt.WithIssuer(ic.Issuer))
	}
	if len(ic.Audience) > 0 {
		opts = append(opts, jwt.WithAudience(ic.Audience...))
	}
	is.parser = jwt.NewParser(opts...)
	return is, nil
}

func newStaticKey(kc KeyConfig) (staticKey, error) {
	sk := staticKey{id: kc.ID}
	switch {
	case len(kc.Secret) > 0 && len(kc.PEM) > 0:
		return sk, errors.New("a key is either a secret or a PEM key, not both")
	case len(kc.Secret) > 0:
		if err := CheckSecret(kc.Secret); err != nil {
			return sk, err
		}
		sk.key = kc.Secret
	case len(kc.PEM) > 0:
		k, err := parsePublicKeyPEM(kc.PEM)
		if err != nil {
			return sk, err
		}
		sk.key = k
	default:
		return sk, errors.New("a key needs a secret or a PEM key")
	}
	if err := CheckKeyAlgorithms(kc.Algorithms, len(kc.Secret) > 0); err != nil {
		return sk, err
	}
	fit := algsFor(sk.key)
	if len(fit) == 0 {
		return sk, errors.New("unsupported key type")
	}
	sk.algs = kc.Algorithms
	if len(sk.algs) == 0 {
		sk.algs = fit[:1]
		if _, ok := sk.key.(*ecdsa.PublicKey); ok {
			sk.algs = fit
		}
	}
	return sk, checkFit(sk.algs, fit)
}

func parsePublicKeyPEM(b []byte) (any, error) {
	block, _ := pem.Decode(b)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	switch block.Type {
	case "CERTIFICATE":
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, err
		}
		return cert.PublicKey, nil
	case "PUBLIC KEY":
		return x509.ParsePKIXPublicKey(block.Bytes)
	case "RSA PUBLIC KEY":
		return x509.ParsePKCS1PublicKey(block.Bytes)
	}
	return nil, fmt.Errorf("PEM block %q is not a public key or certificate (never configure a private key here)", block.Type)
}

// Verify checks a token and returns its claims.
func (v *Verifier) Verify(ctx context.Context, token string) (Claims, error) {
	if len(token) > v.cfg.MaxTokenSize {
		return nil, fmt.Errorf("%w: too large", ErrToken)
	}
	if strings.Count(token, ".") != 2 {
		return nil, fmt.Errorf("%w: malformed", ErrToken)
	}
	key := keyOf(token)
	now := v.cfg.Now()
	v.cacheMu.Lock()
	hit, ok := v.cache[key]
	v.cacheMu.Unlock()
	if ok && now.Before(hit.until) {
		if v.cfg.CacheHits != nil {
			v.cfg.CacheHits.Add(1)
		}
		if hit.err != nil {
			return nil, hit.err
		}
		return hit.claims, nil
	}
	claims, err := v.verify(ctx, token)
	if err != nil {
		if errors.Is(err, errBadSignature) {
			// A bad signature stays bad: a flood of the same forged token
			// costs one signature check per refusedTTL.
			v.remember(key, cachedToken{err: err, until: now.Add(refusedTTL)}, now)
		}
		return nil, err
	}
	until := now.Add(verifiedTTL)
	if exp, err := claims.exp(); err == nil && exp != nil {
		until = minTime(until, exp.Add(v.cfg.Leeway))
	}
	v.remember(key, cachedToken{claims: claims, until: until}, now)
	return claims, nil
}

func (v *Verifier) remember(key [32]byte, e cachedToken, now time.Time) {
	v.cacheMu.Lock()
	defer v.cacheMu.Unlock()
	if len(v.cache) >= maxVerified {
		for k, e := range v.cache {
			if !now.Before(e.until) {
				delete(v.cache, k)
			}
		}
		if len(v.cache) >= maxVerified {
			clear(v.cache)
		}
	}
	v.cache[key] = e
}

func keyOf(token string) [32]byte { return sha256.Sum256([]byte(token)) }

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// exp is the token's exp claim.
func (c Claims) exp() (*jwt.NumericDate, error) { return jwt.MapClaims(c).GetExpirationTime() }

// verify checks a token's signature and claims.
func (v *Verifier) verify(ctx context.Context, token string) (Claims, error) {
	// Read iss (unverified) only to pick the issuer whose keys and rules apply.
	var peek jwt.RegisteredClaims
	unverified, _, err := jwt.NewParser().ParseUnverified(token, &peek)
	if err != nil {
		return nil, fmt.Errorf("%w: malformed", ErrToken)
	}
	// RFC 7515 §4.1.11: a token that lists header extensions as critical
	// must be refused unless every one is understood, and none is here.
	if _, ok := unverified.Header["crit"]; ok {
		return nil, fmt.Errorf("%w: unsupported critical header", ErrToken)
	}
	is := v.issuers[peek.Issuer]
	if is == nil {
		if len(v.issuers) == 1 {
			is = v.issuers[""]
		}
		if is == nil {
			return nil, fmt.Errorf("%w: unknown issuer", ErrToken)
		}
	}
	claims := jwt.MapClaims{}
	_, err = is.parser.ParseWithClaims(token, claims, func(t *jwt.Token) (any, error) { return is.key(ctx, t) })
	if err != nil {
		if errors.Is(err, jwt.ErrTokenSignatureInvalid) {
			return nil, fmt.Errorf("%w: %w", ErrToken, errBadSignature)
		}
		return nil, fmt.Errorf("%w: %s", ErrToken, reason(err))
	}
	for _, c := range v.cfg.RequiredClaims {
		if claims[c] == nil {
			return nil, fmt.Errorf("%w: claim %q missing", ErrToken, c)
		}
	}
	return Claims(claims), nil
}

// TokenResult names the outcome of a verification for metrics: "valid"
// for a nil error, else one of a small fixed set (expired, not_yet_valid,
// bad_signature, unknown_issuer, wrong_issuer, wrong_audience,
// missing_claim, malformed, too_large, unknown_key, missing, invalid).
func TokenResult(err error) string {
	if err == nil {
		return "valid"
	}
	desc, ok := strings.CutPrefix(err.Error(), ErrToken.Error()+": ")
	if !ok {
		return "invalid"
	}
	switch {
	case desc == "expired", desc == "token expired":
		return "expired"
	case desc == "not valid yet":
		return "not_yet_valid"
	case desc == errBadSignature.Error():
		return "bad_signature"
	case desc == "unknown issuer":
		return "unknown_issuer"
	case desc == "wrong issuer":
		return "wrong_issuer"
	case desc == "wrong audience":
		return "wrong_audience"
	case desc == "required claim missing", strings.HasPrefix(desc, "claim "):
		return "missing_claim"
	case desc == "malformed", desc == "unsupported critical header":
		return "malformed"
	case desc == "too large":
		return "too_large"
	case desc == "unverifiable":
		return "unknown_key"
	case desc == "no token":
		return "missing"
	}
	return "invalid"
}

// reason turns a jwt error into a short message without token content.
func reason(err error) string {
	switch {
	case errors.Is(err, jwt.ErrTokenExpired):
		return "expired"
	case errors.Is(err, jwt.ErrTokenNotValidYet), errors.Is(err, jwt.ErrTokenUsedBeforeIssued):
		return "not valid yet"
	case errors.Is(err, jwt.ErrTokenInvalidAudience):
		return "wrong audience"
	case errors.Is(err, jwt.ErrTokenInvalidIssuer):
		return "wrong issuer"
	case errors.Is(err, jwt.ErrTokenRequiredClaimMissing):
		return "required claim missing"
	case errors.Is(err, jwt.ErrTokenSignatureInvalid):
		return "bad signature"
	case errors.Is(err, jwt.ErrTokenUnverifiable):
		return "unverifiable"
	case errors.Is(err, jwt.ErrTokenMalformed):
		return "malformed"
	}
	return "rejected"
}

// key finds the verification key for a token among this issuer's keys,
// and checks the token's algorithm fits that key.
func (is *issuer) key(ctx context.Context, t *jwt.Token) (any, error) {
	alg := t.Method.Alg()
	kid, hasKid := t.Header["kid"].(string)
	if _, present := t.Header["kid"]; present && !hasKid {
		return nil, errors.New("kid is not a string")
	}
	for _, k := range is.keys {
		if k.id == kid {
			if !slices.Contains(k.algs, alg) {
				return nil, fmt.Errorf("algorithm %s not allowed for this key", alg)
			}
			return k.key, nil
		}
	}
	if is.jwks == nil || !hasKid {
		return nil, errors.New("no key for this token")
	}
	if len(is.cfg.JWKSAlgorithms) > 0 && !slices.Contains(is.cfg.JWKSAlgorithms, alg) {
		return nil, fmt.Errorf("algorithm %s not allowed", alg)
	}
	key, err := is.jwks.KeyfuncCtx(ctx)(t)
	if err != nil {
		return nil, err
	}
	if pk, ok := key.(interface{ Public() crypto.PublicKey }); ok {
		key = pk.Public()
	}
	if !slices.Contains(algsFor(key), alg) {
		return nil, fmt.Errorf("algorithm %s does not fit the key", alg)
	}
	return key, nil
}
