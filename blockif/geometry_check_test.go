package blockif

import (
	"errors"
	"path/filepath"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
)

// TestCrossExamineImpliesTheRightGeometry: one wrong key of the descriptor
// makes it disagree with the files, and the geometry they imply is the
// right one; Open refuses a split descriptor beside a LUT.
func TestCrossExamineImpliesTheRightGeometry(t *testing.T) {
	p := format.Params{Layout: format.LayoutSparse, Size: 4 << 20, Split: 1 << 20, SectorSize: 4096}
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := Create(path, p, nil); err != nil {
		t.Fatal(err)
	}
	d := mustOpen(t, path, nil)
	for off := int64(0); off < p.Size; off += 3 * 4096 {
		if _, err := d.WriteAt([]byte{byte(off>>12) | 1}, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	good, err := format.ReadDescriptor(nil, path)
	if err != nil {
		t.Fatal(err)
	}
	if g, err := CrossExamine(nil, path, good); err != nil || !g.Trusted() {
		t.Fatalf("the right descriptor: %+v, %v", g, err)
	}
	for _, wrong := range []func(*format.Descriptor){
		func(d *format.Descriptor) { d.Split = 2 << 20 },
		func(d *format.Descriptor) { d.Split = 4096 },
		func(d *format.Descriptor) { d.Size = 2 << 20 },
		func(d *format.Descriptor) { d.Size = 8 << 20 },
		func(d *format.Descriptor) { d.SectorSize = 512 },
		func(d *format.Descriptor) { d.SectorSize = 8192 },
		func(d *format.Descriptor) { d.Layout = format.LayoutSplit },
	} {
		desc := good
		wrong(&desc)
		g, err := CrossExamine(nil, path, desc)
		if err != nil {
			t.Fatal(err)
		}
		if g.Trusted() || g.Implied == nil || *g.Implied != p {
			t.Errorf("descriptor %+v: disagreements %q, implied %+v; want the files to imply %+v", desc.Params, g.Disagreements, g.Implied, p)
		}
	}
	desc := good
	desc.Layout = format.LayoutSplit
	if err := format.WriteDescriptor(nil, path, desc); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(path, &Options{ReadOnly: true}); !errors.Is(err, ErrGeometry) {
		t.Errorf("open of a split descriptor beside a LUT: %v, want ErrGeometry", err)
	}
}
