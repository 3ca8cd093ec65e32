package caddymodule

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/spf13/cobra"

	"github.com/wsgate/wsgate/internal/redistest"
	"github.com/wsgate/wsgate/policy"
)

// testNow is the clock of the minted tokens and of their verifier.
var testNow = time.Date(2031, 5, 6, 7, 8, 9, 0, time.UTC)

// runCommand runs a command set up by setup with args, and returns what
// it wrote to stdout.
func runCommand(t *testing.T, setup func(*cobra.Command), args ...string) (string, error) {
	t.Helper()
	cmd := &cobra.Command{Use: "test", SilenceUsage: true, SilenceErrors: true}
	setup(cmd)
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetArgs(args)
	err := cmd.ExecuteContext(context.Background())
	return out.String(), err
}

// keyFiles writes a private key as PEM (in the given block type) and
// returns the file's path and the PEM of the public key.
func keyFiles(t *testing.T, key crypto.Signer, blockType string) (string, []byte) {
	t.Helper()
	var der []byte
	var err error
	switch blockType {
	case "PRIVATE KEY":
		der, err = x509.MarshalPKCS8PrivateKey(key)
	case "RSA PRIVATE KEY":
		der = x509.MarshalPKCS1PrivateKey(key.(*rsa.PrivateKey))
	case "EC PRIVATE KEY":
		der, err = x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
	}
	if err != nil {
		t.Fatal(err)
	}
	var file []byte
	if blockType == "EC PRIVATE KEY" {
		// as `openssl ecparam -genkey` writes it: the curve first
		file = pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07}})
	}
	file = append(file, pem.EncodeToMemory(&pem.Block{Type: blockType, Bytes: der})...)
	path := filepath.Join(t.TempDir(), "key.pem")
	if err := os.WriteFile(path, file, 0o600); err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
}

func mustKey[K crypto.Signer](t *testing.T) func(K, error) K {
	return func(k K, err error) K {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
}

// TestTokenCommandVerifies mints tokens with every kind of key and checks
// that the gateway's own verifier, configured as a jwt block would be,
// accepts them with the claims the flags gave.
func TestTokenCommandVerifies(t *testing.T) {
	rsaKey := mustKey[*rsa.PrivateKey](t)(rsa.GenerateKey(rand.Reader, 2048))
	p256 := mustKey[*ecdsa.PrivateKey](t)(ecdsa.GenerateKey(elliptic.P256(), rand.Reader))
	p384 := mustKey[*ecdsa.PrivateKey](t)(ecdsa.GenerateKey(elliptic.P384(), rand.Reader))
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rsaPKCS8, rsaPub := keyFiles(t, rsaKey, "PRIVATE KEY")
	rsaPKCS1, _ := keyFiles(t, rsaKey, "RSA PRIVATE KEY")
	ecSEC1, ecPub := keyFiles(t, p256, "EC PRIVATE KEY")
	ecPKCS8, _ := keyFiles(t, p256, "PRIVATE KEY")
	ec384, ec384Pub := keyFiles(t, p384, "PRIVATE KEY")
	edFile, edPub := keyFiles(t, edKey, "PRIVATE KEY")
	t.Setenv("TEST_WSGATE_SECRET", testSecret)

	for _, tc := range []struct {
		name    string
		keyArgs []string
		key     policy.KeyConfig // what the gateway holds
		alg     string           // the header's alg
	}{
		{"HS256 secret", []string{"--secret", testSecret}, policy.KeyConfig{Secret: []byte(testSecret)}, "HS256"},
		{"HS256 secret from the environment", []string{"--secret-env", "TEST_WSGATE_SECRET"}, policy.KeyConfig{Secret: []byte(testSecret)}, "HS256"},
		{"HS512 secret", []string{"--secret", testSecret, "--alg", "HS512"}, policy.KeyConfig{Secret: []byte(testSecret), Algorithms: []string{"HS512"}}, "HS512"},
		{"RS256 PKCS #8", []string{"--key", rsaPKCS8}, policy.KeyConfig{PEM: rsaPub}, "RS256"},
		{"RS256 PKCS #1", []string{"--key", rsaPKCS1}, policy.KeyConfig{PEM: rsaPub}, "RS256"},
		{"PS256", []string{"--key", rsaPKCS8, "--alg", "PS256"}, policy.KeyConfig{PEM: rsaPub, Algorithms: []string{"PS256"}}, "PS256"},
		{"ES256 SEC 1 after EC PARAMETERS", []string{"--key", ecSEC1}, policy.KeyConfig{PEM: ecPub}, "ES256"},
		{"ES256 PKCS #8", []string{"--key", ecPKCS8}, policy.KeyConfig{PEM: ecPub}, "ES256"},
		{"ES384", []string{"--key", ec384}, policy.KeyConfig{PEM: ec384Pub}, "ES384"},
		{"EdDSA", []string{"--key", edFile}, policy.KeyConfig{PEM: edPub}, "EdDSA"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.key.ID = "k1"
			args := append(slices.Clone(tc.keyArgs), "--kid", "k1", "--sub", "u-7", "--iss", "https://id.example",
				"--aud", "chat", "--aud", "admin,ops", "--ttl", "90m",
				"--claim", "org=acme", "--claim", `rooms=["a","b,c"]`, "--claim", "n=42", "--claim", `id="42"`,
				"--claim", "admin=true", "--claim", "note=a=b")
			out, err := runCommand(t, tokenCobra(func() time.Time { return testNow }), args...)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasSuffix(out, "\n") || strings.Count(out, "\n") != 1 {
				t.Fatalf("output %q: want the token on one line", out)
			}
			tok := strings.TrimSpace(out)
			verify := func(at time.Time) (policy.Claims, error) {
				v, err := policy.NewVerifier(context.Background(), policy.JWTConfig{
					Issuers: []policy.IssuerConfig{{Issuer: "https://id.example", Audience: []string{"chat"}, Keys: []policy.KeyConfig{tc.key}}},
					Now:     func() time.Time { return at },
				})
				if err != nil {
					t.Fatal(err)
				}
				return v.Verify(context.Background(), tok)
			}
			claims, err := verify(testNow)
			if err != nil {
				t.Fatalf("the gateway refuses the token: %v", err)
			}
			want := map[string]any{
				"sub": "u-7", "iss": "https://id.example", "aud": []any{"chat", "admin,ops"},
				"org": "acme", "rooms": []any{"a", "b,c"}, "n": 42.0, "id": "42", "admin": true, "note": "a=b",
				"iat": float64(testNow.Unix()), "exp": float64(testNow.Add(90 * time.Minute).Unix()),
			}
			got, _ := json.Marshal(map[string]any(claims))
			wantJSON, _ := json.Marshal(want)
			if string(got) != string(wantJSON) {
				t.Fatalf("claims\n got %s\nwant %s", got, wantJSON)
			}
			hdr := tokenHeader(t, tok)
			if hdr["alg"] != tc.alg || hdr["kid"] != "k1" {
				t.Fatalf("header %v: want alg %s, kid k1", hdr, tc.alg)
			}
			// the ttl is the token's lifetime
			if _, err := verify(testNow.Add(90*time.Minute + time.Second)); err == nil || !strings.Contains(err.Error(), "expired") {
				t.Fatalf("after the ttl: %v, want expired", err)
			}
		})
	}
}

func tokenHeader(t *testing.T, tok string) map[string]any {
	t.Helper()
	var hdr map[string]any
	seg, _, _ := strings.Cut(tok, ".")
	b, err := base64.RawURLEncoding.DecodeString(seg)
	if err == nil {
		err = json.Unmarshal(b, &hdr)
	}
	if err != nil {
		t.Fatalf("token header: %v", err)
	}
	return hdr
}

// TestTokenCommandDefaults: no --ttl means one hour; --ttl 0 leaves exp
// out, which only allow_missing_exp accepts.
func TestTokenCommandDefaults(t *testing.T) {
	for _, tc := range []struct {
		name    string
		args    []string
		wantExp any
	}{
		{"default ttl", nil, float64(testNow.Add(time.Hour).Unix())},
		{"no exp", []string{"--ttl", "0"}, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCommand(t, tokenCobra(func() time.Time { return testNow }), append([]string{"--secret", testSecret}, tc.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			for _, allowMissing := range []bool{false, true} {
				v, err := policy.NewVerifier(context.Background(), policy.JWTConfig{
					Issuers:         []policy.IssuerConfig{{Keys: []policy.KeyConfig{{Secret: []byte(testSecret)}}}},
					AllowMissingExp: allowMissing, Now: func() time.Time { return testNow },
				})
				if err != nil {
					t.Fatal(err)
				}
				claims, err := v.Verify(context.Background(), strings.TrimSpace(out))
				if tc.wantExp == nil && !allowMissing {
					if err == nil {
						t.Fatal("a token without exp passes a verifier that requires exp")
					}
					continue
				}
				if err != nil {
					t.Fatalf("allow_missing_exp %v: %v", allowMissing, err)
				}
				if claims["exp"] != tc.wantExp || claims.Subject() != "" {
					t.Fatalf("exp %v sub %q: want exp %v and no sub", claims["exp"], claims.Subject(), tc.wantExp)
				}
			}
		})
	}
}

func TestTokenCommandRefuses(t *testing.T) {
	rsaKey := mustKey[*rsa.PrivateKey](t)(rsa.GenerateKey(rand.Reader, 2048))
	rsaFile, rsaPub := keyFiles(t, rsaKey, "PRIVATE KEY")
	p384 := mustKey[*ecdsa.PrivateKey](t)(ecdsa.GenerateKey(elliptic.P384(), rand.Reader))
	ec384, _ := keyFiles(t, p384, "PRIVATE KEY")
	dir := t.TempDir()
	pubFile := filepath.Join(dir, "pub.pem")
	encrypted := filepath.Join(dir, "enc.pem")
	garbage := filepath.Join(dir, "garbage.pem")
	for path, data := range map[string][]byte{
		pubFile:   rsaPub,
		encrypted: pem.EncodeToMemory(&pem.Block{Type: "ENCRYPTED PRIVATE KEY", Bytes: []byte{1}}),
		garbage:   []byte("not a key"),
	} {
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("TEST_WSGATE_EMPTY", "")

	for _, tc := range []struct {
		name string
		args []string
		want string // in the error
	}{
		{"no key", []string{"--sub", "u"}, "exactly one of --secret, --secret-env, --key or --config"},
		{"two keys", []string{"--secret", testSecret, "--key", rsaFile}, "exactly one of"},
		{"short secret", []string{"--secret", testSecret[:31]}, "at least 32 bytes"},
		{"unset secret variable", []string{"--secret-env", "TEST_WSGATE_UNSET_VARIABLE"}, "TEST_WSGATE_UNSET_VARIABLE is unset or empty"},
		{"empty secret variable", []string{"--secret-env", "TEST_WSGATE_EMPTY"}, "TEST_WSGATE_EMPTY is unset or empty"},
		{"missing key file", []string{"--key", filepath.Join(dir, "nope.pem")}, "reading private key"},
		{"public key as private key", []string{"--key", pubFile}, `PEM block "PUBLIC KEY" is not a private key`},
		{"encrypted key", []string{"--key", encrypted}, "encrypted"},
		{"no PEM", []string{"--key", garbage}, "no PEM private key found"},
		{"alg none", []string{"--secret", testSecret, "--alg", "none"}, `unknown algorithm "none"`},
		{"unknown alg", []string{"--secret", testSecret, "--alg", "HS999"}, `unknown algorithm "HS999"`},
		{"RSA alg with a secret", []string{"--secret", testSecret, "--alg", "RS256"}, "RS256 does not fit this key (it takes HS256, HS384, HS512)"},
		{"HMAC alg with an RSA key", []string{"--key", rsaFile, "--alg", "HS256"}, "HS256 does not fit this key"},
		{"ES256 with a P-384 key", []string{"--key", ec384, "--alg", "ES256"}, "ES256 does not fit this key (it takes ES384)"},
		{"claim without value", []string{"--secret", testSecret, "--claim", "org"}, `--claim "org": want name=value`},
		{"claim without name", []string{"--secret", testSecret, "--claim", "=acme"}, "want name=value"},
		{"claim twice", []string{"--secret", testSecret, "--claim", "org=a", "--claim", "org=b"}, "--claim org given twice"},
		{"claim and its flag", []string{"--secret", testSecret, "--sub", "a", "--claim", "sub=b"}, "--claim sub: the claim is set by its own flag"},
		{"exp as a claim", []string{"--secret", testSecret, "--claim", "exp=1"}, "--claim exp: the claim is set by its own flag"},
		{"negative ttl", []string{"--secret", testSecret, "--ttl", "-1m"}, "must not be negative"},
		{"bad ttl", []string{"--secret", testSecret, "--ttl", "soon"}, "invalid argument"},
		{"stray argument", []string{"--secret", testSecret, "u-7"}, "unknown command"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := runCommand(t, tokenCobra(time.Now), tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
			if out != "" {
				t.Fatalf("wrote %q despite the error", out)
			}
		})
	}
}

// TestPublishCommandHTTP publishes through a real wsgate_publish handler
// and checks what its subscribers get.
func TestPublishCommandHTTP(t *testing.T) {
	f := newPublishFixture(t, false)
	var requests atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		requests.Add(1)
		if ct := r.Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
		f.p.ServeHTTP(w, r, nil)
	}))
	defer srv.Close()
	t.Setenv("TEST_WSGATE_PUBLISH_KEY", testPublishKey)

	for _, tc := range []struct {
		name string
		args []string
		out  string // stdout
		err  string // in the error, if any
		got  []string
	}{
		{"object", []string{"--channel", "a", "--data", `{"text": "hi"}`, "--key", testPublishKey},
			"{\"accepted\":1,\"duplicates\":0}\n", "", []string{`a {"text": "hi"}`}},
		{"key from the environment, string data", []string{"--channel", "c:d", "--data", `"hé"`, "--key-env", "TEST_WSGATE_PUBLISH_KEY"},
			"{\"accepted\":1,\"duplicates\":0}\n", "", []string{`c:d "hé"`}},
		{"idempotency key, first", []string{"--channel", "b", "--data", "1", "--key", testPublishKey, "--idempotency-key", "ev-1"},
			"{\"accepted\":1,\"duplicates\":0}\n", "", []string{"b 1"}},
		{"idempotency key, again", []string{"--channel", "b", "--data", "1", "--key", testPublishKey, "--idempotency-key", "ev-1"},
			"{\"accepted\":0,\"duplicates\":1}\n", "", nil},
		{"wrong key", []string{"--channel", "a", "--data", "1", "--key", "wrong-key-0123456789"},
			"", "answered 401: unauthorized", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(f.got.all())
			out, err := runCommand(t, publishCobra, append(tc.args, "--url", srv.URL+"/publish")...)
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Fatalf("error %v, want %q", err, tc.err)
			}
			if out != tc.out {
				t.Fatalf("stdout %q, want %q", out, tc.out)
			}
			if got := f.got.all()[before:]; !slices.Equal(got, tc.got) {
				t.Fatalf("subscribers got %q, want %q", got, tc.got)
			}
		})
	}

	// What the gateway would refuse is refused before any request.
	n := requests.Load()
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"no channel", []string{"--data", "1"}, "invalid channel name"},
		{"bad channel", []string{"--channel", "a b", "--data", "1"}, "invalid channel name"},
		{"empty segment", []string{"--channel", "a::b", "--data", "1"}, "invalid channel name"},
		{"no data", []string{"--channel", "a"}, "--data is required"},
		{"data not JSON", []string{"--channel", "a", "--data", "hi"}, `--data: invalid data: not valid JSON (a string is written with quotes: '"hi"')`},
		{"two JSON values", []string{"--channel", "a", "--data", "1 2"}, "not valid JSON"},
		{"data not UTF-8", []string{"--channel", "a", "--data", "\"\xff\""}, "not valid UTF-8"},
		{"bad idempotency key", []string{"--channel", "a", "--data", "1", "--idempotency-key", "a\nb"}, "printable ASCII"},
		{"no key", []string{"--channel", "a", "--data", "1", "--key", ""}, "--key or --key-env is required"},
		{"both keys", []string{"--channel", "a", "--data", "1", "--key-env", "TEST_WSGATE_PUBLISH_KEY"}, "not both"},
		{"unset key variable", []string{"--channel", "a", "--data", "1", "--key", "", "--key-env", "TEST_WSGATE_UNSET_VARIABLE"}, "TEST_WSGATE_UNSET_VARIABLE is unset or empty"},
		{"url and redis", []string{"--channel", "a", "--data", "1", "--redis", "redis://127.0.0.1:1"}, "either --url"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--url", srv.URL + "/publish", "--key", testPublishKey}, tc.args...)
			_, err := runCommand(t, publishCobra, args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
	if got := requests.Load(); got != n {
		t.Fatalf("%d requests sent for publications the gateway would refuse", got-n)
	}
	if _, err := runCommand(t, publishCobra, "--channel", "a", "--data", "1"); err == nil || !strings.Contains(err.Error(), "either --url") {
		t.Fatalf("neither --url nor --redis: %v", err)
	}
}

// TestPublishCommandRedis publishes straight to a real Redis and reads the
// message as a gateway node subscribed to the channel would.
func TestPublishCommandRedis(t *testing.T) {
	srv := redistest.StartFree(t)
	client := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for _, tc := range []struct {
		name, prefix, channel, data string
	}{
		{"default prefix", "", "org:acme:general", `{"text": "hi"}`},
		{"own prefix", "chat:", "org:acme:general", `"hé"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.prefix
			args := []string{"--redis", srv.URL(), "--channel", tc.channel, "--data", tc.data}
			if tc.prefix == "" {
				want = "wsgate:"
			} else {
				args = append(args, "--prefix", tc.prefix)
			}
			sub := client.Subscribe(ctx, want+tc.channel)
			defer sub.Close()
			if _, err := sub.Receive(ctx); err != nil { // the subscription's confirmation
				t.Fatal(err)
			}
			out, err := runCommand(t, publishCobra, args...)
			if err != nil {
				t.Fatal(err)
			}
			if out != "published to Redis channel "+want+tc.channel+"\n" {
				t.Fatalf("stdout %q", out)
			}
			msg, err := sub.ReceiveMessage(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if msg.Channel != want+tc.channel || msg.Payload != tc.data {
				t.Fatalf("Redis got %q on %q, want %q on %q", msg.Payload, msg.Channel, tc.data, want+tc.channel)
			}
		})
	}

	t.Run("refused", func(t *testing.T) {
		for _, tc := range []struct {
			name string
			args []string
			want string
		}{
			{"idempotency key", []string{"--idempotency-key", "k"}, "--idempotency-key needs --url"},
			{"bad URL", []string{"--redis", "http://" + srv.Addr()}, "redis url"},
		} {
			t.Run(tc.name, func(t *testing.T) {
				args := append([]string{"--redis", srv.URL(), "--channel", "a", "--data", "1"}, tc.args...)
				if _, err := runCommand(t, publishCobra, args...); err == nil || !strings.Contains(err.Error(), tc.want) {
					t.Fatalf("error %v, want one containing %q", err, tc.want)
				}
			})
		}
	})

	t.Run("Redis down", func(t *testing.T) {
		srv.Kill()
		start := time.Now()
		_, err := runCommand(t, publishCobra, "--redis", srv.URL(), "--channel", "a", "--data", "1")
		if err == nil || !strings.Contains(err.Error(), "publishing to Redis: broker unavailable") {
			t.Fatalf("error %v, want broker unavailable", err)
		}
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("a Redis that is down took %v to report", d)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("error %v: the command's own timeout, not Redis's answer", err)
		}
	})
}

// TestTokenCommandFromConfig takes the secret, and what else the key says,
// from a Caddyfile's jwt blocks.
func TestTokenCommandFromConfig(t *testing.T) {
	rsaKey := mustKey[*rsa.PrivateKey](t)(rsa.GenerateKey(rand.Reader, 2048))
	_, rsaPub := keyFiles(t, rsaKey, "PRIVATE KEY")
	dir := t.TempDir()
	pubFile := filepath.Join(dir, "pub.pem")
	if err := os.WriteFile(pubFile, rsaPub, 0o600); err != nil {
		t.Fatal(err)
	}
	other := strings.Repeat("s", 40)
	caddyfile := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(caddyfile, []byte(`{
	admin off
}

:8080 {
	route {
		wsgate /ws {
			rooms {
			}
			jwt {
				issuer https://id.example {
					audience chat other
					secret {env.TEST_WSGATE_SECRET} kid k1
					secret `+other+` kid k2 alg HS512
				}
				issuer internal {
					public_key `+pubFile+`
				}
			}
		}
		wsgate_publish /publish {
			jwt {
				issuer https://id.example {
					audience chat other
					secret {env.TEST_WSGATE_SECRET} kid k1
				}
			}
		}
	}
}
`), 0o600); err != nil {
		t.Fatal(err)
	}
	plain := filepath.Join(dir, "plain.caddyfile")
	if err := os.WriteFile(plain, []byte(":8080 {\n\trespond hi\n}\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TEST_WSGATE_SECRET", testSecret)

	verifierFor := func(t *testing.T, key policy.KeyConfig) *policy.Verifier {
		t.Helper()
		v, err := policy.NewVerifier(context.Background(), policy.JWTConfig{
			Issuers: []policy.IssuerConfig{{Issuer: "https://id.example", Audience: []string{"chat"}, Keys: []policy.KeyConfig{key}}},
			Now:     func() time.Time { return testNow },
		})
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	for _, tc := range []struct {
		name string
		args []string
		key  policy.KeyConfig
		alg  string
	}{
		{"key k1, issuer and audience from the config", []string{"--kid", "k1"},
			policy.KeyConfig{ID: "k1", Secret: []byte(testSecret)}, "HS256"},
		{"key k2 with its algorithm", []string{"--iss", "https://id.example", "--kid", "k2"},
			policy.KeyConfig{ID: "k2", Secret: []byte(other), Algorithms: []string{"HS512"}}, "HS512"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--config", caddyfile, "--sub", "u-7"}, tc.args...)
			out, err := runCommand(t, tokenCobra(func() time.Time { return testNow }), args...)
			if err != nil {
				t.Fatal(err)
			}
			tok := strings.TrimSpace(out)
			claims, err := verifierFor(t, tc.key).Verify(context.Background(), tok)
			if err != nil {
				t.Fatalf("the gateway refuses the token: %v", err)
			}
			if claims.Subject() != "u-7" || claims["iss"] != "https://id.example" || claims["aud"] != "chat" {
				t.Fatalf("claims %v", claims)
			}
			if hdr := tokenHeader(t, tok); hdr["alg"] != tc.alg || hdr["kid"] != tc.key.ID {
				t.Fatalf("header %v, want alg %s kid %s", hdr, tc.alg, tc.key.ID)
			}
		})
	}

	for _, tc := range []struct {
		name string
		args []string
		env  string // TEST_WSGATE_SECRET
		want string
	}{
		{"several keys", []string{"--config", caddyfile}, testSecret,
			`several jwt keys; choose one with --iss and --kid: issuer "https://id.example" key id "k1" (secret); issuer "https://id.example" key id "k2" (secret); issuer "internal" key id "" (public key ` + pubFile + `)`},
		{"a public key", []string{"--config", caddyfile, "--iss", "internal"}, testSecret, "is verified with a public key; sign with its private key: --key"},
		{"no such issuer", []string{"--config", caddyfile, "--iss", "nobody"}, testSecret, `no jwt key for --iss "nobody" --kid ""; the config has: issuer "https://id.example" key id "k1"`},
		{"no jwt block", []string{"--config", plain}, testSecret, "no jwt key with a secret or public key"},
		{"unset secret variable", []string{"--config", caddyfile, "--kid", "k1"}, "", "the secret {env.TEST_WSGATE_SECRET} is empty"},
		{"short secret in the environment", []string{"--config", caddyfile, "--kid", "k1"}, "short", "at least 32 bytes"},
		{"config and secret", []string{"--config", caddyfile, "--secret", testSecret}, testSecret, "exactly one of"},
		{"adapter without config", []string{"--secret", testSecret, "--adapter", "caddyfile"}, testSecret, "--adapter needs --config"},
		{"missing config", []string{"--config", filepath.Join(dir, "nope")}, testSecret, "--config: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("TEST_WSGATE_SECRET", tc.env)
			_, err := runCommand(t, tokenCobra(time.Now), tc.args...)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one containing %q", err, tc.want)
			}
		})
	}
}
