package offline

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// readAll reads a whole disk through the engine.
func readDisk(t *testing.T, path string) []byte {
	t.Helper()
	d := mustOpen(t, path, &blockif.Options{ReadOnly: true})
	defer d.Close()
	b := make([]byte, d.Size())
	if _, err := d.ReadAt(b, 0); err != nil {
		t.Fatal(err)
	}
	return b
}

// Convert moves an image between the LUT kinds, sparse to sparse, without
// changing a byte of its content; with no --lut it keeps the source's.
// The xhyve fixture converted to thin and back reads what xhyve wrote.
func TestConvertBetweenLUTKinds(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 7))
	dir := t.TempDir()
	want := rawWithData(t, filepath.Join(dir, "in.raw"), 3*(64<<10)+5*4096, rng)
	steps := []struct {
		src, dst string
		o        ConvertOptions
		kind     lut.Kind
	}{
		{"in.raw", "x.img", ConvertOptions{Split: 64 << 10, SectorSize: 4096}, lut.Xhyve},
		{"x.img", "t.img", ConvertOptions{LUT: lut.Thin}, lut.Thin},
		{"t.img", "t2.img", ConvertOptions{Split: 32 << 10}, lut.Thin}, // keeps the source's kind
		{"t2.img", "x2.img", ConvertOptions{LUT: lut.Xhyve}, lut.Xhyve},
	}
	for _, s := range steps {
		src, dst := filepath.Join(dir, s.src), filepath.Join(dir, s.dst)
		rep, err := Convert(src, dst, &s.o)
		if err != nil {
			t.Fatalf("%s → %s: %v", s.src, s.dst, err)
		}
		if rep.Params.LUTKind() != s.kind || kindOf(t, dst) != s.kind {
			t.Errorf("%s: LUT kind %q (report %q), want %q", s.dst, kindOf(t, dst), rep.Params.LUTKind(), s.kind)
		}
		mustCheck(t, dst, nil, false)
		if got := readDisk(t, dst); !bytes.Equal(got, want) {
			t.Fatalf("%s differs from the source at byte %d", s.dst, firstDiff(got, want))
		}
	}
	// Same geometry, same allocation order: the xhyve LUTs are identical,
	// and the thin one holds each entry plus one.
	x, _ := os.ReadFile(filepath.Join(dir, "x.img") + lut.Suffix)
	th, _ := os.ReadFile(filepath.Join(dir, "t.img") + lut.Suffix)
	if !bytes.Equal(lut.Xhyve.EncodeEntries(lut.Thin.DecodeEntries(th)), x) {
		t.Error("thin LUT does not encode the same entries as the xhyve one")
	}
	if _, err := Convert(filepath.Join(dir, "x.img"), filepath.Join(dir, "r.raw"), &ConvertOptions{Layout: format.LayoutRaw, LUT: lut.Thin}); !errors.Is(err, ErrInvalid) {
		t.Errorf("raw destination with lut=thin: %v, want ErrInvalid", err)
	}

	fixture := copyFixture(t, "hdd512.img")
	expected, err := os.ReadFile(fixture + ".expected")
	if err != nil {
		t.Fatal(err)
	}
	if err := Adopt(fixture, format.Params{Layout: format.LayoutSparse, Size: 96 << 10, Split: 32 << 10, SectorSize: 512}, nil); err != nil {
		t.Fatal(err)
	}
	thin := filepath.Join(dir, "fixture-thin.img")
	back := filepath.Join(dir, "fixture-xhyve.img")
	if _, err := Convert(fixture, thin, &ConvertOptions{LUT: lut.Thin}); err != nil {
		t.Fatal(err)
	}
	if _, err := Convert(thin, back, &ConvertOptions{LUT: lut.Xhyve}); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{fixture, thin, back} {
		if got := readDisk(t, p); !bytes.Equal(got, expected) {
			t.Errorf("%s differs from what xhyve wrote at byte %d", p, firstDiff(got, expected))
		}
	}
}

// Adopt recognises xhyve images only: a thin kind is refused.
func TestAdoptRefusesThin(t *testing.T) {
	fixture := copyFixture(t, "hdd512.img")
	err := Adopt(fixture, format.Params{Layout: format.LayoutSparse, Size: 96 << 10, Split: 32 << 10, SectorSize: 512, LUT: lut.Thin}, nil)
	if !errors.Is(err, ErrInvalid) {
		t.Errorf("adopt with lut=thin: %v, want ErrInvalid", err)
	}
	if _, err := os.Stat(fixture); err == nil {
		t.Error("refused adopt wrote a descriptor")
	}
}

// The advice check gives for a fragmented image names shrink, and shrink
// indeed makes it go away, on both LUT kinds.
func TestShrinkClearsAdvice(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 512
		p := format.Params{Layout: format.LayoutSparse, Size: 2048 * ss, Split: 1024 * ss, SectorSize: ss, LUT: kind}
		path := testImage(t, p, nil, false)
		d := mustOpen(t, path, nil)
		one := bytes.Repeat([]byte{3}, ss)
		for s := int64(2047); s >= 0; s -= 2 { // backwards: every sector a break
			if _, err := d.WriteAt(one, s*ss); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		before := mustCheck(t, path, nil, false)
		if before.Advice == 0 || !before.Clean() {
			t.Fatalf("fragmented image: advice %d, clean %v: %+v", before.Advice, before.Clean(), before.Findings)
		}
		if _, err := Shrink(path, nil); err != nil {
			t.Fatal(err)
		}
		after := mustCheck(t, path, nil, false)
		if after.Advice != 0 || after.Fragments != 0 || after.AllocatedSectors != 1024 {
			t.Errorf("after shrink: advice %d, fragments %d, allocated %d: %+v", after.Advice, after.Fragments, after.AllocatedSectors, after.Findings)
		}
	})
}
