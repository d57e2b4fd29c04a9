package segment

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/vfs"
)

// Concurrent Alloc never hands out a slot twice.
func TestAllocUnique(t *testing.T) {
	s := New(vfs.NewMemFS(), "/d.img.0000", 0, 4096, false)
	s.SetNext(5)
	var mu sync.Mutex
	seen := map[int64]bool{}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := range 500 {
				n := int64(1 + (g+i)%3)
				base := s.Alloc(n)
				mu.Lock()
				for k := base; k < base+n; k++ {
					if seen[k] || k < 5 {
						t.Errorf("slot %d handed out twice or below the cursor", k)
					}
					seen[k] = true
				}
				mu.Unlock()
			}
		}(g)
	}
	wg.Wait()
	if int64(len(seen)) != s.cursor()-5 {
		t.Errorf("%d slots seen, cursor moved by %d", len(seen), s.cursor()-5)
	}
}

func TestReadSlotsStrictAndDirty(t *testing.T) {
	m := vfs.NewMemFS()
	f, _ := m.OpenFile("/d.img.0000", os.O_RDWR|os.O_CREATE, 0o644)
	f.Close()
	s := New(m, "/d.img.0000", 0, 512, false)
	defer s.Close()
	if s.Dirty() {
		t.Error("new segment dirty")
	}
	if err := s.WriteAt(make([]byte, 1024), 0); err != nil {
		t.Fatal(err)
	}
	if !s.Dirty() {
		t.Error("write did not mark the segment dirty")
	}
	if err := s.ReadSlotsStrict(make([]byte, 512), 512); err != nil {
		t.Errorf("slot inside the file: %v", err)
	}
	if err := s.ReadSlotsStrict(make([]byte, 512), 1024); !errors.Is(err, ErrShort) {
		t.Errorf("slot past the end: %v, want ErrShort", err)
	}
	p := []byte{1, 2, 3, 4}
	if err := s.ReadAt(p, 4000); err != nil || p[0] != 0 || p[3] != 0 {
		t.Errorf("ReadAt past the end must read zeros: %v %v", err, p)
	}
	if err := s.Sync(); err != nil || s.Dirty() {
		t.Errorf("Sync: %v, dirty after %v", err, s.Dirty())
	}
}

// A failed sync leaves the segment dirty so the next Flush retries it;
// a failed write still marks it dirty (part of it may have landed).
func TestFailedSyncAndWriteStayDirty(t *testing.T) {
	m := vfs.NewMemFS()
	f, _ := m.OpenFile("/d.img.0000", os.O_RDWR|os.O_CREATE, 0o644)
	f.Close()
	ff := vfs.NewFaultFS(m)
	s := New(ff, "/d.img.0000", 0, 512, false)
	defer s.Close()
	s.WriteAt(make([]byte, 512), 0)
	ff.SetFault(func(op vfs.Op, name string, off, n int64) error {
		if op == vfs.OpSync {
			return syscall.EIO
		}
		return nil
	})
	if err := s.Sync(); !errors.Is(err, syscall.EIO) || !s.Dirty() {
		t.Errorf("failed sync: %v, dirty %v (want EIO and still dirty)", err, s.Dirty())
	}
	ff.SetFault(nil)
	if err := s.Sync(); err != nil || s.Dirty() {
		t.Fatalf("retry: %v", err)
	}
	ff.SetFault(func(op vfs.Op, name string, off, n int64) error {
		if op == vfs.OpWrite {
			return syscall.ENOSPC
		}
		return nil
	})
	if err := s.WriteAt(make([]byte, 512), 512); !errors.Is(err, syscall.ENOSPC) || !s.Dirty() {
		t.Errorf("failed write: %v, dirty %v (want ENOSPC and dirty)", err, s.Dirty())
	}
}
