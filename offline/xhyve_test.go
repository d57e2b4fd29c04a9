package offline

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
)

// copyFixture copies testdata/xhyve/NAME* into a temp dir.
func copyFixture(t *testing.T, name string) string {
	t.Helper()
	dir := t.TempDir()
	files, _ := filepath.Glob(filepath.Join("..", "testdata", "xhyve", name+".*"))
	if len(files) == 0 {
		t.Fatalf("fixture %s missing", name)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(f)), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, name)
}

func TestXhyveAdopt(t *testing.T) {
	path := copyFixture(t, "hdd512.img")
	want, err := os.ReadFile(path + ".expected")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := blockif.Open(path, nil); !errors.Is(err, blockif.ErrNotAdopted) {
		t.Fatalf("Open before adopt: %v, want blockif.ErrNotAdopted", err)
	}
	p := format.Params{Layout: format.LayoutSparse, Size: 96 << 10, Split: 32 << 10, SectorSize: 512}
	// Wrong parameters are refused, and write nothing.
	for _, bad := range []format.Params{
		{Size: 64 << 10, Split: 32 << 10, SectorSize: 512},                             // LUT too long for this size
		{Size: 96 << 10, Split: 32 << 10, SectorSize: 4096},                            // LUT length mismatch
		{Size: 96 << 10, Split: 16 << 10, SectorSize: 512},                             // entries past segment ends
		{Size: 128 << 10, Split: 32 << 10, SectorSize: 512},                            // segment missing / LUT short
		{Size: 96 << 10, Split: 40 << 10, SectorSize: 512},                             // same segment count, entries cut wrong: shared slots
		{Layout: format.LayoutSplit, Size: 96 << 10, Split: 32 << 10, SectorSize: 512}, // a LUT exists: not a split image
	} {
		if err := Adopt(path, bad, nil); err == nil {
			t.Errorf("Adopt(%+v) accepted wrong parameters", bad)
		}
		if _, err := os.Stat(path); err == nil {
			t.Fatalf("Adopt(%+v) wrote a descriptor", bad)
		}
	}
	if err := Adopt(path, p, nil); err != nil {
		t.Fatalf("Adopt: %v", err)
	}
	t.Cleanup(func() { mustCheck(t, path, nil, false) })
	d := mustOpen(t, path, &blockif.Options{ReadOnly: true})
	got := make([]byte, d.Size())
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if !bytes.Equal(got, want) {
		t.Fatalf("adopted image reads differently from the flat content at byte %d", firstDiff(got, want))
	}
	r := mustCheck(t, path, nil, false)
	if r.Fragments == 0 {
		t.Errorf("fixture should be fragmented (slots out of logical order)")
	}
	// Writable too: write, close, reread.
	d = mustOpen(t, path, nil)
	if _, err := d.WriteAt([]byte("hello"), 1000); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	copy(want[1000:], "hello")
	d = mustOpen(t, path, &blockif.Options{ReadOnly: true})
	defer d.Close()
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("content after a write differs")
	}
	// The trailing empty segment is still there and tolerated.
	if _, err := os.Stat(path + ".0003"); err != nil {
		t.Error(err)
	}
	if err := Adopt(path, p, nil); !errors.Is(err, blockif.ErrExist) || !strings.Contains(err.Error(), path) {
		t.Errorf("second Adopt: %v", err)
	}
}

// TestAdoptWrongSplitSharedSlots: a wrong split= that gives the same
// segment count and keeps every entry inside its file still cuts the LUT
// at the wrong places, so slots get claimed twice; adopt must see that
// rather than write a descriptor that serves wrong data.
func TestAdoptWrongSplitSharedSlots(t *testing.T) {
	p := format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 256 << 10, SectorSize: 512}
	path := testImageNoCheck(t, p)
	d := mustOpen(t, path, nil)
	if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(path); err != nil { // as xhyve leaves it: no descriptor
		t.Fatal(err)
	}
	bad := p
	bad.Split = 300 << 10 // still 4 segments
	err := Adopt(path, bad, nil)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "both map to slot") {
		t.Fatalf("Adopt with split 300k: %v, want a shared-slot refusal", err)
	}
	if err := Adopt(path, p, nil); err != nil {
		t.Fatalf("Adopt with the right split: %v", err)
	}
}

// TestAdoptSizeHint: a size that is not whole sectors (xhyve accepted such
// sizes and kept floor(size/sectorsize) LUT entries) is refused with the
// size the LUT actually holds.
func TestAdoptSizeHint(t *testing.T) {
	path := copyFixture(t, "hdd512.img")
	err := Adopt(path, format.Params{Layout: format.LayoutSparse, Size: 96<<10 + 100, Split: 32 << 10, SectorSize: 512}, nil)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "adopt with size=98304") {
		t.Fatalf("Adopt with size 96k+100: %v, want the hint size=98304", err)
	}
}
