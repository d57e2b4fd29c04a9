package offline

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// fragment fills an open image with a fragmenting workload: writes of
// random data at random places (so slots come out of logical order),
// trims, and zero overwrites of allocated sectors (which stay allocated).
// It returns the disk's expected content.
func fragment(t testing.TB, d *blockif.Disk, rng *rand.Rand, ops int) []byte {
	t.Helper()
	size, ss := d.Size(), d.SectorSize()
	model := make([]byte, size)
	for i := 0; i < ops; i++ {
		off := rng.Int64N(size/ss) * ss
		n := min((1+rng.Int64N(4))*ss, size-off)
		switch k := rng.IntN(10); {
		case k < 6:
			p := randBytes(rng, int(n))
			if _, err := d.WriteAt(p, off); err != nil {
				t.Fatalf("WriteAt(%d, %d): %v", off, n, err)
			}
			copy(model[off:], p)
		case k < 8:
			if err := d.Trim(off, n); err != nil {
				t.Fatalf("Trim(%d, %d): %v", off, n, err)
			}
			clear(model[off : off+n])
		default:
			if _, err := d.WriteAt(make([]byte, n), off); err != nil {
				t.Fatalf("WriteAt zeros(%d, %d): %v", off, n, err)
			}
			clear(model[off : off+n])
		}
	}
	// Sectors right at both ends of the disk.
	for _, off := range []int64{0, size - ss} {
		p := randBytes(rng, int(ss))
		if _, err := d.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	return model
}

// content reads a whole image through a read-only Disk.
func content(t testing.TB, path string, fsys vfs.FS) []byte {
	t.Helper()
	d := mustOpen(t, path, &blockif.Options{FS: fsys, ReadOnly: true})
	defer d.Close()
	all := make([]byte, d.Size())
	if _, err := d.ReadAt(all, 0); err != nil {
		t.Fatalf("read %s: %v", path, err)
	}
	return all
}

// addLeak appends a slot of garbage to segment i: data no entry references.
func addLeak(t testing.TB, fsys vfs.FS, path string, i int, ss int64) {
	t.Helper()
	if fsys == nil {
		fsys = vfs.OS{}
	}
	f, err := fsys.OpenFile(format.SegmentName(path, i), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, _ := f.Size()
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xA5}, int(ss)), (size+ss-1)/ss*ss); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// fileDigest maps every file of the image's directory to its content.
func fileDigest(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = string(b)
	}
	return out
}

func sameDigest(t testing.TB, what string, a, b map[string]string) {
	t.Helper()
	if len(a) != len(b) {
		t.Errorf("%s: files changed: %d before, %d after", what, len(a), len(b))
	}
	names := make([]string, 0, len(a))
	for n := range a {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if a[n] != b[n] {
			t.Errorf("%s: file %s changed", what, n)
		}
	}
}

func TestShrinkFragmented(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		geoms := []format.Params{
			{Layout: format.LayoutSparse, Size: 5*(256<<10) + 3*4096, Split: 256 << 10, SectorSize: 4096, LUT: kind},
			{Layout: format.LayoutSparse, Size: 3*(64<<10) + 7*512, Split: 64 << 10, SectorSize: 512, LUT: kind},
		}
		for _, p := range geoms {
			for _, fsName := range []string{"os", "mem"} {
				t.Run(fmt.Sprintf("ss%d-%s", p.SectorSize, fsName), func(t *testing.T) {
					seed := uint64(time.Now().UnixNano())
					t.Logf("seed %d", seed)
					rng := rand.New(rand.NewPCG(seed, 3))
					var fsys vfs.FS
					if fsName == "mem" {
						fsys = vfs.NewMemFS()
					}
					path := testImage(t, p, fsys, false)
					d := mustOpen(t, path, &blockif.Options{FS: fsys})
					model := fragment(t, d, rng, 400)
					if err := d.Close(); err != nil {
						t.Fatal(err)
					}
					addLeak(t, fsys, path, 1, p.SectorSize)
					before := mustCheck(t, path, fsys, true)
					if before.Fragments == 0 || before.LeakedSlots == 0 {
						t.Fatalf("workload made no fragments (%d) or leaks (%d)", before.Fragments, before.LeakedSlots)
					}
					d = mustOpen(t, path, &blockif.Options{FS: fsys, ReadOnly: true})
					st0, err := d.Stats()
					d.Close()
					if err != nil {
						t.Fatal(err)
					}
					dry, err := Shrink(path, &ShrinkOptions{FS: fsys, DryRun: true})
					if err != nil {
						t.Fatalf("dry run: %v", err)
					}
					rep, err := Shrink(path, &ShrinkOptions{FS: fsys})
					if err != nil {
						t.Fatalf("Shrink: %v", err)
					}
					t.Logf("shrink: %+v", *rep)
					if dry.LiveBytes != rep.LiveBytes || dry.Compacted != rep.Compacted {
						t.Errorf("dry run predicted %+v, shrink did %+v", *dry, *rep)
					}
					if got := content(t, path, fsys); !bytes.Equal(got, model) {
						t.Fatalf("content differs after shrink at byte %d", firstDiff(got, model))
					}
					d = mustOpen(t, path, &blockif.Options{FS: fsys, ReadOnly: true})
					st, err := d.Stats()
					d.Close()
					if err != nil {
						t.Fatal(err)
					}
					if st.Fragments != 0 || st.LeakedSlots != 0 {
						t.Errorf("after shrink: fragments %d, leaked slots %d; want 0, 0", st.Fragments, st.LeakedSlots)
					}
					// The reported bytes are what the segments and the LUT
					// occupy (as du counts them; OnDiskBytes adds the
					// descriptor, which shrink leaves alone) before and after.
					if rep.BytesBefore-rep.BytesAfter != st0.OnDiskBytes-st.OnDiskBytes || rep.BytesAfter >= rep.BytesBefore ||
						st.OnDiskBytes < rep.BytesAfter || st.OnDiskBytes > rep.BytesAfter+4096 {
						t.Errorf("shrink reports %d -> %d bytes on disk; the image occupied %d before and %d after",
							rep.BytesBefore, rep.BytesAfter, st0.OnDiskBytes, st.OnDiskBytes)
					}
					if st.AllocatedBytes != rep.LiveBytes {
						t.Errorf("allocated %d, shrink kept %d live bytes", st.AllocatedBytes, rep.LiveBytes)
					}
					lutBytes := (p.Sectors()*lut.EntrySize + 4095) / 4096 * 4096
					if bound := st.AllocatedBytes + lutBytes + 4096; p.SectorSize == 4096 && st.OnDiskBytes > bound {
						t.Errorf("on-disk %d bytes > live %d + LUT %d + descriptor", st.OnDiskBytes, st.AllocatedBytes, lutBytes)
					}
					var nz int64
					for s := int64(0); s < p.Size; s += p.SectorSize {
						if !isZero(model[s : s+p.SectorSize]) {
							nz++
						}
					}
					if rep.LiveBytes != nz*p.SectorSize {
						t.Errorf("live bytes %d, model holds %d non-zero sectors", rep.LiveBytes, nz)
					}
					// A second shrink has nothing to do.
					rep2, err := Shrink(path, &ShrinkOptions{FS: fsys})
					if err != nil || rep2.Compacted != 0 {
						t.Errorf("second shrink: %+v, %v; want nothing compacted", rep2, err)
					}
				})
			}
		}
	})
}

// TestShrinkDryRunReadOnly: a dry run and a check change no byte.
func TestShrinkDryRunReadOnly(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 4 * (64 << 10), Split: 64 << 10, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, true)
		d := mustOpen(t, path, nil)
		fragment(t, d, rand.New(rand.NewPCG(1, 2)), 100)
		d.Close()
		addLeak(t, nil, path, 0, 4096)
		before := fileDigest(t, filepath.Dir(path))
		if _, err := Shrink(path, &ShrinkOptions{DryRun: true}); err != nil {
			t.Fatal(err)
		}
		if _, err := blockif.Check(path, nil); err != nil {
			t.Fatal(err)
		}
		sameDigest(t, "dry run + check", before, fileDigest(t, filepath.Dir(path)))
	})
}

func TestShrinkRefusesCorruptAndOtherLayouts(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 8 * 4096, Split: 4 * 4096, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, true)
		t.Cleanup(func() { RepairWith(path, RepairAll, RepairOptions{AcceptLoss: true}, nil) })
		d := mustOpen(t, path, nil)
		d.WriteAt(bytes.Repeat([]byte{1}, 4096), 0)
		d.Close()
		setEntry(t, nil, path, 1, 99)
		if _, err := Shrink(path, nil); !errors.Is(err, ErrCorrupt) {
			t.Errorf("shrink of corrupt image: %v, want ErrCorrupt", err)
		}
		sp := testImage(t, format.Params{Layout: format.LayoutSplit, Size: 8 * 4096, Split: 4 * 4096, SectorSize: 4096}, nil, false)
		if _, err := Shrink(sp, nil); !errors.Is(err, ErrInvalid) {
			t.Errorf("shrink of split image: %v, want ErrInvalid", err)
		}
	})
}

// setEntry writes LUT entry of sector sec directly, in the image's LUT
// encoding.
func setEntry(t testing.TB, fsys vfs.FS, path string, sec int64, v uint32) {
	t.Helper()
	if fsys == nil {
		fsys = vfs.OS{}
	}
	f, err := fsys.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	desc, err := format.ReadDescriptor(fsys, path)
	if err != nil {
		t.Fatal(err)
	}
	if err := lut.WriteEntries(f, desc.LUTKind(), sec, []uint32{v}); err != nil {
		t.Fatal(err)
	}
	f.Sync()
}

// TestShrinkCrash cuts power after every single I/O step of a shrink
// (k = 0..N) on the crash-simulating file system. After each crash the
// image is recovered either by opening it (even k) or by shrinking it
// again (odd k), which finishes or rolls back the interrupted shrink; it
// then reads exactly as before and Check finds no corruption.
func TestShrinkCrash(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		seed := uint64(time.Now().UnixNano())
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(seed, 4))
		for _, p := range []format.Params{
			{Layout: format.LayoutSparse, Size: 4*(32<<10) + 2*4096, Split: 32 << 10, SectorSize: 4096, LUT: kind},
			{Layout: format.LayoutSparse, Size: 3*(8<<10) + 512, Split: 8 << 10, SectorSize: 512, LUT: kind},
		} {
			base := vfs.NewMemFS()
			path := "/img/disk.img"
			if err := blockif.Create(path, p, &blockif.Options{FS: base}); err != nil {
				t.Fatal(err)
			}
			d := mustOpen(t, path, &blockif.Options{FS: base})
			want := fragment(t, d, rng, 150)
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			addLeak(t, base, path, 0, p.SectorSize)
			probe := base.Crash(rng)
			ops0 := probe.Ops()
			if _, err := Shrink(path, &ShrinkOptions{FS: probe}); err != nil {
				t.Fatal(err)
			}
			n := probe.Ops() - ops0
			for k := int64(0); k <= n; k++ {
				m := base.Crash(rng)
				m.SetCrashAfter(k)
				_, err := Shrink(path, &ShrinkOptions{FS: m})
				if err != nil && !errors.Is(err, vfs.ErrCrashed) {
					t.Fatalf("k=%d: shrink: %v", k, err)
				}
				after := m.Crash(rng)
				switch k % 3 {
				case 1: // recovery by a repeated shrink rather than by Open
					if _, err := Shrink(path, &ShrinkOptions{FS: after}); err != nil {
						t.Fatalf("seed %d k=%d: shrink after crash: %v", seed, k, err)
					}
				case 2: // by `check -r leaks`, which must not take moved live slots for leaks
					if _, err := Repair(path, RepairLeaks, &blockif.Options{FS: after}); err != nil {
						t.Fatalf("seed %d k=%d: repair leaks after crash: %v", seed, k, err)
					}
				}
				d, err := blockif.Open(path, &blockif.Options{FS: after})
				if err != nil {
					t.Fatalf("seed %d k=%d: open after crash: %v", seed, k, err)
				}
				got := make([]byte, d.Size())
				if _, err := d.ReadAt(got, 0); err != nil {
					t.Fatalf("seed %d k=%d: read after crash: %v", seed, k, err)
				}
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("seed %d k=%d: content differs after crash at byte %d", seed, k, firstDiff(got, want))
				}
				r := mustCheck(t, path, after, true)
				if t.Failed() {
					t.Fatalf("seed %d k=%d: check after crash failed", seed, k)
				}
				if k%2 == 0 && k%7 == 0 { // a repeated shrink after Open completes the job
					if _, err := Shrink(path, &ShrinkOptions{FS: after}); err != nil {
						t.Fatalf("k=%d: shrink after crash: %v", k, err)
					}
					r = mustCheck(t, path, after, false)
					if r.Fragments != 0 || !bytes.Equal(content(t, path, after), want) {
						t.Fatalf("k=%d: shrink after crash: fragments %d or content differs", k, r.Fragments)
					}
				}
			}
			t.Logf("%+v: crashed at each of %d I/O steps of shrink; content identical, no corruption", p, n+1)
		}
	})
}

// BenchmarkShrink compacts a 4 GiB sparse image holding 400 MiB of live
// data written one 4 KiB sector at a time in random order (fully
// fragmented), plus 10% of it trimmed again, and reports the throughput
// in GiB/s of live data. `make bench` runs it.
func BenchmarkShrink(b *testing.B) {
	p := format.Params{Layout: format.LayoutSparse, Size: 4 << 30, Split: 1 << 30, SectorSize: 4096}
	rng := rand.New(rand.NewPCG(11, 11))
	pool := randBytes(rng, 4<<20)
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		path := filepath.Join(b.TempDir(), "disk.img")
		if err := blockif.Create(path, p, nil); err != nil {
			b.Fatal(err)
		}
		d := mustOpen(b, path, nil)
		nsec := p.Size / p.SectorSize
		for _, s := range rng.Perm(int(nsec))[:102400] {
			off := rng.IntN(len(pool)/4096-1) * 4096
			if _, err := d.WriteAt(pool[off:off+4096], int64(s)*4096); err != nil {
				b.Fatal(err)
			}
		}
		for k := 0; k < 10240; k++ {
			d.Trim(rng.Int64N(nsec)*4096, 4096)
		}
		if err := d.Close(); err != nil {
			b.Fatal(err)
		}
		syscall.Sync() // do not bill the setup's writeback to shrink
		b.StartTimer()
		start := time.Now()
		rep, err := Shrink(path, nil)
		if err != nil {
			b.Fatal(err)
		}
		secs := time.Since(start).Seconds()
		b.ReportMetric(float64(rep.LiveBytes)/(1<<30)/secs, "GiB/s-live")
		b.ReportMetric(float64(rep.LiveBytes)/(1<<20), "MiB-live")
		b.ReportMetric(float64(rep.BytesBefore)/(1<<20), "MiB-before")
		b.ReportMetric(float64(rep.BytesAfter)/(1<<20), "MiB-after")
	}
}

// TestOfflineLock: an offline tool refuses an image open for writing, and
// its lock follows its own descriptor rewrites, so no writer gets in
// while an intent is recorded.
func TestOfflineLock(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		p := format.Params{Layout: format.LayoutSparse, Size: 4 * 4096, Split: 2 * 4096, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, false)
		d := mustOpen(t, path, nil)
		if _, err := Shrink(path, nil); !errors.Is(err, blockif.ErrInUse) {
			t.Errorf("shrink of an open image: %v, want blockif.ErrInUse", err)
		}
		if _, err := Resize(path, 8*4096, nil); !errors.Is(err, blockif.ErrInUse) {
			t.Errorf("resize of an open image: %v, want blockif.ErrInUse", err)
		}
		d.Close()
		lock, err := format.LockImage(vfs.OS{}, path, true)
		if err != nil {
			t.Fatal(err)
		}
		desc, _ := format.ReadDescriptor(nil, path)
		if err := lock.SetIntent(&desc, format.IntentShrink); err != nil {
			t.Fatal(err)
		}
		if d, err := blockif.Open(path, nil); !errors.Is(err, blockif.ErrInUse) {
			if err == nil {
				d.Close()
			}
			t.Errorf("Open while an offline tool holds the image: %v, want blockif.ErrInUse", err)
		}
		lock.Close()
		finishIntent(t, path)
	})
}

// TestShrinkTempSpace: shrink needs at most one segment of extra space
// (one compacted copy at a time, plus its small journal). The image's
// directory is measured (allocated blocks, as du counts) at every progress
// report, which comes after each chunk of the copy.
func TestShrinkTempSpace(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		// Segments large enough that each compacted copy spans several
		// shrinkChunk writes, filled out of order with holes punched after.
		p := format.Params{Layout: format.LayoutSparse, Size: 3 * (4 << 20), Split: 4 << 20, SectorSize: 4096, LUT: kind}
		path := testImage(t, p, nil, false)
		d := mustOpen(t, path, nil)
		rng := rand.New(rand.NewPCG(11, 11))
		for _, blk := range rng.Perm(int(p.Size / (64 << 10))) {
			if rng.IntN(4) == 0 {
				continue
			}
			if _, err := d.WriteAt(randBytes(rng, 64<<10), int64(blk)*(64<<10)); err != nil {
				t.Fatal(err)
			}
		}
		for i := 0; i < 40; i++ {
			if err := d.Trim(rng.Int64N(p.Size/4096-8)*4096, 8*4096); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		dirBytes := func() int64 {
			ents, err := os.ReadDir(filepath.Dir(path))
			if err != nil {
				t.Fatal(err)
			}
			var n int64
			for _, e := range ents {
				fi, err := e.Info()
				if err != nil {
					continue // renamed away meanwhile
				}
				n += fi.Sys().(*syscall.Stat_t).Blocks * 512
			}
			return n
		}
		base := dirBytes()
		var peak int64
		reports := 0
		rep, err := Shrink(path, &ShrinkOptions{Progress: func(done, total int64) {
			reports++
			peak = max(peak, dirBytes()-base)
		}})
		if err != nil {
			t.Fatal(err)
		}
		if reports == 0 || rep.Compacted == 0 || peak < shrinkChunk {
			t.Fatalf("shrink compacted %d segments, %d progress reports saw at most %d extra bytes: the measurement missed the copies", rep.Compacted, reports, peak)
		}
		t.Logf("%d segments compacted, peak extra space %d bytes (segment %d)", rep.Compacted, peak, p.Split)
		if limit := p.Split + 64<<10; peak > limit {
			t.Fatalf("shrink used %d bytes of extra space, more than one segment (%d) plus 64 KiB", peak, p.Split)
		}
	})
}
