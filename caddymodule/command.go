package caddymodule

import (
	"bytes"
	"context"
	"crypto"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/golang-jwt/jwt/v5"
	"github.com/spf13/cobra"

	"github.com/wsgate/wsgate/broker"
	"github.com/wsgate/wsgate/policy"
	"github.com/wsgate/wsgate/rooms"
)

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "wsgate-token",
		Usage: "--secret <secret> | --secret-env <NAME> | --key <private.pem> | --config <file> [--adapter <name>] [--alg <alg>] [--sub <subject>] [--iss <issuer>] [--aud <audience>]... [--ttl <duration>] [--kid <id>] [--claim <name>=<value>]...",
		Short: "Mints a development JWT that a wsgate jwt block accepts",
		Long: `
Signs a JWT with the secret or key a wsgate jwt block verifies with, and
writes it to stdout. For development and tests: production tokens come from
the identity provider.

Exactly one of:
--secret       the HMAC secret (at least 32 bytes, as the gateway requires)
--secret-env   the name of an environment variable that holds the secret
               (keeps it out of the shell history and the process list)
--key          a PEM private key file: RSA, ECDSA or Ed25519, PKCS #8,
               PKCS #1 or SEC 1 (the gateway holds the matching public key)
--config       the gateway's config (with --adapter, as caddy run takes
               them): the HMAC secret of a jwt block in it, with its
               placeholders ({env.NAME}) expanded; --iss and --kid choose
               among several keys, and the key's issuer, first audience, id
               and first algorithm are used unless flags say otherwise

--alg      the algorithm; default HS256 for a secret, RS256 for RSA, ES256,
           ES384 or ES512 by the curve, EdDSA for Ed25519
--sub      the subject (sub claim)
--iss      the issuer (iss claim): needed when the gateway has several issuers
--aud      an audience (aud claim); repeat for several
--ttl      the lifetime: exp is now + ttl; default 1h; 0 leaves exp out
           (only allow_missing_exp accepts such a token)
--kid      the key id (kid header), when the gateway's key has an id
--claim    name=value, repeatable: value is taken as JSON when it is JSON
           (org=acme is the string "acme"; rooms='["a","b"]' is an array;
           n=3 is a number; id='"3"' is the string "3")

Examples:
  caddy wsgate-token --secret-env CHAT_JWT_SECRET --sub u-7 --claim org=acme
  caddy wsgate-token --config Caddyfile --sub u-7 --claim org=acme
`,
		CobraFunc: tokenCobra(time.Now),
	})
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "wsgate-publish",
		Usage: "--channel <channel> --data <json> (--url <publish URL> [--key <key> | --key-env <NAME>] [--idempotency-key <key>] | --redis <URL> [--prefix <prefix>])",
		Short: "Publishes a message to a wsgate channel",
		Long: `
Publishes one message to a channel, checked the way the gateway checks it
(a valid channel name; data that is JSON in valid UTF-8), either through a
wsgate_publish endpoint or straight to Redis.

--channel   the channel, e.g. org:acme:general
--data      the message, any JSON value: '{"text":"hi"}', '"hi"', 42

Over HTTP (what a backend does with POST /publish):
--url              the wsgate_publish endpoint, e.g. https://chat.example.com/publish
--key              the endpoint's bearer key (or a JWT it accepts)
--key-env          the name of an environment variable that holds the key
--idempotency-key  the publication's idempotency key

Straight to Redis (PUBLISH <prefix><channel> <data>, what any app can do):
--redis     the broker's redis:// or rediss:// URL
--prefix    the broker's prefix; default wsgate:

The endpoint's answer ({"accepted":1,"duplicates":0}) is written to stdout;
any other answer is an error that quotes it.

Example:
  caddy wsgate-publish --url http://localhost:8080/publish --key-env CHAT_PUBLISH_KEY \
    --channel org:acme:general --data '{"text":"deploy done"}'
`,
		CobraFunc: publishCobra,
	})
}

// tokenOptions are the flags of `caddy wsgate-token`.
type tokenOptions struct {
	Secret    string
	SecretEnv string
	KeyFile   string
	Config    string
	Adapter   string
	Alg       string
	Sub       string
	Iss       string
	Aud       []string
	TTL       time.Duration
	Kid       string
	Claims    []string // name=value
	Now       func() time.Time
}

// tokenCobra sets up the flags of wsgate-token; now is the clock.
func tokenCobra(now func() time.Time) func(*cobra.Command) {
	return func(cmd *cobra.Command) {
		o := tokenOptions{Now: now}
		f := cmd.Flags()
		f.StringVar(&o.Secret, "secret", "", "HMAC secret (at least 32 bytes)")
		f.StringVar(&o.SecretEnv, "secret-env", "", "name of the environment variable holding the HMAC secret")
		f.StringVar(&o.KeyFile, "key", "", "PEM private key file (RSA, ECDSA, Ed25519)")
		f.StringVar(&o.Config, "config", "", "the gateway's config file, to take the HMAC secret of a jwt block")
		f.StringVar(&o.Adapter, "adapter", "", "name of the config adapter (as caddy run takes it)")
		f.StringVar(&o.Alg, "alg", "", "signing algorithm (default by key type)")
		f.StringVar(&o.Sub, "sub", "", "subject (sub claim)")
		f.StringVar(&o.Iss, "iss", "", "issuer (iss claim)")
		// StringArray, not StringSlice: a value may hold commas.
		f.StringArrayVar(&o.Aud, "aud", nil, "audience (aud claim); repeatable")
		f.DurationVar(&o.TTL, "ttl", time.Hour, "lifetime (exp = now + ttl; 0: no exp)")
		f.StringVar(&o.Kid, "kid", "", "key id (kid header)")
		f.StringArrayVar(&o.Claims, "claim", nil, "name=value claim, value as JSON if it is JSON; repeatable")
		cmd.Args = cobra.NoArgs
		cmd.RunE = func(cmd *cobra.Command, _ []string) error {
			tok, err := mintToken(o)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok)
			return err
		}
	}
}

// mintToken signs a token as tokenOptions say.
func mintToken(o tokenOptions) (string, error) {
	var sign, verify any // the key that signs, and the one the gateway holds
	switch given := countSet(o.Secret, o.SecretEnv, o.KeyFile, o.Config); {
	case given != 1:
		return "", errors.New("give exactly one of --secret, --secret-env, --key or --config")
	case o.Adapter != "" && o.Config == "":
		return "", errors.New("--adapter needs --config")
	case o.Config != "":
		if err := o.secretFromConfig(); err != nil {
			return "", err
		}
		fallthrough
	case o.KeyFile == "":
		secret := o.Secret
		if o.SecretEnv != "" {
			if secret = os.Getenv(o.SecretEnv); secret == "" {
				return "", fmt.Errorf("environment variable %s is unset or empty", o.SecretEnv)
			}
		}
		if err := policy.CheckSecret([]byte(secret)); err != nil {
			return "", err
		}
		sign, verify = []byte(secret), []byte(secret)
	default:
		k, err := readPrivateKey(o.KeyFile)
		if err != nil {
			return "", err
		}
		sign, verify = k, k.Public()
	}
	fit := policy.KeyAlgorithms(verify)
	if len(fit) == 0 {
		return "", fmt.Errorf("unsupported key type %T", verify)
	}
	alg := o.Alg
	if alg == "" {
		alg = fit[0]
	}
	if err := policy.CheckAlgorithm(alg); err != nil {
		return "", err
	}
	if !slices.Contains(fit, alg) {
		return "", fmt.Errorf("algorithm %s does not fit this key (it takes %s)", alg, strings.Join(fit, ", "))
	}

	claims := jwt.MapClaims{}
	for _, c := range o.Claims {
		name, value, ok := strings.Cut(c, "=")
		if !ok || name == "" {
			return "", fmt.Errorf("--claim %q: want name=value", c)
		}
		if _, dup := claims[name]; dup {
			return "", fmt.Errorf("--claim %s given twice", name)
		}
		if json.Valid([]byte(value)) {
			claims[name] = json.RawMessage(value)
		} else {
			claims[name] = value
		}
	}
	if o.TTL < 0 {
		return "", fmt.Errorf("--ttl %v: must not be negative", o.TTL)
	}
	now := o.Now
	if now == nil {
		now = time.Now
	}
	t := now()
	var aud any = o.Aud
	if len(o.Aud) == 1 {
		aud = o.Aud[0]
	}
	for _, c := range []struct {
		name  string
		value any
		given bool
	}{
		{"iat", t.Unix(), true},
		{"exp", t.Add(o.TTL).Unix(), o.TTL > 0},
		{"sub", o.Sub, o.Sub != ""},
		{"iss", o.Iss, o.Iss != ""},
		{"aud", aud, len(o.Aud) > 0},
	} {
		if !c.given {
			continue
		}
		if _, dup := claims[c.name]; dup {
			return "", fmt.Errorf("--claim %s: the claim is set by its own flag (--sub, --iss, --aud, --ttl), or is iat", c.name)
		}
		claims[c.name] = c.value
	}
	tok := jwt.NewWithClaims(jwt.GetSigningMethod(alg), claims)
	if o.Kid != "" {
		tok.Header["kid"] = o.Kid
	}
	s, err := tok.SignedString(sign)
	if err != nil {
		return "", fmt.Errorf("signing: %w", err)
	}
	return s, nil
}

// secretFromConfig sets o.Secret, and the issuer, audience, key id and
// algorithm not given by flags, from the one jwt key of the config that
// --iss and --kid select.
func (o *tokenOptions) secretFromConfig() error {
	cfg, _, _, err := caddycmd.LoadConfig(o.Config, o.Adapter)
	if err != nil {
		return fmt.Errorf("--config: %w", err)
	}
	type candidate struct {
		issuer JWTIssuer
		key    JWTKey
	}
	var all, match []candidate
	for _, j := range jwtBlocks(cfg) {
		for _, is := range j.Issuers {
			for _, k := range is.Keys {
				c := candidate{is, k}
				if slices.ContainsFunc(all, func(a candidate) bool {
					return a.issuer.Issuer == c.issuer.Issuer && a.key.ID == c.key.ID && a.key.Secret == c.key.Secret && a.key.PublicKeyFile == c.key.PublicKeyFile
				}) {
					continue // the same key in several handlers
				}
				all = append(all, c)
				if (o.Iss == "" || o.Iss == is.Issuer) && (o.Kid == "" || o.Kid == k.ID) {
					match = append(match, c)
				}
			}
		}
	}
	describe := func(cs []candidate) string {
		var d []string
		for _, c := range cs {
			kind := "secret"
			if c.key.Secret == "" {
				kind = "public key " + c.key.PublicKeyFile
			}
			d = append(d, fmt.Sprintf("issuer %q key id %q (%s)", c.issuer.Issuer, c.key.ID, kind))
		}
		return strings.Join(d, "; ")
	}
	switch {
	case len(all) == 0:
		return fmt.Errorf("--config %s: no jwt key with a secret or public key in any wsgate or wsgate_publish handler", o.Config)
	case len(match) == 0:
		return fmt.Errorf("--config %s: no jwt key for --iss %q --kid %q; the config has: %s", o.Config, o.Iss, o.Kid, describe(all))
	case len(match) > 1:
		return fmt.Errorf("--config %s: several jwt keys; choose one with --iss and --kid: %s", o.Config, describe(match))
	}
	c := match[0]
	if c.key.Secret == "" {
		return fmt.Errorf("--config %s: %s is verified with a public key; sign with its private key: --key <private.pem>", o.Config, describe(match))
	}
	o.Secret = caddy.NewReplacer().ReplaceKnown(c.key.Secret, "")
	if o.Secret == "" {
		return fmt.Errorf("--config %s: the secret %s is empty (unset environment variable?)", o.Config, c.key.Secret)
	}
	if o.Iss == "" {
		o.Iss = c.issuer.Issuer
	}
	if len(o.Aud) == 0 && len(c.issuer.Audience) > 0 {
		o.Aud = c.issuer.Audience[:1]
	}
	if o.Kid == "" {
		o.Kid = c.key.ID
	}
	if o.Alg == "" && len(c.key.Algorithms) > 0 {
		o.Alg = c.key.Algorithms[0]
	}
	return nil
}

// jwtBlocks finds the jwt blocks of the wsgate and wsgate_publish
// handlers anywhere in a JSON config (in routes, subroutes, any app).
func jwtBlocks(cfg []byte) []JWT {
	var root any
	if json.Unmarshal(cfg, &root) != nil {
		return nil
	}
	var out []JWT
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if h, _ := v["handler"].(string); (h == "wsgate" || h == "wsgate_publish") && v["jwt"] != nil {
				b, _ := json.Marshal(v["jwt"])
				var j JWT
				if json.Unmarshal(b, &j) == nil {
					out = append(out, j)
				}
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(root)
	return out
}

func countSet(values ...string) int {
	n := 0
	for _, v := range values {
		if v != "" {
			n++
		}
	}
	return n
}

// readPrivateKey reads the first private key of a PEM file.
func readPrivateKey(path string) (crypto.Signer, error) {
	rest, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading private key: %w", err)
	}
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, fmt.Errorf("%s: no PEM private key found", path)
		}
		var key any
		switch block.Type {
		case "EC PARAMETERS": // what `openssl ecparam -genkey` puts first
			continue
		case "PRIVATE KEY":
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "ENCRYPTED PRIVATE KEY":
			return nil, fmt.Errorf("%s: the private key is encrypted; decrypt it first (openssl pkey -in key.pem -out plain.pem)", path)
		default:
			return nil, fmt.Errorf("%s: PEM block %q is not a private key (the gateway verifies with the public key; signing needs the private one)", path, block.Type)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		signer, ok := key.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("%s: unsupported private key type %T", path, key)
		}
		return signer, nil
	}
}

// publishOptions are the flags of `caddy wsgate-publish`.
type publishOptions struct {
	Channel        string
	Data           string
	URL            string
	Key            string
	KeyEnv         string
	IdempotencyKey string
	Redis          string
	Prefix         string
	// Client sends the HTTP request; nil means a client with a 10 s timeout.
	Client *http.Client
}

// publishTimeout bounds a publication from the command line.
const publishTimeout = 10 * time.Second

func publishCobra(cmd *cobra.Command) {
	var o publishOptions
	f := cmd.Flags()
	f.StringVar(&o.Channel, "channel", "", "channel to publish to")
	f.StringVar(&o.Data, "data", "", "message: a JSON value")
	f.StringVar(&o.URL, "url", "", "wsgate_publish endpoint")
	f.StringVar(&o.Key, "key", "", "bearer key of the endpoint")
	f.StringVar(&o.KeyEnv, "key-env", "", "name of the environment variable holding the endpoint's key")
	f.StringVar(&o.IdempotencyKey, "idempotency-key", "", "idempotency key of the publication (HTTP only)")
	f.StringVar(&o.Redis, "redis", "", "Redis URL, to publish without the gateway")
	f.StringVar(&o.Prefix, "prefix", defaultPrefix, "the broker's channel prefix on Redis")
	cmd.Args = cobra.NoArgs
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		ctx, cancel := context.WithTimeout(cmd.Context(), publishTimeout)
		defer cancel()
		return publish(ctx, o, cmd.OutOrStdout())
	}
}

// publish sends one publication and writes the outcome to out. It checks
// the publication as wsgate_publish does before sending anything.
func publish(ctx context.Context, o publishOptions, out io.Writer) error {
	if countSet(o.URL, o.Redis) != 1 {
		return errors.New("give either --url (a wsgate_publish endpoint) or --redis (the broker's Redis)")
	}
	if o.Data == "" {
		return errors.New(`--data is required: a JSON value, e.g. '{"text":"hi"}' or '"hi"'`)
	}
	if err := rooms.CheckData([]byte(o.Data)); err != nil {
		return fmt.Errorf(`--data: %w (a string is written with quotes: '"hi"')`, err)
	}
	body := publicationBody(o.Channel, o.Data, o.IdempotencyKey)
	if _, err := parsePublication(body); err != nil {
		return err
	}
	if o.Redis != "" {
		if o.IdempotencyKey != "" {
			return errors.New("--idempotency-key needs --url: a plain Redis PUBLISH has no deduplication")
		}
		return publishRedis(ctx, o, out)
	}
	key := o.Key
	if o.KeyEnv != "" {
		if key != "" {
			return errors.New("give --key or --key-env, not both")
		}
		if key = os.Getenv(o.KeyEnv); key == "" {
			return fmt.Errorf("environment variable %s is unset or empty", o.KeyEnv)
		}
	}
	if key == "" {
		return errors.New("--key or --key-env is required with --url: wsgate_publish never accepts anonymous publishers")
	}
	return publishHTTP(ctx, o.URL, key, body, o.Client, out)
}

// publicationBody is the JSON object wsgate_publish takes, with data
// as given, byte for byte.
func publicationBody(channel, data, key string) []byte {
	ch, _ := json.Marshal(channel)
	var b bytes.Buffer
	b.WriteString(`{"channel":`)
	b.Write(ch)
	b.WriteString(`,"data":`)
	b.WriteString(data)
	if key != "" {
		k, _ := json.Marshal(key)
		b.WriteString(`,"idempotency_key":`)
		b.Write(k)
	}
	b.WriteString("}")
	return b.Bytes()
}

func publishHTTP(ctx context.Context, url, key string, body []byte, client *http.Client, out io.Writer) error {
	if client == nil {
		client = &http.Client{Timeout: publishTimeout}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("--url: %w", err)
	}
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Content-Type", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return fmt.Errorf("publishing: %w", err)
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return fmt.Errorf("reading the answer: %w", err)
	}
	answer = bytes.TrimSpace(answer)
	if resp.StatusCode != http.StatusOK {
		var e struct{ Error string }
		if json.Unmarshal(answer, &e) == nil && e.Error != "" {
			return fmt.Errorf("%s answered %d: %s", url, resp.StatusCode, e.Error)
		}
		return fmt.Errorf("%s answered %d: %q", url, resp.StatusCode, answer)
	}
	_, err = fmt.Fprintf(out, "%s\n", answer)
	return err
}

func publishRedis(ctx context.Context, o publishOptions, out io.Writer) error {
	if err := broker.CheckRedisURL(o.Redis); err != nil {
		return err
	}
	// The broker itself, so the command publishes exactly what a gateway
	// node would.
	b, err := broker.NewRedis(broker.RedisOptions{URL: o.Redis, Prefix: o.Prefix}, func(string, broker.Message) {})
	if err != nil {
		return err
	}
	defer b.Close()
	if err := b.Publish(ctx, o.Channel, []byte(o.Data)); err != nil {
		return fmt.Errorf("publishing to Redis: %w", err)
	}
	_, err = fmt.Fprintf(out, "published to Redis channel %s\n", o.Prefix+o.Channel)
	return err
}
