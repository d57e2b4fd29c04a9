package fusefs

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/stamp"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/vfs"
	"golang.org/x/sys/unix"
)

// faultMount mounts b and returns the mount, the open disk file and a
// function that closes the file and unmounts (also run when the test ends,
// if the test did not).
func faultMount(t *testing.T, b blockif.Device) (*Mount, *os.File, func()) {
	t.Helper()
	testutil.NeedFUSE(t)
	m, err := New(t.TempDir(), b, &Options{Name: "disk"})
	if err != nil {
		t.Fatalf("mount: %v", err)
	}
	f, err := os.OpenFile(m.Path(), os.O_RDWR, 0)
	if err != nil {
		_ = m.Unmount()
		t.Fatalf("open %s: %v", m.Path(), err)
	}
	done := false
	stop := func() {
		if !done {
			done = true
			f.Close()
			unmountT(t, m)
		}
	}
	t.Cleanup(stop)
	return m, f, stop
}

// TestDiskFullFUSE fills the host file system under a mounted image:
// pwrite gets ENOSPC, the mount keeps serving reads, in-place writes and
// fsync; punching holes and deleting a file give space back and writes
// resume; after unmount the image holds every acknowledged write and
// checks free of corruption.
func TestDiskFullFUSE(t *testing.T) {
	const (
		ss     = 4096
		chunk  = 64 << 10
		perChk = chunk / ss
		size   = 64 << 20
	)
	testutil.NeedFUSE(t)
	dir := testutil.FaultTmpfs(t, "8m")
	path := filepath.Join(dir, "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: size, Split: 4 << 20, SectorSize: ss}, nil); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, bytes.Repeat([]byte{0x5a}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := blockif.Open(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			d.Close()
		}
	})
	_, f, unmount := faultMount(t, d)

	led := stamp.NewLedger()
	id := 0
	next := int64(0)
	var acked []int64
	write := func(ch int64) error {
		id++
		s := ch * perChk
		_, err := f.WriteAt(led.Data(s, perChk, id), ch*chunk)
		if err == nil {
			led.Acked(s, perChk, id)
		}
		return err
	}
	fsync := func(where string) {
		t.Helper()
		if err := f.Sync(); err != nil {
			t.Fatalf("%s: fsync: %v", where, err)
		}
	}
	fill := func(phase string) (writes int) {
		t.Helper()
		for ; next < size/chunk; next++ {
			err := write(next)
			writes++
			if err == nil {
				acked = append(acked, next)
				if len(acked)%8 == 0 {
					fsync(phase)
				}
				continue
			}
			if errnoOf(err) != syscall.ENOSPC {
				t.Fatalf("%s: pwrite of chunk %d: %v, want ENOSPC", phase, next, err)
			}
			next++
			return writes
		}
		t.Fatalf("%s: %d MiB written to an 8 MiB file system without ENOSPC", phase, size>>20)
		return 0
	}
	readBack := func(where string) {
		t.Helper()
		buf := make([]byte, chunk)
		for _, ch := range acked {
			if _, err := f.ReadAt(buf, ch*chunk); err != nil {
				t.Fatalf("%s: read of chunk %d: %v", where, ch, err)
			}
			led.Verify(t, buf, ch*perChk, where)
		}
	}

	w1 := fill("fill")
	t.Logf("ENOSPC after %d acknowledged 64 KiB pwrites (%d sent)", len(acked), w1)
	for k := range 3 {
		if err := write(next); errnoOf(err) != syscall.ENOSPC {
			t.Fatalf("allocating pwrite %d while full: %v, want ENOSPC", k, err)
		}
		next++
	}
	if err := write(acked[2]); err != nil {
		t.Fatalf("in-place pwrite while full: %v", err)
	}
	readBack("while full")
	fsync("while full")

	// Punching holes releases space at once.
	for _, ch := range acked[:8] {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, ch*chunk, chunk); err != nil {
			t.Fatalf("punch chunk %d: %v", ch, err)
		}
		led.Zeroed(ch*perChk, perChk)
	}
	acked = acked[8:]
	for k := range 4 {
		if err := write(next); err != nil {
			t.Fatalf("pwrite %d after punching 512 KiB: %v", k, err)
		}
		acked = append(acked, next)
		next++
	}
	fsync("after punch")
	readBack("after punch")

	// Full again; then deleting the filler gives 1 MiB back.
	w2 := fill("refill")
	fsync("second full")
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for k := range 8 {
		if err := write(next); err != nil {
			t.Fatalf("pwrite %d after deleting the filler: %v", k, err)
		}
		acked = append(acked, next)
		next++
	}
	fsync("space back")
	readBack("space back")

	unmount()
	closed = true
	if err := d.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	r, err := blockif.Check(path, nil)
	if err != nil || r.Corruptions > 0 {
		t.Fatalf("check: %v %+v", err, r)
	}
	ro, err := blockif.Open(path, &blockif.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	whole := make([]byte, size)
	if _, err := ro.ReadAt(whole, 0); err != nil {
		t.Fatal(err)
	}
	verified := led.Verify(t, whole, 0, "reopened")
	t.Logf("refill: ENOSPC after %d more pwrites; reopened: %d sectors verified; check: %d corruptions, %d leaked slots", w2, verified, r.Corruptions, r.LeakedSlots)
}

// TestReadEIOFUSE: an EIO from one segment file fails the reads of the
// mounted file that touch that segment, with EIO; other reads go on, and
// the data is back once the fault clears.
func TestReadEIOFUSE(t *testing.T) {
	const ss = 4096
	const mib = 1 << 20
	ffs := vfs.NewFaultFS(vfs.OS{})
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: 4 * mib, Split: mib, SectorSize: ss}, &blockif.Options{FS: ffs}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { checkImage(t, path) })
	d := openImage(t, path, &blockif.Options{FS: ffs})
	a := bytes.Repeat([]byte{0xa1}, 2*ss)
	b := bytes.Repeat([]byte{0xb2}, 2*ss)
	if _, err := d.WriteAt(a, mib-2*ss); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(b, mib); err != nil {
		t.Fatal(err)
	}
	_, f, _ := faultMount(t, d)
	ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
		if op == vfs.OpRead && strings.HasSuffix(name, ".0001") {
			return syscall.EIO
		}
		return nil
	})
	buf := make([]byte, 2*ss)
	for _, off := range []int64{mib, mib - ss, mib + ss} {
		if _, err := f.ReadAt(buf, off); errnoOf(err) != syscall.EIO {
			t.Errorf("read at %d touching the failing segment: %v, want EIO", off, err)
		}
	}
	if _, err := f.ReadAt(buf, mib-2*ss); err != nil || !bytes.Equal(buf, a) {
		t.Errorf("read of the healthy segment: %v", err)
	}
	if _, err := f.ReadAt(buf, mib+64*ss); err != nil || !bytes.Equal(buf, make([]byte, 2*ss)) {
		t.Errorf("read of a hole in the failing segment: %v", err)
	}
	if _, err := f.WriteAt([]byte("rmw"), mib+5); errnoOf(err) != syscall.EIO {
		t.Errorf("partial-sector write needing a read of the failing segment: %v, want EIO", err)
	}
	if err := f.Sync(); err != nil {
		t.Errorf("fsync: %v", err)
	}
	ffs.SetFault(nil)
	if _, err := f.ReadAt(buf, mib); err != nil || !bytes.Equal(buf, b) {
		t.Errorf("read after the fault cleared: %v, data ok %v", err, bytes.Equal(buf, b))
	}
}
