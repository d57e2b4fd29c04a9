package blockif

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// FuzzOpenLUT: a disk whose LUT and segment lengths are arbitrary bytes
// opens, reads and checks without panicking; every error is ErrCorrupt
// (or a plain I/O error) and reads return either data or an error.
func FuzzOpenLUT(f *testing.F) {
	f.Add(bytes.Repeat([]byte{0xFF}, 64), uint16(0), uint16(4096))
	f.Add([]byte{0, 0, 0, 0, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF}, uint16(8192), uint16(100))
	lutSeed, err := os.ReadFile(filepath.Join("..", "testdata", "xhyve", "hdd512.img.lut"))
	if err != nil || len(lutSeed) < 64 {
		f.Fatalf("seed: xhyve fixture LUT: %v (%d bytes)", err, len(lutSeed))
	}
	f.Add(lutSeed[:64], uint16(3584), uint16(7168))
	f.Fuzz(func(t *testing.T, lutBytes []byte, seg0, seg1 uint16) {
		for _, k := range lut.Kinds {
			fuzzOpenLUT(t, k, lutBytes, seg0, seg1)
		}
	})
}

// fuzzOpenLUT is one FuzzOpenLUT case, for a LUT of kind k.
func fuzzOpenLUT(t *testing.T, k lut.Kind, lutBytes []byte, seg0, seg1 uint16) {
	const ss = 512
	p := format.Params{Layout: format.LayoutSparse, Size: 16 * ss, Split: 8 * ss, SectorSize: ss, LUT: k}
	mem := vfs.NewMemFS()
	path := "/f/disk.img"
	if err := Create(path, p, &Options{FS: mem}); err != nil {
		t.Fatal(err)
	}
	put := func(name string, data []byte) {
		fh, err := mem.OpenFile(name, os.O_RDWR|os.O_TRUNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		fh.WriteAt(data, 0)
		fh.Close()
	}
	put(path+lut.Suffix, lutBytes)
	put(path+".0000", bytes.Repeat([]byte{1}, int(seg0)))
	put(path+".0001", bytes.Repeat([]byte{2}, int(seg1)))
	d, err := Open(path, &Options{FS: mem, ReadOnly: true})
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Open: error outside ErrCorrupt: %v", err)
		}
		return
	}
	defer d.Close()
	buf := make([]byte, p.Size)
	if _, err := d.ReadAt(buf, 0); err != nil && !errors.Is(err, ErrCorrupt) {
		t.Fatalf("ReadAt: error outside ErrCorrupt: %v", err)
	}
	if _, err := d.Extents(0, p.Size); err != nil && !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Extents: %v", err)
	}
	r, err := d.check(nil)
	if err != nil && !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Check: %v", err)
	}
	if err == nil {
		var n int64 // the check counts exactly the allocated entries
		for _, v := range k.DecodeEntries(lutBytes[:min(len(lutBytes), int(p.Sectors())*lut.EntrySize)]) {
			if v != lut.Unallocated {
				n++
			}
		}
		if r.AllocatedSectors != n {
			t.Fatalf("%s LUT % x: check counts %d allocated sectors, the LUT holds %d", k, lutBytes, r.AllocatedSectors, n)
		}
	}
}
