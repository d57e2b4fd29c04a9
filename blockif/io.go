package blockif

import (
	"bytes"
	"fmt"
	"slices"
	"syscall"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// zeros is a read-only buffer of zero bytes, as large as the largest sector.
var zeros = make([]byte, format.MaxSectorSize)

func isZero(p []byte) bool {
	for len(p) > 0 {
		n := min(len(p), len(zeros))
		if !bytes.Equal(p[:n], zeros[:n]) {
			return false
		}
		p = p[n:]
	}
	return true
}

// maxSlot is the largest slot number a LUT entry can hold.
const maxSlot = int64(lut.Unallocated) - 1

func (d *Disk) bounds(off, n int64) error {
	if off < 0 || n < 0 || off > d.desc.Size || n > d.desc.Size-off {
		return fmt.Errorf("%w: offset %d length %d, disk size %d", ErrOutOfRange, off, n, d.desc.Size)
	}
	return nil
}

// withTable calls fn with segment s's LUT part, loading it on first use,
// and returns the load error (for every access, once a load failed)
// without calling fn. fn runs with s.mu read-held and released right after
// it: it may read the entries, must not change them or keep them, and must
// not block or take another lock.
func (d *Disk) withTable(s *segState, fn func(t *lut.Part)) error {
	for {
		s.mu.RLock()
		if s.err != nil {
			err := s.err
			s.mu.RUnlock()
			return err
		}
		if s.part != nil {
			fn(s.part)
			s.mu.RUnlock()
			return nil
		}
		s.mu.RUnlock()
		s.mu.Lock()
		if s.part == nil && s.err == nil {
			s.part, s.err = d.loadTable(s)
		}
		s.mu.Unlock()
		// Loop: a read-only Disk's ReleaseTables may have dropped the
		// part again before the read lock is back.
	}
}

// loadTable reads a segment's LUT part and sets its append cursor to
// max(file slots, highest referenced slot + 1). An entry at or past the
// file's end is corruption (FORMAT.md, sections 6 and 7.1). A writer also
// fdatasyncs the LUT (once per open) and the segment file first, then takes
// every slot of the file that no entry references as reusable: what a
// killed earlier process left unsynced in the page cache is durable by
// then, so "unreferenced in what we read" means "unreferenced on disk".
func (d *Disk) loadTable(s *segState) (*lut.Part, error) {
	if !d.readOnly {
		d.lutSynced.Do(func() { d.lutSyncErr = d.lut.Sync() })
		if d.lutSyncErr != nil {
			return nil, d.lutSyncErr
		}
		if err := s.SyncFile(); err != nil {
			return nil, err
		}
	}
	t, err := d.lut.Load(s.Index())
	if err != nil {
		return nil, err
	}
	size, err := s.Size()
	if err != nil {
		return nil, err
	}
	ss := d.desc.SectorSize
	fileSlots := size / ss
	next := (size + ss - 1) / ss
	bad, firstBad := 0, int64(-1)
	var live int64
	for j, v := range t.Entries {
		if v == lut.Unallocated {
			continue
		}
		if int64(v) >= fileSlots {
			err := fmt.Errorf("%w: segment %d (%s) sector %d: LUT entry points at slot %d, past the end of the file (%d slots)",
				ErrCorrupt, s.Index(), s.Path(), t.First+int64(j), v, fileSlots)
			if !d.readOnly {
				return nil, err
			}
			// A reader salvages what it can: only reads touching such
			// a sector fail (ReadSlotsStrict finds the slot missing),
			// every other sector of the segment stays readable.
			if bad == 0 {
				firstBad = t.First + int64(j)
			}
			bad++
			continue
		}
		live++
		next = max(next, int64(v)+1)
	}
	if bad > 0 {
		d.log.Warn("LUT entries point past their segment file; reads of those sectors fail, the rest of the segment is readable",
			"image", d.path, "segment", s.Index(), "bad_entries", bad, "first_sector", firstBad)
	}
	s.SetNext(next)
	if !d.readOnly {
		// Called with s.mu write-held (withTable).
		s.live = live
		s.free = freeRunsFrom(t.Entries, fileSlots)
		s.pend, s.pendBase, s.pendIdx = nil, 0, nil
	}
	return t, nil
}

// slotWarnAt is the append cursor past which a segment is close enough to
// the 2^32−1 slot limit to warn (90 %).
const slotWarnAt = maxSlot / 10 * 9

// sectorOf is the global sector number of sector j of segment s.
func (d *Disk) sectorOf(s *segState, j int64) int64 {
	return int64(s.Index())*(d.desc.Split/d.desc.SectorSize) + j
}

// slotSource tells where allocSlots found a slot, so that a failed write
// can give it back.
type slotSource byte

const (
	fromAppend slotSource = iota + 1
	fromFree
	fromPending
)

// allocSlots picks a slot for each sector j0+k with want[k]: the sector's
// own freed slot if it has one pending, else the lowest reusable slot,
// else a new slot at the end of the file. Called with s.mu write-held. On
// ENOSPC nothing stays allocated.
func (d *Disk) allocSlots(s *segState, j0 int64, want []bool, slots []uint32, src []slotSource) error {
	for k := range want {
		if !want[k] {
			continue
		}
		if !d.reuse {
			// Append-only (see Options.ReuseSlots).
		} else if v, ok := s.takePending(j0 + int64(k)); ok {
			slots[k], src[k] = uint32(v), fromPending
			continue
		} else if v, ok := s.free.pop(); ok {
			stats.count(transReused)
			slots[k], src[k] = uint32(v), fromFree
			continue
		}
		next := s.Next()
		if next > maxSlot {
			d.releaseSlots(s, j0, slots, src)
			return fmt.Errorf("image %s, segment %d (%s): all %d slot numbers of the segment file are in use (%d hold live data, %d freed since the last flush); "+
				"flush to make trimmed slots reusable, or run `sparsedisk shrink %s` while nothing serves the image: %w",
				d.path, s.Index(), s.Path(), maxSlot+1, s.live, s.pendLen(), d.path, syscall.ENOSPC)
		}
		if next >= slotWarnAt && !s.warned {
			s.warned = true
			d.log.Warn("segment file is close to its limit of 2^32-1 slots; writes to it will fail with ENOSPC once it is reached. Trim unused space, or run `sparsedisk shrink` on the image while nothing serves it",
				"image", d.path, "segment", s.Index(), "file", s.Path(), "slots", next, "live", s.live, "limit", maxSlot+1)
		}
		s.SetNext(next + 1)
		stats.count(transAppended)
		slots[k], src[k] = uint32(next), fromAppend
	}
	return nil
}

// releaseSlots gives back the slots allocSlots picked (src[k] != 0) when
// their data could not be written: a sector's own pending slot becomes
// pending again, any other is reusable (no entry references it). Called
// with s.mu write-held.
func (d *Disk) releaseSlots(s *segState, j0 int64, slots []uint32, src []slotSource) {
	var back []int64
	for k, from := range src {
		switch from {
		case fromPending:
			s.freeSlot(j0+int64(k), int64(slots[k]), true)
		case fromFree, fromAppend:
			back = append(back, int64(slots[k]))
		}
		src[k] = 0
	}
	s.free.add(back)
}

// ReadAt reads len(p) bytes at off. Any offset and length inside the disk
// is allowed; unallocated sectors read as zeros.
func (d *Disk) ReadAt(p []byte, off int64) (int, error) {
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.leave()
	if err := d.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := d.readAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// readAt reads without taking closeMu or checking bounds.
func (d *Disk) readAt(p []byte, off int64) error {
	split := d.desc.Split
	for len(p) > 0 {
		i := off / split
		segOff := off % split
		n := min(int64(len(p)), split-segOff)
		s := d.segs[i]
		var err error
		if d.desc.Layout == format.LayoutSparse {
			err = d.readSparse(s, p[:n], segOff)
		} else {
			err = s.ReadAt(p[:n], segOff)
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// run is one contiguous piece of I/O inside a segment file.
type run struct {
	fileOff int64
	buf     []byte
}

// readSparse reads p from segment s at byte segOff of the segment's part of
// the disk, coalescing sectors whose slots are consecutive into one read.
func (d *Disk) readSparse(s *segState, p []byte, segOff int64) error {
	ss := d.desc.SectorSize
	var runs []run
	var gen uint64
	err := d.withTable(s, func(t *lut.Part) {
		// Register as a reader of this generation before looking up: a
		// slot freed after the lookup is not reused before the read
		// below is done (reuse.go).
		gen = s.gen & 1
		s.active[gen].Add(1)
		for pos := int64(0); pos < int64(len(p)); {
			j := (segOff + pos) / ss
			in := (segOff + pos) % ss
			n := min(ss-in, int64(len(p))-pos)
			v := t.Entries[j]
			if v == lut.Unallocated {
				clear(p[pos : pos+n])
			} else {
				fo := int64(v)*ss + in
				if k := len(runs) - 1; k >= 0 && runs[k].fileOff+int64(len(runs[k].buf)) == fo && adjacent(runs[k].buf, p[pos:]) {
					runs[k].buf = runs[k].buf[:len(runs[k].buf)+int(n)]
				} else {
					runs = append(runs, run{fileOff: fo, buf: p[pos : pos+n]})
				}
			}
			pos += n
		}
	})
	if err != nil {
		return err
	}
	defer s.active[gen].Add(-1)
	if testHookRead != nil {
		testHookRead(s.Index(), runs)
	}
	for _, r := range runs {
		if err := s.ReadSlotsStrict(r.buf, r.fileOff); err != nil {
			return fmt.Errorf("%w: segment %d: %w", ErrCorrupt, s.Index(), err)
		}
	}
	return nil
}

// testHookRead, if set (by tests only), runs between a read's lookup and
// its preads.
var testHookRead func(seg int, runs []run)

// WriteAt writes p at off. A write reaching past the end of the disk fails
// with ErrOutOfRange and writes nothing.
func (d *Disk) WriteAt(p []byte, off int64) (int, error) {
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.leave()
	if d.readOnly {
		return 0, ErrReadOnly
	}
	if err := d.bounds(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) == 0 {
		return 0, nil
	}
	d.writes.Add(1)
	ss := d.desc.SectorSize
	first, last := off/ss, (off+int64(len(p))-1)/ss
	d.ranges.lock(first, last)
	err := d.writeLocked(p, off)
	d.ranges.unlock(first, last)
	if err == nil && d.sync {
		err = d.flush() // not Flush: the close read-lock is held, and a waiting Close would deadlock a second RLock
	}
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// writeLocked writes p at off; the caller holds the range lock of every
// sector it touches.
func (d *Disk) writeLocked(p []byte, off int64) error {
	split := d.desc.Split
	for len(p) > 0 {
		i := off / split
		segOff := off % split
		n := min(int64(len(p)), split-segOff)
		s := d.segs[i]
		var err error
		if d.desc.Layout == format.LayoutSparse {
			err = d.writeSparse(s, p[:n], segOff)
		} else {
			err = s.WriteAt(p[:n], segOff)
		}
		if err != nil {
			return err
		}
		p, off = p[n:], off+n
	}
	return nil
}

// writeSparse writes p into segment s at byte segOff of its part of the
// disk. Allocated sectors are written in place; non-zero data for
// unallocated sectors goes to newly appended slots, whose LUT entries are
// set only after the data is written (so a concurrent Flush never persists
// an entry before its data). All-zero data for an unallocated sector
// allocates nothing.
func (d *Disk) writeSparse(s *segState, p []byte, segOff int64) error {
	ss := d.desc.SectorSize
	j0 := segOff / ss
	nsec := (segOff+int64(len(p))-1)/ss - j0 + 1
	slots := make([]uint32, nsec)
	if err := d.withTable(s, func(t *lut.Part) { copy(slots, t.Entries[j0:j0+nsec]) }); err != nil {
		return err
	}

	// Sector images: full sectors point into p; partial ones are merged
	// with the sector's current content (read-modify-write).
	srcs := make([][]byte, nsec)
	for k := int64(0); k < nsec; k++ {
		lo := (j0+k)*ss - segOff // sector start relative to p
		if lo >= 0 && lo+ss <= int64(len(p)) {
			srcs[k] = p[lo : lo+ss]
			continue
		}
		buf := make([]byte, ss)
		if slots[k] != lut.Unallocated {
			if err := s.ReadSlotsStrict(buf, int64(slots[k])*ss); err != nil {
				return fmt.Errorf("%w: segment %d: %w", ErrCorrupt, s.Index(), err)
			}
		}
		from, to := max(lo, 0), min(lo+ss, int64(len(p)))
		copy(buf[from-lo:], p[from:to])
		srcs[k] = buf
	}

	// Sectors that become all zeros give their slot back; non-zero data
	// for unallocated sectors needs a slot.
	var fresh int64
	isNew := make([]bool, nsec)
	var zeroed []int64 // k of allocated sectors overwritten with zeros
	for k := range slots {
		z := isZero(srcs[k])
		switch {
		case slots[k] == lut.Unallocated && !z:
			isNew[k] = true
			fresh++
		case slots[k] != lut.Unallocated && z:
			zeroed = append(zeroed, int64(k))
		}
	}
	var src []slotSource
	if fresh > 0 {
		src = make([]slotSource, nsec)
		s.mu.Lock()
		err := d.allocSlots(s, j0, isNew, slots, src)
		s.mu.Unlock()
		if err != nil {
			return err
		}
	}
	written := slots
	if len(zeroed) > 0 {
		written = append([]uint32(nil), slots...)
		for _, k := range zeroed {
			written[k] = lut.Unallocated
		}
	}

	// Write runs of sectors whose slots are consecutive and whose sources
	// are contiguous in memory.
	var runs []run
	for k := int64(0); k < nsec; k++ {
		if written[k] == lut.Unallocated {
			continue
		}
		fo := int64(written[k]) * ss
		if r := len(runs) - 1; r >= 0 && runs[r].fileOff+int64(len(runs[r].buf)) == fo && adjacent(runs[r].buf, srcs[k]) {
			runs[r].buf = runs[r].buf[:len(runs[r].buf)+int(ss)]
			continue
		}
		runs = append(runs, run{fileOff: fo, buf: srcs[k]})
	}
	for _, r := range runs {
		if err := s.WriteAt(r.buf, r.fileOff); err != nil {
			if fresh > 0 {
				s.mu.Lock()
				d.releaseSlots(s, j0, slots, src)
				s.mu.Unlock()
			}
			return err
		}
	}
	if fresh == 0 && len(zeroed) == 0 {
		return nil
	}
	var punch []int64
	s.mu.Lock()
	for k := range slots {
		if isNew[k] {
			s.part.Set(j0+int64(k), slots[k])
			s.live++
		}
	}
	for _, k := range zeroed {
		punch = append(punch, int64(slots[k]))
		s.part.Set(j0+k, lut.Unallocated)
		s.live--
		s.freeSlot(j0+k, int64(slots[k]), false)
	}
	s.mu.Unlock()
	return d.punchSlots(s, punch)
}

// punchSlots punches the slots (sorted or not), one call per run of
// consecutive slots.
func (d *Disk) punchSlots(s *segState, slots []int64) error {
	if len(slots) == 0 {
		return nil
	}
	slices.Sort(slots)
	ss := d.desc.SectorSize
	for a := 0; a < len(slots); {
		b := a + 1
		for b < len(slots) && slots[b] == slots[b-1]+1 {
			b++
		}
		if err := s.Punch(slots[a]*ss, int64(b-a)*ss); err != nil {
			return err
		}
		a = b
	}
	return nil
}

// adjacent tells whether b starts right where a ends in the same array.
func adjacent(a, b []byte) bool {
	if cap(a) <= len(a) || len(b) == 0 {
		return false
	}
	return &a[:len(a)+1][len(a)] == &b[0]
}

// Trim deallocates [off, off+n): whole sectors become unallocated and
// their slots' space is released at once (punched); partial sectors at the
// edges are zeroed. The range reads as zeros afterwards.
func (d *Disk) Trim(off, n int64) error { return d.zero(off, n) }

// WriteZeroes makes [off, off+n) read as zeros, deallocating whole sectors
// like Trim.
func (d *Disk) WriteZeroes(off, n int64) error { return d.zero(off, n) }

func (d *Disk) zero(off, n int64) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	if d.readOnly {
		return ErrReadOnly
	}
	if err := d.bounds(off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	d.writes.Add(1)
	ss := d.desc.SectorSize
	first, last := off/ss, (off+n-1)/ss
	d.ranges.lock(first, last)
	err := d.zeroLocked(off, n)
	d.ranges.unlock(first, last)
	if err == nil && d.sync {
		err = d.flush() // not Flush: see WriteAt
	}
	return err
}

func (d *Disk) zeroLocked(off, n int64) error {
	ss := d.desc.SectorSize
	if d.desc.Layout != format.LayoutSparse {
		// Punch whole 4 KiB-aligned blocks, write zeros at the edges.
		split := d.desc.Split
		for n > 0 {
			i := off / split
			segOff := off % split
			c := min(n, split-segOff)
			if err := d.segs[i].Punch(segOff, c); err != nil {
				return err
			}
			off, n = off+c, n-c
		}
		return nil
	}
	// Partial sectors at the edges: write zeros (read-modify-write).
	if head := off % ss; head != 0 {
		c := min(n, ss-head)
		if err := d.writeLocked(zeros[:c], off); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	if tail := (off + n) % ss; tail != 0 && n > 0 {
		c := min(n, tail)
		if err := d.writeLocked(zeros[:c], off+n-c); err != nil {
			return err
		}
		n -= c
	}
	split := d.desc.Split
	for n > 0 {
		i := off / split
		segOff := off % split
		c := min(n, split-segOff)
		if err := d.deallocate(d.segs[i], segOff/ss, c/ss); err != nil {
			return err
		}
		off, n = off+c, n-c
	}
	return nil
}

// deallocate unmaps sectors [j, j+count) of segment s and punches their
// slots at once. The slots are freed, not reusable: another sector gets
// one only once a flush has made the unmapping durable and every read
// that may have looked it up has finished (reuse.go); until then the
// on-disk LUT may still name it, and reads as zeros or the old data,
// both correct for an unflushed trim. The caller holds the range lock of
// the sectors, so no write to them is in flight.
func (d *Disk) deallocate(s *segState, j, count int64) error {
	if err := d.withTable(s, func(*lut.Part) {}); err != nil { // load it
		return err
	}
	var freed []int64
	s.mu.Lock()
	for k := j; k < j+count; k++ {
		if v := s.part.Entries[k]; v != lut.Unallocated {
			freed = append(freed, int64(v))
			s.part.Set(k, lut.Unallocated)
			s.live--
			s.freeSlot(k, int64(v), false)
		}
	}
	s.mu.Unlock()
	return d.punchSlots(s, freed)
}

// Flush makes every write, trim and zeroing completed before the call
// durable: it fdatasyncs every dirty segment, then writes the dirty LUT
// pages, then fdatasyncs the LUT (FORMAT.md, section 7.2).
func (d *Disk) Flush() error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	if d.readOnly {
		return nil
	}
	return d.flush()
}

func (d *Disk) flush() error {
	d.flushMu.Lock()
	defer d.flushMu.Unlock()
	// Snapshot the LUT pages first: every entry in the snapshot was set
	// after its data was written, so the segment syncs below cover it.
	// Each snapshot is an epoch of its segment: the slots freed before
	// it become reusable once this flush has synced the LUT (reuse.go).
	var pages []lut.Page
	epochs := make([]uint64, len(d.segs))
	if d.lut != nil {
		for i, s := range d.segs {
			s.mu.Lock()
			if s.part != nil && s.part.Dirty() {
				pages = append(pages, s.part.TakeDirty()...)
			}
			if s.part != nil {
				s.epoch++
				epochs[i] = s.epoch
				s.tryAdvance()
			}
			s.mu.Unlock()
		}
	}
	redirty := func() {
		for _, s := range d.segs {
			s.mu.Lock()
		}
		lut.Redirty(pages)
		for _, s := range d.segs {
			s.mu.Unlock()
		}
	}
	for _, s := range d.segs {
		if err := s.Sync(); err != nil {
			redirty()
			return err
		}
	}
	if len(pages) > 0 {
		if err := d.lut.WritePages(pages); err != nil {
			redirty()
			return err
		}
		if err := d.lut.Sync(); err != nil {
			redirty()
			return err
		}
	}
	if d.lut == nil || d.readOnly {
		return nil
	}
	for i, s := range d.segs {
		if epochs[i] == 0 {
			continue
		}
		s.mu.Lock()
		s.synced = max(s.synced, epochs[i])
		s.mu.Unlock()
		if err := d.reclaim(s); err != nil {
			return err
		}
	}
	if d.compactor != nil {
		d.compactor.kick()
	}
	return nil
}

// reclaim makes the freed slots of s that have become reusable so
// (punching those the compactor moved out of, first).
func (d *Disk) reclaim(s *segState) error {
	s.mu.Lock()
	if s.part == nil || len(s.pend) == 0 {
		s.mu.Unlock()
		return nil
	}
	toPunch := s.promotable()
	s.mu.Unlock()
	if len(toPunch) == 0 {
		return nil
	}
	// Unreachable meanwhile: neither pending nor reusable.
	err := d.punchSlots(s, append([]int64(nil), toPunch...))
	s.mu.Lock()
	s.free.add(toPunch)
	s.mu.Unlock()
	return err
}
