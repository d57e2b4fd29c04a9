package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestAdoptXhyveFixture(t *testing.T) {
	dir := t.TempDir()
	files, _ := filepath.Glob("../../testdata/xhyve/hdd512.img.*")
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(dir, filepath.Base(f)), data, 0o644)
	}
	path := filepath.Join(dir, "hdd512.img")
	if _, errs, code := sdRun(t, "info", path); code == 0 || !strings.Contains(errs, "adopt") {
		t.Errorf("info before adopt: exit %d, %q (should say to adopt)", code, errs)
	}
	if _, errs, code := sdRun(t, "adopt", path, "size=96k", "split=32k", "sectorsize=4096"); code == 0 || !strings.Contains(errs, "LUT") {
		t.Errorf("adopt with a wrong sector size: exit %d, %q", code, errs)
	}
	out, errs, code := sdRun(t, "adopt", path, "size=96k", "split=32k", "sectorsize=512")
	if code != 0 {
		t.Fatalf("adopt: exit %d: %s", code, errs)
	}
	if !strings.Contains(out, "96 KiB") {
		t.Errorf("adopt output: %q", out)
	}
	out, _, code = sdRun(t, "info", path)
	if code != 0 || !strings.Contains(out, "sector size:    512") {
		t.Errorf("info after adopt: exit %d\n%s", code, out)
	}
}
