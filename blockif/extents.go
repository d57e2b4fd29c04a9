package blockif

import (
	"fmt"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// Extent is a run of the disk that is either allocated (data) or a hole
// (reads as zeros, takes no space).
type Extent struct {
	Offset    int64 `json:"offset"`
	Length    int64 `json:"length"`
	Allocated bool  `json:"allocated"`
}

// Extents describes [off, off+n) as alternating allocated and hole runs,
// straight from the LUT (sparse layout). The runs cover exactly the range,
// in order, and adjacent runs differ in Allocated. Split and raw images
// report everything as allocated.
func (d *Disk) Extents(off, n int64) ([]Extent, error) {
	if err := d.enter(); err != nil {
		return nil, err
	}
	defer d.leave()
	if err := d.bounds(off, n); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, nil
	}
	if d.desc.Layout != format.LayoutSparse {
		return []Extent{{Offset: off, Length: n, Allocated: true}}, nil
	}
	var out []Extent
	add := func(o, l int64, a bool) {
		if k := len(out) - 1; k >= 0 && out[k].Allocated == a && out[k].Offset+out[k].Length == o {
			out[k].Length += l
			return
		}
		out = append(out, Extent{Offset: o, Length: l, Allocated: a})
	}
	ss, split := d.desc.SectorSize, d.desc.Split
	end := off + n
	for pos := off; pos < end; {
		i := pos / split
		s := d.segs[i]
		segEnd := min(end, (i+1)*split)
		if empty, err := d.unloadedEmpty(s); err != nil {
			return nil, err
		} else if empty {
			add(pos, segEnd-pos, false)
			pos = segEnd
			continue
		}
		err := d.withTable(s, func(t *lut.Part) {
			for pos < segEnd {
				j := (pos % split) / ss
				c := min(segEnd, (pos/ss+1)*ss) - pos
				add(pos, c, t.Entries[j] != lut.Unallocated)
				pos += c
			}
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

// unloadedEmpty tells whether segment s's LUT part is not loaded and the
// LUT file holds no allocated entry for it. The first call per segment
// scans its part of the LUT (lut.Table.Empty: a seek for a thin LUT, a
// pass of comparisons for an xhyve one, nothing decoded or kept); the
// answer is remembered, so Extents over a huge, mostly empty image costs
// neither a load nor the memory of the parts.
func (d *Disk) unloadedEmpty(s *segState) (bool, error) {
	s.mu.RLock()
	loaded, probed, empty := s.part != nil || s.err != nil, s.probed, s.empty
	s.mu.RUnlock()
	if loaded {
		return false, nil
	}
	if probed {
		return empty, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.part != nil || s.err != nil {
		return false, nil
	}
	if !s.probed {
		e, err := d.lut.Empty(s.Index())
		if err != nil {
			return false, err
		}
		s.probed, s.empty = true, e
	}
	return s.empty, nil
}

// ReleaseTables drops the LUT parts a read-only Disk has loaded, so a
// scan of a huge image (map of 1 TiB: 1 GiB of LUT at 4 KiB sectors) can
// keep only the segment at hand in memory; they are read again when next
// needed. A writable Disk refuses (ErrInvalid): its tables may hold
// entries not yet flushed to P.lut.
func (d *Disk) ReleaseTables() error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	if !d.readOnly {
		return fmt.Errorf("%w: ReleaseTables needs a read-only Disk", ErrInvalid)
	}
	for _, s := range d.segs {
		s.mu.Lock()
		s.part, s.err = nil, nil
		s.mu.Unlock()
	}
	return nil
}

// ReleaseTablesIn is ReleaseTables for the segments holding [off, off+n)
// only: a scan that works a segment at a time releases each as it leaves
// it, at a cost independent of the number of segments.
func (d *Disk) ReleaseTablesIn(off, n int64) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	if !d.readOnly {
		return fmt.Errorf("%w: ReleaseTablesIn needs a read-only Disk", ErrInvalid)
	}
	if err := d.bounds(off, n); err != nil || n == 0 || d.desc.Split <= 0 {
		return err
	}
	for i := off / d.desc.Split; i <= (off+n-1)/d.desc.Split && i < int64(len(d.segs)); i++ {
		s := d.segs[i]
		s.mu.Lock()
		s.part, s.err = nil, nil
		s.mu.Unlock()
	}
	return nil
}

// Stats summarises an image.
type Stats struct {
	format.Params
	State    string `json:"state"`
	Segments int    `json:"segments"`
	// AllocatedBytes is the data the disk holds: allocated sectors × sector
	// size (sparse), or the files' allocated bytes (split, raw).
	AllocatedBytes int64 `json:"allocated_bytes"`
	// OnDiskBytes is what the image's files occupy on their device,
	// descriptor and LUT included.
	OnDiskBytes int64 `json:"on_disk_bytes"`
	// Advice counts Check's Advice findings: bloated segments and
	// fragmentation (sparse).
	Advice int `json:"advice"`
	// Slots counts slots in the segment files (sparse).
	Slots int64 `json:"slots"`
	// LeakedSlots counts slots holding data no entry references (sparse).
	LeakedSlots int64 `json:"leaked_slots"`
	// Fragments counts breaks in logical order of slots (sparse); 0 after
	// shrink.
	Fragments int64 `json:"fragments"`
}

// Stats walks the image and summarises it, at the cost of Check: the
// allocated LUT entries (one segment at a time) and the unreferenced
// slots inside the segment files' data regions.
func (d *Disk) Stats() (Stats, error) {
	if err := d.enter(); err != nil {
		return Stats{}, err
	}
	defer d.leave()
	st := Stats{Params: d.desc.Params, State: d.desc.State, Segments: len(d.segs)}
	if !d.readOnly {
		st.State = format.StateDirty
	}
	if d.desc.Layout != format.LayoutSparse {
		for _, s := range d.segs {
			a, err := d.allocatedFile(s.Path(), s.Allocated)
			if err != nil {
				return st, err
			}
			st.OnDiskBytes += a
		}
		st.AllocatedBytes = st.OnDiskBytes
		return st, nil
	}
	var err error
	if st.OnDiskBytes, err = d.onDiskBytes(); err != nil {
		return st, err
	}
	st.LUT = d.desc.LUTKind()
	r, err := d.check(nil)
	if err != nil {
		return st, err
	}
	st.AllocatedBytes = r.AllocatedSectors * d.desc.SectorSize
	st.Slots, st.LeakedSlots, st.Fragments, st.Advice = r.Slots, r.LeakedSlots, r.Fragments, r.Advice
	return st, nil
}
