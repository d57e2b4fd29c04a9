package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/internal/stamp"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// faultServe serves exps until the returned stop is called (or the test
// ends); stop checks that the server shut down cleanly.
func faultServe(t *testing.T, exps ...Export) (addr string, stop func()) {
	t.Helper()
	_, addr, stop = startServerStop(t, Config{}, exps...)
	return addr, stop
}

// simple NBD requests over the test client, one at a time.
func (c *client) faultWrite(cookie uint64, off int64, data []byte) uint32 {
	c.t.Helper()
	c.request(cmdWrite, 0, cookie, uint64(off), uint32(len(data)), data)
	errno, got, _ := c.simpleReply(0)
	if got != cookie {
		c.t.Fatalf("write reply cookie %d, want %d", got, cookie)
	}
	return errno
}

func (c *client) faultCmd(typ uint16, cookie uint64, off, n int64) uint32 {
	c.t.Helper()
	c.request(typ, 0, cookie, uint64(off), uint32(n), nil)
	errno, got, _ := c.simpleReply(0)
	if got != cookie {
		c.t.Fatalf("%s reply cookie %d, want %d", cmdName(typ), got, cookie)
	}
	return errno
}

func (c *client) faultRead(cookie uint64, off, n int64) (uint32, []byte) {
	c.t.Helper()
	c.request(cmdRead, 0, cookie, uint64(off), uint32(n), nil)
	errno, got, data := c.simpleReply(int(n))
	if got != cookie {
		c.t.Fatalf("read reply cookie %d, want %d", got, cookie)
	}
	return errno, data
}

// TestDiskFullNBD fills the host file system under an image served over
// NBD: allocating writes get NBD ENOSPC while the connection and server
// keep serving reads, in-place writes and flushes; trimming and deleting
// a file give space back and writes resume; a reopen after the episode
// reads back every acknowledged write and nothing that was not written
// (partial appends at ENOSPC leave at most leaks), and Check finds no
// corruption.
func TestDiskFullNBD(t *testing.T) {
	const (
		ss     = 4096
		chunk  = 64 << 10
		perChk = chunk / ss
		size   = 64 << 20 // far more than the 8 MiB tmpfs holds
	)
	dir := testutil.FaultTmpfs(t, "8m")
	path := filepath.Join(dir, "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: size, Split: 4 << 20, SectorSize: ss}, nil); err != nil {
		t.Fatal(err)
	}
	filler := filepath.Join(dir, "filler")
	if err := os.WriteFile(filler, bytes.Repeat([]byte{0x5a}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	var d *blockif.Disk
	t.Cleanup(func() {
		if d != nil {
			d.Close()
		}
	})
	open := func(ro bool) {
		t.Helper()
		var err error
		if d, err = blockif.Open(path, &blockif.Options{ReadOnly: ro}); err != nil {
			t.Fatalf("open (read-only %v): %v", ro, err)
		}
	}
	open(false)
	addr, stop := faultServe(t, Export{Name: "disk", Backend: d})
	c := dial(t, addr)
	c.connect("disk", connectOpts{})

	led := stamp.NewLedger()
	id := 0
	next := int64(0) // next chunk never written
	var acked []int64
	// fill writes fresh chunks until one fails with ENOSPC; every 8th
	// acknowledged chunk is followed by a flush, which must succeed.
	fill := func(phase string) (writes int) {
		t.Helper()
		for ; next < size/chunk; next++ {
			id++
			s := next * perChk
			errno := c.faultWrite(uint64(id), next*chunk, led.Data(s, perChk, id))
			writes++
			switch errno {
			case 0:
				led.Acked(s, perChk, id)
				acked = append(acked, next)
				if len(acked)%8 == 0 {
					if e := c.faultCmd(cmdFlush, 1, 0, 0); e != 0 {
						t.Fatalf("%s: flush errno %d", phase, e)
					}
				}
			case errnoNoSpc:
				next++
				return writes
			default:
				t.Fatalf("%s: write of chunk %d: errno %d, want 0 or ENOSPC", phase, next, errno)
			}
		}
		t.Fatalf("%s: %d MiB written to an 8 MiB file system without ENOSPC", phase, size>>20)
		return 0
	}
	readBack := func(where string) {
		t.Helper()
		for _, ch := range acked {
			errno, data := c.faultRead(2, ch*chunk, chunk)
			if errno != 0 {
				t.Fatalf("%s: read of chunk %d: errno %d", where, ch, errno)
			}
			led.Verify(t, data, ch*perChk, where)
		}
	}

	// 1. The file system fills up.
	w1 := fill("fill")
	full1 := len(acked)
	t.Logf("ENOSPC after %d acknowledged 64 KiB writes (%d sent)", full1, w1)
	for k := range 3 { // still full: allocating writes keep failing
		id++
		if errno := c.faultWrite(uint64(id), next*chunk, led.Data(next*perChk, perChk, id)); errno != errnoNoSpc {
			t.Fatalf("allocating write %d while full: errno %d, want ENOSPC (%d)", k, errno, errnoNoSpc)
		}
		next++
	}
	// Overwriting allocated sectors needs no space.
	id++
	if errno := c.faultWrite(uint64(id), acked[1]*chunk, led.Data(acked[1]*perChk, perChk, id)); errno != 0 {
		t.Fatalf("in-place write while full: errno %d", errno)
	}
	led.Acked(acked[1]*perChk, perChk, id)
	readBack("while full")
	if errno := c.faultCmd(cmdFlush, 3, 0, 0); errno != 0 {
		t.Fatalf("flush while full: errno %d", errno)
	}

	// 2. Trimming allocated chunks releases space: writes resume on the
	// same connection.
	for _, ch := range acked[:16] {
		if errno := c.faultCmd(cmdTrim, 4, ch*chunk, chunk); errno != 0 {
			t.Fatalf("trim of chunk %d: errno %d", ch, errno)
		}
		led.Zeroed(ch*perChk, perChk)
	}
	acked = acked[16:]
	for k := range 8 {
		id++
		s := next * perChk
		if errno := c.faultWrite(uint64(id), next*chunk, led.Data(s, perChk, id)); errno != 0 {
			t.Fatalf("write %d after trimming 1 MiB: errno %d", k, errno)
		}
		led.Acked(s, perChk, id)
		acked = append(acked, next)
		next++
	}
	if errno := c.faultCmd(cmdFlush, 5, 0, 0); errno != 0 {
		t.Fatalf("flush after trim: errno %d", errno)
	}
	readBack("after trim")

	// 3. Full again, then everything acknowledged is flushed.
	w3 := fill("refill")
	if errno := c.faultCmd(cmdFlush, 6, 0, 0); errno != 0 {
		t.Fatalf("flush at the second ENOSPC: errno %d", errno)
	}
	readBack("second full")

	// 4. Close and reopen while still full. Close flushes; marking the
	// descriptor clean needs a new file, which may fail with ENOSPC (the
	// image then stays dirty, which is safe). A writable open needs the
	// same and may fail likewise; a read-only one must work and show
	// every acknowledged write and nothing never written.
	stop()
	cerr := d.Close()
	d = nil
	if cerr != nil && !errors.Is(cerr, syscall.ENOSPC) {
		t.Fatalf("close while full: %v", cerr)
	}
	if rw, err := blockif.Open(path, nil); err == nil {
		rw.Close()
	} else if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("writable open while full: %v, want success or ENOSPC", err)
	}
	open(true)
	whole := make([]byte, size)
	if _, err := d.ReadAt(whole, 0); err != nil {
		t.Fatalf("read after reopen: %v", err)
	}
	verified := led.Verify(t, whole, 0, "reopened while full")
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	d = nil
	r, err := blockif.Check(path, nil)
	if err != nil {
		t.Fatalf("check while full: %v", err)
	}
	if r.Corruptions > 0 {
		t.Fatalf("check while full: %d corruption(s): %v", r.Corruptions, r.Findings)
	}
	t.Logf("close while full: %v; reopened: %d sectors verified; check: %d corruptions, %d leaked slots (partial appends)", cerr, verified, r.Corruptions, r.LeakedSlots)

	// 5. Deleting the filler gives space back: a new server on the
	// reopened image takes writes again, flushes, and closes clean.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	open(false)
	addr, stop = faultServe(t, Export{Name: "disk", Backend: d})
	c = dial(t, addr)
	c.connect("disk", connectOpts{})
	for k := range 8 {
		id++
		s := next * perChk
		if errno := c.faultWrite(uint64(id), next*chunk, led.Data(s, perChk, id)); errno != 0 {
			t.Fatalf("write %d after deleting the filler: errno %d", k, errno)
		}
		led.Acked(s, perChk, id)
		acked = append(acked, next)
		next++
	}
	if errno := c.faultCmd(cmdFlush, 7, 0, 0); errno != 0 {
		t.Fatalf("flush after deleting the filler: errno %d", errno)
	}
	readBack("space back")
	stop()
	if err := d.Close(); err != nil {
		t.Fatalf("close once space is back: %v", err)
	}
	d = nil
	if st, err := format.ReadDescriptor(nil, path); err != nil || st.State != format.StateClean {
		t.Errorf("descriptor after close: %+v %v", st, err)
	}
	r, err = blockif.Check(path, nil)
	if err != nil || r.Corruptions > 0 {
		t.Fatalf("final check: %v %+v", err, r)
	}
	t.Logf("refill: ENOSPC after %d more writes; %d chunks acknowledged in all; final check: %d corruptions, %d leaked slots", w3, len(acked), r.Corruptions, r.LeakedSlots)
}

// TestReadEIONBD: an EIO from one segment file fails only the requests
// that read that segment, with NBD EIO; other reads on the same
// connection, in-place writes that need no read, and structured replies
// all keep working, and the data is back once the fault clears.
func TestReadEIONBD(t *testing.T) {
	const ss = 4096
	const mib = 1 << 20
	ffs := vfs.NewFaultFS(vfs.OS{})
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := blockif.Create(path, format.Params{Layout: format.LayoutSparse, Size: 4 * mib, Split: mib, SectorSize: ss}, &blockif.Options{FS: ffs}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		r, err := blockif.Check(path, nil)
		if err != nil || r.Corruptions > 0 {
			t.Errorf("check: %v %+v", err, r)
		}
	})
	d, err := blockif.Open(path, &blockif.Options{FS: ffs})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	a, b, e := pattern(2*ss, 1), pattern(2*ss, 2), pattern(2*ss, 3)
	for _, w := range []struct {
		p   []byte
		off int64
	}{{a, mib - 2*ss}, {b, mib}, {e, 2 * mib}} {
		if _, err := d.WriteAt(w.p, w.off); err != nil {
			t.Fatal(err)
		}
	}
	var failed sync.Map // segment reads that were failed, by offset
	ffs.SetFault(func(op vfs.Op, name string, off, n int64) error {
		if op == vfs.OpRead && strings.HasSuffix(name, ".0001") {
			failed.Store(off, n)
			return syscall.EIO
		}
		return nil
	})
	logs := &testutil.SyncBuffer{}
	_, addr := startServer(t, Config{Logger: slog.New(slog.NewTextHandler(logs, nil))}, Export{Name: "disk", Backend: d})
	c := dial(t, addr)
	c.connect("disk", connectOpts{})
	steps := []struct {
		name  string
		off   int64
		n     int64
		errno uint32
		want  []byte
	}{
		{"failing segment", mib, 2 * ss, errnoIO, nil},
		{"healthy segment before it", mib - 2*ss, 2 * ss, 0, a},
		{"straddling into the failing segment", mib - ss, 2 * ss, errnoIO, nil},
		{"healthy segment after it", 2 * mib, 2 * ss, 0, e},
		{"hole in the failing segment (no I/O)", mib + 8*ss, ss, 0, make([]byte, ss)},
		{"failing segment again", mib + ss, 100, errnoIO, nil},
	}
	for i, s := range steps {
		errno, data := c.faultRead(uint64(i), s.off, s.n)
		if errno != s.errno {
			t.Errorf("%s: errno %d, want %d", s.name, errno, s.errno)
		}
		if s.want != nil && !bytes.Equal(data, s.want) {
			t.Errorf("%s: wrong data", s.name)
		}
	}
	if _, ok := failed.Load(int64(0)); !ok {
		t.Error("the fault was never hit at the failing segment's first slot")
	}
	// The failures are logged at the default level, naming the image,
	// the offset and the errno.
	if got := logs.String(); !strings.Contains(got, "request failed") || !strings.Contains(got, "image="+path) ||
		!strings.Contains(got, fmt.Sprintf("offset=%d", mib)) || !strings.Contains(got, "EIO") || !strings.Contains(got, "level=WARN") {
		t.Errorf("failed reads are not logged at the default level with image, offset and errno:\n%s", got)
	}
	// A whole-sector overwrite in the failing segment needs no read; a
	// partial one must read the sector first and fails with EIO.
	nb := pattern(ss, 9)
	if errno := c.faultWrite(20, mib, nb); errno != 0 {
		t.Errorf("in-place whole-sector write into the failing segment: errno %d", errno)
	}
	if errno := c.faultWrite(21, mib+ss+10, []byte("partial")); errno != errnoIO {
		t.Errorf("read-modify-write in the failing segment: errno %d, want EIO", errno)
	}
	if errno := c.faultCmd(cmdFlush, 22, 0, 0); errno != 0 {
		t.Errorf("flush: errno %d", errno)
	}
	// Structured replies: an error chunk for the failing read, data for
	// the next one on the same connection.
	sc := dial(t, addr)
	sc.connect("disk", connectOpts{structured: true})
	sc.request(cmdRead, 0, 30, mib, 2*ss, nil)
	if _, errno, _, _ := sc.structuredRead(mib, 2*ss); errno != errnoIO {
		t.Errorf("structured read of the failing segment: errno %d, want EIO", errno)
	}
	sc.request(cmdRead, 0, 31, 2*mib, 2*ss, nil)
	if data, errno, _, _ := sc.structuredRead(2*mib, 2*ss); errno != 0 || !bytes.Equal(data, e) {
		t.Errorf("structured read after the error: errno %d, data ok %v", errno, bytes.Equal(data, e))
	}
	// The fault clears: the segment reads again, with the in-place write.
	ffs.SetFault(nil)
	errno, data := c.faultRead(40, mib, 2*ss)
	if errno != 0 || !bytes.Equal(data, append(append([]byte(nil), nb...), b[ss:]...)) {
		t.Errorf("read after the fault cleared: errno %d, data ok %v", errno, bytes.Equal(data[:ss], nb))
	}
}
