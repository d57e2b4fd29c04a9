package blockif

import (
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// FindingKind classifies a Check finding.
type FindingKind string

const (
	// Leak: a slot that holds data but that no LUT entry references. It
	// wastes space and nothing else; shrink or `check -r leaks` reclaims it.
	Leak FindingKind = "leak"
	// Corruption: an inconsistency that can return wrong data or lose it.
	Corruption FindingKind = "corruption"
)

// Finding is one problem found by Check. Segment, Sector and Slot are -1
// where they do not apply.
type Finding struct {
	Kind    FindingKind `json:"kind"`
	File    string      `json:"file,omitempty"`
	Segment int         `json:"segment"`
	Sector  int64       `json:"sector"`
	Slot    int64       `json:"slot"`
	Count   int64       `json:"count"` // slots or sectors concerned, from Slot/Sector on
	Message string      `json:"message"`
}

func (f Finding) String() string {
	var b strings.Builder
	b.WriteString(string(f.Kind))
	if f.Segment >= 0 {
		fmt.Fprintf(&b, " segment %d", f.Segment)
	}
	if f.Sector >= 0 {
		fmt.Fprintf(&b, " sector %d", f.Sector)
	}
	if f.Slot >= 0 {
		fmt.Fprintf(&b, " slot %d", f.Slot)
	}
	if f.Count > 1 {
		fmt.Fprintf(&b, " (+%d more)", f.Count-1)
	}
	fmt.Fprintf(&b, ": %s", f.Message)
	if f.File != "" {
		fmt.Fprintf(&b, " [%s]", f.File)
	}
	return b.String()
}

// Report is the result of Check.
type Report struct {
	Image       string        `json:"image"`
	Layout      format.Layout `json:"layout"`
	Findings    []Finding     `json:"findings"`
	Corruptions int           `json:"corruptions"`
	Leaks       int           `json:"leaks"`
	LeakedSlots int64         `json:"leaked_slots"`
	// AllocatedSectors counts LUT entries that reference a slot.
	AllocatedSectors int64 `json:"allocated_sectors"`
	// Slots counts slots in all segment files (live, leaked or punched).
	Slots int64 `json:"slots"`
	// Fragments counts places where logically consecutive allocated
	// sectors do not sit in consecutive slots (0 after shrink).
	Fragments int64 `json:"fragments"`
	// Geometry is set when the descriptor disagrees with the files (see
	// [CrossExamine]); the report then holds that one finding, as nothing
	// else can be judged under a geometry that cannot be trusted.
	Geometry *Geometry `json:"geometry,omitempty"`
}

// Clean tells whether nothing at all was found.
func (r *Report) Clean() bool { return len(r.Findings) == 0 }

func (r *Report) add(f Finding) {
	switch f.Kind {
	case Corruption:
		r.Corruptions++
	case Leak:
		r.Leaks++
		r.LeakedSlots += max(f.Count, 1)
	}
	r.Findings = append(r.Findings, f)
}

func (r *Report) firstCorruption() string {
	for _, f := range r.Findings {
		if f.Kind == Corruption {
			return f.String()
		}
	}
	return ""
}

// Check is the one consistency check of an image, run by `sparsedisk
// check`, by the offline tools' tests and in the cleanup of every engine
// test. It opens the image at path read-only (shared lock) and checks it
// without changing a byte: every LUT entry against its segment file, slots
// shared by two entries, unreferenced slots holding data (leaks), segment
// files beyond the geometry, an unfinished offline operation recorded in
// the descriptor, and a LUT longer than the disk's sectors. Unlike Open it
// reports a broken image through the Report where it can (missing
// segments, bad LUT entries, a truncated LUT, an unparsable descriptor)
// instead of failing. Of o, only FS, Logger, ForceShare and Progress are
// used.
func Check(path string, o *Options) (*Report, error) {
	fsys := o.fs()
	if desc, err := format.ReadDescriptor(fsys, path); err == nil {
		// Cross-examine the descriptor first: under a wrong geometry every
		// later finding would be misleading, and its repair destructive.
		g, err := CrossExamine(fsys, path, desc)
		if err != nil {
			return nil, fmt.Errorf("check %s: %w", path, err)
		}
		if !g.Trusted() {
			r := &Report{Image: path, Layout: desc.Layout, Geometry: g}
			for i, msg := range g.Disagreements {
				r.add(Finding{Kind: Corruption, File: g.Files[i], Segment: -1, Sector: -1, Slot: -1, Count: 1,
					Message: "the descriptor disagrees with the files: " + msg})
			}
			intentFinding(r, path, desc)
			return r, nil
		}
	}
	r, err := checkFiles(path, o)
	if err != nil {
		return nil, err
	}
	desc, err := format.ReadDescriptor(fsys, path)
	if err != nil {
		return r, nil // raw image, or a descriptor already reported
	}
	intentFinding(r, path, desc)
	if desc.Layout == format.LayoutSparse {
		if fi, err := fsys.Stat(format.LUTName(path)); err == nil && fi.Size() > desc.Sectors()*lut.EntrySize {
			r.add(Finding{Kind: Corruption, File: format.LUTName(path), Segment: -1, Sector: desc.Sectors(), Slot: -1, Count: 1,
				Message: fmt.Sprintf("LUT is %d bytes, longer than the %d entries the size needs", fi.Size(), desc.Sectors())})
		}
	}
	return r, nil
}

// intentFinding reports an unfinished offline operation.
func intentFinding(r *Report, path string, desc format.Descriptor) {
	if desc.Intent != "" {
		r.add(Finding{Kind: Corruption, File: path, Segment: -1, Sector: -1, Slot: -1, Count: 1,
			Message: fmt.Sprintf("unfinished offline operation %q; `check -r all`, opening for writing, or repeating it finishes it", desc.Intent)})
	}
}

// checkFiles is the part of Check that opens the image: the files and
// every LUT entry, through an open Disk (see [Disk.check]).
func checkFiles(path string, o *Options) (*Report, error) {
	oo := Options{ReadOnly: true, NoDirtyCheck: true}
	var progress func(done, total int64)
	if o != nil {
		oo.FS, oo.Logger, progress, oo.ForceShare = o.FS, o.Logger, o.Progress, o.ForceShare
	}
	fsys := oo.fs()
	if fi, err := fsys.Stat(path); err == nil {
		if isDesc, _ := format.IsDescriptor(fsys, path, fi.Size()); isDesc {
			if _, err := format.ReadDescriptor(fsys, path); errors.Is(err, ErrInvalid) {
				// A descriptor (segments or a LUT lie beside it) that
				// cannot be parsed: the image is corrupt, not merely
				// uncheckable.
				r := &Report{Image: path}
				r.add(Finding{Kind: Corruption, File: path, Segment: -1, Sector: -1, Slot: -1, Message: err.Error()})
				return r, nil
			}
		}
	}
	d, err := Open(path, &oo)
	if err != nil {
		if !errors.Is(err, ErrCorrupt) {
			return nil, err
		}
		// Structural corruption: report it from the descriptor alone,
		// one finding per problem, so a repair plan sees all of them.
		desc, derr := format.ReadDescriptor(fsys, path)
		if derr != nil {
			return nil, err
		}
		r := &Report{Image: path, Layout: desc.Layout}
		structuralFindings(fsys, path, desc, r)
		if len(r.Findings) == 0 { // something else Open refused
			r.add(Finding{Kind: Corruption, File: path, Segment: -1, Sector: -1, Slot: -1, Message: err.Error()})
		}
		return r, nil
	}
	defer d.Close()
	if err := d.enter(); err != nil {
		return nil, err
	}
	defer d.leave()
	return d.check(nil, progress)
}

// check walks every segment; visit, if not nil, is called for each
// segment's entries (a copy) and the file's slot count, progress (if not
// nil) after each segment with the bytes of the disk covered so far.
func (d *Disk) check(visit func(s *segState, e []uint32, fileSlots int64), progress func(done, total int64)) (*Report, error) {
	r := &Report{Image: d.path, Layout: d.desc.Layout}
	if d.desc.Layout == format.LayoutRaw {
		return r, nil
	}
	d.checkExtraSegments(r)
	if d.desc.Layout != format.LayoutSparse {
		return r, nil
	}
	ss := d.desc.SectorSize
	for _, s := range d.segs {
		e, err := d.entries(s)
		if err != nil {
			return nil, err
		}
		size, err := s.Size()
		if err != nil {
			return nil, err
		}
		fileSlots := size / ss
		first := int64(s.Index()) * (d.desc.Split / ss)
		if size%ss != 0 {
			r.add(Finding{Kind: Leak, File: s.Path(), Segment: s.Index(), Sector: -1, Slot: fileSlots, Count: 1,
				Message: fmt.Sprintf("segment file ends in a partial slot (%d bytes)", size%ss)})
		}
		r.Slots += (size + ss - 1) / ss
		owner := make(map[uint32]int64, len(e))
		used := make([]bool, fileSlots)
		prev := int64(-1) // slot of the previous allocated sector; compact images start at slot 0
		for j, v := range e {
			if v == lut.Unallocated {
				continue
			}
			r.AllocatedSectors++
			if int64(v) != prev+1 {
				r.Fragments++
			}
			prev = int64(v)
			sector := first + int64(j)
			if int64(v) >= fileSlots {
				r.add(Finding{Kind: Corruption, File: s.Path(), Segment: s.Index(), Sector: sector, Slot: int64(v), Count: 1,
					Message: fmt.Sprintf("LUT entry points past the end of the segment file (%d slots)", fileSlots)})
				continue
			}
			if o, dup := owner[v]; dup {
				r.add(Finding{Kind: Corruption, File: s.Path(), Segment: s.Index(), Sector: sector, Slot: int64(v), Count: 1,
					Message: fmt.Sprintf("slot shared with sector %d", o)})
				continue
			}
			owner[v] = sector
			used[v] = true
		}
		if err := d.findLeaks(r, s, used); err != nil {
			return nil, err
		}
		if visit != nil {
			visit(s, e, fileSlots)
		}
		if progress != nil {
			progress(min(int64(s.Index()+1)*d.desc.Split, d.desc.Size), d.desc.Size)
		}
	}
	return r, nil
}

// entries returns a copy of segment s's LUT entries: from memory if
// loaded, else read from the LUT file without validating or caching them.
func (d *Disk) entries(s *segState) ([]uint32, error) {
	s.mu.RLock()
	if s.part != nil {
		e := append([]uint32(nil), s.part.Entries...)
		s.mu.RUnlock()
		return e, nil
	}
	s.mu.RUnlock()
	t, err := d.lut.Load(s.Index())
	if err != nil {
		return nil, err
	}
	return t.Entries, nil
}

// findLeaks reports runs of unreferenced slots that hold non-zero data.
func (d *Disk) findLeaks(r *Report, s *segState, used []bool) error {
	ss := d.desc.SectorSize
	buf := make([]byte, 1<<20)
	per := int64(len(buf)) / ss
	var leakStart, leakCount int64 = -1, 0
	emit := func() {
		if leakCount > 0 {
			r.add(Finding{Kind: Leak, File: s.Path(), Segment: s.Index(), Sector: -1, Slot: leakStart, Count: leakCount,
				Message: fmt.Sprintf("%d slot(s) hold data no LUT entry references", leakCount)})
		}
		leakStart, leakCount = -1, 0
	}
	for a := int64(0); a < int64(len(used)); {
		if used[a] {
			emit()
			a++
			continue
		}
		b := a
		for b < int64(len(used)) && !used[b] && b-a < per {
			b++
		}
		chunk := buf[:(b-a)*ss]
		if err := s.ReadSlotsStrict(chunk, a*ss); err != nil {
			return err
		}
		for k := a; k < b; k++ {
			if isZero(chunk[(k-a)*ss : (k-a+1)*ss]) {
				emit()
				continue
			}
			if leakStart < 0 || leakStart+leakCount != k {
				emit()
				leakStart = k
			}
			leakCount++
		}
		a = b
	}
	emit()
	return nil
}

// structuralFindings lists, from the descriptor alone, the problems that
// keep an image from opening: missing segment files, split segments longer
// than their part of the disk, a missing LUT or one of the wrong length,
// and segment files past the geometry (scanned up to the first index that
// does not exist, as the FS seam has no directory listing).
func structuralFindings(fsys vfs.FS, path string, desc format.Descriptor, r *Report) {
	p := desc.Params
	nseg := p.Segments()
	for i := 0; i < nseg; i++ {
		name := format.SegmentName(path, i)
		fi, err := fsys.Stat(name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			r.add(Finding{Kind: Corruption, File: name, Segment: i, Sector: -1, Slot: -1, Count: 1,
				Message: fmt.Sprintf("segment file is missing (image has %d segments)", nseg)})
		case err != nil:
			r.add(Finding{Kind: Corruption, File: name, Segment: i, Sector: -1, Slot: -1, Count: 1, Message: err.Error()})
		case p.Layout == format.LayoutSplit && fi.Size() > min(p.Split, p.Size-int64(i)*p.Split):
			r.add(Finding{Kind: Corruption, File: name, Segment: i, Sector: -1, Slot: -1, Count: 1,
				Message: fmt.Sprintf("segment file is %d bytes, longer than its %d", fi.Size(), min(p.Split, p.Size-int64(i)*p.Split))})
		}
	}
	if p.Layout == format.LayoutSparse {
		name := path + lut.Suffix
		want := p.Sectors() * lut.EntrySize
		fi, err := fsys.Stat(name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			r.add(Finding{Kind: Corruption, File: name, Segment: -1, Sector: -1, Slot: -1, Count: 1, Message: "LUT file is missing"})
		case err != nil:
			r.add(Finding{Kind: Corruption, File: name, Segment: -1, Sector: -1, Slot: -1, Count: 1, Message: err.Error()})
		case fi.Size() < want || fi.Size()%lut.EntrySize != 0:
			r.add(Finding{Kind: Corruption, File: name, Segment: -1, Sector: -1, Slot: -1, Count: 1,
				Message: fmt.Sprintf("LUT is %d bytes, want %d (%d sectors × %d)", fi.Size(), want, p.Sectors(), lut.EntrySize)})
		}
	}
	for _, x := range format.ExtraSegments(fsys, path, nseg) {
		r.add(Finding{Kind: Corruption, File: x.Name, Segment: x.Index, Sector: -1, Slot: -1, Count: 1,
			Message: fmt.Sprintf("segment file beyond the image's %d segments (%d bytes)", nseg, x.Size)})
	}
}

// checkExtraSegments reports segment files past the geometry; one
// trailing empty file is xhyve's habit and is tolerated.
func (d *Disk) checkExtraSegments(r *Report) {
	for _, x := range format.ExtraSegments(d.fs, d.path, len(d.segs)) {
		r.add(Finding{Kind: Corruption, File: x.Name, Segment: x.Index, Sector: -1, Slot: -1, Count: 1,
			Message: fmt.Sprintf("segment file beyond the image's %d segments (%d bytes)", len(d.segs), x.Size)})
	}
}
