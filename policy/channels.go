package policy

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode/utf8"
)

// Channel names are ':'-separated segments. A segment is 1..MaxSegmentLen
// bytes of letters, digits and "-_.@=+~!$&'()," (no ':', '*', '{', '}',
// spaces or control characters); a channel is at most MaxChannelLen bytes.
const (
	MaxChannelLen = 255
	MaxSegmentLen = 128
)

// Effect of a rule.
type Effect uint8

// Effects.
const (
	Deny Effect = iota
	Allow
)

func (e Effect) String() string {
	if e == Allow {
		return "allow"
	}
	return "deny"
}

// Rule is one line of a channel policy: "allow subscribe chat:{claims.org}:*".
type Rule struct {
	Effect  Effect
	Actions []string // "subscribe", "publish", or custom words; "*" for any
	Pattern string
}

// ChannelPolicy is a compiled, ordered list of rules. The first rule whose
// action and pattern match decides; when none does the answer is Deny.
type ChannelPolicy struct {
	rules []compiledRule
}

type compiledRule struct {
	effect  Effect
	actions []string
	any     bool
	segs    []segment
	tail    bool // the pattern ends with "**"
	text    string
}

type segKind uint8

const (
	segLiteral segKind = iota
	segStar
	segTemplate
)

type segment struct {
	kind  segKind
	lit   string
	parts []part // segTemplate
}

// part of a template segment: a literal or a claim reference.
type part struct {
	lit   string
	claim []string // path into the claims; nil for a literal
	each  bool     // claims.x[*]: any element of an array
}

// PolicyError is a rule that does not compile; it names the rule and the
// byte position in its pattern.
type PolicyError struct {
	Rule    int // 1-based
	Pos     int // 1-based byte position in the pattern
	Pattern string
	Message string
}

func (e *PolicyError) Error() string {
	return fmt.Sprintf("channel rule %d (%q), position %d: %s", e.Rule, e.Pattern, e.Pos, e.Message)
}

// ValidAction reports whether s can name an action.
func ValidAction(s string) bool {
	if s == "*" {
		return true
	}
	if s == "" || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// CompileChannelPolicy compiles rules in order.
func CompileChannelPolicy(rules []Rule) (*ChannelPolicy, error) {
	p := &ChannelPolicy{}
	for i, r := range rules {
		cr, err := compileRule(r)
		if err != nil {
			var pe *PolicyError
			if errors.As(err, &pe) {
				pe.Rule = i + 1
				return nil, pe
			}
			return nil, &PolicyError{Rule: i + 1, Pos: 1, Pattern: r.Pattern, Message: err.Error()}
		}
		p.rules = append(p.rules, cr)
	}
	return p, nil
}

func compileRule(r Rule) (compiledRule, error) {
	cr := compiledRule{effect: r.Effect, text: r.Pattern}
	if len(r.Actions) == 0 {
		return cr, errors.New("no action")
	}
	for _, a := range r.Actions {
		if !ValidAction(a) {
			return cr, fmt.Errorf("bad action %q", a)
		}
		if a == "*" {
			cr.any = true
		}
		cr.actions = append(cr.actions, a)
	}
	pat := r.Pattern
	perr := func(pos int, msg string, args ...any) error {
		return &PolicyError{Pos: pos + 1, Pattern: pat, Message: fmt.Sprintf(msg, args...)}
	}
	if pat == "" {
		return cr, perr(0, "empty pattern")
	}
	if len(pat) > 4*MaxChannelLen {
		return cr, perr(0, "pattern too long")
	}
	start := 0
	for start <= len(pat) {
		end := start + indexSegEnd(pat[start:])
		seg := pat[start:end]
		last := end == len(pat)
		switch {
		case seg == "":
			return cr, perr(start, "empty segment")
		case seg == "**":
			if !last {
				return cr, perr(start, "** may only be the last segment")
			}
			cr.tail = true
		case seg == "*":
			cr.segs = append(cr.segs, segment{kind: segStar})
		case strings.ContainsAny(seg, "{}"):
			s, err := compileTemplate(seg, start, perr)
			if err != nil {
				return cr, err
			}
			cr.segs = append(cr.segs, s)
		default:
			if i := strings.IndexByte(seg, '*'); i >= 0 {
				return cr, perr(start+i, "* must be a whole segment")
			}
			if !validSegment(seg) {
				return cr, perr(start, "segment %q has characters a channel cannot have", seg)
			}
			cr.segs = append(cr.segs, segment{kind: segLiteral, lit: seg})
		}
		start = end + 1
	}
	return cr, nil
}

// indexSegEnd finds the ':' that ends the segment at the start of s,
// skipping over {…} (a claim path may not contain ':' anyway).
func indexSegEnd(s string) int {
	depth := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '{':
			depth++
		case '}':
			depth--
		case ':':
			if depth <= 0 {
				return i
			}
		}
	}
	return len(s)
}

func compileTemplate(seg string, off int, perr func(int, string, ...any) error) (segment, error) {
	s := segment{kind: segTemplate}
	i := 0
	for i < len(seg) {
		open := strings.IndexByte(seg[i:], '{')
		if open < 0 {
			lit := seg[i:]
			if strings.ContainsAny(lit, "}*") || !validSegment(lit) {
				return s, perr(off+i, "bad text %q in segment", lit)
			}
			s.parts = append(s.parts, part{lit: lit})
			break
		}
		if open > 0 {
			lit := seg[i : i+open]
			if strings.ContainsAny(lit, "}*") || !validSegment(lit) {
				return s, perr(off+i, "bad text %q in segment", lit)
			}
			s.parts = append(s.parts, part{lit: lit})
		}
		i += open
		closeAt := strings.IndexByte(seg[i:], '}')
		if closeAt < 0 {
			return s, perr(off+i, "unclosed {")
		}
		ref := seg[i+1 : i+closeAt]
		p, err := compileRef(ref)
		if err != nil {
			return s, perr(off+i+1, "%v", err)
		}
		if len(s.parts) > 0 && s.parts[len(s.parts)-1].claim != nil {
			return s, perr(off+i, "two claims side by side in one segment are ambiguous; put text between them")
		}
		s.parts = append(s.parts, p)
		i += closeAt + 1
	}
	return s, nil
}

func compileRef(ref string) (part, error) {
	p := part{}
	if strings.HasSuffix(ref, "[*]") {
		p.each = true
		ref = strings.TrimSuffix(ref, "[*]")
	}
	path, ok := strings.CutPrefix(ref, "claims.")
	if !ok {
		return p, fmt.Errorf("{%s}: a placeholder must be {claims.<name>} or {claims.<name>[*]}", ref)
	}
	for _, name := range strings.Split(path, ".") {
		if name == "" || strings.ContainsAny(name, "{}[]*: ") {
			return p, fmt.Errorf("{%s}: bad claim name %q", ref, name)
		}
		p.claim = append(p.claim, name)
	}
	return p, nil
}

func segByteOK(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		strings.IndexByte("-_.@=+~!$&'(),", c) >= 0
}

func validSegment(s string) bool {
	if s == "" || len(s) > MaxSegmentLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !segByteOK(s[i]) {
			return false
		}
	}
	return true
}

// ErrChannelName is returned for a channel name that is not valid.
var ErrChannelName = errors.New("invalid channel name")

// ValidateChannel checks a channel name from a client.
func ValidateChannel(ch string) error {
	if ch == "" || len(ch) > MaxChannelLen {
		return ErrChannelName
	}
	segStart := 0
	for i := 0; i <= len(ch); i++ {
		if i == len(ch) || ch[i] == ':' {
			if n := i - segStart; n == 0 || n > MaxSegmentLen {
				return ErrChannelName
			}
			segStart = i + 1
			continue
		}
		if !segByteOK(ch[i]) {
			return ErrChannelName
		}
	}
	return nil
}

// Decide returns the effect for action on channel with claims. The channel
// must have passed ValidateChannel (Decide denies one that has not). It
// does not allocate.
func (p *ChannelPolicy) Decide(action, channel string, claims Claims) Effect {
	if ValidateChannel(channel) != nil || !utf8.ValidString(action) {
		return Deny
	}
	for i := range p.rules {
		r := &p.rules[i]
		if !r.hasAction(action) {
			continue
		}
		if r.match(channel, claims) {
			return r.effect
		}
	}
	return Deny
}

func (r *compiledRule) hasAction(a string) bool {
	if r.any {
		return true
	}
	for _, x := range r.actions {
		if x == a {
			return true
		}
	}
	return false
}

func (r *compiledRule) match(ch string, claims Claims) bool {
	rest := ch
	for i := range r.segs {
		if rest == "" && i > 0 {
			return false
		}
		var seg string
		if j := strings.IndexByte(rest, ':'); j >= 0 {
			seg, rest = rest[:j], rest[j+1:]
			if rest == "" {
				return false // trailing ':'
			}
		} else {
			if rest == "" {
				return false
			}
			seg, rest = rest, ""
		}
		if !r.segs[i].match(seg, claims) {
			return false
		}
	}
	if r.tail {
		return true // ** matches any number of trailing segments, none included
	}
	return rest == ""
}

func (s *segment) match(seg string, claims Claims) bool {
	switch s.kind {
	case segLiteral:
		return seg == s.lit
	case segStar:
		return true
	}
	return matchParts(s.parts, seg, claims)
}

func matchParts(parts []part, seg string, claims Claims) bool {
	if len(parts) == 0 {
		return seg == ""
	}
	p := &parts[0]
	if p.claim == nil {
		rest, ok := strings.CutPrefix(seg, p.lit)
		return ok && matchParts(parts[1:], rest, claims)
	}
	v, ok := lookupPath(claims, p.claim)
	if !ok {
		return false
	}
	if p.each {
		arr, ok := v.([]any)
		if !ok {
			return false
		}
		for _, e := range arr {
			if matchValue(e, parts, seg, claims) {
				return true
			}
		}
		return false
	}
	return matchValue(v, parts, seg, claims)
}

// matchValue matches claim value v (as a literal) at the start of seg, then
// the remaining parts.
func matchValue(v any, parts []part, seg string, claims Claims) bool {
	var buf [32]byte
	var s string
	switch t := v.(type) {
	case string:
		s = t
	case float64:
		b := strconv.AppendFloat(buf[:0], t, 'f', -1, 64)
		if len(b) == 0 || len(b) > len(seg) || string(b) != seg[:len(b)] {
			return false
		}
		return matchParts(parts[1:], seg[len(b):], claims)
	case bool:
		s = strconv.FormatBool(t)
	default:
		return false
	}
	if s == "" {
		return false // an empty claim never matches (it could join segments)
	}
	rest, ok := strings.CutPrefix(seg, s)
	return ok && matchParts(parts[1:], rest, claims)
}

func lookupPath(c Claims, path []string) (any, bool) {
	var cur any = map[string]any(c)
	for _, name := range path {
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[name]; !ok {
			return nil, false
		}
	}
	return cur, true
}

// Len is the number of rules.
func (p *ChannelPolicy) Len() int { return len(p.rules) }

// UsesClaims reports whether a rule's pattern reads the claims, and so can
// only match for a client whose claims are known.
func (p *ChannelPolicy) UsesClaims() bool {
	for _, r := range p.rules {
		for _, s := range r.segs {
			for _, pt := range s.parts {
				if pt.claim != nil {
					return true
				}
			}
		}
	}
	return false
}
