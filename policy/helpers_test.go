package policy

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
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"hash"
	"math/big"
	"strings"
	"sync"
	"testing"
	"time"
)

// Tokens are minted here with the standard library only, never with
// golang-jwt, so that a bug in the library that verifies them cannot be
// cancelled out by the same bug in the code that makes them.

// b64 is the JWS base64url encoding, without padding.
func b64url(b []byte) string { return base64.RawURLEncoding.EncodeToString(b) }

// jsonSeg encodes v as a JWS segment.
func jsonSeg(t testing.TB, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b64url(b)
}

// hashFor gives the hash a JWS algorithm uses.
func hashFor(alg string) (crypto.Hash, func() hash.Hash) {
	switch alg[2:] {
	case "384":
		return crypto.SHA384, sha512.New384
	case "512":
		return crypto.SHA512, sha512.New
	}
	return crypto.SHA256, sha256.New
}

// sign makes the JWS signature of input with key, the way RFC 7518 says.
func signJWS(t testing.TB, alg string, key any, input string) []byte {
	t.Helper()
	if key == nil { // alg none and other unsigned tokens
		return nil
	}
	if alg == "EdDSA" {
		return ed25519.Sign(key.(ed25519.PrivateKey), []byte(input))
	}
	h, newHash := hashFor(alg)
	switch alg[:2] {
	case "HS":
		m := hmac.New(newHash, key.([]byte))
		m.Write([]byte(input))
		return m.Sum(nil)
	}
	d := newHash()
	d.Write([]byte(input))
	digest := d.Sum(nil)
	var sig []byte
	var err error
	switch alg[:2] {
	case "RS":
		sig, err = rsa.SignPKCS1v15(rand.Reader, key.(*rsa.PrivateKey), h, digest)
	case "PS":
		sig, err = rsa.SignPSS(rand.Reader, key.(*rsa.PrivateKey), h, digest,
			&rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	case "ES":
		k := key.(*ecdsa.PrivateKey)
		var r, s *big.Int
		r, s, err = ecdsa.Sign(rand.Reader, k, digest)
		if err == nil {
			// JWS wants R and S as fixed-size big-endian integers, not ASN.1
			size := (k.Curve.Params().BitSize + 7) / 8
			sig = make([]byte, 2*size)
			r.FillBytes(sig[:size])
			s.FillBytes(sig[size:])
		}
	default:
		t.Fatalf("sign: unknown algorithm %s", alg)
	}
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// mintRaw signs a token from a header and claims given as values that
// marshal to JSON objects.
func mintJWTRaw(t testing.TB, key any, header, claims any) string {
	t.Helper()
	alg := ""
	switch h := header.(type) {
	case map[string]any:
		alg, _ = h["alg"].(string)
	}
	input := jsonSeg(t, header) + "." + jsonSeg(t, claims)
	return input + "." + b64url(signJWS(t, alg, key, input))
}

// mint signs claims with alg and key; kid, if not empty, goes in the header.
func mintJWT(t testing.TB, alg, kid string, key any, claims map[string]any) string {
	t.Helper()
	header := map[string]any{"alg": alg, "typ": "JWT"}
	if kid != "" {
		header["kid"] = kid
	}
	return mintJWTRaw(t, key, header, claims)
}

// testKeys are generated once per test binary: RSA generation is slow,
// more so under -race.
type keyPairs struct {
	rsa, rsa2 *rsa.PrivateKey
	p256      *ecdsa.PrivateKey
	p384      *ecdsa.PrivateKey
	ed        ed25519.PrivateKey
}

var testKeyPairs = sync.OnceValue(func() keyPairs {
	var k keyPairs
	var err error
	if k.rsa, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		panic(err)
	}
	if k.rsa2, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
		panic(err)
	}
	if k.p256, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
		panic(err)
	}
	if k.p384, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader); err != nil {
		panic(err)
	}
	if _, k.ed, err = ed25519.GenerateKey(rand.Reader); err != nil {
		panic(err)
	}
	return k
})

// publicPEM encodes a public key as a PKIX "PUBLIC KEY" PEM block.
func publicPEM(t testing.TB, pub any) []byte {
	t.Helper()
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
}

// certPEM makes a self-signed certificate for priv's public key.
func certPEM(t testing.TB, priv crypto.Signer) []byte {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "issuer.test"},
		NotBefore:    time.Unix(0, 0),
		NotAfter:     time.Unix(4e9, 0),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// privatePEM encodes a private key the way people paste it by mistake.
func privatePEM(t testing.TB, typ string, priv any) []byte {
	t.Helper()
	var der []byte
	var err error
	switch typ {
	case "PRIVATE KEY":
		der, err = x509.MarshalPKCS8PrivateKey(priv)
	case "RSA PRIVATE KEY":
		der = x509.MarshalPKCS1PrivateKey(priv.(*rsa.PrivateKey))
	case "EC PRIVATE KEY":
		der, err = x509.MarshalECPrivateKey(priv.(*ecdsa.PrivateKey))
	}
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// leaks reports the parts of token (whole, and each long-enough segment)
// that appear in msg.
func tokenLeaks(msg, token string) []string {
	var found []string
	parts := []string{token}
	if strings.Count(token, ".") <= 2 {
		parts = append(parts, strings.Split(token, ".")...)
	}
	for _, p := range parts {
		if len(p) >= 8 && strings.Contains(msg, p) {
			found = append(found, p)
		}
	}
	return found
}
