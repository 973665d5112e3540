package main

import "testing"

func TestContentHashMatchesSDK(t *testing.T) {
	// kuwa_sdk::meta::tests::content_hash_is_stable_and_short
	if got := contentHash([]byte("hello")); got != "2cf24dba5fb0a30e" {
		t.Fatalf("contentHash(hello) = %s", got)
	}
}

func TestIsSubset(t *testing.T) {
	actual := map[string]any{
		"spec": map[string]any{"replicas": int64(2), "cpu": "1", "extra": true},
		"list": []any{map[string]any{"a": "x", "b": "y"}},
	}
	for _, c := range []struct {
		desired map[string]any
		want    bool
	}{
		{map[string]any{"spec": map[string]any{"replicas": int64(2)}}, true},
		{map[string]any{"spec": map[string]any{"replicas": float64(2)}}, true},
		{map[string]any{"spec": map[string]any{"replicas": int64(3)}}, false},
		{map[string]any{"spec": map[string]any{"cpu": "1000m"}}, true},
		{map[string]any{"spec": map[string]any{"missing": "v"}}, false},
		{map[string]any{"spec": map[string]any{"missing": nil}}, true},
		{map[string]any{"list": []any{map[string]any{"a": "x"}}}, true},
		{map[string]any{"list": []any{}}, false},
	} {
		if got := isSubset(c.desired, actual); got != c.want {
			t.Errorf("isSubset(%v) = %v, want %v", c.desired, got, c.want)
		}
	}
}
