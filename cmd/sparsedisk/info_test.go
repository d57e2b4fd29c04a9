package main

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
)

// makeImage creates a sparse image with a few written ranges.
func makeImage(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Size: 64 << 20, Split: 16 << 20, SectorSize: 4096}, nil); err != nil {
		t.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 20 << 20, 63 << 20} {
		if _, err := d.WriteAt([]byte(strings.Repeat("x", 8192)), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestInfo(t *testing.T) {
	path := makeImage(t)
	before := imageDigest(t, path)
	out, errs, code := sdRun(t, "info", path)
	if code != 0 {
		t.Fatalf("info: exit %d: %s", code, errs)
	}
	for _, want := range []string{"layout:", "sparse", "67108864 (64 MiB)", "24576 (24 KiB)", "segments:", "4", "state:", "clean", "fragmentation:"} {
		if !strings.Contains(out, want) {
			t.Errorf("info output lacks %q:\n%s", want, out)
		}
	}
	out, _, code = sdRun(t, "info", "--output=json", path)
	var st struct {
		AllocatedBytes int64  `json:"allocated_bytes"`
		Size           int64  `json:"size"`
		State          string `json:"state"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
		t.Fatalf("info --output=json: exit %d: %s", code, out)
	}
	if st.AllocatedBytes != 3*8192 || st.Size != 64<<20 || st.State != "clean" {
		t.Errorf("json info %+v", st)
	}
	// Keys are snake_case throughout (json.Unmarshal above would match
	// any case, so look at the keys themselves).
	var keys map[string]any
	if err := json.Unmarshal([]byte(out), &keys); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"image", "layout", "size", "split", "sector_size", "state", "segments", "allocated_bytes", "on_disk_bytes"} {
		if _, ok := keys[k]; !ok {
			t.Errorf("info --output=json lacks key %q: %s", k, out)
		}
	}
	for k := range keys {
		if strings.ToLower(k) != k {
			t.Errorf("info --output=json key %q is not snake_case", k)
		}
	}
	if after := imageDigest(t, path); after != before {
		t.Error("info changed the image's bytes")
	}
	if _, errs, code := sdRun(t, "info", path+".nope"); code == 0 || !strings.Contains(errs, ".nope") {
		t.Errorf("info of a missing image: exit %d, %q", code, errs)
	}
}

// TestInfoMapUnfinished: info and map read an image whose descriptor
// records an interrupted offline operation (they never finish it: they
// are read-only), and say so, with the command that finishes it.
func TestInfoMapUnfinished(t *testing.T) {
	path := makeImage(t)
	desc, err := format.ReadDescriptor(nil, path)
	if err != nil {
		t.Fatal(err)
	}
	desc.Intent = format.IntentResize
	if err := format.WriteDescriptor(nil, path, desc); err != nil {
		t.Fatal(err)
	}
	before := imageDigest(t, path)
	out, errs, code := sdRun(t, "info", path)
	if code != 0 || !strings.Contains(out, "unfinished:") || !strings.Contains(errs, "check -r all "+path) {
		t.Errorf("info: exit %d, want an 'unfinished' line and a warning naming the fix\n%s%s", code, out, errs)
	}
	out, _, code = sdRun(t, "info", "--output=json", path)
	if code != 0 || !strings.Contains(out, `"unfinished": "resize"`) {
		t.Errorf("info json: exit %d, want \"unfinished\": \"resize\"\n%s", code, out)
	}
	_, errs, code = sdRun(t, "map", path)
	if code != 0 || !strings.Contains(errs, "unfinished") {
		t.Errorf("map: exit %d, want a warning about the unfinished resize\n%s", code, errs)
	}
	if imageDigest(t, path) != before {
		t.Fatal("info/map changed an image with an unfinished operation")
	}
	// A clean image says nothing of the kind.
	clean := makeImage(t)
	if out, errs, _ := sdRun(t, "info", clean); strings.Contains(out+errs, "unfinished") {
		t.Errorf("clean image: info mentions an unfinished operation:\n%s%s", out, errs)
	}
}
