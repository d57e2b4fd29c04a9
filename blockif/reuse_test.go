package blockif

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/sparsedisk/sparsedisk/internal/testutil"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

func TestFreeRuns(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 9))
	var f freeRuns
	model := map[int64]bool{}
	const span = 300
	for op := 0; op < 5000; op++ {
		switch rng.IntN(3) {
		case 0:
			var add []int64
			for k := rng.IntN(20); k > 0; k-- {
				v := rng.Int64N(span)
				if !model[v] {
					model[v] = true
					add = append(add, v)
				}
			}
			f.add(add)
		case 1:
			v, ok := f.pop()
			lowest := int64(-1)
			for m := range model {
				if lowest < 0 || m < lowest {
					lowest = m
				}
			}
			if ok != (lowest >= 0) || (ok && v != lowest) {
				t.Fatalf("op %d: pop = %d, %v; want the lowest, %d", op, v, ok, lowest)
			}
			delete(model, v)
		case 2:
			end := int64(span)
			for model[end-1] {
				end--
			}
			if rng.IntN(2) == 0 {
				// only when the set reaches the end
				got := f.trimTail(span)
				for v := got; v < span; v++ {
					delete(model, v)
				}
				if got != end {
					t.Fatalf("op %d: trimTail(%d) = %d, want %d", op, span, got, end)
				}
			}
		}
		if f.len() != int64(len(model)) {
			t.Fatalf("op %d: len %d, model %d", op, f.len(), len(model))
		}
		prev := int64(-1)
		for _, r := range f.live() {
			if r.start <= prev || r.end <= r.start {
				t.Fatalf("op %d: runs not sorted, disjoint and non-adjacent: %v", op, f.live())
			}
			prev = r.end
		}
	}
}

// slotOfSector returns the slot the in-memory LUT gives global sector g.
func slotOfSector(t *testing.T, d *Disk, g int64) uint32 {
	t.Helper()
	per := d.desc.Split / d.desc.SectorSize
	s := d.segs[g/per]
	var v uint32
	if err := d.withTable(s, func(p *lut.Part) { v = p.Entries[g%per] }); err != nil {
		t.Fatal(err)
	}
	return v
}

func fill(b byte, n int64) []byte { return bytes.Repeat([]byte{b}, int(n)) }

// TestReuseLowestFirst: trimmed slots are reused after a flush, lowest
// first, and before it only by the sector that freed them; the space of a
// trimmed slot is released at once and a reused slot is written into the
// hole (trap d).
func TestReuseLowestFirst(t *testing.T) {
	const ss = 4096
	mem := vfs.NewMemFS()
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 32 * ss, Split: 32 * ss, SectorSize: ss}, mem, false)
	d := mustOpen(t, path, &Options{FS: mem})
	defer d.Close()
	for g := int64(0); g < 8; g++ {
		if _, err := d.WriteAt(fill(byte(g+1), ss), g*ss); err != nil {
			t.Fatal(err)
		}
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	alloc := func() int64 {
		a, err := d.segs[0].Allocated()
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	before := alloc()
	if err := d.Trim(5*ss, ss); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(2*ss, ss); err != nil {
		t.Fatal(err)
	}
	if a := alloc(); a != before-2*ss {
		t.Errorf("allocated %d after trimming 2 slots, want %d (punched at once)", a, before-2*ss)
	}
	// Not flushed: a new sector must not get slot 2 or 5...
	if _, err := d.WriteAt(fill(20, ss), 20*ss); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 20); v != 8 {
		t.Errorf("sector 20 got slot %d before the trims were flushed, want 8 (appended)", v)
	}
	// ...but sector 5 may take its own slot back.
	if _, err := d.WriteAt(fill(55, ss), 5*ss); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 5); v != 5 {
		t.Errorf("sector 5 rewritten after its trim got slot %d, want its own 5", v)
	}
	if err := d.Trim(5*ss, ss); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ g, slot int64 }{{21, 2}, {22, 5}, {23, 9}} {
		if _, err := d.WriteAt(fill(byte(c.g), ss), c.g*ss); err != nil {
			t.Fatal(err)
		}
		if v := slotOfSector(t, d, c.g); int64(v) != c.slot {
			t.Errorf("sector %d got slot %d, want %d (lowest reusable first)", c.g, v, c.slot)
		}
	}
	got := make([]byte, ss)
	for g, want := range map[int64]byte{2: 0, 5: 0, 20: 20, 21: 21, 22: 22, 23: 23, 7: 8} {
		if _, err := d.ReadAt(got, g*ss); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, fill(want, ss)) {
			t.Errorf("sector %d reads %x…, want %x", g, got[:4], want)
		}
	}
}

// TestZeroOverwriteFrees: writing zeros over a whole allocated sector
// deallocates it like a trim.
func TestZeroOverwriteFrees(t *testing.T) {
	const ss = 4096
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 8 * ss, Split: 8 * ss, SectorSize: ss}, nil, false)
	d := mustOpen(t, path, nil)
	defer d.Close()
	if _, err := d.WriteAt(fill(1, 2*ss), 0); err != nil {
		t.Fatal(err)
	}
	// One full sector of zeros, and a partial write that zeros the rest
	// of sector 1 (its other half was zeroed by the first write).
	if _, err := d.WriteAt(make([]byte, ss+ss/2), 0); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 0); v != lut.Unallocated {
		t.Errorf("sector 0 overwritten with zeros still maps slot %d", v)
	}
	if _, err := d.WriteAt(make([]byte, ss/2), ss+ss/2); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 1); v != lut.Unallocated {
		t.Errorf("sector 1 made all zeros by a partial write still maps slot %d", v)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(fill(3, ss), 5*ss); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 5); v != 0 {
		t.Errorf("sector 5 got slot %d, want 0 (freed by the zero overwrite)", v)
	}
}

// TestReuseWaitsForReaders is trap a: a read that looked sector 0 up
// (slot 0) and stalls while sector 0 is trimmed and flushed must not see
// slot 0 reused for another sector's data; once it is done, slot 0 is
// reusable.
func TestReuseWaitsForReaders(t *testing.T) {
	const ss = 4096
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 16 * ss, Split: 16 * ss, SectorSize: ss}, nil, false)
	d := mustOpen(t, path, nil)
	defer d.Close()
	if _, err := d.WriteAt(fill(0xAA, ss), 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	looked, release := make(chan struct{}), make(chan struct{})
	var once, relOnce sync.Once
	rel := func() { relOnce.Do(func() { close(release) }) }
	defer rel() // before d.Close, even when the test fails
	testHookRead = func(seg int, runs []run) {
		if len(runs) == 1 && runs[0].fileOff == 0 {
			once.Do(func() {
				close(looked)
				<-release
			})
		}
	}
	defer func() { testHookRead = nil }()
	got := make([]byte, ss)
	readDone := make(chan error, 1)
	go func() {
		_, err := d.ReadAt(got, 0)
		readDone <- err
	}()
	<-looked
	if err := d.Trim(0, ss); err != nil {
		t.Fatal(err)
	}
	for g := int64(1); g <= 3; g++ {
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		if _, err := d.WriteAt(fill(byte(0x10+g), ss), g*ss); err != nil {
			t.Fatal(err)
		}
		if v := slotOfSector(t, d, g); v == 0 {
			t.Fatalf("sector %d got slot 0 while a read that looked it up for sector 0 is in flight", g)
		}
	}
	rel()
	if err := <-readDone; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, fill(0xAA, ss)) && !bytes.Equal(got, make([]byte, ss)) {
		t.Errorf("stalled read of sector 0 returned %x…, want its old data or zeros", got[:8])
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := d.WriteAt(fill(0x44, ss), 4*ss); err != nil {
		t.Fatal(err)
	}
	if v := slotOfSector(t, d, 4); v != 0 {
		t.Errorf("after the read finished and a flush, sector 4 got slot %d, want 0", v)
	}
}

// abandon drops a Disk as a killed process would: no flush, no clean
// close; unsynced writes stay in MemFS's "page cache".
func abandon(d *Disk) {
	d.closeMu.Lock()
	d.closed = true
	d.closeMu.Unlock()
	d.closeFiles()
	d.lock.Close()
}

// TestReuseAfterKill is trap b: a killed process wrote a LUT page that
// unmaps sector 0 (slot 0) but never synced it. The next writer must not
// reuse slot 0 for another sector unless that page is durable: a power
// cut would otherwise leave the durable LUT naming slot 0 for sector 0,
// holding the other sector's data.
func TestReuseAfterKill(t *testing.T) {
	const ss = 4096
	p := format.Params{Layout: format.LayoutSparse, Size: 8 * ss, Split: 8 * ss, SectorSize: ss}
	for cut := int64(0); cut < 40; cut++ {
		for r := uint64(0); r < 8; r++ {
			mem := vfs.NewMemFS()
			path := "/img/disk.img"
			if err := Create(path, p, &Options{FS: mem}); err != nil {
				t.Fatal(err)
			}
			if err := mem.SyncDir("/img"); err != nil {
				t.Fatal(err)
			}
			d := mustOpen(t, path, &Options{FS: mem})
			if _, err := d.WriteAt(fill(0xAA, ss), 0); err != nil {
				t.Fatal(err)
			}
			if err := d.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := d.Trim(0, ss); err != nil {
				t.Fatal(err)
			}
			// The killed process's flush got as far as writing the page.
			d.flushMu.Lock()
			pages := d.segs[0].part.TakeDirty()
			if err := d.lut.WritePages(pages); err != nil {
				t.Fatal(err)
			}
			d.flushMu.Unlock()
			abandon(d)

			mem.SetCrashAfter(cut)
			d2, err := Open(path, &Options{FS: mem})
			if err == nil {
				if _, err = d2.WriteAt(fill(0xBB, ss), 5*ss); err == nil {
					err = d2.Flush()
				}
			}
			if err != nil && !errors.Is(err, vfs.ErrCrashed) {
				t.Fatal(err)
			}
			after := mem.Crash(rand.New(rand.NewPCG(r, uint64(cut))))
			d3, err := Open(path, &Options{FS: after, ReadOnly: true, NoDirtyCheck: true})
			if err != nil {
				t.Fatalf("cut %d: open after crash: %v", cut, err)
			}
			got := make([]byte, ss)
			if _, err := d3.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			d3.Close()
			for c := 0; c < ss; c += 512 { // a crash may tear the punch at 512 bytes
				if ch := got[c : c+512]; !bytes.Equal(ch, fill(0xAA, 512)) && !bytes.Equal(ch, make([]byte, 512)) {
					t.Fatalf("cut %d rng %d: sector 0 bytes %d.. read %x… after the crash: another sector's data", cut, r, c, ch[:8])
				}
			}
		}
	}
}

// tagged fills a sector image with 8-byte words naming the sector and a
// version, so that a read can tell whose data it got.
func tagged(sector int64, version uint32, n int64) []byte {
	b := make([]byte, n)
	for i := int64(0); i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], uint64(sector)<<32|uint64(version))
	}
	return b
}

// checkTags reports the first 8-byte word of p (read at off) that is
// neither zero nor tagged with its own sector.
func checkTags(p []byte, off, ss int64) error {
	for i := int64(0); i+8 <= int64(len(p)); i += 8 {
		w := binary.LittleEndian.Uint64(p[i:])
		if w == 0 {
			continue
		}
		if want := (off + i) / ss; int64(w>>32) != want {
			return fmt.Errorf("sector %d (byte %d) holds data of sector %d", want, off+i, w>>32)
		}
	}
	return nil
}

// TestReuseConcurrentTagged is trap c (and a random version of trap a):
// goroutines write, trim, zero, flush and read overlapping sectors while
// the compactor runs; a read must never return another sector's data,
// which a free racing a write to the same sector, or a reuse racing a
// read, would produce.
func TestReuseConcurrentTagged(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	for _, ss := range []int64{512, 4096} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			const nsec = 48
			path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: nsec * ss, Split: 16 * ss, SectorSize: ss}, nil, false)
			d := mustOpen(t, path, &Options{Compact: true, CompactInterval: time.Millisecond})
			var wg sync.WaitGroup
			var version sync.Mutex
			ver := uint32(0)
			next := func() uint32 { version.Lock(); defer version.Unlock(); ver++; return ver }
			for w := 0; w < 6; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					rng := rand.New(rand.NewPCG(seed, uint64(w)))
					for op := 0; op < 1500 && !t.Failed(); op++ {
						g := rng.Int64N(nsec - 2)
						n := 1 + rng.Int64N(3)
						var err error
						switch k := rng.IntN(10); {
						case k < 4:
							buf := make([]byte, 0, n*ss)
							v := next()
							for s := g; s < g+n; s++ {
								buf = append(buf, tagged(s, v, ss)...)
							}
							if rng.IntN(3) == 0 { // partial, 8-byte aligned
								a := rng.Int64N(ss/8) * 8
								buf = buf[a:]
								_, err = d.WriteAt(buf, g*ss+a)
							} else {
								_, err = d.WriteAt(buf, g*ss)
							}
						case k < 6:
							err = d.Trim(g*ss, n*ss)
						case k < 7:
							err = d.WriteZeroes(g*ss, n*ss)
						case k < 8:
							err = d.Flush()
						default:
							buf := make([]byte, n*ss)
							if _, err = d.ReadAt(buf, g*ss); err == nil {
								err = checkTags(buf, g*ss, ss)
							}
						}
						if err != nil {
							t.Errorf("worker %d op %d: %v", w, op, err)
						}
					}
				}(w)
			}
			wg.Wait()
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestCompactor: with holes below live data, the compactor moves the
// tail's slots down and truncates the file; content is unchanged and the
// image checks clean (no leak: moved-out slots are punched or cut off).
func TestCompactor(t *testing.T) {
	const ss = 4096
	const nsec = 256
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 3))
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: nsec * ss, Split: 128 * ss, SectorSize: ss}, nil, false)
	var logs syncBuf
	d := mustOpen(t, path, &Options{Compact: true, CompactInterval: time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	model := make([]byte, nsec*ss)
	for g := int64(0); g < nsec; g++ {
		b := randBytes(rng, ss)
		copy(model[g*ss:], b)
		if _, err := d.WriteAt(b, g*ss); err != nil {
			t.Fatal(err)
		}
	}
	// Keep every 8th sector.
	for g := int64(0); g < nsec; g++ {
		if g%8 != 0 {
			clear(model[g*ss : (g+1)*ss])
			if err := d.Trim(g*ss, ss); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	want := int64(128/8) * ss
	deadline := time.Now().Add(60 * time.Second)
	for {
		dense := true
		for _, s := range d.segs {
			if sz, err := s.Size(); err != nil {
				t.Fatal(err)
			} else if sz > want {
				dense = false
			}
		}
		if dense {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("segments not compacted to %d bytes within the deadline; log:\n%s", want, logs.String())
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	got := make([]byte, nsec*ss)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("content changed by compaction")
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(logs.String(), "compactor truncated segment file") || !strings.Contains(logs.String(), "compactor moved slots") {
		t.Errorf("compactor did not log its work:\n%s", logs.String())
	}
	d2 := mustOpen(t, path, &Options{ReadOnly: true})
	if _, err := d2.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	d2.Close()
	if !bytes.Equal(got, model) {
		t.Fatal("content changed by compaction, after reopen")
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestSlotLimitMessages: a segment whose slot numbers are all in use fails
// the write with ENOSPC naming the image, the segment and the fix, and
// warns once at 90 %.
func TestSlotLimitMessages(t *testing.T) {
	const ss = 512
	path := testImage(t, format.Params{Layout: format.LayoutSparse, Size: 16 * ss, Split: 16 * ss, SectorSize: ss}, nil, false)
	var logs syncBuf
	d := mustOpen(t, path, &Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	defer d.Close()
	s := d.segs[0]
	if err := d.withTable(s, func(*lut.Part) {}); err != nil {
		t.Fatal(err)
	}
	// Pretend the file has grown (a white-box setup: the real edge is
	// TestSlotEdge).
	s.mu.Lock()
	s.SetNext(slotWarnAt - 1)
	s.mu.Unlock()
	if _, err := d.WriteAt(fill(1, 2*ss), 0); err == nil {
		// slots slotWarnAt-1 and slotWarnAt are past the file's end:
		// the write lands in a sparse file, fine for this test.
	} else {
		t.Fatal(err)
	}
	if n := strings.Count(logs.String(), "close to its limit"); n != 1 {
		t.Errorf("%d warnings at 90%%, want 1:\n%s", n, logs.String())
	}
	if err := d.Trim(0, 2*ss); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.SetNext(maxSlot + 1)
	s.mu.Unlock()
	_, err := d.WriteAt(fill(2, ss), 5*ss)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write with every slot number used: %v, want ENOSPC", err)
	}
	for _, w := range []string{path, "segment 0", "sparsedisk shrink", "flush"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not mention %q", err, w)
		}
	}
	if n := strings.Count(logs.String(), "close to its limit"); n != 1 {
		t.Errorf("%d warnings, want still 1", n)
	}
	// Undo the pretend growth so that Close and Check see a sane file.
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	s.free = freeRuns{}
	s.pend, s.pendIdx = nil, nil
	s.SetNext(0)
	s.mu.Unlock()
	if err := s.Truncate(0); err != nil {
		t.Fatal(err)
	}
}

// TestSlotEdge is the 2^32−1 boundary: a segment an old version grew to
// (2^32−2) slots of 512 bytes (a sparse file of 2 TiB) keeps accepting
// writes after trims, and the compactor brings it back to its live data.
func TestSlotEdge(t *testing.T) {
	const ss = 512
	const nsec = 2048
	dir := t.TempDir()
	path := dir + "/edge.img"
	if err := Create(path, format.Params{Layout: format.LayoutSparse, Size: nsec * ss, Split: nsec * ss, SectorSize: ss}, nil); err != nil {
		t.Fatal(err)
	}
	// The old version's layout: the file is (2^32−2) slots long, and
	// sectors 0..3 live in its last four slots.
	last := int64(1)<<32 - 2
	seg, err := os.OpenFile(format.SegmentName(path, 0), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := seg.Truncate(last * ss); err != nil {
		testutil.Unavailable(t, "file system cannot hold a %d-byte sparse file: %v", last*ss, err)
	}
	lf, err := os.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	model := make([]byte, nsec*ss)
	for g := int64(0); g < 4; g++ {
		slot := last - 4 + g
		copy(model[g*ss:], fill(byte(0xE0+g), ss))
		if _, err := seg.WriteAt(fill(byte(0xE0+g), ss), slot*ss); err != nil {
			t.Fatal(err)
		}
		var e [4]byte
		binary.LittleEndian.PutUint32(e[:], uint32(slot))
		if _, err := lf.WriteAt(e[:], g*4); err != nil {
			t.Fatal(err)
		}
	}
	seg.Close()
	lf.Close()

	d := mustOpen(t, path, nil)
	rng := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 20; round++ {
		g := 4 + rng.Int64N(nsec-100)
		n := 1 + rng.Int64N(90)
		b := randBytes(rng, int(n*ss))
		copy(model[g*ss:], b)
		if _, err := d.WriteAt(b, g*ss); err != nil {
			t.Fatalf("round %d: write at the 2^32 edge: %v", round, err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		clear(model[g*ss : (g+n)*ss])
		if err := d.Trim(g*ss, n*ss); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	if sz, _ := d.segs[0].Size(); sz != last*ss {
		t.Errorf("segment is %d bytes after reusing slots, want unchanged %d", sz, last*ss)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}

	d = mustOpen(t, path, &Options{Compact: true, CompactInterval: time.Millisecond})
	deadline := time.Now().Add(60 * time.Second)
	for {
		sz, err := d.segs[0].Size()
		if err != nil {
			t.Fatal(err)
		}
		if sz <= 4*ss {
			break
		}
		if time.Now().After(deadline) {
			d.Close()
			t.Fatalf("compactor left the edge segment at %d bytes", sz)
		}
		time.Sleep(time.Millisecond) // polling a condition, with a deadline
	}
	got := make([]byte, nsec*ss)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("content differs from the model")
	}
	mustCheck(t, path, nil, false)
}
