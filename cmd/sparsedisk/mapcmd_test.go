package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func TestMap(t *testing.T) {
	path := makeImage(t)
	before := imageDigest(t, path)
	out, errs, code := sdRun(t, "map", "--output=json", path)
	if code != 0 {
		t.Fatalf("map: exit %d: %s", code, errs)
	}
	var got []mapEntry
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatal(err)
	}
	want := []mapEntry{
		{0, 8192, true, false},
		{8192, 20<<20 - 8192, false, true},
		{20 << 20, 8192, true, false},
		{20<<20 + 8192, 43<<20 - 8192, false, true},
		{63 << 20, 8192, true, false},
		{63<<20 + 8192, 1<<20 - 8192, false, true},
	}
	if len(got) != len(want) {
		t.Fatalf("map: %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("run %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	out, _, code = sdRun(t, "map", path)
	if code != 0 || strings.Count(out, "data") != 3 || strings.Count(out, "hole") != 3 {
		t.Errorf("human map:\n%s", out)
	}
	if after := imageDigest(t, path); after != before {
		t.Error("map changed the image's bytes")
	}
}
