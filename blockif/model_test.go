package blockif

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// modelCase is one geometry for the model-based test.
type modelCase struct {
	layout     format.Layout
	sectorSize int64
	split      int64
	size       int64 // not a multiple of split: the last segment is short
	lut        lut.Kind
}

// modelCases are the geometries of the model-based tests: each sparse one
// with both LUT kinds.
func modelCases() []modelCase {
	var out []modelCase
	for _, mc := range baseModelCases() {
		out = append(out, mc)
		if mc.layout == format.LayoutSparse {
			mc.lut = lut.Thin
			out = append(out, mc)
		}
	}
	return out
}

func baseModelCases() []modelCase {
	return []modelCase{
		{format.LayoutSparse, 512, 8 << 10, 8<<10*5 + 3*512, ""},
		{format.LayoutSparse, 4096, 64 << 10, 64<<10*4 + 5*4096, ""},
		{format.LayoutSparse, 4096, 4096, 4096 * 7, ""},
		{format.LayoutSplit, 512, 8 << 10, 8<<10*3 + 512, ""},
		{format.LayoutSplit, 4096, 64 << 10, 64<<10*3 + 4096, ""},
		{format.LayoutRaw, 512, 0, 100000, ""},
	}
}

// TestModel runs seeded random I/O against a flat []byte model: aligned
// and unaligned writes, writes straddling segment boundaries, all-zero
// writes, trims, zeroing, flushes and reopens; every read must match the
// model, and Check must be clean at the end.
func TestModel(t *testing.T) {
	for _, mc := range modelCases() {
		for _, fsName := range []string{"os", "mem"} {
			t.Run(fmt.Sprintf("%s-ss%d-split%d-%s-lut=%s", mc.layout, mc.sectorSize, mc.split, fsName, mc.lut.Or()), func(t *testing.T) {
				seed := uint64(time.Now().UnixNano())
				t.Logf("seed %d", seed)
				var fsys vfs.FS
				if fsName == "mem" {
					fsys = vfs.NewMemFS()
				}
				runModel(t, mc, fsys, seed, 1500)
			})
		}
	}
}

func runModel(t *testing.T, mc modelCase, fsys vfs.FS, seed uint64, ops int) {
	rng := rand.New(rand.NewPCG(seed, 1))
	path := testImage(t, format.Params{Layout: mc.layout, Size: mc.size, Split: mc.split, SectorSize: mc.sectorSize, LUT: mc.lut}, fsys, false)
	d := mustOpen(t, path, &Options{FS: fsys})
	defer func() { d.Close() }()
	size := d.Size()
	model := make([]byte, size)
	ss := mc.sectorSize
	split := mc.split
	if split == 0 {
		split = size
	}
	pickRange := func() (int64, int64) {
		var off, n int64
		switch rng.IntN(4) {
		case 0: // aligned sectors
			off = rng.Int64N(size/ss) * ss
			n = (1 + rng.Int64N(8)) * ss
		case 1: // straddle a segment boundary
			b := (1 + rng.Int64N(max(size/split, 1))) * split
			off = max(0, b-rng.Int64N(2*ss)-1)
			n = 1 + rng.Int64N(3*ss)
		case 2: // long, across segments
			off = rng.Int64N(size)
			n = 1 + rng.Int64N(2*split+ss)
		default: // small unaligned
			off = rng.Int64N(size)
			n = 1 + rng.Int64N(ss+17)
		}
		return off, min(n, size-off)
	}
	for i := 0; i < ops; i++ {
		switch op := rng.IntN(20); {
		case op < 8:
			off, n := pickRange()
			p := randBytes(rng, int(n))
			if rng.IntN(5) == 0 {
				clear(p) // zero data must allocate nothing new
			}
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatalf("seed %d op %d: WriteAt(%d, %d): %v", seed, i, off, n, err)
			}
			copy(model[off:], p)
		case op < 13:
			off, n := pickRange()
			p := make([]byte, n)
			if _, err := d.ReadAt(p, off); err != nil {
				t.Fatalf("seed %d op %d: ReadAt(%d, %d): %v", seed, i, off, n, err)
			}
			if !bytes.Equal(p, model[off:off+n]) {
				t.Fatalf("seed %d op %d: ReadAt(%d, %d) differs from model at byte %d", seed, i, off, n, firstDiff(p, model[off:off+n]))
			}
		case op < 15:
			off, n := pickRange()
			var err error
			if op == 13 {
				err = d.Trim(off, n)
			} else {
				err = d.WriteZeroes(off, n)
			}
			if err != nil {
				t.Fatalf("seed %d op %d: zero(%d, %d): %v", seed, i, off, n, err)
			}
			clear(model[off : off+n])
		case op < 17:
			if err := d.Flush(); err != nil {
				t.Fatalf("seed %d op %d: Flush: %v", seed, i, err)
			}
		case op == 17:
			off, n := pickRange()
			ext, err := d.Extents(off, n)
			if err != nil {
				t.Fatalf("seed %d: Extents: %v", seed, err)
			}
			pos := off
			for _, e := range ext {
				if e.Offset != pos || e.Length <= 0 {
					t.Fatalf("seed %d: Extents(%d,%d) not contiguous: %+v", seed, off, n, ext)
				}
				if !e.Allocated && !isZero(model[e.Offset:e.Offset+e.Length]) {
					t.Fatalf("seed %d: hole %+v holds data in the model", seed, e)
				}
				pos += e.Length
			}
			if pos != off+n {
				t.Fatalf("seed %d: Extents(%d,%d) end at %d", seed, off, n, pos)
			}
		case op == 18 && rng.IntN(10) == 0:
			if err := d.Close(); err != nil {
				t.Fatalf("seed %d: Close: %v", seed, err)
			}
			d = mustOpen(t, path, &Options{FS: fsys})
		}
	}
	all := make([]byte, size)
	if _, err := d.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, model) {
		t.Fatalf("seed %d: final content differs from model at byte %d", seed, firstDiff(all, model))
	}
	if err := d.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	d = mustOpen(t, path, &Options{FS: fsys, ReadOnly: true})
	clear(all)
	if _, err := d.ReadAt(all, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(all, model) {
		t.Fatalf("seed %d: content after reopen differs from model at byte %d", seed, firstDiff(all, model))
	}
}

func firstDiff(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}
