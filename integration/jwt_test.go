package integration

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"hash"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tokens are minted by hand with the standard library, independently of
// the JWT library the gateway uses, so a bug there cannot cancel out here.

var (
	tokensMu sync.Mutex
	minted   []string
)

// remember records a token so the log check can look for it.
func remember(tok string) string {
	tokensMu.Lock()
	minted = append(minted, tok)
	tokensMu.Unlock()
	return tok
}

// tokenLeaks reports minted tokens (or their signatures) found in logs.
func tokenLeaks(logs string) []string {
	tokensMu.Lock()
	defer tokensMu.Unlock()
	var out []string
	for _, tok := range minted {
		sig := tok[strings.LastIndexByte(tok, '.')+1:]
		if strings.Contains(logs, tok) || (len(sig) > 16 && strings.Contains(logs, sig)) {
			out = append(out, tok)
		}
	}
	return out
}

func b64(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

type keys struct {
	hmac    []byte
	rsa     *rsa.PrivateKey
	ec256   *ecdsa.PrivateKey
	ec384   *ecdsa.PrivateKey
	ed      ed25519.PrivateKey
	rsaPEM  string // file paths of the public keys
	ec256PE string
	ec384PE string
	edPEM   string
	rsaPub  []byte // PEM bytes of the RSA public key (for the confusion attack)
}

func newKeys(t testing.TB) *keys {
	t.Helper()
	k := &keys{hmac: []byte("0123456789abcdef0123456789abcdef-test-secret")}
	var err error
	if k.rsa, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		t.Fatal(err)
	}
	k.ec256, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	k.ec384, _ = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	_, k.ed, _ = ed25519.GenerateKey(rand.Reader)
	dir := t.TempDir()
	write := func(name string, pub any) (string, []byte) {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		p := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
		path := filepath.Join(dir, name)
		os.WriteFile(path, p, 0o600)
		return path, p
	}
	k.rsaPEM, k.rsaPub = write("rsa.pem", &k.rsa.PublicKey)
	k.ec256PE, _ = write("ec256.pem", &k.ec256.PublicKey)
	k.ec384PE, _ = write("ec384.pem", &k.ec384.PublicKey)
	k.edPEM, _ = write("ed.pem", k.ed.Public())
	return k
}

// sign makes a compact JWS with alg over claims; kid is set when non-empty.
func (k *keys) sign(t testing.TB, alg, kid string, claims map[string]any) string {
	t.Helper()
	hdr := map[string]any{"alg": alg, "typ": "JWT"}
	if kid != "" {
		hdr["kid"] = kid
	}
	hb, _ := json.Marshal(hdr)
	cb, _ := json.Marshal(claims)
	input := b64(hb) + "." + b64(cb)
	var sig []byte
	digest := func(h hash.Hash) []byte { h.Write([]byte(input)); return h.Sum(nil) }
	switch alg {
	case "none":
		sig = nil
	case "HS256":
		m := hmac.New(sha256.New, k.hmac)
		m.Write([]byte(input))
		sig = m.Sum(nil)
	case "RS256":
		sig, _ = rsa.SignPKCS1v15(rand.Reader, k.rsa, crypto.SHA256, digest(sha256.New()))
	case "PS256":
		sig, _ = rsa.SignPSS(rand.Reader, k.rsa, crypto.SHA256, digest(sha256.New()), &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	case "ES256":
		sig = ecSig(t, k.ec256, digest(sha256.New()), 32)
	case "ES384":
		sig = ecSig(t, k.ec384, digest(sha512.New384()), 48)
	case "EdDSA":
		sig = ed25519.Sign(k.ed, []byte(input))
	default:
		t.Fatalf("alg %s", alg)
	}
	return remember(input + "." + b64(sig))
}

// hmacWith signs HS256 with an arbitrary secret (the RS/HS confusion attack
// uses the RSA public key PEM as the secret).
func hmacWith(secret []byte, kid string, claims map[string]any) string {
	hdr := map[string]any{"alg": "HS256", "typ": "JWT"}
	if kid != "" {
		hdr["kid"] = kid
	}
	return hmacHeader(secret, hdr, claims)
}

// hmacHeader signs HS256 under an arbitrary protected header.
func hmacHeader(secret []byte, hdr, claims map[string]any) string {
	hb, _ := json.Marshal(hdr)
	cb, _ := json.Marshal(claims)
	input := b64(hb) + "." + b64(cb)
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(input))
	return remember(input + "." + b64(m.Sum(nil)))
}

func ecSig(t testing.TB, key *ecdsa.PrivateKey, digest []byte, size int) []byte {
	r, s, err := ecdsa.Sign(rand.Reader, key, digest)
	if err != nil {
		t.Fatal(err)
	}
	out := make([]byte, 2*size)
	r.FillBytes(out[:size])
	s.FillBytes(out[size:])
	return out
}

// claims builds a claim set valid for an hour.
func claims(iss, sub string, extra ...any) map[string]any {
	now := time.Now()
	c := map[string]any{"iss": iss, "sub": sub, "aud": "wsgate-test", "iat": now.Unix(), "exp": now.Add(time.Hour).Unix()}
	for i := 0; i+1 < len(extra); i += 2 {
		c[extra[i].(string)] = extra[i+1]
	}
	return c
}

// jwk renders a public key as a JWK.
func jwk(kid string, pub any) map[string]any {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		return map[string]any{"kty": "RSA", "kid": kid, "use": "sig", "n": b64(k.N.Bytes()), "e": b64(big.NewInt(int64(k.E)).Bytes())}
	case *ecdsa.PublicKey:
		size := (k.Curve.Params().BitSize + 7) / 8
		x, y := make([]byte, size), make([]byte, size)
		k.X.FillBytes(x)
		k.Y.FillBytes(y)
		return map[string]any{"kty": "EC", "kid": kid, "use": "sig", "crv": k.Curve.Params().Name, "x": b64(x), "y": b64(y)}
	}
	panic("unsupported key")
}
