package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"math"
	"strconv"
	"strings"
)

// contentHash is kuwa_sdk::content_hash: the first 16 hex digits of SHA-256.
func contentHash(b []byte) string {
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// hashValue is a stable hash of a JSON value: encoding/json writes map keys
// sorted, so the text is canonical. 24 hex digits, like the kuwa host.
func hashValue(v any) string {
	text, err := json.Marshal(v)
	if err != nil {
		panic(err) // desired objects are plain JSON values
	}
	sum := sha256.Sum256(text)
	return hex.EncodeToString(sum[:12])
}

// isSubset reports whether every field set in desired has the same value in
// actual (the kuwa host's rule): objects may have extra keys in actual, lists
// must have the same length with each element a subset, numbers compare by
// value and strings that are quantities by value.
func isSubset(desired, actual any) bool {
	switch d := desired.(type) {
	case map[string]any:
		a, ok := actual.(map[string]any)
		if !ok {
			return false
		}
		for k, dv := range d {
			av, ok := a[k]
			if !ok {
				if dv != nil {
					return false
				}
				continue
			}
			if !isSubset(dv, av) {
				return false
			}
		}
		return true
	case []any:
		a, ok := actual.([]any)
		if !ok || len(a) != len(d) {
			return false
		}
		for i := range d {
			if !isSubset(d[i], a[i]) {
				return false
			}
		}
		return true
	case string:
		a, ok := actual.(string)
		return ok && (d == a || sameQuantity(d, a))
	case nil:
		return actual == nil
	case bool:
		a, ok := actual.(bool)
		return ok && a == d
	default:
		dn, ok := number(desired)
		if !ok {
			return false
		}
		an, ok := number(actual)
		return ok && dn == an
	}
}

// number reads a JSON number as the unstructured converters produce them.
func number(v any) (float64, bool) {
	switch n := v.(type) {
	case int64:
		return float64(n), true
	case int32:
		return float64(n), true
	case int:
		return float64(n), true
	case float64:
		return n, true
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	}
	return 0, false
}

var quantitySuffixes = []struct {
	suffix string
	scale  float64
}{
	{"Ki", 1024}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"Ti", 1 << 40}, {"Pi", 1 << 50}, {"Ei", 1 << 60},
	{"n", 1e-9}, {"u", 1e-6}, {"m", 1e-3}, {"k", 1e3}, {"M", 1e6}, {"G", 1e9}, {"T", 1e12},
	{"P", 1e15}, {"E", 1e18},
}

// quantity parses a Kubernetes quantity (1, 1000m, 1.5Gi, 2e3) to its value.
func quantity(text string) (float64, bool) {
	num, scale := text, 1.0
	for _, s := range quantitySuffixes {
		if n, ok := strings.CutSuffix(text, s.suffix); ok {
			num, scale = n, s.scale
			break
		}
	}
	body := num
	if len(body) > 0 && (body[0] == '+' || body[0] == '-') {
		body = body[1:]
	}
	mantissa, _, _ := strings.Cut(strings.ReplaceAll(body, "E", "e"), "e")
	if mantissa == "" || strings.Count(mantissa, ".") > 1 || strings.Trim(mantissa, ".") == "" {
		return 0, false
	}
	for _, c := range mantissa {
		if (c < '0' || c > '9') && c != '.' {
			return 0, false
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil {
		return 0, false
	}
	return v * scale, true
}

// sameQuantity reports whether two strings are one quantity written two ways.
func sameQuantity(a, b string) bool {
	x, ok1 := quantity(a)
	y, ok2 := quantity(b)
	if !ok1 || !ok2 {
		return false
	}
	return x == y || math.Abs(x-y) <= 1e-12*math.Max(math.Abs(x), math.Abs(y))
}
