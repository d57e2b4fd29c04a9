package offline

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

func TestResolveSize(t *testing.T) {
	for _, c := range []struct {
		cur  int64
		spec string
		want int64
		ok   bool
	}{
		{1 << 30, "2G", 2 << 30, true},
		{1 << 30, "+1g", 2 << 30, true},
		{1 << 30, "-512M", 512 << 20, true},
		{1 << 30, "-1G", 0, false},
		{1 << 30, "+1.5G", 0, false},
		{1 << 30, "lots", 0, false},
	} {
		got, err := ResolveSize(c.cur, c.spec)
		if (err == nil) != c.ok || got != c.want {
			t.Errorf("ResolveSize(%d, %q) = %d, %v", c.cur, c.spec, got, err)
		}
	}
}

// TestResizeGrowShrink grows and shrinks sparse and split images with data
// in the first and last sectors and right around the new ends.
func TestResizeGrowShrink(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		for _, layout := range []format.Layout{format.LayoutSparse, format.LayoutSplit} {
			t.Run(string(layout), func(t *testing.T) {
				ss := int64(4096)
				p := format.Params{Layout: layout, Size: 2*(32<<10) + 3*ss, Split: 32 << 10, SectorSize: ss, LUT: lutFor(layout, kind)}
				path := testImage(t, p, nil, false)
				rng := rand.New(rand.NewPCG(5, 5))
				d := mustOpen(t, path, nil)
				model := make([]byte, p.Size)
				for _, off := range []int64{0, p.Size - ss, p.Size - 3*ss} {
					b := randBytes(rng, int(ss))
					d.WriteAt(b, off)
					copy(model[off:], b)
				}
				d.Close()
				// Grow by a bit more than two segments.
				newSize := p.Size + 2*p.Split + 5*ss
				if _, err := Resize(path, newSize, nil); err != nil {
					t.Fatalf("grow: %v", err)
				}
				model = append(model, make([]byte, newSize-p.Size)...)
				if got := content(t, path, nil); !bytes.Equal(got, model) {
					t.Fatalf("after grow: differs at %d", firstDiff(got, model))
				}
				d = mustOpen(t, path, nil)
				b := randBytes(rng, int(ss))
				d.WriteAt(b, newSize-ss)
				copy(model[newSize-ss:], b)
				d.Close()
				// Shrinking needs AllowShrink, refuses data past the end.
				small := p.Size - ss
				if _, err := Resize(path, small, nil); !errors.Is(err, ErrInvalid) {
					t.Errorf("shrink without AllowShrink: %v", err)
				}
				_, err := Resize(path, small, &ResizeOptions{AllowShrink: true})
				if !errors.Is(err, ErrDataPastEnd) || !strings.Contains(err.Error(), fmt.Sprintf("sector %d ", small/ss)) {
					t.Fatalf("shrink over data: %v; want ErrDataPastEnd naming sector %d", err, small/ss)
				}
				if got := content(t, path, nil); !bytes.Equal(got, model) {
					t.Fatal("refused shrink changed content")
				}
				rep, err := Resize(path, small, &ResizeOptions{AllowShrink: true, Force: true})
				if err != nil {
					t.Fatalf("forced shrink: %v", err)
				}
				if rep.FirstDropped != small/ss || rep.DroppedSectors != 2 {
					t.Errorf("forced shrink report %+v; want first %d, 2 dropped", *rep, small/ss)
				}
				model = model[:small]
				if got := content(t, path, nil); !bytes.Equal(got, model) {
					t.Fatalf("after shrink: differs at %d", firstDiff(got, model))
				}
				np := p
				np.Size = small
				if _, err := os.Stat(format.SegmentName(path, np.Segments())); err == nil {
					t.Errorf("segment %d still exists after shrink", np.Segments())
				}
				if layout == format.LayoutSparse {
					if fi, _ := os.Stat(path + lut.Suffix); fi.Size() != np.Sectors()*lut.EntrySize {
						t.Errorf("LUT is %d bytes after shrink, want %d", fi.Size(), np.Sectors()*lut.EntrySize)
					}
				}
				// Shrink to exactly the data's end: no force needed.
				if _, err := Resize(path, small-ss, &ResizeOptions{AllowShrink: true}); err != nil {
					t.Fatalf("shrink over zeros only: %v", err)
				}
				if got := content(t, path, nil); !bytes.Equal(got, model[:small-ss]) {
					t.Fatal("content differs after second shrink")
				}
				if _, err := Resize(path, small-ss+1, nil); !errors.Is(err, ErrInvalid) {
					t.Errorf("size not a multiple of the sector: %v", err)
				}
			})
		}
	})
}

func TestResizeRaw(t *testing.T) {
	path := filepath.Join(t.TempDir(), "raw.img")
	data := bytes.Repeat([]byte{7}, 5000)
	os.WriteFile(path, data, 0o644)
	if _, err := Resize(path, 1<<20, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := Resize(path, 4096, &ResizeOptions{AllowShrink: true}); !errors.Is(err, ErrDataPastEnd) || !strings.Contains(err.Error(), "sector 8 ") {
		t.Fatalf("raw shrink over data: %v", err)
	}
	if _, err := Resize(path, 5000, &ResizeOptions{AllowShrink: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatal("raw content changed")
	}
}

// TestResizeGrowCrash cuts power at every I/O step of a grow: after the
// crash the image opens with the old or the new size, the data reads as
// before (and zeros past the old end), and Check is clean.
func TestResizeGrowCrash(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		seed := uint64(time.Now().UnixNano())
		if s, err := strconv.ParseUint(os.Getenv("SPARSEDISK_SEED"), 10, 64); err == nil {
			seed = s
		}
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(seed, 6))
		for _, layout := range []format.Layout{format.LayoutSparse, format.LayoutSplit} {
			p := format.Params{Layout: layout, Size: 2*(16<<10) + 4096, Split: 16 << 10, SectorSize: 4096, LUT: lutFor(layout, kind)}
			newSize := p.Size + 3*p.Split
			base := vfs.NewMemFS()
			path := "/img/disk.img"
			if err := blockif.Create(path, p, &blockif.Options{FS: base}); err != nil {
				t.Fatal(err)
			}
			d := mustOpen(t, path, &blockif.Options{FS: base})
			want := make([]byte, newSize)
			for _, off := range []int64{0, p.Size - 4096} {
				b := randBytes(rng, 4096)
				d.WriteAt(b, off)
				copy(want[off:], b)
			}
			d.Close()
			probe := base.Crash(rng)
			ops0 := probe.Ops()
			if _, err := Resize(path, newSize, &ResizeOptions{FS: probe}); err != nil {
				t.Fatal(err)
			}
			n := probe.Ops() - ops0
			sizes := map[int64]int{}
			for k := int64(0); k <= n; k++ {
				m := base.Crash(rng)
				m.SetCrashAfter(k)
				if _, err := Resize(path, newSize, &ResizeOptions{FS: m}); err != nil && !errors.Is(err, vfs.ErrCrashed) {
					t.Fatalf("k=%d: %v", k, err)
				}
				after := m.Crash(rng)
				d, err := blockif.Open(path, &blockif.Options{FS: after})
				if err != nil {
					t.Fatalf("seed %d k=%d: open after crash: %v", seed, k, err)
				}
				got := make([]byte, d.Size())
				_, err = d.ReadAt(got, 0)
				d.Close()
				if err != nil {
					t.Fatalf("k=%d: read: %v", k, err)
				}
				if (d.Size() != p.Size && d.Size() != newSize) || !bytes.Equal(got, want[:d.Size()]) {
					t.Fatalf("seed %d k=%d: size %d, content differs at %d", seed, k, d.Size(), firstDiff(got, want[:d.Size()]))
				}
				sizes[d.Size()]++
				mustCheck(t, path, after, false)
				if t.Failed() {
					t.Fatalf("seed %d k=%d", seed, k)
				}
			}
			t.Logf("%s: crashed at each of %d I/O steps of grow; sizes after recovery %v", layout, n+1, sizes)
		}
	})
}

// TestResizeProgress checks that every long phase of a resize reports
// progress that only grows and ends complete: the LUT extension of a grow
// (more than one 1 MiB write), the scan of a shrink, for sparse, split and
// raw images.
func TestResizeProgress(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		type call struct{ done, total int64 }
		check := func(t *testing.T, what string, calls []call, wantTotal int64) {
			t.Helper()
			if len(calls) == 0 {
				t.Fatalf("%s: Progress was never called", what)
			}
			for i, c := range calls {
				if c.total != wantTotal || c.done < 0 || c.done > c.total || (i > 0 && c.done < calls[i-1].done) {
					t.Fatalf("%s: call %d = %d/%d (want total %d, done growing)", what, i, c.done, c.total, wantTotal)
				}
			}
			if last := calls[len(calls)-1]; last.done != last.total {
				t.Fatalf("%s: last call %d/%d, want complete", what, last.done, last.total)
			}
		}
		record := func(calls *[]call) *ResizeOptions {
			return &ResizeOptions{AllowShrink: true, Progress: func(done, total int64) { *calls = append(*calls, call{done, total}) }}
		}
		for _, layout := range []format.Layout{format.LayoutSparse, format.LayoutSplit} {
			t.Run(string(layout), func(t *testing.T) {
				p := format.Params{Layout: layout, Size: 1 << 20, Split: 1 << 20, SectorSize: 512, LUT: lutFor(layout, kind)}
				path := testImage(t, p, nil, false)
				var calls []call
				newSize := int64(1<<30) + 3<<20 // 2 Mi + 6 Ki LUT entries: 8 MiB+ of LUT
				if _, err := Resize(path, newSize, record(&calls)); err != nil {
					t.Fatal(err)
				}
				if layout == format.LayoutSparse {
					check(t, "grow", calls, (newSize-p.Size)/512*lut.EntrySize)
					if len(calls) < 2 && kind == lut.Xhyve {
						t.Fatalf("grow reported %d times for 8 MiB of LUT", len(calls))
					}
					if fi, err := os.Stat(path + lut.Suffix); err != nil || kind == lut.Thin && fi.Sys().(*syscall.Stat_t).Blocks > 8 {
						t.Errorf("thin LUT grown by writing: %v %v", fi.Sys(), err) // a hole: at most the one page of its old entries
					}
				}
				calls = nil
				if _, err := Resize(path, 64<<20, record(&calls)); err != nil {
					t.Fatal(err)
				}
				want := newSize - 64<<20 // split: bytes scanned
				if layout == format.LayoutSparse {
					want = (newSize - 64<<20) / 512 * lut.EntrySize // LUT bytes of the segments past the new end
				}
				check(t, "shrink", calls, want)
			})
		}
		t.Run("raw", func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "raw.img")
			if err := os.WriteFile(path, make([]byte, 3<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			var calls []call
			if _, err := Resize(path, 1<<20, record(&calls)); err != nil {
				t.Fatal(err)
			}
			check(t, "raw shrink", calls, 2<<20)
		})
	})
}

// TestResizeGrowRefusalKeepsStray: a grow refused because a segment file
// already exists past the image records no intent, so the repair the
// message suggests moves that file aside (data kept) instead of finishing
// a "resize" that would delete it.
func TestResizeGrowRefusalKeepsStray(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 128 << 10, Split: 64 << 10, SectorSize: 4096, LUT: kind}
		path := testImageNoCheck(t, p)
		stray := format.SegmentName(path, 2)
		if err := os.WriteFile(stray, bytes.Repeat([]byte{3}, 8192), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := Resize(path, 256<<10, nil); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("grow over a stray segment: %v, want ErrCorrupt", err)
		}
		if desc, err := format.ReadDescriptor(nil, path); err != nil || desc.Intent != "" {
			t.Fatalf("refused grow left intent %q (%v)", desc.Intent, err)
		}
		if _, err := Repair(path, RepairAll, nil); err != nil {
			t.Fatal(err)
		}
		if got, err := os.ReadFile(stray + ".orphaned"); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{3}, 8192)) {
			t.Fatalf("stray segment's data after repair: %v (%d bytes)", err, len(got))
		}
	})
}

// TestHugeSizesRefused: sizes near 2^63 must not overflow the segment
// count into something that passes validation, and a LUT larger than the
// file system's free space is refused before anything is written.
func TestHugeSizesRefused(t *testing.T) {
	huge := format.Params{Layout: format.LayoutSparse, Size: 1<<63 - 4096, Split: 64 << 10, SectorSize: 4096}
	if n := huge.Segments(); n <= 0 {
		t.Fatalf("Segments() = %d for size 2^63-4096", n)
	}
	if err := huge.Validate(); !errors.Is(err, ErrInvalid) {
		t.Fatalf("Validate(2^63-4096, split 64k) = %v, want ErrInvalid (too many segments)", err)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "big.img")
	big := format.Params{Layout: format.LayoutSparse, Size: 8000 << 50, Split: 128 << 40, SectorSize: 65536} // 512 TiB of LUT
	if err := blockif.Create(path, big, nil); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Create with a 512 TiB LUT: %v, want ENOSPC", err)
	}
	if files, _ := filepath.Glob(filepath.Join(dir, "*")); len(files) != 0 {
		t.Fatalf("refused create left files: %v", files)
	}
	small := testImageNoCheck(t, format.Params{Layout: format.LayoutSparse, Size: 1 << 20, Split: 1 << 20, SectorSize: 4096})
	if _, err := Resize(small, 8000<<50, nil); !errors.Is(err, syscall.ENOSPC) && !errors.Is(err, ErrInvalid) {
		t.Fatalf("grow to 8000 PiB: %v, want a refusal", err)
	}
	if desc, _ := format.ReadDescriptor(nil, small); desc.Size != 1<<20 || desc.Intent != "" {
		t.Fatalf("refused grow changed the descriptor: %+v", desc)
	}
}

// TestCreateCleansUpOnFailure: a create that fails part-way removes the
// files it made, so a retry is not refused as "already exists".
func TestCreateCleansUpOnFailure(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		ffs := vfs.NewFaultFS(vfs.NewMemFS())
		ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
			// A thin LUT is created by truncation alone.
			if strings.HasSuffix(name, lut.Suffix) && (op == vfs.OpWrite || op == vfs.OpTruncate) {
				return syscall.ENOSPC
			}
			return nil
		})
		path := "/img/disk.img"
		p := format.Params{Layout: format.LayoutSparse, Size: 4 << 20, Split: 1 << 20, SectorSize: 4096, LUT: kind}
		if err := blockif.Create(path, p, &blockif.Options{FS: ffs}); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("create with a failing LUT write: %v, want ENOSPC", err)
		}
		ffs.SetFault(nil)
		if err := blockif.Create(path, p, &blockif.Options{FS: ffs}); err != nil {
			t.Fatalf("retry after the failed create: %v", err)
		}
	})
}
