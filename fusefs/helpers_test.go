package fusefs

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/lut"
	"golang.org/x/sys/unix"
)

// needTools checks that the named programs exist (sbin included) and that
// we are root (loop devices and mount(8) need it).
func needTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		testutil.NeedTool(t, n)
	}
	testutil.NeedRoot(t)
}

// command is exec.Command with the sbin directories on PATH.
func command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/sbin:/usr/bin:/bin:"+os.Getenv("PATH"))
	return cmd
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %q: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// mountT mounts b at a fresh directory and unmounts it when the test ends.
func mountT(t testing.TB, b blockif.Device, o *Options) *Mount {
	t.Helper()
	testutil.NeedFUSE(t)
	if o == nil {
		o = &Options{}
	}
	if o.Name == "" {
		o.Name = "disk"
	}
	dir := t.TempDir()
	m, err := New(dir, b, o)
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() { unmountT(t, m) })
	return m
}

// unmountT unmounts, retrying while the kernel still sees the file busy.
// A mount that will not go away (a child stuck on it, a server that does
// not finish) is aborted through fusectl and detached, so that a failing
// test never leaves a process or the test binary stuck on a dead mount.
func unmountT(t testing.TB, m *Mount) {
	t.Helper()
	var err error
	for i := 0; i < 50; i++ {
		// Unmount waits for the server's request loops, which a request
		// stuck in the Backend would hold forever: bound it.
		var uerr error
		if !within(30*time.Second, func() { uerr = m.Unmount() }) {
			err = errors.New("unmount did not return in 30s")
			break
		}
		if err = uerr; err == nil {
			if within(30*time.Second, m.Wait) {
				return
			}
			err = errors.New("server still running 30s after the unmount")
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Errorf("unmount %s: %v; aborting the FUSE connection", m.Dir(), err)
	if aerr := abortMount(m.Dir()); aerr != nil {
		t.Errorf("abort %s: %v", m.Dir(), aerr)
	}
}

// newImage creates a sparse image (LUT kind kind) and, at the end of the test, checks it
// for corruption (after every Close registered later has run).
func newImage(t testing.TB, size, split, sector int64, kind lut.Kind) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	p := format.Params{Layout: format.LayoutSparse, Size: size, Split: split, SectorSize: sector, LUT: kind}
	if err := blockif.Create(path, p, nil); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { checkImage(t, path) })
	return path
}

func checkImage(t testing.TB, path string) {
	t.Helper()
	r, err := blockif.Check(path, nil)
	if err != nil {
		t.Errorf("check %s: %v", path, err)
		return
	}
	if r.Corruptions > 0 {
		t.Errorf("check %s: %d corruptions: %v", path, r.Corruptions, r.Findings)
	}
}

// openImage opens an image and closes it at the end of the test (before the
// image check registered by newImage).
func openImage(t testing.TB, path string, o *blockif.Options) *blockif.Disk {
	t.Helper()
	d, err := blockif.Open(path, o)
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil && !errors.Is(err, blockif.ErrClosed) {
			t.Errorf("close: %v", err)
		}
	})
	return d
}

// openFile opens the mounted disk file; it is closed when the test ends
// (before the unmount, which would otherwise fail with EBUSY).
func openFile(t testing.TB, m *Mount, flag int) *os.File {
	t.Helper()
	f, err := os.OpenFile(m.Path(), flag, 0)
	if err != nil {
		t.Fatalf("open %s: %v", m.Path(), err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func errnoOf(err error) syscall.Errno {
	var e syscall.Errno
	if errors.As(err, &e) {
		return e
	}
	return 0
}

// dataRuns walks a file with SEEK_DATA/SEEK_HOLE and returns its data runs.
func dataRuns(t testing.TB, f *os.File, size int64) []blockif.Extent {
	t.Helper()
	fd := int(f.Fd())
	var runs []blockif.Extent
	for off := int64(0); off < size; {
		d, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errnoOf(err) == unix.ENXIO {
			break
		}
		if err != nil {
			t.Fatalf("SEEK_DATA %d: %v", off, err)
		}
		h, err := unix.Seek(fd, d, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE %d: %v", d, err)
		}
		if h <= d {
			t.Fatalf("SEEK_HOLE(%d) = %d", d, h)
		}
		runs = append(runs, blockif.Extent{Offset: d, Length: h - d, Allocated: true})
		off = h
	}
	return runs
}

// allocatedRuns merges a backend's allocated extents into maximal runs.
func allocatedRuns(t testing.TB, b blockif.Device) []blockif.Extent {
	t.Helper()
	ext, err := b.Extents(0, b.Size())
	if err != nil {
		t.Fatal(err)
	}
	var runs []blockif.Extent
	for _, e := range ext {
		if !e.Allocated || e.Length == 0 {
			continue
		}
		if k := len(runs) - 1; k >= 0 && runs[k].Offset+runs[k].Length == e.Offset {
			runs[k].Length += e.Length
		} else {
			runs = append(runs, e)
		}
	}
	return runs
}

// forEachKind runs fn as one subtest per LUT kind (xhyve, thin), for the
// tests that serve images of both kinds.
func forEachKind(t *testing.T, fn func(t *testing.T, kind lut.Kind)) {
	t.Helper()
	for _, k := range lut.Kinds {
		t.Run("lut="+string(k), func(t *testing.T) { fn(t, k) })
	}
}
