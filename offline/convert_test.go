package offline

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// rawWithData writes a raw image of size bytes where about a tenth of the
// 512-byte sectors hold random data, including the first and last.
func rawWithData(t testing.TB, path string, size int64, rng *rand.Rand) []byte {
	t.Helper()
	b := make([]byte, size)
	for s := int64(0); s < size; s += 512 {
		if s == 0 || s+512 >= size || rng.IntN(10) == 0 {
			copy(b[s:min(s+512, size)], randBytes(rng, 512))
		}
	}
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestConvertRoundTrip: raw → sparse → split → raw and sparse(512) →
// sparse(4096) are byte-identical, with sizes that are not a multiple of
// split; the sparse copies allocate only non-zero sectors, in logical
// order; the raw output is sparse on disk.
func TestConvertRoundTrip(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		dir := t.TempDir()
		rng := rand.New(rand.NewPCG(8, 8))
		size := int64(5*(64<<10) + 3*4096)
		want := rawWithData(t, filepath.Join(dir, "in.raw"), size, rng)
		steps := []struct {
			from, to string
			o        ConvertOptions
		}{
			{"in.raw", "a.sparse", ConvertOptions{Layout: format.LayoutSparse, Split: 64 << 10, SectorSize: 4096, LUT: kind}},
			{"a.sparse", "b.split", ConvertOptions{Layout: format.LayoutSplit, Split: 48 << 10}},
			{"b.split", "c.raw", ConvertOptions{Layout: format.LayoutRaw, Workers: 3}},
			{"c.raw", "d.sparse512", ConvertOptions{Layout: format.LayoutSparse, Split: 40 << 10, SectorSize: 512, LUT: kind}},
			{"d.sparse512", "e.sparse4096", ConvertOptions{Layout: format.LayoutSparse, SectorSize: 4096, Split: 64 << 10}},
			{"e.sparse4096", "f.raw", ConvertOptions{Layout: format.LayoutRaw}},
		}
		for _, s := range steps {
			src, dst := filepath.Join(dir, s.from), filepath.Join(dir, s.to)
			var last int64
			s.o.Progress = func(done, total int64) {
				if done < last || total != size {
					t.Errorf("progress went %d → %d of %d", last, done, total)
				}
				last = done
			}
			rep, err := Convert(src, dst, &s.o)
			if err != nil {
				t.Fatalf("convert %s → %s: %v", s.from, s.to, err)
			}
			if last != size {
				t.Errorf("%s: progress ended at %d of %d", s.to, last, size)
			}
			if got := content(t, dst, nil); !bytes.Equal(got, want) {
				t.Fatalf("%s → %s: content differs at byte %d", s.from, s.to, firstDiff(got, want))
			}
			if s.o.Layout != format.LayoutRaw {
				r := mustCheck(t, dst, nil, false)
				if s.o.Layout == format.LayoutSparse {
					var nz int64
					for o := int64(0); o < size; o += rep.Params.SectorSize {
						if !isZero(want[o : o+rep.Params.SectorSize]) {
							nz++
						}
					}
					if r.AllocatedSectors != nz || r.Fragments > int64(rep.Params.Segments()) {
						t.Errorf("%s: %d sectors allocated (want %d non-zero), %d fragments", s.to, r.AllocatedSectors, nz, r.Fragments)
					}
				}
			}
			if fi, err := os.Stat(filepath.Join(dir, "."+s.to+".converting")); err == nil {
				t.Errorf("temporary %s left behind", fi.Name())
			}
		}
		// The raw output keeps holes.
		f, _ := vfs.OS{}.OpenFile(filepath.Join(dir, "f.raw"), os.O_RDONLY, 0)
		a, _ := f.Allocated()
		f.Close()
		if a >= size {
			t.Errorf("raw output occupies %d bytes of %d: not sparse", a, size)
		}
	})
}

// TestConvertRefusesAndOverwrites: an existing destination is refused
// (untouched) unless Overwrite; the source is never changed.
func TestConvertRefusesAndOverwrites(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		dir := t.TempDir()
		rng := rand.New(rand.NewPCG(9, 9))
		src := filepath.Join(dir, "src.raw")
		want := rawWithData(t, src, 3*4096*7, rng)
		dst := filepath.Join(dir, "dst.img")
		if _, err := Convert(src, dst, &ConvertOptions{Split: 16 << 10}); err != nil {
			t.Fatal(err)
		}
		before := fileDigest(t, dir)
		if _, err := Convert(src, dst, nil); !errors.Is(err, blockif.ErrExist) {
			t.Fatalf("convert onto existing image: %v, want blockif.ErrExist", err)
		}
		if _, err := Convert(src, src, &ConvertOptions{Overwrite: true}); !errors.Is(err, ErrInvalid) {
			t.Fatalf("convert onto itself: %v", err)
		}
		sameDigest(t, "refused convert", before, fileDigest(t, dir))
		// Overwrite a sparse image of 6 segments with a split one of 2.
		if _, err := Convert(src, dst, &ConvertOptions{Overwrite: true, Layout: format.LayoutSplit, Split: 64 << 10}); err != nil {
			t.Fatal(err)
		}
		if got := content(t, dst, nil); !bytes.Equal(got, want) {
			t.Fatal("overwritten content differs")
		}
		mustCheck(t, dst, nil, false)
		if _, err := os.Stat(dst + ".lut"); err == nil {
			t.Error("old LUT left behind")
		}
		if b, _ := os.ReadFile(src); !bytes.Equal(b, want) {
			t.Error("source changed")
		}
		if _, err := Convert(src, filepath.Join(dir, "bad.img"), &ConvertOptions{SectorSize: 65536}); !errors.Is(err, ErrInvalid) ||
			!strings.Contains(err.Error(), "truncate -s 131072 "+src) {
			t.Errorf("size not a multiple of the sector size: %v, want ErrInvalid and how to pad the source", err)
		}

		// An image open for writing (a server, a mount) is not replaced under
		// its writer.
		d := mustOpen(t, dst, nil)
		before = fileDigest(t, dir)
		if _, err := Convert(src, dst, &ConvertOptions{Overwrite: true, Split: 16 << 10}); !errors.Is(err, blockif.ErrInUse) {
			t.Fatalf("overwrite of an image in use: %v, want blockif.ErrInUse", err)
		}
		sameDigest(t, "refused overwrite of an image in use", before, fileDigest(t, dir))
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}

		// Replacing a plain file removes that file only, not files that
		// merely share its name as a prefix.
		plain := filepath.Join(dir, "q.raw")
		for _, name := range []string{plain, plain + ".0000", plain + ".lut", plain + ".tmp"} {
			if err := os.WriteFile(name, []byte("keep "+name), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := Convert(dst, plain, &ConvertOptions{Overwrite: true, Layout: format.LayoutRaw}); err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(plain); !bytes.Equal(got, want) {
			t.Fatal("overwritten plain file has the wrong content")
		}
		for _, name := range []string{plain + ".0000", plain + ".lut", plain + ".tmp"} {
			if got, err := os.ReadFile(name); err != nil || string(got) != "keep "+name {
				t.Errorf("%s was removed or changed by convert --overwrite of %s: %v", name, plain, err)
			}
		}
	})
}

// TestConvertCrash interrupts a convert at every I/O step: afterwards
// there is either no image at the destination or a complete one.
func TestConvertCrash(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		rng := rand.New(rand.NewPCG(10, 10))
		base := vfs.NewMemFS()
		src := "/img/src.img"
		p := format.Params{Layout: format.LayoutSparse, Size: 3*(16<<10) + 4096, Split: 16 << 10, SectorSize: 4096, LUT: kind}
		if err := blockif.Create(src, p, &blockif.Options{FS: base}); err != nil {
			t.Fatal(err)
		}
		d := mustOpen(t, src, &blockif.Options{FS: base})
		want := fragment(t, d, rng, 30)
		d.Close()
		dst := "/img/dst.img"
		for _, layout := range []format.Layout{format.LayoutSparse, format.LayoutSplit, format.LayoutRaw} {
			probe := base.Crash(rng)
			ops0 := probe.Ops()
			if _, err := Convert(src, dst, &ConvertOptions{FS: probe, Layout: layout, Workers: 1}); err != nil {
				t.Fatal(err)
			}
			n := probe.Ops() - ops0
			whole := 0
			for k := int64(0); k <= n; k++ {
				m := base.Crash(rng)
				m.SetCrashAfter(k)
				_, convErr := Convert(src, dst, &ConvertOptions{FS: m, Layout: layout, Workers: 1})
				if convErr != nil && !errors.Is(convErr, vfs.ErrCrashed) {
					t.Fatalf("k=%d: %v", k, convErr)
				}
				after := m.Crash(rng)
				if _, err := after.Stat(dst); err != nil {
					if convErr == nil || k == n {
						// Convert reported success (or would have: the
						// crash came after its last step), so the image
						// must have been durable.
						t.Fatalf("%s k=%d: convert succeeded but after the crash there is no image: %v", layout, k, err)
					}
					continue // interrupted: no image is fine
				}
				whole++
				got := content(t, dst, after)
				if !bytes.Equal(got, want) {
					t.Fatalf("%s k=%d: an image exists at the destination but differs at byte %d", layout, k, firstDiff(got, want))
				}
				if layout != format.LayoutRaw {
					mustCheck(t, dst, after, false)
				}
			}
			t.Logf("%s: crashed at each of %d steps; %d left a whole image, the rest none", layout, n+1, whole)
		}
	})
}

// TestConvertIntoOwnFiles: a destination that is one of the source
// image's own files (a segment, the LUT), or the reverse, is refused even
// with Overwrite: the copy would destroy what it reads.
func TestConvertIntoOwnFiles(t *testing.T) {
	p := format.Params{Layout: format.LayoutSparse, Size: 4 * 4096, Split: 2 * 4096, SectorSize: 4096}
	src := testImage(t, p, nil, false)
	before := fileDigest(t, filepath.Dir(src))
	for _, dst := range []string{src + ".0001", src + ".lut", src + ".0000"} {
		if _, err := Convert(src, dst, &ConvertOptions{Layout: format.LayoutRaw, Overwrite: true}); !errors.Is(err, ErrInvalid) {
			t.Errorf("convert %s into its own %s: %v, want ErrInvalid", src, dst, err)
		}
	}
	sameDigest(t, "refused converts", before, fileDigest(t, filepath.Dir(src)))
	if !format.PartOf("/a/x.img.0012", "/a/x.img") || format.PartOf("/a/x.img.raw", "/a/x.img") || format.PartOf("/a/x.img.01", "/a/x.img") {
		t.Error("partOf misclassifies")
	}
}
