// Package dashboard reads the Prometheus queries of a Grafana dashboard
// (examples/grafana/wsgate.json), so that tests can hold them against the
// metrics wsgate exposes. It reads the PromQL the dashboard uses (metric
// selectors with label matchers, functions, aggregations with by or
// without, binary operators, range and offset modifiers); it is no
// general PromQL parser.
package dashboard

import (
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"
)

// Query is one PromQL expression of a dashboard.
type Query struct {
	// Where names the panel (its title) or the variable the query is of.
	Where string
	// Expr is the expression.
	Expr string
	// Labels are labels the query reads besides those in Expr: the label
	// of a label_values(…) variable.
	Labels []string
}

// Queries returns the queries of a dashboard's panels (those in rows
// too) and of its query variables.
func Queries(dashboardJSON []byte) ([]Query, error) {
	var d struct {
		Panels     []panel `json:"panels"`
		Templating struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(dashboardJSON, &d); err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	var out []Query
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for _, t := range p.Targets {
				out = append(out, Query{Where: p.Title, Expr: t.Expr})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		// The query is a string, or an object {"query": "…"}.
		var q string
		if json.Unmarshal(v.Query, &q) != nil {
			var obj struct{ Query string }
			if err := json.Unmarshal(v.Query, &obj); err != nil {
				return nil, fmt.Errorf("dashboard variable %s: query: %w", v.Name, err)
			}
			q = obj.Query
		}
		where := "variable " + v.Name
		m := labelValues.FindStringSubmatch(q)
		if m == nil {
			return nil, fmt.Errorf("dashboard %s: %q is not label_values(<selector>, <label>)", where, q)
		}
		out = append(out, Query{Where: where, Expr: m[1], Labels: []string{m[2]}})
	}
	return out, nil
}

type panel struct {
	Title   string `json:"title"`
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	Panels []panel `json:"panels"`
}

var labelValues = regexp.MustCompile(`^\s*label_values\(\s*(.+?)\s*,\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$`)

// Selector is a metric selector of an expression.
type Selector struct {
	Metric string
	// Labels are the label names of its matchers, in order.
	Labels []string
}

// Parsed is what an expression reads.
type Parsed struct {
	Selectors []Selector
	// Grouping are the labels of its by, without, on and ignoring clauses.
	Grouping []string
}

// keywords are the identifiers that are no metric names when they are not
// followed by "(" (which makes any identifier a function).
var keywords = []string{"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset"}

// grouping are the keywords followed by a list of label names.
var grouping = []string{"by", "without", "on", "ignoring", "group_left", "group_right"}

// Parse reads the selectors and grouping labels of an expression.
func Parse(expr string) (Parsed, error) {
	toks, err := lex(expr)
	if err != nil {
		return Parsed{}, err
	}
	var p Parsed
	for i := 0; i < len(toks); i++ {
		t := toks[i]
		switch {
		case t.kind == ident && slices.Contains(grouping, t.text):
			if i+1 >= len(toks) || toks[i+1].text != "(" {
				if t.text == "group_left" || t.text == "group_right" {
					continue // without a label list
				}
				return p, fmt.Errorf("%q: %s without a label list", expr, t.text)
			}
			j := i + 2
			for ; j < len(toks) && toks[j].text != ")"; j++ {
				switch {
				case toks[j].kind == ident:
					p.Grouping = append(p.Grouping, toks[j].text)
				case toks[j].text != ",":
					return p, fmt.Errorf("%q: %q in the label list of %s", expr, toks[j].text, t.text)
				}
			}
			i = j
		case t.kind == ident && i+1 < len(toks) && toks[i+1].text == "(":
			// a function or an aggregation: its arguments follow
		case t.kind == ident && i+1 < len(toks) && toks[i+1].kind == ident && (toks[i+1].text == "by" || toks[i+1].text == "without"):
			// an aggregation written "sum by (…) (…)"
		case t.kind == ident && slices.Contains(keywords, t.text):
		case t.kind == ident || t.text == "{":
			sel := Selector{}
			if t.kind == ident {
				sel.Metric = t.text
				i++
			}
			if i < len(toks) && toks[i].text == "{" {
				j := i + 1
				for ; j < len(toks) && toks[j].text != "}"; j++ {
					if toks[j].text == "," {
						continue
					}
					if j+2 >= len(toks) || toks[j].kind != ident || toks[j+1].kind != op || toks[j+2].kind != str {
						return p, fmt.Errorf("%q: bad label matcher at %q", expr, toks[j].text)
					}
					if toks[j].text == "__name__" {
						return p, fmt.Errorf("%q: a selector by __name__ is not read here; write the metric name", expr)
					}
					sel.Labels = append(sel.Labels, toks[j].text)
					j += 2
				}
				if j == len(toks) {
					return p, fmt.Errorf("%q: unclosed {", expr)
				}
				i = j
			} else {
				i--
			}
			if sel.Metric == "" {
				return p, fmt.Errorf("%q: a selector without a metric name", expr)
			}
			p.Selectors = append(p.Selectors, sel)
		case t.kind == str:
			// an argument such as label_replace's
		}
	}
	return p, nil
}

type kind int

const (
	ident kind = iota
	str
	op // a label matching operator
	punct
	number
)

type token struct {
	kind kind
	text string
}

// lex splits an expression into tokens; range and offset durations in
// brackets are skipped with the brackets.
func lex(expr string) ([]token, error) {
	var toks []token
	s := expr
	for len(s) > 0 {
		c := s[0]
		switch {
		case c == ' ' || c == '\t' || c == '\n' || c == '\r':
			s = s[1:]
		case c == '"' || c == '\'' || c == '`':
			end := 1
			for ; end < len(s) && s[end] != c; end++ {
				if s[end] == '\\' && c != '`' {
					end++
				}
			}
			if end >= len(s) {
				return nil, fmt.Errorf("%q: unterminated string", expr)
			}
			toks = append(toks, token{str, s[1:end]})
			s = s[end+1:]
		case c == '[':
			end := strings.IndexByte(s, ']')
			if end < 0 {
				return nil, fmt.Errorf("%q: unclosed [", expr)
			}
			s = s[end+1:]
		case isIdentStart(c):
			n := 1
			for n < len(s) && (isIdentStart(s[n]) || s[n] >= '0' && s[n] <= '9') {
				n++
			}
			toks = append(toks, token{ident, s[:n]})
			s = s[n:]
		case c >= '0' && c <= '9' || c == '.':
			n := 1
			// a number, or a duration such as offset's 5m
			for n < len(s) && (isIdentStart(s[n]) || s[n] >= '0' && s[n] <= '9' || s[n] == '.') {
				n++
			}
			toks = append(toks, token{number, s[:n]})
			s = s[n:]
		case strings.HasPrefix(s, "=~") || strings.HasPrefix(s, "!~") || strings.HasPrefix(s, "!=") || strings.HasPrefix(s, "=="):
			toks = append(toks, token{op, s[:2]})
			s = s[2:]
		case c == '=':
			toks = append(toks, token{op, "="})
			s = s[1:]
		case strings.IndexByte("(){},+-*/%^<>", c) >= 0:
			toks = append(toks, token{punct, s[:1]})
			s = s[1:]
		default:
			return nil, fmt.Errorf("%q: unexpected %q", expr, c)
		}
	}
	return toks, nil
}

func isIdentStart(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '_' || c == ':'
}

// MetricNames returns the metric names a dashboard's queries select, as
// written (a histogram's series with their _bucket, _sum or _count
// suffix), sorted, each once.
func MetricNames(dashboardJSON []byte) ([]string, error) {
	qs, err := Queries(dashboardJSON)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, q := range qs {
		p, err := Parse(q.Expr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", q.Where, err)
		}
		for _, s := range p.Selectors {
			names = append(names, s.Metric)
		}
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}
