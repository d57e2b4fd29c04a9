package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
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

// TestMapAcrossSegments: map works a segment at a time (releasing each
// segment's LUT part), yet a data run crossing a segment boundary is one
// extent, and so is a hole spanning several segments.
func TestMapAcrossSegments(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.img")
	if err := blockif.Create(path, format.Params{Size: 4 << 20, Split: 1 << 20, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(bytes.Repeat([]byte{1}, 8192), 1<<20-4096); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	out, errs, code := sdRun(t, "map", "--output=json", path)
	if code != 0 {
		t.Fatalf("map: exit %d\n%s", code, errs)
	}
	var got []mapEntry
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	want := []mapEntry{
		{Start: 0, Length: 1<<20 - 4096, Data: false, Zero: true},
		{Start: 1<<20 - 4096, Length: 8192, Data: true, Zero: false},
		{Start: 1<<20 + 4096, Length: 3<<20 - 4096, Data: false, Zero: true},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("map = %+v\nwant  %+v", got, want)
	}
}
