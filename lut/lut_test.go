package lut

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"

	"github.com/sparsedisk/sparsedisk/vfs"
)

func fileBytes(t *testing.T, fsys vfs.FS, path string) []byte {
	t.Helper()
	f, err := fsys.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, _ := f.Size()
	b := make([]byte, n)
	f.ReadAt(b, 0)
	return b
}

func TestCreateIsAllUnallocated(t *testing.T) {
	m := vfs.NewMemFS()
	if err := Create(m, "/d.lut", 3000); err != nil {
		t.Fatal(err)
	}
	if got := fileBytes(t, m, "/d.lut"); !bytes.Equal(got, bytes.Repeat([]byte{0xFF}, 3000*EntrySize)) {
		t.Errorf("new LUT is not %d bytes of 0xFF", 3000*EntrySize)
	}
	if err := Create(m, "/d.lut", 10); err == nil {
		t.Error("Create over an existing LUT succeeded")
	}
}

// Segment i's entries start at entry i*perSeg of the file, little-endian,
// and only dirty pages are written, at their own offsets.
func TestSetPersistsLittleEndianAtGlobalIndex(t *testing.T) {
	const n, perSeg = 5000, 2500 // perSeg not a multiple of PageEntries
	m := vfs.NewMemFS()
	if err := Create(m, "/d.lut", n); err != nil {
		t.Fatal(err)
	}
	tab, err := Open(m, "/d.lut", n, n, perSeg, false)
	if err != nil {
		t.Fatal(err)
	}
	s1, err := tab.Load(1)
	if err != nil {
		t.Fatal(err)
	}
	if s1.First != perSeg || len(s1.Entries) != n-perSeg || s1.Entries[0] != Unallocated {
		t.Fatalf("segment 1: first %d, %d entries, Entries[0]=%#x", s1.First, len(s1.Entries), s1.Entries[0])
	}
	if s1.Dirty() {
		t.Error("freshly loaded segment is dirty")
	}
	s1.Set(0, 0x01020304)
	s1.Set(PageEntries+5, 7)
	pages := s1.TakeDirty()
	if len(pages) != 2 || s1.Dirty() {
		t.Fatalf("TakeDirty: %d pages, still dirty %v", len(pages), s1.Dirty())
	}
	if err := tab.WritePages(pages); err != nil {
		t.Fatal(err)
	}
	if err := tab.Sync(); err != nil {
		t.Fatal(err)
	}
	raw := fileBytes(t, m, "/d.lut")
	if got := raw[perSeg*EntrySize : perSeg*EntrySize+4]; !bytes.Equal(got, []byte{4, 3, 2, 1}) {
		t.Errorf("entry %d bytes = % x, want little-endian 04 03 02 01", perSeg, got)
	}
	if v := binary.LittleEndian.Uint32(raw[(perSeg+PageEntries+5)*EntrySize:]); v != 7 {
		t.Errorf("entry %d = %d, want 7", perSeg+PageEntries+5, v)
	}
	for j := 0; j < n; j++ {
		if j == perSeg || j == perSeg+PageEntries+5 {
			continue
		}
		if v := binary.LittleEndian.Uint32(raw[j*EntrySize:]); v != Unallocated {
			t.Fatalf("entry %d = %#x, was never set", j, v)
		}
	}
	// Reload sees the values.
	again, _ := tab.Load(1)
	if again.Entries[0] != 0x01020304 || again.Entries[PageEntries+5] != 7 {
		t.Error("reloaded entries differ")
	}
	// A failed write puts the dirty marks back.
	s1.Set(3, 9)
	p := s1.TakeDirty()
	Redirty(p)
	if !s1.Dirty() {
		t.Error("Redirty did not mark the page dirty again")
	}
	tab.Close()
}

func TestOpenShortLUT(t *testing.T) {
	m := vfs.NewMemFS()
	if err := Create(m, "/d.lut", 100); err != nil {
		t.Fatal(err)
	}
	// xhyve's floor variant: a file of 100 entries for a disk of 101.
	tab, err := Open(m, "/d.lut", 101, 100, 101, true)
	if err != nil {
		t.Fatalf("LUT one entry short (minEntries allows it): %v", err)
	}
	s, err := tab.Load(0)
	if err != nil || s.Entries[100] != Unallocated {
		t.Errorf("missing entry must read unallocated: %v", err)
	}
	tab.Close()
	if _, err := Open(m, "/d.lut", 200, 200, 200, true); !errors.Is(err, ErrTruncated) {
		t.Errorf("LUT half the length: %v, want ErrTruncated", err)
	}
	f, _ := m.OpenFile("/odd.lut", os.O_RDWR|os.O_CREATE, 0o644)
	f.WriteAt([]byte{1, 2, 3}, 0)
	f.Close()
	if _, err := Open(m, "/odd.lut", 0, 0, 1, true); !errors.Is(err, ErrTruncated) {
		t.Errorf("LUT with a partial entry: %v, want ErrTruncated", err)
	}
}
