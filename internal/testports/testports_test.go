package testports

import "testing"

func TestParse(t *testing.T) {
	tests := []struct {
		in        string
		low, high int
		ok        bool
	}{
		{"", 20000, 32000, true},
		{"40000-48000", 40000, 48000, true},
		{" 1000 - 1100 ", 1000, 1100, true},
		{"40000", 0, 0, false},
		{"48000-40000", 0, 0, false},
		{"1000-1050", 0, 0, false},
		{"0-1000", 0, 0, false},
		{"60000-70000", 0, 0, false},
		{"a-b", 0, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			b, err := parse(tt.in)
			if tt.ok != (err == nil) {
				t.Fatalf("parse(%q) error = %v, want ok %v", tt.in, err, tt.ok)
			}
			if tt.ok && (b[0] != tt.low || b[1] != tt.high) {
				t.Fatalf("parse(%q) = %v, want [%d %d]", tt.in, b, tt.low, tt.high)
			}
		})
	}
}
