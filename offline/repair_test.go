package offline

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// sectorsOf reads every sector of an image one by one; a sector that
// cannot be read is nil. It returns nil if the image does not open.
func sectorsOf(t testing.TB, path string) [][]byte {
	t.Helper()
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true, NoDirtyCheck: true})
	if err != nil {
		return nil
	}
	defer d.Close()
	ss := d.SectorSize()
	out := make([][]byte, d.Size()/ss)
	for s := range out {
		b := make([]byte, ss)
		if _, err := d.ReadAt(b, int64(s)*ss); err == nil {
			out[s] = b
		}
	}
	return out
}

func splitSectors(b []byte, ss int64) [][]byte {
	var out [][]byte
	for o := int64(0); o < int64(len(b)); o += ss {
		out = append(out, b[o:o+ss])
	}
	return out
}

// TestCheckRepairFaults injects each kind of fault, checks that Check
// classifies it (leak or corruption), repairs, and checks that the image
// is clean afterwards and every sector not named as lost reads as before.
func TestCheckRepairFaults(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 3*(16<<10) + 2*4096, Split: 16 << 10, SectorSize: 4096, LUT: kind}
		perSeg := p.Split / p.SectorSize
		type fault struct {
			name    string
			kind    blockif.FindingKind // worst finding expected
			mode    RepairMode
			inject  func(t *testing.T, path string)
			wantMsg string // in some action
			lossy   bool   // refused without AcceptLoss
		}
		faults := []fault{
			{"leak", blockif.Leak, RepairLeaks, func(t *testing.T, path string) { addLeak(t, nil, path, 1, p.SectorSize) }, "leaked", false},
			{"partial-slot", blockif.Leak, RepairLeaks, func(t *testing.T, path string) {
				f, _ := os.OpenFile(format.SegmentName(path, 0), os.O_RDWR, 0)
				fi, _ := f.Stat()
				f.WriteAt([]byte("torn"), fi.Size())
				f.Close()
			}, "partial slot", false},
			{"entry-past-end", blockif.Corruption, RepairAll, func(t *testing.T, path string) { setEntry(t, nil, path, 2, 1000) }, "past the end", true},
			{"shared-slot", blockif.Corruption, RepairAll, func(t *testing.T, path string) {
				e := lutEntries(t, path)
				setEntry(t, nil, path, 3, e[1]) // sector 3 now shares sector 1's slot
			}, "own copy", false},
			{"lut-truncated", blockif.Corruption, RepairAll, func(t *testing.T, path string) {
				os.Truncate(path+lut.Suffix, (p.Sectors()-3)*lut.EntrySize)
			}, "short of", true},
			{"lut-too-long", blockif.Corruption, RepairAll, func(t *testing.T, path string) {
				f, _ := os.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
				f.WriteAt(kind.EncodeEntries(slices.Repeat([]uint32{lut.Unallocated}, 16)), p.Sectors()*lut.EntrySize)
				f.Close()
			}, "longer than", false},
			{"segment-missing", blockif.Corruption, RepairAll, func(t *testing.T, path string) { os.Remove(format.SegmentName(path, 1)) }, "missing", true},
			{"segment-extra", blockif.Corruption, RepairAll, func(t *testing.T, path string) {
				os.WriteFile(format.SegmentName(path, p.Segments()), []byte("stray data"), 0o644)
			}, "moved aside", false},
			{"intent-pending", blockif.Corruption, RepairAll, func(t *testing.T, path string) {
				desc, _ := format.ReadDescriptor(nil, path)
				desc.Intent = format.IntentShrink
				format.WriteDescriptor(nil, path, desc)
				os.WriteFile(format.ShrinkCopyName(path, 0), []byte("half a copy"), 0o644)
			}, "finished", false},
		}
		for _, f := range faults {
			t.Run(f.name, func(t *testing.T) {
				path := testImage(t, p, nil, false)
				d := mustOpen(t, path, nil)
				rng := rand.New(rand.NewPCG(7, uint64(len(f.name))))
				for s := int64(0); s < p.Sectors(); s++ {
					if s%3 != 2 || s < 4 { // every segment holds data; sectors 0-3 allocated
						d.WriteAt(randBytes(rng, int(p.SectorSize)), s*p.SectorSize)
					}
				}
				pristine := make([]byte, p.Size)
				d.ReadAt(pristine, 0)
				d.Close()
				f.inject(t, path)
				baseline := sectorsOf(t, path)
				if baseline == nil {
					baseline = splitSectors(pristine, p.SectorSize)
				}
				before := fileDigest(t, filepath.Dir(path))
				r, err := blockif.Check(path, nil)
				if err != nil {
					t.Fatalf("check: %v", err)
				}
				sameDigest(t, "check", before, fileDigest(t, filepath.Dir(path)))
				switch f.kind {
				case blockif.Leak:
					if r.Leaks == 0 || r.Corruptions != 0 {
						t.Fatalf("want leaks only, got %d leaks %d corruptions: %v", r.Leaks, r.Corruptions, r.Findings)
					}
				case blockif.Corruption:
					if r.Corruptions == 0 {
						t.Fatalf("want corruption, got %v", r.Findings)
					}
				}
				if f.lossy {
					if _, err := Repair(path, f.mode, nil); !errors.Is(err, ErrGeometry) {
						t.Fatalf("repair without AcceptLoss: %v, want ErrGeometry", err)
					}
					sameDigest(t, "refused repair", before, fileDigest(t, filepath.Dir(path)))
				}
				rep, err := RepairWith(path, f.mode, RepairOptions{AcceptLoss: f.lossy}, nil)
				if err != nil {
					t.Fatalf("repair: %v", err)
				}
				// Undo puts back every byte (intents excepted: finishing
				// one is what any writable open does); repair again.
				if f.name != "intent-pending" {
					if rep.Undo == "" {
						t.Fatal("repair changed the image but names no undo log")
					}
					if _, err := Undo(path, nil); err != nil {
						t.Fatalf("undo: %v", err)
					}
					sameDigest(t, "undo", before, fileDigest(t, filepath.Dir(path)))
					if rep, err = RepairWith(path, f.mode, RepairOptions{AcceptLoss: f.lossy}, nil); err != nil {
						t.Fatalf("repair after undo: %v", err)
					}
				}
				var msgs []string
				lost := map[int64]bool{}
				for _, a := range rep.Actions {
					msgs = append(msgs, a.String())
					if a.Lost {
						for s := a.Sector; s < a.Sector+max(a.Count, 1); s++ {
							lost[s] = true
						}
					}
				}
				t.Logf("repair: %s", strings.Join(msgs, "; "))
				if !strings.Contains(strings.Join(msgs, "\n"), f.wantMsg) {
					t.Errorf("no action mentions %q", f.wantMsg)
				}
				r2, err := blockif.Check(path, nil)
				if err != nil || !r2.Clean() {
					t.Fatalf("after repair: %v %v", err, r2.Findings)
				}
				after := sectorsOf(t, path)
				for s := range after {
					switch {
					case lost[int64(s)]:
						if !isZero(after[s]) {
							t.Errorf("sector %d named lost but does not read zeros", s)
						}
					case baseline[s] == nil:
						// Unreadable before (the engine refuses a whole
						// segment with a bad entry): must hold what was
						// written before the fault.
						if !bytes.Equal(after[s], pristine[int64(s)*p.SectorSize:int64(s+1)*p.SectorSize]) {
							t.Errorf("sector %d was unreadable before repair, is not named lost, and does not read what was written", s)
						}
					case !bytes.Equal(after[s], baseline[s]):
						t.Errorf("sector %d (segment %d) not named lost but reads differently after repair", s, int64(s)/perSeg)
					}
				}
			})
		}
	})
}

// lutEntries reads the whole LUT.
func lutEntries(t testing.TB, path string) []uint32 {
	b, err := os.ReadFile(path + lut.Suffix)
	if err != nil {
		t.Fatal(err)
	}
	return kindOf(t, path).DecodeEntries(b)
}

func TestRepairSplitAndRaw(t *testing.T) {
	p := format.Params{Layout: format.LayoutSplit, Size: 2*(16<<10) + 4096, Split: 16 << 10, SectorSize: 4096}
	path := testImage(t, p, nil, false)
	d := mustOpen(t, path, nil)
	d.WriteAt(bytes.Repeat([]byte{9}, int(p.Size)), 0)
	d.Close()
	f, _ := os.OpenFile(format.SegmentName(path, 2), os.O_RDWR, 0)
	f.WriteAt([]byte("past the end"), 4096) // segment longer than its share
	f.Close()
	r, err := blockif.Check(path, nil)
	if err != nil || r.Corruptions == 0 {
		t.Fatalf("check of over-long split segment: %v %+v", err, r)
	}
	if _, err := Repair(path, RepairAll, nil); err != nil {
		t.Fatal(err)
	}
	if got := content(t, path, nil); !bytes.Equal(got, bytes.Repeat([]byte{9}, int(p.Size))) {
		t.Fatal("split content changed by repair")
	}
	raw := filepath.Join(t.TempDir(), "raw.img")
	os.WriteFile(raw, make([]byte, 8192), 0o644)
	if r, err := blockif.Check(raw, nil); err != nil || !r.Clean() {
		t.Fatalf("check raw: %v %v", err, r)
	}
	if _, err := Repair(raw, RepairAll, nil); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(t.TempDir(), "bad.img")
	os.WriteFile(bad, []byte("# sparsedisk image\nformat = sparsedisk/1\nlayout = sparse\nsize = 12\n"), 0o644)
	// Issue 5 counts an inconsistent descriptor as corruption.
	if r, err := blockif.Check(bad, nil); err != nil || r.Corruptions != 1 {
		t.Fatalf("check of malformed descriptor: %v %+v, want one corruption", err, r)
	}
}

// TestCheckListsEveryStructuralProblem: damage that keeps an image from
// opening is reported one finding per problem, each naming its file, and
// a descriptor that cannot be parsed is corruption (not "could not check").
func TestCheckListsEveryStructuralProblem(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 4 * (16 << 10), Split: 16 << 10, SectorSize: 4096, LUT: kind}
		path := filepath.Join(t.TempDir(), "disk.img")
		if err := blockif.Create(path, p, nil); err != nil {
			t.Fatal(err)
		}
		os.Remove(format.SegmentName(path, 1))
		os.Remove(format.SegmentName(path, 3))
		os.Truncate(path+lut.Suffix, 8)
		os.WriteFile(format.SegmentName(path, 4), []byte("stray"), 0o644)
		r, err := blockif.Check(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]bool{format.SegmentName(path, 1): false, format.SegmentName(path, 3): false, path + lut.Suffix: false, format.SegmentName(path, 4): false}
		for _, f := range r.Findings {
			if f.Kind != blockif.Corruption {
				t.Errorf("finding %s is not corruption", f)
			}
			if _, ok := want[f.File]; ok {
				want[f.File] = true
			}
		}
		for file, seen := range want {
			if !seen {
				t.Errorf("no finding names %s; report: %+v", file, r.Findings)
			}
		}
		if r.Corruptions < 4 || r.Geometry == nil || r.Geometry.Trusted() {
			t.Errorf("%d corruptions, geometry %+v; want at least 4, as the descriptor disagrees with the files", r.Corruptions, r.Geometry)
		}

		os.WriteFile(path, []byte("this is not a descriptor\n"), 0o644)
		r, err = blockif.Check(path, nil)
		if err != nil || r.Corruptions != 1 || r.Findings[0].File != path {
			t.Errorf("garbage descriptor: %v %+v, want one corruption naming %s", err, r, path)
		}
		if _, err := blockif.Check(filepath.Join(t.TempDir(), "absent.img"), nil); err == nil {
			t.Error("a missing image must fail the check itself")
		}
	})
}

// TestCheckProgress: Check reports progress once per segment, growing,
// in bytes of the virtual disk, ending at its size (the last segment is
// shorter than the others here).
func TestCheckProgress(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 3*(64<<10) + 8192, Split: 64 << 10, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, false)
		var got []int64
		r, err := blockif.Check(path, &blockif.Options{Progress: func(done, total int64) {
			if total != p.Size {
				t.Errorf("progress total %d, want the disk size %d", total, p.Size)
			}
			got = append(got, done)
		}})
		if err != nil || !r.Clean() {
			t.Fatalf("Check = %+v, %v", r, err)
		}
		want := []int64{64 << 10, 128 << 10, 192 << 10, p.Size}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("progress calls %v, want %v", got, want)
		}
	})
}

// TestReleaseTables: a read-only Disk drops its loaded LUT parts and reads
// them again when needed (same answers); a writable Disk refuses, since
// its tables may hold entries not yet in P.lut.
func TestReleaseTables(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 4 * 4096, Split: 2 * 4096, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, false)
		w := mustOpen(t, path, nil)
		if _, err := w.WriteAt(bytes.Repeat([]byte{4}, 4096), 2*4096); err != nil {
			t.Fatal(err)
		}
		if err := w.ReleaseTables(); !errors.Is(err, ErrInvalid) {
			t.Fatalf("ReleaseTables on a writable Disk: %v, want ErrInvalid", err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		r := mustOpen(t, path, &blockif.Options{ReadOnly: true})
		defer r.Close()
		before, err := r.Extents(0, p.Size)
		if err != nil {
			t.Fatal(err)
		}
		if err := r.ReleaseTables(); err != nil {
			t.Fatal(err)
		}
		after, err := r.Extents(0, p.Size)
		if err != nil || fmt.Sprint(before) != fmt.Sprint(after) {
			t.Fatalf("extents after release %v (%v), before %v", after, err, before)
		}
		buf := make([]byte, 4096)
		if _, err := r.ReadAt(buf, 2*4096); err != nil || buf[0] != 4 {
			t.Fatalf("read after release: %v, byte %d", err, buf[0])
		}
	})
}

// TestStraySegmentAfterGap: a segment file past the geometry is found even
// when the numbering has a gap before it (the directory is listed), and
// repair moves it aside with its data.
func TestStraySegmentAfterGap(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 128 << 10, Split: 64 << 10, SectorSize: 4096, LUT: kind}
		path := testImageNoCheck(t, p)
		stray := format.SegmentName(path, 5) // .0002 to .0004 do not exist
		if err := os.WriteFile(stray, []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
		// Files that only share the prefix are not segments.
		for _, other := range []string{path + ".0005.bak", path + ".01", path + ".lut.old"} {
			if err := os.WriteFile(other, []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		r, err := blockif.Check(path, nil)
		if err != nil {
			t.Fatal(err)
		}
		if r.Corruptions != 1 || len(r.Findings) != 1 || r.Findings[0].File != stray {
			t.Fatalf("check found %+v; want exactly the stray %s", r.Findings, stray)
		}
		if _, err := Repair(path, RepairAll, nil); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(stray + ".orphaned"); err != nil || string(got) != "data" {
			t.Fatalf("stray after repair: %q, %v", got, err)
		}
		if r, err := blockif.Check(path, nil); err != nil || !r.Clean() {
			t.Fatalf("after repair: %+v, %v", r, err)
		}
	})
}
