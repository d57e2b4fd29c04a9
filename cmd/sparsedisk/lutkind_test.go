package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/lut"
)

// create lut=thin makes an image whose LUT is a hole; info says the kind
// in text and JSON; map, check and info work on it; convert --lut moves
// it to xhyve and back with the same content; a bad kind is refused.
func TestLUTKindCommands(t *testing.T) {
	dir := t.TempDir()
	thin := filepath.Join(dir, "thin.img")
	out, errs, code := sdRun(t, "create", thin, "size=64G", "lut=thin")
	if code != 0 || !strings.Contains(out, "lut thin") {
		t.Fatalf("create lut=thin: exit %d, %q %q", code, out, errs)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(thin+lut.Suffix, &st); err != nil || st.Size != (64<<30)/4096*4 || st.Blocks != 0 {
		t.Errorf("64 GiB thin LUT: %d bytes long, %d blocks allocated (%v); want 64 MiB, 0", st.Size, st.Blocks, err)
	}
	d, err := blockif.Open(thin, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{0, 5 << 30, 64<<30 - 4096} {
		if _, err := d.WriteAt([]byte(strings.Repeat("y", 4096)), off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	out, _, code = sdRun(t, "info", thin)
	if code != 0 || !strings.Contains(out, "lut:") || !strings.Contains(out, "thin") {
		t.Errorf("info: exit %d, %q", code, out)
	}
	out, _, code = sdRun(t, "info", thin, "--output=json")
	var js struct {
		LUT       string `json:"lut"`
		Allocated int64  `json:"allocated_bytes"`
	}
	if err := json.Unmarshal([]byte(out), &js); code != 0 || err != nil || js.LUT != "thin" || js.Allocated != 3*4096 {
		t.Errorf("info --output=json: exit %d, %+v, %v: %s", code, js, err, out)
	}
	out, _, code = sdRun(t, "map", thin, "--output=json")
	var runs []mapEntry
	if err := json.Unmarshal([]byte(out), &runs); code != 0 || err != nil || len(runs) != 5 || !runs[0].Data || runs[1].Data || !runs[2].Data || runs[2].Start != 5<<30 {
		t.Errorf("map: exit %d, %+v, %v", code, runs, err)
	}
	if _, _, code = sdRun(t, "check", thin); code != 0 {
		t.Errorf("check of thin image: exit %d", code)
	}
	x := filepath.Join(dir, "x.img")
	back := filepath.Join(dir, "back.img")
	if out, errs, code = sdRun(t, "convert", thin, x, "--lut", "xhyve"); code != 0 || !strings.Contains(out, "lut xhyve") {
		t.Fatalf("convert --lut xhyve: exit %d %q %q", code, out, errs)
	}
	if out, errs, code = sdRun(t, "convert", x, back, "lut=thin"); code != 0 || !strings.Contains(out, "lut thin") {
		t.Fatalf("convert lut=thin: exit %d %q %q", code, out, errs)
	}
	if desc, _ := os.ReadFile(x); strings.Contains(string(desc), "lut") {
		t.Errorf("xhyve descriptor names a kind:\n%s", desc)
	}
	out1, _, _ := sdRun(t, "map", thin, "--output=json")
	for _, p := range []string{x, back} {
		if out2, _, _ := sdRun(t, "map", p, "--output=json"); out2 != out1 {
			t.Errorf("%s maps differently from the source:\n%s\nwant\n%s", p, out2, out1)
		}
	}
	if _, errs, code = sdRun(t, "create", filepath.Join(dir, "bad.img"), "size=1G", "lut=dense"); code == 0 || !strings.Contains(errs, "xhyve or thin") {
		t.Errorf("create lut=dense: exit %d, %q", code, errs)
	}
}

// check reports a bloated segment as advice naming shrink, and still
// exits 0.
func TestCheckAdviceExitsZero(t *testing.T) {
	for _, kind := range lut.Kinds {
		t.Run(string(kind), func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.img")
			if _, _, code := sdRun(t, "create", path, "size=16M", "lut="+string(kind)); code != 0 {
				t.Fatal("create failed")
			}
			if err := os.Truncate(path+".0000", 1<<30); err != nil { // an old version's churn
				t.Fatal(err)
			}
			out, errs, code := sdRun(t, "check", path)
			if code != 0 || !strings.Contains(out, "advice segment 0") || !strings.Contains(out, "sparsedisk shrink "+path) {
				t.Errorf("check: exit %d, %q %q", code, out, errs)
			}
			if _, _, code := sdRun(t, "shrink", path); code != 0 {
				t.Fatal("shrink failed")
			}
			if out, _, code := sdRun(t, "check", path); code != 0 || strings.Contains(out, "advice") {
				t.Errorf("check after shrink: exit %d, %q", code, out)
			}
		})
	}
}
