package main

import (
	le "encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// corruptEntry points the LUT entry of sector sec past its segment's end.
func corruptEntry(t *testing.T, path string, sec int64) {
	t.Helper()
	f, err := os.OpenFile(path+".lut", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [4]byte
	le.LittleEndian.PutUint32(b[:], 99999)
	if _, err := f.WriteAt(b[:], sec*4); err != nil {
		t.Fatal(err)
	}
}

// leak appends a slot of data no entry references to segment 0.
func leak(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path+".0000", os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, _ := f.Stat()
	if _, err := f.WriteAt([]byte(strings.Repeat("L", 4096)), fi.Size()); err != nil {
		t.Fatal(err)
	}
}

func TestCheckExitCodes(t *testing.T) {
	path := makeImage(t)
	before := imageDigest(t, path)
	out, errs, code := sdRun(t, "check", path)
	if code != 0 || !strings.Contains(out, "no errors found") || errs != "" {
		t.Fatalf("clean image: exit %d\n%s%s", code, out, errs)
	}
	out, _, code = sdRun(t, "check", path, "--output=json")
	if code != 0 || !strings.Contains(out, `"findings": []`) || strings.Contains(out, "null") {
		t.Errorf("clean image as json: exit %d, want an empty findings list and no null:\n%s", code, out)
	}
	leak(t, path)
	before = imageDigest(t, path)
	out, _, code = sdRun(t, "check", path)
	if code != 3 || !strings.Contains(out, "leak") {
		t.Fatalf("leak: exit %d, want 3\n%s", code, out)
	}
	if imageDigest(t, path) != before {
		t.Fatal("check without -r changed the image")
	}
	out, _, code = sdRun(t, "check", path, "-r", "leaks")
	if code != 0 || !strings.Contains(out, "punched") {
		t.Fatalf("check -r leaks: exit %d\n%s", code, out)
	}
	corruptEntry(t, path, 2)
	before = imageDigest(t, path)
	out, _, code = sdRun(t, "check", "--output=json", path)
	var doc checkJSON
	if code != 2 || json.Unmarshal([]byte(out), &doc) != nil || doc.ExitCode != 2 || doc.Check.Corruptions == 0 {
		t.Fatalf("corruption: exit %d, want 2\n%s", code, out)
	}
	if imageDigest(t, path) != before {
		t.Fatal("check --output=json changed the image")
	}
	// The entry's data is gone: -r all refuses to drop it, changing
	// nothing, and names --accept-loss; with it, the repair is undoable.
	out, errs, code = sdRun(t, "check", path, "-r", "all")
	if code != 2 || !strings.Contains(errs, "--accept-loss") || !strings.Contains(errs, "nothing changed") || imageDigest(t, path) != before {
		t.Fatalf("check -r all of a lossy repair: exit %d, want 2, a refusal naming --accept-loss, nothing changed\n%s%s", code, out, errs)
	}
	out, _, code = sdRun(t, "check", path, "-r", "all", "--accept-loss")
	if code != 0 || !strings.Contains(out, "LOST segment 0 sector 2:") || !strings.Contains(out, "check --undo") {
		t.Fatalf("check -r all --accept-loss: exit %d\n%s", code, out)
	}
	repaired := imageDigest(t, path)
	if out, errs, code := sdRun(t, "check", "--undo", path); code != 0 || imageDigest(t, path) != before {
		t.Fatalf("check --undo: exit %d, image as before the repair: %v\n%s%s", code, imageDigest(t, path) == before, out, errs)
	}
	if _, _, code := sdRun(t, "check", path, "-r", "all", "--accept-loss"); code != 0 || imageDigest(t, path) != repaired {
		t.Fatalf("repair after undo: exit %d, same result as the first: %v", code, imageDigest(t, path) == repaired)
	}
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8192)
	d.ReadAt(b, 0)
	d.Close()
	if string(b[:8192]) != strings.Repeat("x", 8192) {
		t.Error("sectors 0-1, not named lost, changed")
	}
	bad := filepath.Join(t.TempDir(), "bad.img")
	os.WriteFile(bad, []byte("# sparsedisk image\nformat = sparsedisk/1\nlayout = sparse\n"), 0o644)
	if out, _, code := sdRun(t, "check", bad); code != 2 || !strings.Contains(out, bad) {
		t.Errorf("malformed descriptor: exit %d, want 2 (corruption) naming the file:\n%s", code, out)
	}
	if _, _, code := sdRun(t, "check", filepath.Join(t.TempDir(), "none.img")); code != 1 {
		t.Errorf("missing image: exit %d, want 1", code)
	}
	if _, _, code := sdRun(t, "check", path, "-r", "some"); code != 1 {
		t.Errorf("bad -r: exit %d, want 1", code)
	}
}

// TestCheckUnparseableDescriptor: a descriptor that does not parse is
// corruption (exit 2) that -r all cannot repair without the geometry; both
// say how to recover (fix by hand, or adopt) and change nothing.
func TestCheckUnparseableDescriptor(t *testing.T) {
	path := makeImage(t)
	desc, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	bad := strings.Replace(string(desc), "split = 16777216", "split = 16777000", 1)
	if bad == string(desc) {
		t.Fatalf("descriptor has no split line to break:\n%s", desc)
	}
	if err := os.WriteFile(path, []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	before := imageDigest(t, path)
	for _, args := range [][]string{{"check", path}, {"check", path, "-r", "all"}, {"check", path, "-r", "leaks"}} {
		out, errs, code := sdRun(t, args...)
		if code != 2 || !strings.Contains(errs, "sparsedisk adopt") || strings.Contains(errs, "repairs them") {
			t.Errorf("%v: exit %d, want 2 with the adopt hint and no promise of repair\n%s%s", args, code, out, errs)
		}
		if !strings.Contains(out, "descriptor unreadable") || strings.Contains(out, "( layout") {
			t.Errorf("%v: summary line does not say the descriptor is unreadable:\n%s", args, out)
		}
	}
	if imageDigest(t, path) != before {
		t.Fatal("check of an image with a broken descriptor changed it")
	}
}
