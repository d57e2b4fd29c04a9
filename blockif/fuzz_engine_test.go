package blockif

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// feGeoms are the small geometries FuzzEngine picks from (first input
// byte): sizes that are not a multiple of the split, so the last segment
// is short, and tiny sectors, so unaligned requests straddle both.
var feGeoms = []format.Params{
	{Layout: format.LayoutSparse, Size: 13 * 512, Split: 4 * 512, SectorSize: 512},
	{Layout: format.LayoutSparse, Size: 8 * 1024, Split: 3 * 1024, SectorSize: 1024},
	{Layout: format.LayoutSplit, Size: 10 * 512, Split: 4 * 512, SectorSize: 512},
	{Layout: format.LayoutSparse, Size: 13 * 512, Split: 4 * 512, SectorSize: 512, LUT: lut.Thin},
	{Layout: format.LayoutSparse, Size: 8 * 1024, Split: 3 * 1024, SectorSize: 1024, LUT: lut.Thin},
}

// feOpSize is the encoded size of one operation: kind, offset (2 bytes),
// length (2 bytes), data seed.
const feOpSize = 6

// feMaxOps bounds the work per input.
const feMaxOps = 64

// Operation kinds (byte % feKinds).
const (
	feWrite = iota
	feWrite2
	feRead
	feTrim
	feZero
	feFlush
	feReopen
	feFull // the device fills up (appends fail part-way with ENOSPC) or space comes back
	feCrash
	feKinds
)

// feFullFS wraps a file system whose device can fill up: while full, a
// write that extends a file stores only part of the new bytes (the device
// ran out mid-write, as a real pwrite can) and fails with ENOSPC;
// overwrites inside a file's length still work.
type feFullFS struct {
	vfs.FS
	full atomic.Bool
}

func (f *feFullFS) OpenFile(name string, flag int, perm os.FileMode) (vfs.File, error) {
	file, err := f.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &feFullFile{File: file, fs: f}, nil
}

type feFullFile struct {
	vfs.File
	fs *feFullFS
}

func (f *feFullFile) enospc() error {
	return &os.PathError{Op: "write", Path: f.Name(), Err: syscall.ENOSPC}
}

func (f *feFullFile) WriteAt(p []byte, off int64) (int, error) {
	if !f.fs.full.Load() {
		return f.File.WriteAt(p, off)
	}
	size, err := f.File.Size()
	if err != nil {
		return 0, err
	}
	end := off + int64(len(p))
	if end <= size {
		return f.File.WriteAt(p, off)
	}
	// Everything up to the old end fits, plus half of the growth rounded
	// down to 256 bytes: a torn slot at the end of the file.
	room := max(size-off, 0) + ((end-max(off, size))/2)&^255
	k := int(min(room, int64(len(p))))
	if k > 0 {
		if n, err := f.File.WriteAt(p[:k], off); err != nil {
			return n, err
		}
	}
	return k, f.enospc()
}

func (f *feFullFile) Truncate(size int64) error {
	if f.fs.full.Load() {
		if cur, err := f.File.Size(); err == nil && size > cur {
			return f.enospc()
		}
	}
	return f.File.Truncate(size)
}

// feData returns n bytes for a write: all zeros, or a pattern derived from
// seed that may contain whole zero sectors.
func feData(seed byte, n int) []byte {
	b := make([]byte, n)
	if seed%5 == 0 {
		return b
	}
	for i := range b {
		b[i] = byte(int(seed)*7+i*13) | 1
	}
	if seed%3 == 0 && n > 1200 { // a zero stretch in the middle
		clear(b[n/3 : 2*n/3])
	}
	return b
}

// feState is one run of FuzzEngine: the disk, its file systems and the
// model it must agree with.
type feState struct {
	t     *testing.T
	p     format.Params
	path  string
	mem   *vfs.MemFS
	fs    *feFullFS
	d     *Disk
	model []byte
}

func (s *feState) readAll(d *Disk) []byte {
	s.t.Helper()
	got := make([]byte, s.p.Size)
	if _, err := d.ReadAt(got, 0); err != nil {
		s.t.Fatalf("read whole disk: %v", err)
	}
	return got
}

func (s *feState) verifyAll(d *Disk, when string) {
	s.t.Helper()
	if got := s.readAll(d); !bytes.Equal(got, s.model) {
		i := firstDiff(got, s.model)
		s.t.Fatalf("%s: disk differs from the model at byte %d (sector %d): got %#x want %#x",
			when, i, int64(i)/s.p.SectorSize, got[i], s.model[i])
	}
}

// settle handles a write or zeroing that failed on a full device: each
// sector it touched must hold either its old or its new content (never a
// mix, never anything else), and the model takes what the disk holds.
func (s *feState) settle(off, n int64, want []byte, err error) {
	s.t.Helper()
	if !s.fs.full.Load() || !errors.Is(err, syscall.ENOSPC) {
		s.t.Fatalf("[%d,+%d): %v (device full: %v)", off, n, err, s.fs.full.Load())
	}
	ss := s.p.SectorSize
	lo, hi := off/ss*ss, (off+n+ss-1)/ss*ss
	newImg := append([]byte(nil), s.model[lo:hi]...)
	copy(newImg[off-lo:], want)
	got := make([]byte, hi-lo)
	if _, err := s.d.ReadAt(got, lo); err != nil {
		s.t.Fatalf("read after failed write: %v", err)
	}
	for k := int64(0); k < hi-lo; k += ss {
		g := got[k : k+ss]
		if !bytes.Equal(g, s.model[lo+k:lo+k+ss]) && !bytes.Equal(g, newImg[k:k+ss]) {
			s.t.Fatalf("sector %d after a failed write holds neither its old nor its new content", (lo+k)/ss)
		}
	}
	copy(s.model[lo:], got)
}

// reopen opens the image for writing on s.fs. While the device is full the
// open may fail (it rewrites the descriptor) with ENOSPC only; then the
// image is verified read-only and space is given back first.
func (s *feState) reopen(when string) {
	s.t.Helper()
	d, err := Open(s.path, &Options{FS: s.fs})
	if err != nil {
		if !s.fs.full.Load() || !errors.Is(err, syscall.ENOSPC) {
			s.t.Fatalf("%s: open: %v", when, err)
		}
		ro, err := Open(s.path, &Options{FS: s.fs, ReadOnly: true})
		if err != nil {
			s.t.Fatalf("%s: read-only open on a full device: %v", when, err)
		}
		s.verifyAll(ro, when+" (read-only, device full)")
		ro.Close()
		s.fs.full.Store(false)
		d, err = Open(s.path, &Options{FS: s.fs})
		if err != nil {
			s.t.Fatalf("%s: open once space is back: %v", when, err)
		}
	}
	s.d = d
	s.verifyAll(d, when)
}

func (s *feState) close(when string) {
	s.t.Helper()
	if err := s.d.Close(); err != nil && !(s.fs.full.Load() && errors.Is(err, syscall.ENOSPC)) {
		s.t.Fatalf("%s: close: %v", when, err)
	}
	s.d = nil
}

func runEngineOps(t *testing.T, in []byte) (ops int) {
	if len(in) == 0 {
		return 0
	}
	p := feGeoms[int(in[0])%len(feGeoms)]
	in = in[1:]
	s := &feState{t: t, p: p, path: "/fz/disk.img", mem: vfs.NewMemFS(), model: make([]byte, p.Size)}
	s.fs = &feFullFS{FS: s.mem}
	if err := Create(s.path, p, &Options{FS: s.fs}); err != nil {
		t.Fatal(err)
	}
	s.reopen("open")
	for ; len(in) >= feOpSize && ops < feMaxOps; in, ops = in[feOpSize:], ops+1 {
		kind := int(in[0]) % feKinds
		off := int64(in[1])<<8 | int64(in[2])
		n := int64(in[3])<<8 | int64(in[4])
		seed := in[5]
		off %= p.Size
		n = min(n%(p.Size+1), p.Size-off)
		if os.Getenv("SPARSEDISK_FUZZ_DEBUG") != "" {
			t.Logf("op %d: kind %d off %d n %d seed %d full %v", ops, kind, off, n, seed, s.fs.full.Load())
		}
		switch kind {
		case feWrite, feWrite2:
			data := feData(seed, int(n))
			if _, err := s.d.WriteAt(data, off); err != nil {
				s.settle(off, n, data, err)
			} else {
				copy(s.model[off:], data)
			}
		case feRead:
			got := make([]byte, n)
			if _, err := s.d.ReadAt(got, off); err != nil {
				t.Fatalf("op %d: read [%d,+%d): %v", ops, off, n, err)
			}
			if !bytes.Equal(got, s.model[off:off+n]) {
				i := firstDiff(got, s.model[off:off+n])
				t.Fatalf("op %d: read [%d,+%d) differs at byte %d: got %#x want %#x", ops, off, n, off+int64(i), got[i], s.model[off+int64(i)])
			}
			ext, err := s.d.Extents(off, n)
			if err != nil {
				t.Fatalf("op %d: extents: %v", ops, err)
			}
			pos := off
			for _, e := range ext {
				if e.Offset != pos || e.Length <= 0 {
					t.Fatalf("op %d: extents of [%d,+%d) do not tile it: %+v", ops, off, n, ext)
				}
				if !e.Allocated && !isZero(s.model[e.Offset:e.Offset+e.Length]) {
					t.Fatalf("op %d: extent %+v reported unallocated holds data", ops, e)
				}
				pos += e.Length
			}
			if pos != off+n {
				t.Fatalf("op %d: extents of [%d,+%d) end at %d", ops, off, n, pos)
			}
		case feTrim, feZero:
			op := s.d.Trim
			if kind == feZero {
				op = s.d.WriteZeroes
			}
			if err := op(off, n); err != nil {
				s.settle(off, n, make([]byte, n), err)
			} else {
				clear(s.model[off : off+n])
			}
		case feFlush:
			if err := s.d.Flush(); err != nil {
				t.Fatalf("op %d: flush: %v", ops, err)
			}
		case feReopen:
			s.close("close")
			s.reopen("reopen")
		case feFull:
			s.fs.full.Store(!s.fs.full.Load())
		case feCrash:
			// Power is cut right after a Flush: the image that comes back
			// must hold exactly the model.
			if err := s.d.Flush(); err != nil {
				t.Fatalf("op %d: flush before crash: %v", ops, err)
			}
			after := s.mem.Crash(rand.New(rand.NewPCG(uint64(seed), uint64(ops))))
			s.d.Close() // the old file system lives on in memory; its state no longer matters
			full := s.fs.full.Load()
			s.mem, s.fs = after, &feFullFS{FS: after}
			s.fs.full.Store(full)
			s.reopen("after crash")
		}
	}
	s.close("final close")
	s.fs.full.Store(false)
	r, err := Check(s.path, &Options{FS: s.fs})
	if err != nil {
		t.Fatalf("check: %v", err)
	}
	for _, f := range r.Findings {
		if f.Kind == Corruption {
			t.Fatalf("check: %s", f)
		}
	}
	s.reopen("final reopen")
	s.close("final")
	return ops
}

// feOps encodes operations for the seed corpus.
func feOps(geom byte, ops ...[feOpSize]byte) []byte {
	b := []byte{geom}
	for _, o := range ops {
		b = append(b, o[:]...)
	}
	return b
}

func feOp(kind int, off, n int, seed byte) [feOpSize]byte {
	return [feOpSize]byte{byte(kind), byte(off >> 8), byte(off), byte(n >> 8), byte(n), seed}
}

// FuzzEngine decodes its input as a sequence of engine operations (writes,
// reads, trims, write-zeroes, flushes, close and reopen, a device filling
// up and freeing, power cuts after a flush) with unaligned offsets and
// lengths that straddle sectors and segments, on tiny images over MemFS,
// and checks every read against a flat model. A write that fails because
// the device is full must leave each sector it touched old or new; the
// image must check free of corruption at the end.
func FuzzEngine(f *testing.F) {
	f.Add(feOps(0,
		feOp(feWrite, 100, 3000, 1), feOp(feRead, 0, 6656, 0), feOp(feFlush, 0, 0, 0),
		feOp(feTrim, 700, 1500, 0), feOp(feRead, 0, 6656, 0), feOp(feReopen, 0, 0, 0)))
	f.Add(feOps(0,
		feOp(feWrite, 0, 2048, 2), feOp(feFlush, 0, 0, 0), feOp(feFull, 0, 0, 0),
		feOp(feWrite, 1000, 4000, 3), feOp(feWrite, 10, 20, 4), feOp(feRead, 0, 6656, 0),
		feOp(feReopen, 0, 0, 0), feOp(feWrite, 5000, 1000, 6)))
	f.Add(feOps(1,
		feOp(feWrite, 1023, 2, 7), feOp(feZero, 1000, 3100, 0), feOp(feWrite, 3000, 3100, 9),
		feOp(feCrash, 0, 0, 1), feOp(feRead, 2000, 3000, 0), feOp(feTrim, 0, 8192, 0)))
	f.Add(feOps(1,
		feOp(feFull, 0, 0, 0), feOp(feWrite, 0, 8192, 11), feOp(feCrash, 0, 0, 2),
		feOp(feWrite, 3071, 1026, 13), feOp(feFull, 0, 0, 0), feOp(feWrite, 3071, 1026, 14)))
	f.Add(feOps(2,
		feOp(feWrite, 1, 5000, 8), feOp(feTrim, 513, 2000, 0), feOp(feFlush, 0, 0, 0),
		feOp(feZero, 0, 511, 0), feOp(feReopen, 0, 0, 0), feOp(feRead, 0, 5120, 0)))
	f.Add(feOps(0, feOp(feWrite, 6655, 1, 3), feOp(feWrite, 0, 6656, 5), feOp(feTrim, 0, 6656, 0)))
	f.Fuzz(func(t *testing.T, in []byte) {
		runEngineOps(t, in)
	})
}

// TestEngineOpsRandom runs FuzzEngine's decoder on seeded random inputs,
// so plain `go test` covers more than the seed corpus. With
// SPARSEDISK_FUZZ_DEBUG set, every input and operation is logged.
func TestEngineOpsRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(20240607, 1))
	const inputs = 300
	total := 0
	for range inputs {
		in := make([]byte, 1+feOpSize*(1+rng.IntN(feMaxOps)))
		for i := range in {
			in[i] = byte(rng.UintN(256))
		}
		if os.Getenv("SPARSEDISK_FUZZ_DEBUG") != "" {
			t.Logf("input %x", in)
		}
		total += runEngineOps(t, in)
		if t.Failed() {
			t.Fatalf("input %x", in)
		}
	}
	t.Logf("%d random inputs, %d operations, 0 model mismatches", inputs, total)
}
