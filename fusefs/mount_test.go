package fusefs

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"golang.org/x/sys/unix"
)

func TestSeekHelpers(t *testing.T) {
	b := newMemBackend(10 * memBlock)
	if _, ok, _ := seekData(b, 0); ok {
		t.Fatal("empty disk has data")
	}
	if h, _ := seekHole(b, 5); h != 5 {
		t.Fatalf("seekHole(5) = %d", h)
	}
	b.WriteAt([]byte{1}, 3*memBlock+7)
	b.WriteAt(make([]byte, 2*memBlock), 7*memBlock)
	for _, c := range []struct{ off, data, hole int64 }{
		{0, 3 * memBlock, 0},
		{3*memBlock + 100, 3*memBlock + 100, 4 * memBlock},
		{4 * memBlock, 7 * memBlock, 4 * memBlock},
		{8 * memBlock, 8 * memBlock, 9 * memBlock},
	} {
		d, ok, err := seekData(b, c.off)
		if err != nil || !ok || d != c.data {
			t.Errorf("seekData(%d) = %d %v %v, want %d", c.off, d, ok, err, c.data)
		}
		h, err := seekHole(b, c.off)
		if err != nil || h != c.hole {
			t.Errorf("seekHole(%d) = %d %v, want %d", c.off, h, err, c.hole)
		}
	}
	if _, ok, _ := seekData(b, 9*memBlock); ok {
		t.Error("data after the last run")
	}
	if n, _ := allocatedBytes(b); n != 3*memBlock {
		t.Errorf("allocatedBytes = %d", n)
	}
}

func TestNewErrors(t *testing.T) {
	b := newMemBackend(memBlock)
	if _, err := New(t.TempDir()+"/nope", b, &Options{Name: "d"}); !errors.Is(err, ErrNoMountpoint) {
		t.Errorf("missing mount point: %v", err)
	}
	f, _ := os.CreateTemp(t.TempDir(), "file")
	f.Close()
	if _, err := New(f.Name(), b, &Options{Name: "d"}); !errors.Is(err, ErrNoMountpoint) {
		t.Errorf("file as mount point: %v", err)
	}
	for _, n := range []string{"", ".", "..", "a/b", "a\x00"} {
		if _, err := New(t.TempDir(), b, &Options{Name: n}); !errors.Is(err, ErrBadName) {
			t.Errorf("name %q: %v", n, err)
		}
	}
}

// statBlocks polls st_blocks until cond holds (attributes may be cached for
// up to a second).
func statBlocks(t *testing.T, path string, cond func(int64) bool) int64 {
	t.Helper()
	var st unix.Stat_t
	for i := 0; ; i++ {
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if cond(st.Blocks*512) || i == 30 {
			return st.Blocks * 512
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestFileSemantics(t *testing.T) {
	const size = 16 << 20
	b := newMemBackend(size)
	m := mountT(t, b, &Options{Name: "vm.img"})

	ents, err := os.ReadDir(m.Dir())
	if err != nil || len(ents) != 1 || ents[0].Name() != "vm.img" {
		t.Fatalf("readdir: %v %v", ents, err)
	}
	st, err := os.Stat(m.Path())
	if err != nil || st.Size() != size || !st.Mode().IsRegular() {
		t.Fatalf("stat: %v %v", st, err)
	}
	if n := statBlocks(t, m.Path(), func(n int64) bool { return n == 0 }); n != 0 {
		t.Errorf("fresh disk allocated %d", n)
	}

	f := openFile(t, m, os.O_RDWR)
	fd := int(f.Fd())
	data := bytes.Repeat([]byte("sparsedisk!"), 100000) // ~1.1 MB, unaligned length
	if n, err := unix.Pwrite(fd, data, 1<<20+3); err != nil || n != len(data) {
		t.Fatalf("pwrite: %d %v", n, err)
	}
	got := make([]byte, len(data))
	if n, err := unix.Pread(fd, got, 1<<20+3); err != nil || n != len(data) || !bytes.Equal(got, data) {
		t.Fatalf("pread: %d %v equal=%v", n, err, bytes.Equal(got, data))
	}
	if !bytes.Equal(b.snapshot()[1<<20+3:1<<20+3+len(data)], data) {
		t.Fatal("backend does not hold the write")
	}
	first, last := int64(1<<20+3)/memBlock, int64(1<<20+3+len(data)-1)/memBlock
	want := (last - first + 1) * memBlock
	if n := statBlocks(t, m.Path(), func(n int64) bool { return n == want }); n != want {
		t.Errorf("st_blocks*512 = %d, want %d", n, want)
	}

	// The end of the disk: a straddling write is cut short, past it ENOSPC.
	if n, err := unix.Pwrite(fd, make([]byte, 8192), size-4096); err != nil || n != 4096 {
		t.Errorf("straddling pwrite: %d %v, want 4096 nil", n, err)
	}
	if _, err := unix.Pwrite(fd, []byte{1}, size); err != unix.ENOSPC {
		t.Errorf("pwrite at end: %v, want ENOSPC", err)
	}
	if n, err := unix.Pread(fd, got, size-10); err != nil || n != 10 {
		t.Errorf("pread at end: %d %v", n, err)
	}

	// The size is fixed.
	if err := unix.Ftruncate(fd, size-4096); err != unix.EPERM {
		t.Errorf("shrinking truncate: %v, want EPERM", err)
	}
	if err := unix.Ftruncate(fd, size*2); err != unix.EPERM {
		t.Errorf("growing truncate: %v, want EPERM", err)
	}
	if err := unix.Ftruncate(fd, size); err != nil {
		t.Errorf("truncate to the same size: %v", err)
	}
	if _, err := os.OpenFile(m.Path(), os.O_RDWR|os.O_TRUNC, 0); errnoOf(err) != unix.EPERM {
		t.Errorf("O_TRUNC: %v, want EPERM", err)
	}
	if err := os.Chmod(m.Path(), 0o600); err != nil {
		t.Errorf("chmod: %v", err)
	} else if st, _ := os.Stat(m.Path()); st.Mode().Perm() != 0o600 {
		t.Errorf("mode after chmod: %v", st.Mode())
	}

	// fsync reaches Flush.
	b.mu.Lock()
	before := b.flushes
	b.mu.Unlock()
	if err := unix.Fsync(fd); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fdatasync(fd); err != nil {
		t.Fatal(err)
	}
	b.mu.Lock()
	after := b.flushes
	b.mu.Unlock()
	if after-before != 2 {
		t.Errorf("fsync+fdatasync flushed %d times, want 2", after-before)
	}

	// SEEK_DATA/SEEK_HOLE.
	if !slices.Equal(dataRuns(t, f, size), allocatedRuns(t, b)) {
		t.Errorf("seek walk %v != extents %v", dataRuns(t, f, size), allocatedRuns(t, b))
	}

	// fallocate.
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 1<<20, 256<<10); err != nil {
		t.Errorf("punch: %v", err)
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, 1<<20+512<<10, 100); err != nil {
		t.Errorf("zero range: %v", err)
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, size-4096, 8192); err != nil {
		t.Errorf("zero range past end with KEEP_SIZE: %v", err)
	}
	if err := unix.Fallocate(fd, 0, 0, 4096); err != unix.EOPNOTSUPP {
		t.Errorf("plain fallocate: %v, want EOPNOTSUPP", err)
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_COLLAPSE_RANGE, 0, 4096); err != unix.EOPNOTSUPP {
		t.Errorf("collapse range: %v, want EOPNOTSUPP", err)
	}
	model := make([]byte, size)
	copy(model[1<<20+3:], data)
	clear(model[1<<20 : 1<<20+256<<10])
	clear(model[1<<20+512<<10 : 1<<20+512<<10+100])
	if !bytes.Equal(b.snapshot(), model) {
		t.Error("backend differs from model after fallocate")
	}

	// Shared writable mmap.
	mem, err := unix.Mmap(fd, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("shared mmap: %v", err)
	}
	copy(mem[4096:], "written through mmap")
	if err := unix.Msync(mem, unix.MS_SYNC); err != nil {
		t.Errorf("msync: %v", err)
	}
	unix.Munmap(mem)
	if !bytes.HasPrefix(b.snapshot()[4096:], []byte("written through mmap")) {
		t.Error("mmap write did not reach the backend")
	}
}

func TestReadOnlyMount(t *testing.T) {
	b := newMemBackend(1 << 20)
	b.WriteAt([]byte("hello"), 0)
	m := mountT(t, b, &Options{ReadOnly: true})
	for _, flag := range []int{os.O_RDWR, os.O_WRONLY} {
		if _, err := os.OpenFile(m.Path(), flag, 0); errnoOf(err) != syscall.EROFS {
			t.Errorf("open flag %d: %v, want EROFS", flag, err)
		}
	}
	f := openFile(t, m, os.O_RDONLY)
	buf := make([]byte, 5)
	if _, err := f.ReadAt(buf, 0); err != nil || string(buf) != "hello" {
		t.Errorf("read: %q %v", buf, err)
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); err == nil {
		t.Error("punch on a read-only mount succeeded")
	}
	if err := unix.Fsync(int(f.Fd())); err != nil {
		t.Errorf("fsync read-only: %v", err)
	}
}

func TestReadOnlyImage(t *testing.T) {
	path := newImage(t, 4<<20, 1<<20, 4096)
	d := openImage(t, path, &blockif.Options{ReadOnly: true})
	m := mountT(t, d, nil)
	if !m.ReadOnly() {
		t.Error("mount of a read-only image is writable")
	}
	if _, err := os.OpenFile(m.Path(), os.O_RDWR, 0); errnoOf(err) != syscall.EROFS {
		t.Errorf("open O_RDWR: %v, want EROFS", err)
	}
}

// TestParallelIO writes and reads disjoint regions from many goroutines on
// a real image, so the race detector sees the concurrent data path.
func TestParallelIO(t *testing.T) {
	const size, workers, chunk = 32 << 20, 8, 256 << 10
	path := newImage(t, size, 1<<20, 4096)
	d := openImage(t, path, nil)
	m := mountT(t, d, nil)
	f := openFile(t, m, os.O_RDWR)
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			buf := make([]byte, chunk)
			got := make([]byte, chunk)
			for i := range size / chunk / workers {
				off := int64((i*workers + w) * chunk)
				for j := range buf {
					buf[j] = byte(rng.Uint32())
				}
				if _, err := f.WriteAt(buf, off); err != nil {
					errs <- err
					return
				}
				if _, err := f.ReadAt(got, off); err != nil || !bytes.Equal(got, buf) {
					errs <- errors.Join(err, errors.New("read back differs"))
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := f.Sync(); err != nil {
		t.Error(err)
	}
}
