package lut

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand/v2"
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

// forEachKind runs fn as a subtest per LUT kind.
func forEachKind(t *testing.T, fn func(t *testing.T, k Kind)) {
	for _, k := range Kinds {
		t.Run(string(k), func(t *testing.T) { fn(t, k) })
	}
}

// raw is the on-disk form of entry v in a LUT of kind k.
func raw(k Kind, v uint32) uint32 {
	if k == Thin {
		return v + 1
	}
	return v
}

func TestCreateIsAllUnallocated(t *testing.T) {
	forEachKind(t, func(t *testing.T, k Kind) {
		m := vfs.NewMemFS()
		if err := Create(m, "/d.lut", 3000, k); err != nil {
			t.Fatal(err)
		}
		fill := byte(0xFF)
		if k == Thin {
			fill = 0
		}
		if got := fileBytes(t, m, "/d.lut"); !bytes.Equal(got, bytes.Repeat([]byte{fill}, 3000*EntrySize)) {
			t.Errorf("new LUT is not %d bytes of %#x", 3000*EntrySize, fill)
		}
		if err := Create(m, "/d.lut", 10, k); err == nil {
			t.Error("Create over an existing LUT succeeded")
		}
	})
}

// A thin LUT is created without writing a byte: its pages are holes.
func TestCreateThinWritesNothing(t *testing.T) {
	m := vfs.NewMemFS()
	if err := Create(m, "/d.lut", 1<<20, Thin); err != nil {
		t.Fatal(err)
	}
	f, _ := m.OpenFile("/d.lut", os.O_RDONLY, 0)
	defer f.Close()
	if a, _ := f.Allocated(); a != 0 {
		t.Errorf("new thin LUT occupies %d bytes, want 0", a)
	}
	if _, err := f.SeekData(0); err == nil {
		t.Error("new thin LUT has a data region")
	}
}

// Segment i's entries start at entry i*perSeg of the file, little-endian,
// and only dirty pages are written, at their own offsets.
func TestSetPersistsLittleEndianAtGlobalIndex(t *testing.T) {
	forEachKind(t, func(t *testing.T, k Kind) {
		const n, perSeg = 5000, 2500 // perSeg not a multiple of PageEntries
		m := vfs.NewMemFS()
		if err := Create(m, "/d.lut", n, k); err != nil {
			t.Fatal(err)
		}
		tab, err := Open(m, "/d.lut", k, n, n, perSeg, false)
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
		s1.Set(PageEntries+6, 0) // slot 0: all-zero bytes in xhyve, 1 in thin
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
		b := fileBytes(t, m, "/d.lut")
		want := binary.LittleEndian.AppendUint32(nil, raw(k, 0x01020304))
		if got := b[perSeg*EntrySize : perSeg*EntrySize+4]; !bytes.Equal(got, want) {
			t.Errorf("entry %d bytes = % x, want little-endian % x", perSeg, got, want)
		}
		for j, v := range map[int]uint32{perSeg + PageEntries + 5: 7, perSeg + PageEntries + 6: 0} {
			if got := binary.LittleEndian.Uint32(b[j*EntrySize:]); got != raw(k, v) {
				t.Errorf("entry %d = %#x on disk, want %#x", j, got, raw(k, v))
			}
		}
		for j := 0; j < n; j++ {
			if j == perSeg || j == perSeg+PageEntries+5 || j == perSeg+PageEntries+6 {
				continue
			}
			if v := binary.LittleEndian.Uint32(b[j*EntrySize:]); v != raw(k, Unallocated) {
				t.Fatalf("entry %d = %#x, was never set", j, v)
			}
		}
		// Reload sees the values.
		again, _ := tab.Load(1)
		if again.Entries[0] != 0x01020304 || again.Entries[PageEntries+5] != 7 || again.Entries[PageEntries+6] != 0 {
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
	})
}

func TestOpenShortLUT(t *testing.T) {
	forEachKind(t, func(t *testing.T, k Kind) {
		m := vfs.NewMemFS()
		if err := Create(m, "/d.lut", 100, k); err != nil {
			t.Fatal(err)
		}
		// xhyve's floor variant: a file of 100 entries for a disk of 101.
		tab, err := Open(m, "/d.lut", k, 101, 100, 101, true)
		if err != nil {
			t.Fatalf("LUT one entry short (minEntries allows it): %v", err)
		}
		s, err := tab.Load(0)
		if err != nil || s.Entries[100] != Unallocated || s.Entries[99] != Unallocated {
			t.Errorf("missing entry must read unallocated: %v", err)
		}
		tab.Close()
		if _, err := Open(m, "/d.lut", k, 200, 200, 200, true); !errors.Is(err, ErrTruncated) {
			t.Errorf("LUT half the length: %v, want ErrTruncated", err)
		}
		f, _ := m.OpenFile("/odd.lut", os.O_RDWR|os.O_CREATE, 0o644)
		f.WriteAt([]byte{1, 2, 3}, 0)
		f.Close()
		if _, err := Open(m, "/odd.lut", k, 0, 0, 1, true); !errors.Is(err, ErrTruncated) {
			t.Errorf("LUT with a partial entry: %v, want ErrTruncated", err)
		}
	})
}

func TestUnknownKindRefused(t *testing.T) {
	m := vfs.NewMemFS()
	if err := Create(m, "/d.lut", 10, Xhyve); err != nil {
		t.Fatal(err)
	}
	_, err := Open(m, "/d.lut", "dense", 10, 10, 10, true)
	if !errors.Is(err, ErrUnknownKind) {
		t.Fatalf("Open with kind dense: %v, want ErrUnknownKind", err)
	}
	for _, want := range []string{`"dense"`, "xhyve", "thin"} {
		if !bytes.Contains([]byte(err.Error()), []byte(want)) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if k, err := ParseKind(""); err != nil || k != Xhyve {
		t.Errorf(`ParseKind("") = %q, %v; want xhyve`, k, err)
	}
}

// Scan reports exactly the allocated entries, in order, whatever mix of
// holes, empty pages and data the file holds, and agrees with Load.
func TestScanMatchesLoad(t *testing.T) {
	forEachKind(t, func(t *testing.T, k Kind) {
		seed := rand.Uint64()
		t.Logf("seed %d", seed)
		rng := rand.New(rand.NewPCG(seed, 0))
		const n, perSeg = 300_000, 100_000
		m := vfs.NewMemFS()
		if err := Create(m, "/d.lut", n, k); err != nil {
			t.Fatal(err)
		}
		tab, err := Open(m, "/d.lut", k, n, n, perSeg, false)
		if err != nil {
			t.Fatal(err)
		}
		defer tab.Close()
		want := map[int64]uint32{}
		for i := 0; i < 3; i++ {
			p, _ := tab.Load(i)
			for c := rng.IntN(200); c > 0; c-- {
				j := rng.Int64N(int64(len(p.Entries)))
				v := uint32(rng.IntN(4)) // slot 0 matters: all-zero bytes in xhyve
				if rng.IntN(2) == 0 {
					v = rng.Uint32() - 1
				}
				p.Set(j, v)
				if v == Unallocated {
					delete(want, p.First+j)
				} else {
					want[p.First+j] = v
				}
			}
			if err := tab.WritePages(p.TakeDirty()); err != nil {
				t.Fatal(err)
			}
		}
		got := map[int64]uint32{}
		for i := 0; i < 3; i++ {
			last := int64(-1)
			err := tab.Scan(i, func(j int64, v uint32) bool {
				if j <= last {
					t.Fatalf("segment %d: entry %d after %d", i, j, last)
				}
				last = j
				got[int64(i)*perSeg+j] = v
				return true
			})
			if err != nil {
				t.Fatal(err)
			}
			p, _ := tab.Load(i)
			empty, err := tab.Empty(i)
			if err != nil {
				t.Fatal(err)
			}
			has := false
			for _, v := range p.Entries {
				has = has || v != Unallocated
			}
			if empty == has {
				t.Errorf("segment %d: Empty = %v, entries allocated: %v", i, empty, has)
			}
		}
		if len(got) != len(want) {
			t.Errorf("Scan found %d entries, want %d", len(got), len(want))
		}
		for j, v := range want {
			if got[j] != v {
				t.Errorf("entry %d: Scan %#x, want %#x", j, got[j], v)
			}
		}
	})
}

// Extend of a thin LUT that ends where the new entries start writes
// nothing; otherwise it writes unallocated entries.
func TestExtend(t *testing.T) {
	forEachKind(t, func(t *testing.T, k Kind) {
		m := vfs.NewMemFS()
		if err := Create(m, "/d.lut", 10, k); err != nil {
			t.Fatal(err)
		}
		f, _ := m.OpenFile("/d.lut", os.O_RDWR, 0)
		defer f.Close()
		if err := WriteEntries(f, k, 9, []uint32{5}); err != nil {
			t.Fatal(err)
		}
		if err := Extend(f, k, 10, 5000, nil); err != nil {
			t.Fatal(err)
		}
		e, err := ReadEntries(f, k, 0, 5000)
		if err != nil {
			t.Fatal(err)
		}
		for j, v := range e {
			if (j == 9) != (v == 5) || (j != 9 && v != Unallocated) {
				t.Fatalf("entry %d = %#x after Extend", j, v)
			}
		}
		if a, _ := f.Allocated(); k == Thin && a > 4096 {
			t.Errorf("thin LUT grew to %d allocated bytes, want at most one page", a)
		}
	})
}

// The codec round-trips every value, and thin stores slot+1.
func FuzzThinDecode(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF})
	f.Fuzz(func(t *testing.T, b []byte) {
		for _, k := range Kinds {
			e := k.DecodeEntries(b)
			if len(e) != len(b)/EntrySize {
				t.Fatalf("%s: %d entries from %d bytes", k, len(e), len(b))
			}
			if back := k.EncodeEntries(e); !bytes.Equal(back, b[:len(e)*EntrySize]) {
				t.Fatalf("%s: decode/encode changed % x to % x", k, b, back)
			}
			for j, v := range e {
				r := binary.LittleEndian.Uint32(b[j*EntrySize:])
				if k == Thin && (r == 0) != (v == Unallocated) {
					t.Fatalf("thin: raw %#x decoded to %#x", r, v)
				}
			}
		}
		// Scanning the bytes as a file finds exactly the allocated ones.
		m := vfs.NewMemFS()
		w, _ := m.OpenFile("/f.lut", os.O_RDWR|os.O_CREATE, 0o644)
		w.WriteAt(b, 0)
		for _, k := range Kinds {
			e := k.DecodeEntries(b)
			var n int
			if err := ScanFile(w, k, 0, int64(len(e)), func(j int64, v uint32) bool {
				if e[j] != v || v == Unallocated {
					t.Fatalf("%s: Scan entry %d = %#x, decoded %#x", k, j, v, e[j])
				}
				n++
				return true
			}); err != nil {
				t.Fatal(err)
			}
			for _, v := range e {
				if v != Unallocated {
					n--
				}
			}
			if n != 0 {
				t.Fatalf("%s: Scan missed or invented %d entries", k, -n)
			}
		}
	})
}
