package fusefs

import (
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
	"golang.org/x/sys/unix"
)

// imageFilesBytes is what du says of an image: the allocated bytes of its
// descriptor, segment files and LUT (when present).
func imageFilesBytes(t *testing.T, path string) int64 {
	t.Helper()
	files, _ := filepath.Glob(path + ".[0-9]*")
	if len(files) == 0 {
		t.Fatalf("no segments for %s", path)
	}
	files = append(files, path, path+lut.Suffix)
	var total int64
	for _, f := range files {
		var st unix.Stat_t
		if err := unix.Stat(f, &st); err != nil {
			if f == path+lut.Suffix && err == unix.ENOENT {
				continue
			}
			t.Fatal(err)
		}
		total += st.Blocks * 512
	}
	return total
}

// statfsUsed returns the used bytes statfs reports for the mount at dir.
func statfsUsed(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks-st.Bfree) * st.Bsize
}

// waitSpace polls until st_blocks*512 of the mounted file equals du of the
// image files (both may lag: the attribute cache, and the host's own
// allocation after writeback), and returns both.
func waitSpace(t *testing.T, m *Mount, path string) (blocks, files int64) {
	t.Helper()
	_ = testutil.Await(testutil.WaitTimeout, func() bool {
		files = imageFilesBytes(t, path)
		var st unix.Stat_t
		if err := unix.Stat(m.Path(), &st); err != nil {
			t.Fatal(err)
		}
		blocks = st.Blocks * 512
		return blocks == files
	})
	return blocks, files // the caller judges values that never matched
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestSpaceHugeImage: on a 1 TiB sparse image (a 1 GiB LUT, 1024 segments
// of 1 GiB) st_blocks and statfs come from the image files' allocation,
// not from loading the LUT: after writes spread over the disk and a stat,
// the heap has not grown by anything like the LUT, and st_blocks*512
// equals du of the image files, after the writes and after a punch.
func TestSpaceHugeImage(t *testing.T) {
	const size, split = 1 << 40, 1 << 30
	path := filepath.Join(t.TempDir(), "huge.img")
	start := time.Now()
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: size, Split: split, SectorSize: 4096}, nil); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Logf("created a 1 TiB image in %v", time.Since(start).Round(time.Millisecond))
	d := openImage(t, path, nil)
	// The baseline precedes the mount: the kernel asks for the file's
	// attributes as soon as it is looked up.
	before := heapInUse()
	m := mountT(t, d, nil)
	f := openFile(t, m, unix.O_RDWR)
	fd := int(f.Fd())

	data := fill(rand.New(rand.NewPCG(9, 10)), 1<<20)
	offs := []int64{0, 300 << 30, 700 << 30, size - 1<<20}
	for _, off := range offs {
		if n, err := unix.Pwrite(fd, data, off); err != nil || n != len(data) {
			t.Fatalf("pwrite at %d: %d %v", off, n, err)
		}
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	blocks, files := waitSpace(t, m, path)
	used := statfsUsed(t, m.Dir())
	grown := int64(heapInUse()) - int64(before)
	t.Logf("after %d MiB written: st_blocks*512 %d, image files %d, statfs used %d, heap grew %d KiB",
		len(offs), blocks, files, used, grown>>10)
	if blocks != files {
		t.Errorf("st_blocks*512 = %d, du of the image files = %d", blocks, files)
	}
	if used < files || used > files+4096 {
		t.Errorf("statfs used %d, image files %d", used, files)
	}
	if grown > 64<<20 {
		t.Errorf("heap grew by %d MiB for a stat of a 1 TiB image (the LUT is 1024 MiB)", grown>>20)
	}

	// Punch two of the writes out: the count follows the segment files.
	for _, off := range offs[1:3] {
		if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, 1<<20); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	blocks2, files2 := waitSpace(t, m, path)
	t.Logf("after punching 2 MiB: st_blocks*512 %d, image files %d", blocks2, files2)
	if blocks2 != files2 {
		t.Errorf("after punch: st_blocks*512 = %d, du of the image files = %d", blocks2, files2)
	}
	if freed := blocks - blocks2; freed < 2<<20-64<<10 {
		t.Errorf("punching 2 MiB lowered st_blocks*512 by %d", freed)
	}
}

// TestSpaceSplitImage: for a split-layout image st_blocks is the real
// allocation of its sparse segment files, not the full disk size.
func TestSpaceSplitImage(t *testing.T) {
	const size, split = 64 << 20, 16 << 20
	path := filepath.Join(t.TempDir(), "split.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSplit, Size: size, Split: split, SectorSize: 512}, nil); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { checkImage(t, path) })
	d := openImage(t, path, nil)
	m := mountT(t, d, nil)
	f := openFile(t, m, unix.O_RDWR)
	if _, err := f.WriteAt(fill(rand.New(rand.NewPCG(11, 12)), 3<<20), 20<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	blocks, files := waitSpace(t, m, path)
	used := statfsUsed(t, m.Dir())
	t.Logf("split image, 3 MiB written: st_blocks*512 %d, image files %d, statfs used %d", blocks, files, used)
	if blocks != files {
		t.Errorf("st_blocks*512 = %d, du of the image files = %d", blocks, files)
	}
	if blocks < 3<<20 || blocks > 4<<20 {
		t.Errorf("st_blocks*512 = %d after writing 3 MiB of a %d-byte split image", blocks, size)
	}
	if used < files || used > files+4096 {
		t.Errorf("statfs used %d, image files %d", used, files)
	}
}
