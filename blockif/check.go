package blockif

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"slices"
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
	// Advice: nothing is wrong, but the image costs more than it should:
	// a segment file's apparent size far beyond its live data (bloat), or
	// slots far out of logical order (fragmentation). The message names
	// the command that fixes it (`sparsedisk shrink IMAGE`). Advice does
	// not make a Report unclean, and `check` still exits 0 for it.
	Advice FindingKind = "advice"
)

// Thresholds of the Advice findings.
const (
	// A segment is bloated when its file holds more than
	// max(bloatMinSlack, split/4, live/4) bytes of slots beyond its live
	// ones: apparent size that a shrink (or the online compactor) gives
	// back.
	bloatMinSlack = 64 << 20
	// A segment whose append cursor has used more than this share of the
	// slot numbers a LUT entry can hold is reported whatever its bloat:
	// once they run out, writes to it fail.
	slotNumbersWarn = 0.5
	// An image is fragmented when at least fragMinBreaks allocated
	// sectors, and more than a quarter of them, do not follow their
	// logical predecessor's slot.
	fragMinBreaks = 256
)

// Finding is one problem found by Check. Segment, Sector and Slot are -1
// where they do not apply.
type Finding struct {
	Kind    FindingKind `json:"kind"`
	File    string      `json:"file,omitempty"`
	Segment int         `json:"segment"`
	Sector  int64       `json:"sector"`
	Slot    int64       `json:"slot"`
	Count   int64       `json:"count"` // slots or sectors concerned, from Slot/Sector on (Advice: excess slots, or fragment breaks)
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
	if f.Count > 1 && f.Kind != Advice {
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
	// Advice counts Advice findings (bloat, fragmentation).
	Advice      int   `json:"advice"`
	LeakedSlots int64 `json:"leaked_slots"`
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

// Clean tells whether nothing needs repair: no corruption and no leak
// (Advice findings may be present).
func (r *Report) Clean() bool { return r.Corruptions == 0 && r.Leaks == 0 }

func (r *Report) add(f Finding) {
	switch f.Kind {
	case Corruption:
		r.Corruptions++
	case Leak:
		r.Leaks++
		r.LeakedSlots += max(f.Count, 1)
	case Advice:
		r.Advice++
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
	return d.check(progress)
}

// check walks every segment, progress (if not nil) after each with the
// bytes of the disk covered so far.
//
// Its cost follows the data, not the disk's or the files' apparent size:
// a segment's entries come from its loaded part or from a scan of the LUT
// that skips unallocated pages and holes (lut.Table.Scan), it keeps only
// the allocated entries (8 bytes each), and it looks for leaks only in
// the data regions of the segment file (SEEK_DATA/SEEK_HOLE), reading
// only unreferenced slots there.
func (d *Disk) check(progress func(done, total int64)) (*Report, error) {
	r := &Report{Image: d.path, Layout: d.desc.Layout}
	if d.desc.Layout == format.LayoutRaw {
		return r, nil
	}
	d.checkExtraSegments(r)
	if d.desc.Layout != format.LayoutSparse {
		return r, nil
	}
	var allocated, breaks int64
	for _, s := range d.segs {
		if err := d.checkSegment(r, s, &breaks); err != nil {
			return nil, err
		}
		if progress != nil {
			progress(min(int64(s.Index()+1)*d.desc.Split, d.desc.Size), d.desc.Size)
		}
	}
	allocated = r.AllocatedSectors
	if breaks >= fragMinBreaks && breaks*4 > allocated {
		r.add(Finding{Kind: Advice, File: d.path, Segment: -1, Sector: -1, Slot: -1, Count: breaks,
			Message: fmt.Sprintf("fragmented: %d of %d allocated sectors (%.0f%%) do not follow their predecessor's slot, so sequential reads are scattered; `sparsedisk shrink %s` rewrites the slots in order",
				breaks, allocated, 100*float64(breaks)/float64(max(allocated, 1)), d.path)})
	}
	return r, nil
}

// mapping is one allocated LUT entry: sector j of its segment in slot v.
type mapping struct{ j, v uint32 }

// allocatedEntries returns segment s's allocated entries in sector order:
// from its part if loaded, else scanned from the LUT file without loading
// or caching the part.
func (d *Disk) allocatedEntries(s *segState) ([]mapping, error) {
	var m []mapping
	s.mu.RLock()
	if s.part != nil {
		for j, v := range s.part.Entries {
			if v != lut.Unallocated {
				m = append(m, mapping{uint32(j), v})
			}
		}
		s.mu.RUnlock()
		return m, nil
	}
	s.mu.RUnlock()
	err := d.lut.Scan(s.Index(), func(j int64, v uint32) bool {
		m = append(m, mapping{uint32(j), v})
		return true
	})
	return m, err
}

// checkSegment checks segment s's entries and file, adding its findings
// to r and its fragment breaks to *breaks.
func (d *Disk) checkSegment(r *Report, s *segState, breaks *int64) error {
	ss := d.desc.SectorSize
	m, err := d.allocatedEntries(s)
	if err != nil {
		return err
	}
	fi, err := d.fs.Stat(s.Path())
	if err != nil {
		return fmt.Errorf("stat segment %d: %w", s.Index(), err)
	}
	size := fi.Size()
	fileSlots := size / ss
	first := int64(s.Index()) * (d.desc.Split / ss)
	if size%ss != 0 {
		r.add(Finding{Kind: Leak, File: s.Path(), Segment: s.Index(), Sector: -1, Slot: fileSlots, Count: 1,
			Message: fmt.Sprintf("segment file ends in a partial slot (%d bytes)", size%ss)})
	}
	r.Slots += (size + ss - 1) / ss
	r.AllocatedSectors += int64(len(m))
	var bad []Finding // corruptions, reported in sector order
	prev := int64(-1) // slot of the previous allocated sector; compact images start at slot 0
	used := make([]mapping, 0, len(m))
	for _, e := range m {
		if int64(e.v) != prev+1 {
			r.Fragments++
			*breaks++
		}
		prev = int64(e.v)
		if int64(e.v) >= fileSlots {
			bad = append(bad, Finding{Kind: Corruption, File: s.Path(), Segment: s.Index(), Sector: first + int64(e.j), Slot: int64(e.v), Count: 1,
				Message: fmt.Sprintf("LUT entry points past the end of the segment file (%d slots)", fileSlots)})
			continue
		}
		used = append(used, e)
	}
	// Shared slots: sort by slot (then sector); the first sector of each
	// slot owns it, the others share it.
	slices.SortFunc(used, func(a, b mapping) int {
		if a.v != b.v {
			return int(int64(a.v) - int64(b.v))
		}
		return int(int64(a.j) - int64(b.j))
	})
	slots := make([]int64, 0, len(used)) // live slots, sorted
	owner := uint32(0)
	for k, e := range used {
		if k > 0 && used[k-1].v == e.v {
			bad = append(bad, Finding{Kind: Corruption, File: s.Path(), Segment: s.Index(), Sector: first + int64(e.j), Slot: int64(e.v), Count: 1,
				Message: fmt.Sprintf("slot shared with sector %d", first+int64(owner))})
			continue
		}
		owner = e.j
		slots = append(slots, int64(e.v))
	}
	slices.SortFunc(bad, func(a, b Finding) int { return int(a.Sector - b.Sector) })
	for _, f := range bad {
		r.add(f)
	}
	if err := d.findLeaks(r, s, fileSlots, slots); err != nil {
		return err
	}
	highest := int64(-1)
	if len(m) > 0 {
		highest = int64(slices.MaxFunc(m, func(a, b mapping) int { return int(int64(a.v) - int64(b.v)) }).v)
	}
	d.bloatFinding(r, s, size, int64(len(slots)), highest)
	return nil
}

// bloatFinding reports a segment file much larger than its live data, or
// one whose slot numbers are running out.
func (d *Disk) bloatFinding(r *Report, s *segState, size, live, highest int64) {
	ss := d.desc.SectorSize
	apparent := (size + ss - 1) / ss
	excess := (apparent - live) * ss
	slack := max(bloatMinSlack, d.desc.Split/4, live*ss/4)
	used := float64(max(apparent, highest+1)) / float64(maxSlot+1)
	if excess <= slack && used <= slotNumbersWarn {
		return
	}
	msg := fmt.Sprintf("segment file is %s apparent size for %s of live data (%d slots, %d live)",
		format.HumanSize(size), format.HumanSize(live*ss), apparent, live)
	if used > slotNumbersWarn {
		msg += fmt.Sprintf("; it has used %.0f%% of the %d slot numbers a LUT entry holds, and writes to it fail once they run out", 100*used, maxSlot+1)
	}
	r.add(Finding{Kind: Advice, File: s.Path(), Segment: s.Index(), Sector: -1, Slot: -1, Count: apparent - live,
		Message: msg + fmt.Sprintf("; `sparsedisk shrink %s` compacts it", d.path)})
}

// findLeaks reports runs of unreferenced slots that hold non-zero data.
// slots are the live slots, sorted. Only the segment file's data regions
// are visited (holes read as zeros: never a leak), and in them only the
// slots no entry references are read.
func (d *Disk) findLeaks(r *Report, s *segState, fileSlots int64, slots []int64) error {
	if fileSlots == 0 {
		return nil
	}
	ss := d.desc.SectorSize
	f, err := d.fs.OpenFile(s.Path(), os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("open segment %d: %w", s.Index(), err)
	}
	defer f.Close()
	var buf []byte // allocated once there is something to read
	per := int64(1<<20) / ss
	var leakStart, leakCount int64 = -1, 0
	emit := func() {
		if leakCount > 0 {
			r.add(Finding{Kind: Leak, File: s.Path(), Segment: s.Index(), Sector: -1, Slot: leakStart, Count: leakCount,
				Message: fmt.Sprintf("%d slot(s) hold data no LUT entry references", leakCount)})
		}
		leakStart, leakCount = -1, 0
	}
	// scan reads unreferenced slots [a, b) and records the non-zero ones.
	scan := func(a, b int64) error {
		if buf == nil {
			buf = make([]byte, per*ss)
		}
		for a < b {
			c := min(b-a, per)
			chunk := buf[:c*ss]
			n, err := f.ReadAt(chunk, a*ss)
			if int64(n) != c*ss {
				if err == nil || errors.Is(err, io.EOF) {
					err = fmt.Errorf("%w: %s: file ends before slot %d", ErrCorrupt, s.Path(), a+c)
				}
				return fmt.Errorf("read segment %d at offset %d: %w", s.Index(), a*ss, err)
			}
			for k := a; k < a+c; k++ {
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
			a += c
		}
		return nil
	}
	next := 0 // first entry of slots not yet passed
	for pos := int64(0); pos < fileSlots; {
		dataOff, err := f.SeekData(pos * ss)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("segment %d: %w", s.Index(), err)
		}
		holeOff, err := f.SeekHole(dataOff)
		if errors.Is(err, io.EOF) {
			holeOff = fileSlots * ss
		} else if err != nil {
			return fmt.Errorf("segment %d: %w", s.Index(), err)
		}
		a := max(pos, dataOff/ss)
		b := min(fileSlots, (holeOff+ss-1)/ss)
		if a > pos {
			emit() // a hole in between
		}
		for next < len(slots) && slots[next] < a {
			next++
		}
		for a < b {
			if next < len(slots) && slots[next] == a {
				emit()
				a++
				next++
				continue
			}
			end := b
			if next < len(slots) && slots[next] < b {
				end = slots[next]
			}
			if err := scan(a, end); err != nil {
				return err
			}
			a = end
		}
		pos = max(b, pos+1)
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
