package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
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
	_ = testutil.Await(testutil.WaitTimeout, func() bool {
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return cond(st.Blocks * 512)
	})
	return st.Blocks * 512 // the caller judges a value that never matched
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
	if st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", st.Mode().Perm())
	}
	if err := os.Chmod(m.Path(), 0o640); err != nil {
		t.Errorf("chmod: %v", err)
	} else if st, _ := os.Stat(m.Path()); st.Mode().Perm() != 0o640 {
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
}

// TestSharedMmap writes through shared writable mappings of the mounted
// file. The mapping lives in a child process (runChild): faulting on it in
// the serving test binary can deadlock against the Go garbage collector.
// Meanwhile this process collects garbage without pause, which is what
// turned that deadlock from rare into likely; the child must still finish
// and its writes reach the backend.
func TestSharedMmap(t *testing.T) {
	const size = 4 << 20
	b := newMemBackend(size)
	m := mountT(t, b, &Options{Name: "vm.img"})
	stop := make(chan struct{})
	gcDone := make(chan struct{})
	go func() {
		defer close(gcDone)
		for {
			select {
			case <-stop:
				return
			default:
				runtime.GC()
			}
		}
	}()
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 8))
	for i := range 8 {
		msg := fmt.Sprintf("written through mmap, round %d", i)
		off := rng.Int64N(size - int64(len(msg)))
		if i == 0 {
			off = 4096 - 5 // straddles two pages
		}
		out, err := runChild(t, m, time.Minute, "mmap", "CHILD_OFF="+strconv.FormatInt(off, 10), "CHILD_DATA="+msg)
		if err != nil {
			close(stop)
			<-gcDone
			t.Fatalf("round %d: mmap child: %v\n%s", i, err, out)
		}
		copy(model[off:], msg)
	}
	close(stop)
	<-gcDone
	if !bytes.Equal(b.snapshot(), model) {
		t.Error("mapped writes did not all reach the backend")
	}
}

// TestModeAllowOther: with allow_other the file is still private (0600),
// so another user cannot read the disk until it is chmod'ed.
func TestModeAllowOther(t *testing.T) {
	needTools(t, "head")
	const nobody = 65534
	b := newMemBackend(1 << 20)
	b.WriteAt([]byte("secret"), 0)
	m := mountT(t, b, &Options{AllowOther: true})
	// Let the other user reach the mount point (t.TempDir makes 0700
	// dirs; the mount's root itself is 0755).
	for d := filepath.Dir(m.Dir()); d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	read := func() (string, error) {
		cmd := command("head", "-c", "6", m.Path())
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	var st unix.Stat_t
	if err := unix.Stat(m.Path(), &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode&0o7777 != 0o600 {
		t.Errorf("mode %#o, want 0600", st.Mode&0o7777)
	}
	if out, err := read(); err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("another user read the private disk: %q %v", out, err)
	}
	if err := os.Chmod(m.Path(), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := read(); err != nil || out != "secret" {
		t.Errorf("another user after chmod 0644: %q %v", out, err)
	}
}

func TestReadOnlyMount(t *testing.T) {
	b := newMemBackend(1 << 20)
	b.WriteAt([]byte("hello"), 0)
	m := mountT(t, b, &Options{ReadOnly: true})
	if st, err := os.Stat(m.Path()); err != nil {
		t.Error(err)
	} else if st.Mode().Perm() != 0o400 {
		t.Errorf("read-only mode %v, want 0400", st.Mode().Perm())
	}
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
	path := newImage(t, 4<<20, 1<<20, 4096, lut.Xhyve)
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
	path := newImage(t, size, 1<<20, 4096, lut.Xhyve)
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

// TestCloseSendsNoFlush: the kernel is told (FOPEN_NOFLUSH) not to send a
// FLUSH request on close, a request it would wait for uninterruptibly.
func TestCloseSendsNoFlush(t *testing.T) {
	var log testutil.SyncBuffer
	logger := slog.New(slog.NewTextHandler(&log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	m := mountT(t, newMemBackend(1<<20), &Options{Debug: true, Logger: logger})
	for range 3 {
		f, err := os.OpenFile(m.Path(), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("x"), 0); err != nil {
			t.Error(err)
		}
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	}
	// go-fuse's own poll probe file at mount time (node ID 2^64-1) may
	// see a FLUSH; the disk file must not.
	out := log.String()
	if !strings.Contains(out, "DIRECT,NOFLUSH") {
		t.Fatalf("debug log shows no open answered with NOFLUSH:\n%s", out)
	}
	for line := range strings.Lines(out) {
		if strings.Contains(line, ": FLUSH n") && !strings.Contains(line, "FLUSH n18446744073709551615 ") {
			t.Errorf("close sent a FLUSH: %s", line)
		}
	}
}
