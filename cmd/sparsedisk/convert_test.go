package main

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestConvertCommand(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "in.raw")
	rng := rand.New(rand.NewPCG(1, 1))
	data := make([]byte, 3<<20+5*4096) // not a multiple of split
	for i := 0; i < len(data); i += 4096 * 7 {
		for j := 0; j < 4096 && i+j < len(data); j++ {
			data[i+j] = byte(rng.UintN(256))
		}
	}
	os.WriteFile(raw, data, 0o644)
	img := filepath.Join(dir, "out.img")
	out, errs, code := sdRun(t, "convert", raw, img, "split=1M", "--jobs", "2")
	if code != 0 || !strings.Contains(out, "layout sparse") || errs != "" {
		t.Fatalf("raw → sparse: exit %d\n%s%s", code, out, errs)
	}
	before := imageDigest(t, img)
	if _, errs, code := sdRun(t, "convert", raw, img); code == 0 || !strings.Contains(errs, "--overwrite") {
		t.Fatalf("existing destination: exit %d\n%s", code, errs)
	}
	split := filepath.Join(dir, "out.split")
	if _, errs, code := sdRun(t, "convert", img, split, "layout=split", "split=768k"); code != 0 {
		t.Fatalf("sparse → split: %s", errs)
	}
	back := filepath.Join(dir, "back.raw")
	if out, errs, code := sdRun(t, "convert", "-q", split, back, "--layout=raw"); code != 0 || out != "" {
		t.Fatalf("split → raw: exit %d %q %s", code, out, errs)
	}
	if got, _ := os.ReadFile(back); !bytes.Equal(got, data) {
		t.Fatal("round trip raw → sparse → split → raw differs")
	}
	if imageDigest(t, img) != before {
		t.Error("convert changed its source")
	}
	if _, errs, code := sdRun(t, "convert", raw, img, "--overwrite", "sectorsize=512"); code != 0 {
		t.Fatalf("overwrite: %s", errs)
	}
	if _, _, code := sdRun(t, "check", img); code != 0 {
		t.Error("overwritten image does not check clean")
	}
	if _, _, code := sdRun(t, "convert", raw, filepath.Join(dir, "x.img"), "colour=blue"); code == 0 {
		t.Error("unknown setting accepted")
	}
}
