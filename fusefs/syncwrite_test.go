package fusefs

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

func (m *memBackend) flushCount() int {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.flushes
}

// TestSyncWritesFlush: a write the caller asked to be synchronous
// (O_SYNC, O_DSYNC, RWF_DSYNC) flushes the engine before it returns; a
// plain write does not. With direct I/O the kernel never sends FSYNC for
// these, so without this the data would be acknowledged but not durable.
func TestSyncWritesFlush(t *testing.T) {
	mem := newMemBackend(1 << 20)
	m := mountT(t, mem, nil)
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 0x5a
	}
	for _, c := range []struct {
		name  string
		flag  int
		rwf   int // pwritev2 flags, 0 for pwrite
		flush bool
	}{
		{"plain", os.O_RDWR, 0, false},
		{"O_DSYNC", os.O_RDWR | syscall.O_DSYNC, 0, true},
		{"O_SYNC", os.O_RDWR | syscall.O_SYNC, 0, true},
		{"RWF_DSYNC", os.O_RDWR, unix.RWF_DSYNC, true},
		{"RWF_SYNC", os.O_RDWR, unix.RWF_SYNC, true},
	} {
		f := openFile(t, m, c.flag)
		before := mem.flushCount()
		var err error
		if c.rwf != 0 {
			_, err = unix.Pwritev2(int(f.Fd()), [][]byte{buf}, 8192, c.rwf)
		} else {
			_, err = f.WriteAt(buf, 8192)
		}
		if err != nil {
			t.Fatalf("%s: write: %v", c.name, err)
		}
		if got := mem.flushCount() - before; (got > 0) != c.flush {
			t.Errorf("%s write: %d engine flushes, want flush=%v", c.name, got, c.flush)
		}
		f.Close()
	}
}

// failingFlush is a memBackend whose Flush fails, like a disk that lost
// the data it was given.
type failingFlush struct{ *memBackend }

var errFlushLost = errors.New("flush: I/O error")

func (failingFlush) Flush() error { return errFlushLost }

// TestSyncWriteFlushFailure: when the flush of a synchronous write fails,
// the write fails (EIO): the caller asked to learn whether it is durable.
func TestSyncWriteFlushFailure(t *testing.T) {
	m := mountT(t, failingFlush{newMemBackend(1 << 20)}, nil)
	f := openFile(t, m, os.O_RDWR|syscall.O_DSYNC)
	defer f.Close()
	if _, err := f.WriteAt(make([]byte, 4096), 0); errnoOf(err) != syscall.EIO {
		t.Fatalf("O_DSYNC write whose flush fails: %v, want EIO", err)
	}
	g := openFile(t, m, os.O_RDWR)
	defer g.Close()
	if _, err := g.WriteAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("plain write (no flush asked): %v", err)
	}
}
