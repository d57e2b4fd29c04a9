package blockif

import (
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// A thin image's LUT is created as a hole: nothing of it is allocated,
// and the descriptor records the kind; an xhyve image's descriptor has no
// lut key at all.
func TestCreateThin(t *testing.T) {
	mem := vfs.NewMemFS()
	p := format.Params{Layout: format.LayoutSparse, Size: 64 << 20, Split: 16 << 20, SectorSize: 4096, LUT: lut.Thin}
	path := testImage(t, p, mem, false)
	f, err := mem.OpenFile(path+lut.Suffix, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, _ := f.Size(); n != p.Sectors()*lut.EntrySize {
		t.Errorf("thin LUT is %d bytes long, want %d", n, p.Sectors()*lut.EntrySize)
	}
	if a, _ := f.Allocated(); a != 0 {
		t.Errorf("empty thin LUT occupies %d bytes, want 0", a)
	}
	desc, err := format.ReadDescriptor(mem, path)
	if err != nil || desc.LUTKind() != lut.Thin || !strings.Contains(string(desc.Marshal()), "lut = thin") {
		t.Errorf("descriptor: kind %q, %v", desc.LUTKind(), err)
	}
	x := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096, LUT: lut.Xhyve}, mem, false)
	desc, err = format.ReadDescriptor(mem, x)
	if err != nil || strings.Contains(string(desc.Marshal()), "lut") {
		t.Errorf("xhyve descriptor names a LUT kind: %s (%v)", desc.Marshal(), err)
	}
	d := mustOpen(t, path, &Options{FS: mem, ReadOnly: true})
	st, err := d.Stats()
	d.Close()
	if err != nil || st.LUT != lut.Thin || st.AllocatedBytes != 0 {
		t.Errorf("Stats: LUT %q, allocated %d, %v", st.LUT, st.AllocatedBytes, err)
	}
}

// An image whose descriptor names a LUT kind this version does not know
// is refused by Open and Check, with an error naming the kind and the
// known ones.
func TestUnknownLUTKindRefused(t *testing.T) {
	path := testImageNoCheck(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096})
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, append(data, "lut = dense\n"...), 0o644); err != nil {
		t.Fatal(err)
	}
	open := func(o *Options) error {
		d, err := Open(path, o)
		if d != nil {
			d.Close()
		}
		return err
	}
	for name, fn := range map[string]func() error{
		"Open":           func() error { return open(nil) },
		"Open read-only": func() error { return open(&Options{ReadOnly: true}) },
		"Check":          func() error { _, err := Check(path, nil); return err },
	} {
		err := fn()
		if !errors.Is(err, lut.ErrUnknownKind) {
			t.Errorf("%s: %v, want ErrUnknownKind", name, err)
			continue
		}
		for _, want := range []string{`"dense"`, "xhyve", "thin"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("%s: error %q does not name %s", name, err, want)
			}
		}
	}
}

// Extents over segments that hold nothing answers from the LUT summary:
// the parts stay unloaded. A segment with data is loaded and mapped.
func TestExtentsSkipsEmptySegments(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		mem := vfs.NewMemFS()
		p := format.Params{Layout: format.LayoutSparse, Size: 8 << 20, Split: 1 << 20, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, mem, false)
		d := mustOpen(t, path, &Options{FS: mem})
		if _, err := d.WriteAt([]byte{1}, 5<<20+4096); err != nil {
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		for _, ro := range []bool{true, false} {
			d = mustOpen(t, path, &Options{FS: mem, ReadOnly: ro})
			ext, err := d.Extents(0, p.Size)
			if err != nil {
				t.Fatal(err)
			}
			want := []Extent{{0, 5<<20 + 4096, false}, {5<<20 + 4096, 4096, true}, {5<<20 + 8192, p.Size - 5<<20 - 8192, false}}
			if len(ext) != len(want) {
				t.Fatalf("read-only %v: extents %+v, want %+v", ro, ext, want)
			}
			for i := range want {
				if ext[i] != want[i] {
					t.Errorf("read-only %v: extent %d = %+v, want %+v", ro, i, ext[i], want[i])
				}
			}
			for i, s := range d.segs {
				s.mu.RLock()
				loaded := s.part != nil
				s.mu.RUnlock()
				if loaded != (i == 5) {
					t.Errorf("read-only %v: segment %d loaded = %v after Extents", ro, i, loaded)
				}
			}
			// A write to a probed-empty segment is seen by the next Extents.
			if !ro {
				if _, err := d.WriteAt([]byte{2}, 4096*3); err != nil {
					t.Fatal(err)
				}
				ext, err := d.Extents(0, 1<<20)
				if err != nil || len(ext) != 3 || !ext[1].Allocated || ext[1].Offset != 4096*3 {
					t.Errorf("after a write to segment 0: %+v, %v", ext, err)
				}
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		}
	})
}

// Check finds exactly the unreferenced slots holding data, whether they
// sit between live slots, after them, or past holes in the file, and
// takes holes and zero slots for what they are.
func TestCheckLeaksAroundHoles(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 4096
		mem := vfs.NewMemFS()
		p := format.Params{Layout: format.LayoutSparse, Size: 64 * ss, Split: 64 * ss, SectorSize: ss, LUT: kind}
		path := testImage(t, p, mem, true)
		d := mustOpen(t, path, &Options{FS: mem})
		one := make([]byte, ss)
		one[7] = 1
		for s := int64(0); s < 4; s++ { // slots 0-3
			if _, err := d.WriteAt(one, s*ss); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Trim(1*ss, 2*ss); err != nil { // slots 1, 2 punched: holes
			t.Fatal(err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		f, _ := mem.OpenFile(format.SegmentName(path, 0), os.O_RDWR, 0)
		f.WriteAt(one, 2*ss)      // slot 2: leak between live 0 and 3
		f.WriteAt(one, 10*ss)     // slots 10-11: a leak run after a hole
		f.WriteAt(one, 11*ss)     //
		f.WriteAt(one[:1], 12*ss) // slot 12: all zeros, then the file ends in a partial slot
		f.Close()
		r, err := Check(path, &Options{FS: mem})
		if err != nil {
			t.Fatal(err)
		}
		type leak struct{ slot, count int64 }
		var got []leak
		for _, f := range r.Findings {
			if f.Kind == Leak && f.Slot != 12 {
				got = append(got, leak{f.Slot, f.Count})
			}
			if f.Kind == Corruption {
				t.Errorf("corruption: %s", f)
			}
		}
		want := []leak{{2, 1}, {10, 2}}
		if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
			t.Errorf("leaks %+v, want %+v; report %+v", got, want, r.Findings)
		}
		if r.Leaks != 3 || r.AllocatedSectors != 2 || r.Slots != 13 { // + the partial slot
			t.Errorf("leaks %d, allocated %d, slots %d; want 3, 2, 13", r.Leaks, r.AllocatedSectors, r.Slots)
		}
	})
}

// A segment file far larger than its live data, and an image whose slots
// are out of logical order, are Advice findings naming `sparsedisk
// shrink`; they leave the report clean.
func TestCheckAdvice(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 512
		mem := vfs.NewMemFS()
		p := format.Params{Layout: format.LayoutSparse, Size: 2048 * ss, Split: 2048 * ss, SectorSize: ss, LUT: kind}
		path := testImage(t, p, mem, false)
		d := mustOpen(t, path, &Options{FS: mem})
		one := make([]byte, ss)
		one[0] = 1
		for s := int64(2047); s >= 1024; s-- { // backwards: every sector a break
			if _, err := d.WriteAt(one, s*ss); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		r, err := Check(path, &Options{FS: mem})
		if err != nil {
			t.Fatal(err)
		}
		if !r.Clean() || r.Advice != 1 || r.Findings[0].Kind != Advice || !strings.Contains(r.Findings[0].Message, "fragmented") ||
			!strings.Contains(r.Findings[0].Message, "sparsedisk shrink "+path) {
			t.Fatalf("fragmented image: clean %v, advice %d, findings %+v", r.Clean(), r.Advice, r.Findings)
		}
		// Bloat: a segment grown far past its live data (as an old
		// version's churn leaves it: a sparse tail beyond the slots).
		f, _ := mem.OpenFile(format.SegmentName(path, 0), os.O_RDWR, 0)
		f.Truncate(1024*ss + bloatMinSlack + 8*ss)
		f.Close()
		r, err = Check(path, &Options{FS: mem})
		if err != nil {
			t.Fatal(err)
		}
		var bloat *Finding
		for i, f := range r.Findings {
			if f.Kind == Advice && f.Segment == 0 {
				bloat = &r.Findings[i]
			}
		}
		if !r.Clean() || r.Advice != 2 || bloat == nil || !strings.Contains(bloat.Message, "sparsedisk shrink "+path) || bloat.Count != bloatMinSlack/ss+8 {
			t.Fatalf("bloated segment: clean %v, advice %d, findings %+v", r.Clean(), r.Advice, r.Findings)
		}
	})
}
