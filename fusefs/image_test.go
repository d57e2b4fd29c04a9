package fusefs

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
	"golang.org/x/sys/unix"
)

// TestRandomOps runs a seeded random workload through the mount against an
// in-memory model: aligned and unaligned reads and writes (some all-zero),
// punches, zero ranges and fsyncs. Set SPARSEDISK_SEED to replay a seed.
func TestRandomOps(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const size = 8<<20 + 3*4096 // not a multiple of the split
		seed := uint64(time.Now().UnixNano())
		if s := os.Getenv("SPARSEDISK_SEED"); s != "" {
			var err error
			if seed, err = strconv.ParseUint(s, 10, 64); err != nil {
				t.Fatal(err)
			}
		}
		t.Logf("seed %d (SPARSEDISK_SEED=%d to replay)", seed, seed)
		rng := rand.New(rand.NewPCG(seed, seed^0x5eed))

		path := newImage(t, size, 1<<20, 512, kind)
		d := openImage(t, path, nil)
		m := mountT(t, d, nil)
		f := openFile(t, m, os.O_RDWR)
		fd := int(f.Fd())
		model := make([]byte, size)

		span := func() (int64, int64) {
			var n int64
			switch rng.IntN(4) {
			case 0:
				n = 1 + rng.Int64N(600) // tiny, inside or across a sector
			case 1:
				n = 4096 * (1 + rng.Int64N(16))
			case 2:
				n = 1 + rng.Int64N(300<<10)
			default:
				n = 1 + rng.Int64N(1<<20+4096) // may straddle segments
			}
			off := rng.Int64N(size)
			if rng.IntN(2) == 0 {
				off &^= 4095
			}
			if off+n > size {
				n = size - off
			}
			return off, n
		}
		const ops = 4000
		counts := map[string]int{}
		for i := range ops {
			off, n := span()
			var op string
			switch r := rng.IntN(100); {
			case r < 35:
				op = "write"
				buf := make([]byte, n)
				if rng.IntN(5) > 0 {
					for j := range buf {
						buf[j] = byte(rng.Uint32() | 1)
					}
				}
				if w, err := unix.Pwrite(fd, buf, off); err != nil || int64(w) != n {
					t.Fatalf("op %d: pwrite [%d,+%d): %d %v", i, off, n, w, err)
				}
				copy(model[off:], buf)
			case r < 75:
				op = "read"
				buf := make([]byte, n)
				if got, err := unix.Pread(fd, buf, off); err != nil || int64(got) != n {
					t.Fatalf("op %d: pread [%d,+%d): %d %v", i, off, n, got, err)
				}
				if !bytes.Equal(buf, model[off:off+n]) {
					t.Fatalf("op %d: read [%d,+%d) differs from model", i, off, n)
				}
			case r < 85:
				op = "punch"
				if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
					t.Fatalf("op %d: punch [%d,+%d): %v", i, off, n, err)
				}
				clear(model[off : off+n])
			case r < 95:
				op = "zero-range"
				if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, off, n); err != nil {
					t.Fatalf("op %d: zero range [%d,+%d): %v", i, off, n, err)
				}
				clear(model[off : off+n])
			default:
				op = "fsync"
				if err := unix.Fdatasync(fd); err != nil {
					t.Fatalf("op %d: fdatasync: %v", i, err)
				}
			}
			counts[op]++
		}
		t.Logf("%d ops: %v", ops, counts)
		whole := make([]byte, size)
		if _, err := f.ReadAt(whole, 0); err != nil || !bytes.Equal(whole, model) {
			t.Fatalf("final read through the mount differs from the model (err %v)", err)
		}
		if _, err := d.ReadAt(whole, 0); err != nil || !bytes.Equal(whole, model) {
			t.Fatalf("final read from the engine differs from the model (err %v)", err)
		}
		if !slices.Equal(dataRuns(t, f, size), allocatedRuns(t, d)) {
			t.Error("SEEK_DATA/SEEK_HOLE walk differs from Extents")
		}
	})
}

// segmentBytes sums the allocated bytes (st_blocks) of an image's segments.
func segmentBytes(t *testing.T, path string) int64 {
	t.Helper()
	files, _ := filepath.Glob(path + ".[0-9]*")
	if len(files) == 0 {
		t.Fatalf("no segments for %s", path)
	}
	var total int64
	for _, f := range files {
		var st unix.Stat_t
		if err := unix.Stat(f, &st); err != nil {
			t.Fatal(err)
		}
		total += st.Blocks * 512
	}
	return total
}

func fill(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32() | 1)
	}
	return b
}

// TestPunchHoleFreesSpace: fallocate(1) --punch-hole through the mount
// releases segment space, the range reads zeros, the rest is intact.
func TestPunchHoleFreesSpace(t *testing.T) {
	needTools(t, "fallocate")
	path := newImage(t, 16<<20, 1<<20, 4096, lut.Xhyve)
	d := openImage(t, path, nil)
	m := mountT(t, d, nil)
	f := openFile(t, m, os.O_RDWR)
	data := fill(rand.New(rand.NewPCG(1, 2)), 8<<20)
	if _, err := f.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	before := segmentBytes(t, path)
	run(t, "fallocate", "--punch-hole", "--offset", "1MiB", "--length", "4MiB", m.Path())
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	after := segmentBytes(t, path)
	t.Logf("segments allocated: %d before, %d after punching 4 MiB", before, after)
	if before-after < 4<<20-64<<10 {
		t.Errorf("punch freed %d bytes, want about %d", before-after, 4<<20)
	}
	clear(data[1<<20 : 5<<20])
	got := make([]byte, len(data))
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Errorf("content after punch differs (err %v)", err)
	}
	// newImage's cleanup runs blockif.Check once the Disk is closed: the
	// punched image must have no corruption.
}

// TestSparseCopy: cp --sparse=always of the file allocates what the image
// does, and the SEEK_DATA/SEEK_HOLE walk equals the engine's Extents.
func TestSparseCopy(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		needTools(t, "cp")
		const size = 64 << 20
		path := newImage(t, size, 1<<20, 4096, kind)
		d := openImage(t, path, nil)
		m := mountT(t, d, nil)
		f := openFile(t, m, os.O_RDWR)
		rng := rand.New(rand.NewPCG(3, 4))
		for range 40 {
			off := rng.Int64N(size - 1<<20)
			if _, err := f.WriteAt(fill(rng, 1+rng.IntN(1<<20)), off); err != nil {
				t.Fatal(err)
			}
		}
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 8<<20, 8<<20); err != nil {
			t.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		runs := allocatedRuns(t, d)
		if walk := dataRuns(t, f, size); !slices.Equal(walk, runs) {
			t.Fatalf("SEEK walk %v\n!= Extents %v", walk, runs)
		}
		st, err := d.Stats()
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(t.TempDir(), "copy.img")
		run(t, "cp", "--sparse=always", m.Path(), dst)
		var cst unix.Stat_t
		if err := unix.Stat(dst, &cst); err != nil {
			t.Fatal(err)
		}
		got := cst.Blocks * 512
		t.Logf("image allocated %d bytes, sparse copy %d bytes", st.AllocatedBytes, got)
		if diff := got - st.AllocatedBytes; diff*100 > st.AllocatedBytes || -diff*100 > st.AllocatedBytes {
			t.Errorf("copy allocates %d, image %d: more than 1%% apart", got, st.AllocatedBytes)
		}
		a, _ := os.ReadFile(dst)
		b := make([]byte, size)
		if _, err := f.ReadAt(b, 0); err != nil || !bytes.Equal(a, b) {
			t.Errorf("copy differs from the disk (err %v)", err)
		}
	})
}

// TestExt4 puts a real file system on the mounted file through a loop
// device, checks it with e2fsck, remounts everything and verifies the data.
func TestExt4(t *testing.T) {
	testutil.NeedFUSE(t)
	needTools(t, "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	const size = 256 << 20
	path := newImage(t, size, 4<<20, 4096, lut.Xhyve)
	sums := map[string][32]byte{}

	session := func(write bool) {
		d := openImage(t, path, nil)
		m := mountT(t, d, nil)
		loop := losetup(t, m.Path())
		if write {
			run(t, "mkfs.ext4", "-q", "-F", "-E", "nodiscard", loop)
		}
		mnt := t.TempDir()
		run(t, "mount", loop, mnt)
		mounted := true
		defer func() {
			if mounted {
				run(t, "umount", mnt)
			}
		}()
		rng := rand.New(rand.NewPCG(5, 6))
		if write {
			for i := range 60 {
				dir := filepath.Join(mnt, fmt.Sprintf("d%d", i%7))
				os.MkdirAll(dir, 0o755)
				name := filepath.Join(dir, fmt.Sprintf("f%d", i))
				data := fill(rng, rng.IntN(2<<20))
				if err := os.WriteFile(name, data, 0o644); err != nil {
					t.Fatal(err)
				}
				rel, _ := filepath.Rel(mnt, name)
				sums[rel] = sha256.Sum256(data)
			}
			run(t, "sync")
		} else {
			for rel, want := range sums {
				data, err := os.ReadFile(filepath.Join(mnt, rel))
				if err != nil || sha256.Sum256(data) != want {
					t.Errorf("%s: checksum differs after remount (err %v)", rel, err)
				}
			}
		}
		run(t, "umount", mnt)
		mounted = false
		detach(t, loop)
		out, err := command("e2fsck", "-fn", m.Path()).CombinedOutput()
		if err != nil {
			t.Errorf("e2fsck -fn: %v\n%s", err, out)
		}
		unmountT(t, m)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}
	session(true)
	st := checkStats(t, path)
	t.Logf("after writing %d files: image allocates %d bytes", len(sums), st.AllocatedBytes)
	session(false)
}

func checkStats(t *testing.T, path string) blockif.Stats {
	t.Helper()
	d, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	st, err := d.Stats()
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// losetup attaches file to a free loop device, detached at the end of the
// test if the test did not.
func losetup(t *testing.T, file string) string {
	t.Helper()
	out, err := command("losetup", "-f", "--show", file).CombinedOutput()
	if err != nil {
		testutil.Unavailable(t, "losetup: %v: %s", err, out)
	}
	dev := string(bytes.TrimSpace(out))
	t.Cleanup(func() { command("losetup", "-d", dev).Run() })
	return dev
}

func detach(t *testing.T, dev string) {
	t.Helper()
	run(t, "losetup", "-d", dev)
	// Detach is asynchronous; wait until the backing file is released so
	// that the FUSE unmount does not find the file busy.
	testutil.WaitFor(t, dev+" to release its backing file", func() bool {
		out, _ := command("losetup", "-l", "-n", "-O", "BACK-FILE", dev).Output()
		return len(bytes.TrimSpace(out)) == 0
	})
}
