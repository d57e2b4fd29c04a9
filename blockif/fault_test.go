package blockif

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"strings"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// TestDiskFull: allocating writes fail with ENOSPC while the device is
// full; in-place writes and reads go on; flushed data stays intact; once
// space is back, writes resume; Check finds no corruption.
func TestDiskFull(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 4096
		ffs := vfs.NewFaultFS(vfs.NewMemFS())
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 64 * ss, Split: 16 * ss, SectorSize: ss, LUT: kind}, ffs, true)
		d := mustOpen(t, path, &Options{FS: ffs})
		a := bytes.Repeat([]byte{0xA1}, 4*ss)
		if _, err := d.WriteAt(a, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		full := true
		ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
			// Growing a segment file fails; overwriting inside it works.
			if full && op == vfs.OpWrite && strings.HasSuffix(name, ".0001") {
				return syscall.ENOSPC
			}
			return nil
		})
		_, err := d.WriteAt(bytes.Repeat([]byte{0xB2}, ss), 20*ss)
		if !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("allocating write on a full device: %v, want ENOSPC", err)
		}
		// In-place writes elsewhere and reads still work.
		if _, err := d.WriteAt(bytes.Repeat([]byte{0xC3}, ss), 0); err != nil {
			t.Fatalf("in-place write while full: %v", err)
		}
		got := make([]byte, 24*ss)
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatalf("read while full: %v", err)
		}
		if !isZero(got[20*ss:21*ss]) || got[0] != 0xC3 || got[ss] != 0xA1 {
			t.Fatalf("content while full is wrong")
		}
		if err := d.Flush(); err != nil {
			t.Fatalf("flush while full: %v", err)
		}
		full = false
		if _, err := d.WriteAt(bytes.Repeat([]byte{0xB2}, ss), 20*ss); err != nil {
			t.Fatalf("write after space came back: %v", err)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		d = mustOpen(t, path, &Options{FS: ffs, ReadOnly: true})
		defer d.Close()
		if _, err := d.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		if got[20*ss] != 0xB2 || got[0] != 0xC3 || got[3*ss] != 0xA1 {
			t.Fatal("data lost across the disk-full episode")
		}
	})
}

// TestReadEIO: an I/O error reading one segment fails that read only.
func TestReadEIO(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 4096
		ffs := vfs.NewFaultFS(vfs.NewMemFS())
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 32 * ss, Split: 16 * ss, SectorSize: ss, LUT: kind}, ffs, false)
		d := mustOpen(t, path, &Options{FS: ffs})
		defer d.Close()
		d.WriteAt(bytes.Repeat([]byte{1}, ss), 0)
		d.WriteAt(bytes.Repeat([]byte{2}, ss), 16*ss)
		ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
			if op == vfs.OpRead && strings.HasSuffix(name, ".0001") {
				return syscall.EIO
			}
			return nil
		})
		buf := make([]byte, ss)
		if _, err := d.ReadAt(buf, 16*ss); !errors.Is(err, syscall.EIO) {
			t.Errorf("read of the failing segment: %v, want EIO", err)
		}
		if _, err := d.ReadAt(buf, 0); err != nil || buf[0] != 1 {
			t.Errorf("read of a healthy segment: %v %x", err, buf[0])
		}
		if _, err := d.ReadAt(buf, 20*ss); err != nil { // hole: no I/O
			t.Errorf("read of a hole in the failing segment: %v", err)
		}
		ffs.SetFault(nil)
		if _, err := d.ReadAt(buf, 16*ss); err != nil || buf[0] != 2 {
			t.Errorf("read after the fault cleared: %v", err)
		}
	})
}

// TestFlushSyncError: a failing fdatasync makes Flush fail and keeps the
// LUT pages dirty, so a later Flush persists them.
func TestFlushSyncError(t *testing.T) {
	forEachKind(t, func(t *testing.T, kind lut.Kind) {
		const ss = 4096
		mem := vfs.NewMemFS()
		ffs := vfs.NewFaultFS(mem)
		path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 32 * ss, Split: 16 * ss, SectorSize: ss, LUT: kind}, ffs, false)
		d := mustOpen(t, path, &Options{FS: ffs})
		d.WriteAt(bytes.Repeat([]byte{7}, ss), 3*ss)
		ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
			if op == vfs.OpSync {
				return syscall.EIO
			}
			return nil
		})
		if err := d.Flush(); !errors.Is(err, syscall.EIO) {
			t.Fatalf("Flush with failing fsync: %v", err)
		}
		ffs.SetFault(nil)
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		// Power cut now: the write must survive.
		after := mem.Crash(rand.New(rand.NewPCG(1, 1)))
		d.Close()
		d2, err := Open(path, &Options{FS: after, ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		defer d2.Close()
		buf := make([]byte, ss)
		if _, err := d2.ReadAt(buf, 3*ss); err != nil || buf[0] != 7 {
			t.Fatalf("write flushed after a failed flush was lost: %v %x", err, buf[0])
		}
	})
}
