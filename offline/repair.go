package offline

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// RepairMode selects what Repair fixes.
type RepairMode string

const (
	// RepairLeaks finishes an interrupted offline operation, then
	// reclaims leaked slots (punches them) and nothing else.
	RepairLeaks RepairMode = "leaks"
	// RepairAll also repairs corruption, losing as little data as
	// possible.
	RepairAll RepairMode = "all"
)

// RepairAction is one change Repair made. Segment, Sector and Slot are -1
// where they do not apply.
type RepairAction struct {
	File    string `json:"file,omitempty"`
	Segment int    `json:"segment"`
	Sector  int64  `json:"sector"`
	Slot    int64  `json:"slot"`
	Count   int64  `json:"count"`
	// Lost tells that sectors [Sector, Sector+Count) now read as zeros
	// where they read something else (or failed) before.
	Lost    bool   `json:"lost"`
	Message string `json:"message"`
}

func (a RepairAction) String() string {
	s := "repaired"
	if a.Lost {
		s = "LOST"
	}
	if a.Segment >= 0 {
		s += fmt.Sprintf(" segment %d", a.Segment)
	}
	if a.Sector >= 0 {
		if a.Count > 1 {
			s += fmt.Sprintf(" sectors %d-%d", a.Sector, a.Sector+a.Count-1)
		} else {
			s += fmt.Sprintf(" sector %d", a.Sector)
		}
	}
	if a.Slot >= 0 {
		s += fmt.Sprintf(" slot %d", a.Slot)
	}
	return s + ": " + a.Message
}

// RepairReport lists what Repair did.
type RepairReport struct {
	Image   string         `json:"image"`
	Mode    RepairMode     `json:"mode"`
	Actions []RepairAction `json:"actions"`
	// LostSectors counts sectors that now read as zeros but read
	// differently (or not at all) before.
	LostSectors int64 `json:"lost_sectors"`
	// Undo names the undo log holding what the repair changed ("" if it
	// changed nothing): `sparsedisk check --undo` reverts the repair.
	Undo string `json:"undo,omitempty"`
}

func (r *RepairReport) add(a RepairAction) {
	if a.Lost {
		r.LostSectors += max(a.Count, 1)
	}
	r.Actions = append(r.Actions, a)
}

// RepairOptions tune RepairWith.
type RepairOptions struct {
	// AcceptLoss lets a repair act on an image whose files are damaged in
	// a way that loses data (a missing or shortened segment, a truncated
	// or garbage LUT: sectors that can no longer be read). Without it
	// such a repair is refused. It never overrides a descriptor that
	// another geometry explains better: that descriptor must be fixed.
	AcceptLoss bool
	// Consistent tells that the caller checked the image and found no
	// corruption: a repair in leaks mode then also marks a dirty image
	// clean (RepairAll always does, having repaired everything).
	Consistent bool
}

// Repair is RepairWith without options: it refuses data-losing repairs.
func Repair(path string, mode RepairMode, o *blockif.Options) (*RepairReport, error) {
	return RepairWith(path, mode, RepairOptions{}, o)
}

// RepairWith fixes the image at path under an exclusive lock.
//
// It first cross-examines the descriptor against the files
// ([blockif.CrossExamine]) and refuses (ErrGeometry) when they disagree
// and another geometry explains the files (the descriptor is wrong: fix
// it), when a file that should be a segment or the LUT is not a regular
// file, or when repairing to the descriptor's geometry would drop data
// and ro.AcceptLoss is not set. Nothing is changed then.
//
// Both modes then finish an interrupted offline operation (shrink,
// resize), as opening for writing would. RepairLeaks then punches slots no
// LUT entry references. RepairAll also: recreates missing segment files;
// moves segment files beyond the geometry aside (renamed *.orphaned, data
// kept); fixes the LUT's length; gives each sector that shares a slot its
// own copy (so every sector still reads what it read before); unmaps
// entries that point past their segment's end (those sectors read as
// zeros: they could not be read before); marks a dirty image clean. Every
// change is listed in the report, with the sectors whose content changed
// marked Lost.
//
// Everything a repair removes, cuts, punches, overwrites or renames is
// first saved in an undo log, P.undo.N: [Undo] (`sparsedisk check --undo`)
// puts the image back exactly as it was. Only the finishing of an
// interrupted operation is not logged: it is what any writable open does.
//
// Order keeps the image consistent at every instant: copied data is made
// durable before the LUT entries pointing at it.
func RepairWith(path string, mode RepairMode, ro RepairOptions, o *blockif.Options) (*RepairReport, error) {
	if mode != RepairLeaks && mode != RepairAll {
		return nil, fmt.Errorf("%w: repair mode %q (want leaks or all)", ErrInvalid, mode)
	}
	fsys := fsOf(o)
	fi, err := fsys.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("repair: %w", err)
	}
	rep := &RepairReport{Image: path, Mode: mode}
	isDesc, err := format.IsDescriptor(fsys, path, fi.Size())
	if err != nil {
		return nil, err
	}
	if !isDesc {
		return rep, nil // a raw image has nothing to repair
	}
	lock, err := format.LockImage(fsys, path, true)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	desc, err := format.ReadDescriptor(fsys, path)
	if err != nil {
		return nil, err
	}
	if err := trustGeometry(fsys, path, desc, ro); err != nil {
		return nil, err
	}
	all := mode == RepairAll
	// An interrupted offline operation is finished first in both modes:
	// until then the LUT may not describe the segments (a shrink that
	// stopped after moving slots has its live data in slots the old LUT
	// does not reference), so what looks like a leak may be live data.
	if desc.Intent != "" {
		if err := format.FinishIntent(fsys, path, desc, lock.Write); err != nil {
			return nil, err
		}
		rep.add(RepairAction{File: path, Segment: -1, Sector: -1, Slot: -1, Message: fmt.Sprintf("finished interrupted %q (no sector changed)", desc.Intent)})
		desc.Intent = ""
		if err := trustGeometry(fsys, path, desc, ro); err != nil {
			return rep, err
		}
	}
	u, err := newUndo(fsys, path)
	if err != nil {
		return rep, err
	}
	rp := &repairer{fsys: fsys, path: path, p: desc.Params, all: all, rep: rep, undo: u}
	err = rp.run(desc, lock, all || ro.Consistent)
	if ferr := u.finish(rp.descChanged); err == nil {
		err = ferr
	}
	if err != nil {
		return rep, err
	}
	if u.ops > 0 || rp.descChanged {
		rep.Undo = u.name
	}
	return rep, nil
}

// trustGeometry refuses a repair the descriptor's geometry cannot support.
func trustGeometry(fsys vfs.FS, path string, desc format.Descriptor, ro RepairOptions) error {
	g, err := blockif.CrossExamine(fsys, path, desc)
	if err != nil {
		return err
	}
	if g.Trusted() {
		return nil
	}
	why := ""
	switch {
	case g.Implied != nil:
		why = "another geometry explains the files"
	case hasBadFile(g):
		why = "a file of the image is not a regular file; move it away first"
	case g.Lossy && !ro.AcceptLoss:
		why = "repairing to the descriptor's geometry would drop data"
	default:
		return nil // lossless (a LUT tail of unallocated entries), or loss accepted
	}
	return fmt.Errorf("%w: %s: refusing to repair (%s): %s; %s", ErrGeometry, path, why, g.Summary(), g.Fix)
}

func hasBadFile(g *blockif.Geometry) bool {
	for _, d := range g.Disagreements {
		if strings.Contains(d, "not a segment file") || strings.Contains(d, "not a LUT") {
			return true
		}
	}
	return false
}

// run makes the repairs, undo-logged.
func (rp *repairer) run(desc format.Descriptor, lock *format.ImageLock, markClean bool) error {
	if rp.all {
		if err := rp.files(); err != nil {
			return err
		}
	}
	if desc.Layout == format.LayoutSparse {
		if err := rp.sparse(); err != nil {
			return err
		}
	}
	if markClean && desc.State == format.StateDirty {
		desc.State = format.StateClean
		if err := lock.Write(desc); err != nil {
			return err
		}
		rp.descChanged = true
		rp.rep.add(RepairAction{File: rp.path, Segment: -1, Sector: -1, Slot: -1, Message: "state = dirty: marked clean (no sector changed)"})
	}
	return nil
}

type repairer struct {
	fsys        vfs.FS
	path        string
	p           format.Params
	all         bool
	rep         *RepairReport
	lutCreated  bool
	undo        *undoLog
	descChanged bool
}

// files repairs the set of files: missing and extra segments, segment and
// LUT lengths.
func (rp *repairer) files() error {
	p, fsys := rp.p, rp.fsys
	ss := p.SectorSize
	perSeg := p.Split / ss
	changedDir := false
	for i := 0; i < p.Segments(); i++ {
		name := format.SegmentName(rp.path, i)
		want := min(p.Split, p.Size-int64(i)*p.Split)
		fi, err := fsys.Stat(name)
		if errors.Is(err, fs.ErrNotExist) {
			if err := rp.undo.created(name); err != nil {
				return err
			}
			f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return fmt.Errorf("recreate segment %d: %w", i, err)
			}
			if p.Layout == format.LayoutSplit {
				err = f.Truncate(want)
			}
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("recreate segment %s: %w", name, err)
			}
			changedDir = true
			msg := "segment file was missing: recreated empty; its allocated sectors are unmapped below"
			lost := false
			if p.Layout == format.LayoutSplit {
				msg, lost = "segment file was missing: recreated; its sectors read as zeros", true
			}
			a := RepairAction{File: name, Segment: i, Sector: -1, Slot: -1, Message: msg, Lost: lost}
			if lost {
				a.Sector, a.Count = int64(i)*perSeg, want/ss
			}
			rp.rep.add(a)
			continue
		} else if err != nil {
			return err
		}
		if p.Layout == format.LayoutSplit && fi.Size() > want {
			if err := rp.saveSize(name, want); err != nil {
				return err
			}
			if err := format.TruncateFile(fsys, name, want, false); err != nil {
				return err
			}
			rp.rep.add(RepairAction{File: name, Segment: i, Sector: -1, Slot: -1,
				Message: fmt.Sprintf("segment file was %d bytes, longer than its %d: cut to length (the bytes past it were not part of the disk)", fi.Size(), want)})
		}
	}
	for _, x := range format.ExtraSegments(fsys, rp.path, p.Segments()) {
		if err := rp.undo.renamed(x.Name, format.OrphanedName(x.Name)); err != nil {
			return err
		}
		if err := fsys.Rename(x.Name, format.OrphanedName(x.Name)); err != nil {
			return fmt.Errorf("move %s aside: %w", x.Name, err)
		}
		changedDir = true
		rp.rep.add(RepairAction{File: x.Name, Segment: x.Index, Sector: -1, Slot: -1,
			Message: fmt.Sprintf("segment file beyond the image's %d segments (%d bytes) moved aside to %s", p.Segments(), x.Size, format.OrphanedName(x.Name))})
	}
	if p.Layout == format.LayoutSparse {
		name := rp.path + lut.Suffix
		want := p.Sectors() * lut.EntrySize
		fi, err := fsys.Stat(name)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			if err := rp.undo.created(name); err != nil {
				return err
			}
			if err := lut.Create(fsys, name, p.Sectors(), p.LUTKind()); err != nil {
				return err
			}
			changedDir, rp.lutCreated = true, true
			rp.rep.add(RepairAction{File: name, Segment: -1, Sector: 0, Slot: -1, Count: p.Sectors(), Lost: true,
				Message: "LUT was missing: recreated empty, every sector reads as zeros; segment data kept unpunched for forensics (shrink drops it)"})
		case err != nil:
			return err
		case fi.Size() < want:
			f, err := fsys.OpenFile(name, os.O_RDWR, 0)
			if err != nil {
				return err
			}
			from := fi.Size() / lut.EntrySize * lut.EntrySize
			err = nil
			if from < fi.Size() {
				// A partial entry at the end: a thin LUT is only extended
				// by truncation when it ends on an entry boundary.
				if err = rp.undo.saveSize(f, name, from); err == nil {
					err = f.Truncate(from)
				}
			}
			if err == nil {
				err = rp.undo.saveSize(f, name, want)
			}
			if err == nil {
				err = lut.Extend(f, p.LUTKind(), from/lut.EntrySize, p.Sectors(), nil)
			}
			if err == nil {
				err = f.Sync()
			}
			f.Close()
			if err != nil {
				return fmt.Errorf("extend LUT %s: %w", name, err)
			}
			rp.rep.add(RepairAction{File: name, Segment: -1, Sector: from / lut.EntrySize, Slot: -1, Count: p.Sectors() - from/lut.EntrySize, Lost: true,
				Message: fmt.Sprintf("LUT was %d bytes, short of %d: these sectors had no entry (unreadable) and now read as zeros", fi.Size(), want)})
		case fi.Size() > want:
			// The tail is saved and cut; slots only it referenced are
			// leaks now, punched (and saved) below.
			if err := rp.saveSize(name, want); err != nil {
				return err
			}
			if err := format.TruncateFile(fsys, name, want, false); err != nil {
				return err
			}
			rp.rep.add(RepairAction{File: name, Segment: -1, Sector: -1, Slot: -1,
				Message: fmt.Sprintf("LUT was %d bytes, longer than %d: entries past the disk's end dropped", fi.Size(), want)})
		}
	}
	if changedDir {
		return format.SyncDirOf(fsys, rp.path)
	}
	return nil
}

// saveSize undo-logs the length (and any tail cut off) of the file name.
func (rp *repairer) saveSize(name string, newSize int64) error {
	f, err := rp.fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	return rp.undo.saveSize(f, name, newSize)
}

// sparse repairs every segment's entries and reclaims leaks.
func (rp *repairer) sparse() error {
	flag := os.O_RDWR
	f, err := rp.fsys.OpenFile(rp.path+lut.Suffix, flag, 0)
	if err != nil {
		return fmt.Errorf("open LUT: %w", err)
	}
	defer f.Close()
	for i := 0; i < rp.p.Segments(); i++ {
		if err := rp.segment(f, i); err != nil {
			return err
		}
	}
	return nil
}

func (rp *repairer) segment(lutFile vfs.File, i int) error {
	ss := rp.p.SectorSize
	perSeg := rp.p.Split / ss
	first := int64(i) * perSeg
	name := format.SegmentName(rp.path, i)
	if _, err := rp.fsys.Stat(name); err != nil {
		return nil // missing segment in leaks mode: nothing to do here
	}
	e, err := format.ReadEntries(lutFile, rp.p, i)
	if err != nil {
		return err
	}
	f, err := rp.fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("open segment %d: %w", i, err)
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return err
	}
	fileSlots := size / ss
	changed := make([]bool, len(e))
	dirtyLUT, dirtySeg := false, false
	// Entries past the end: unmap (they could not be read).
	if rp.all {
		for j := 0; j < len(e); {
			if e[j] == lut.Unallocated || int64(e[j]) < fileSlots {
				j++
				continue
			}
			k := j
			for k < len(e) && e[k] != lut.Unallocated && int64(e[k]) >= fileSlots {
				e[k], changed[k] = lut.Unallocated, true
				k++
			}
			rp.rep.add(RepairAction{File: name, Segment: i, Sector: first + int64(j), Slot: -1, Count: int64(k - j), Lost: true,
				Message: fmt.Sprintf("LUT entry pointed past the end of the segment file (%d slots), reads failed: unmapped, reads as zeros", fileSlots)})
			dirtyLUT = true
			j = k
		}
	}
	// A partial slot at the end that no entry reaches is a leak: cut it.
	if size%ss != 0 {
		reached := false
		for _, v := range e {
			if v != lut.Unallocated && int64(v) >= fileSlots {
				reached = true
			}
		}
		if !reached {
			if err := rp.undo.saveSize(f, name, fileSlots*ss); err != nil {
				return err
			}
			if err := f.Truncate(fileSlots * ss); err != nil {
				return fmt.Errorf("truncate %s: %w", name, err)
			}
			dirtySeg = true
			rp.rep.add(RepairAction{File: name, Segment: i, Sector: -1, Slot: fileSlots, Count: 1,
				Message: fmt.Sprintf("partial slot at the end of the file (%d bytes) removed", size%ss)})
			size = fileSlots * ss
		}
	}
	// Shared slots: give every later owner its own copy.
	if rp.all {
		owner := make(map[uint32]int, 1024)
		next := (size + ss - 1) / ss
		buf := make([]byte, ss)
		sizeSaved := false
		for j, v := range e {
			if v == lut.Unallocated || int64(v) >= fileSlots {
				continue
			}
			o, dup := owner[v]
			if !dup {
				owner[v] = j
				continue
			}
			if next > maxSlot {
				return fmt.Errorf("segment %d: no slot number left to copy shared slot %d", i, v)
			}
			if !sizeSaved {
				if err := rp.undo.saveSize(f, name, next*ss); err != nil {
					return err
				}
				sizeSaved = true
			}
			if n, err := f.ReadAt(buf, int64(v)*ss); n != len(buf) {
				return fmt.Errorf("read slot %d of %s: %w", v, name, err)
			}
			if _, err := f.WriteAt(buf, next*ss); err != nil {
				return fmt.Errorf("write slot %d of %s: %w", next, name, err)
			}
			rp.rep.add(RepairAction{File: name, Segment: i, Sector: first + int64(j), Slot: int64(v), Count: 1,
				Message: fmt.Sprintf("shared slot %d with sector %d: given its own copy in slot %d, content unchanged", v, first+int64(o), next)})
			e[j], changed[j] = uint32(next), true
			next++
			dirtyLUT, dirtySeg = true, true
		}
		fileSlots = next
	}
	// Leaks: punch runs of slots no entry references (unless the LUT was
	// recreated: then the data is all that is left of the disk).
	if !rp.lutCreated {
		used := make([]bool, fileSlots)
		for _, v := range e {
			if v != lut.Unallocated && int64(v) < fileSlots {
				used[v] = true
			}
		}
		if err := rp.punchLeaks(f, name, i, used); err != nil {
			return err
		}
	}
	if dirtySeg {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", name, err)
		}
	}
	if dirtyLUT {
		if err := rp.undo.saveBytes(lutFile, lutFile.Name(), first*lut.EntrySize, int64(len(e))*lut.EntrySize); err != nil {
			return err
		}
		for j := 0; j < len(e); j++ {
			if !changed[j] {
				continue
			}
			if err := format.WriteEntries(lutFile, rp.p, first+int64(j), e[j:j+1]); err != nil {
				return fmt.Errorf("entry of sector %d: %w", first+int64(j), err)
			}
		}
		if err := lutFile.Sync(); err != nil {
			return fmt.Errorf("sync LUT: %w", err)
		}
	}
	return nil
}

// punchLeaks punches every run of unreferenced slots that holds data.
func (rp *repairer) punchLeaks(f vfs.File, name string, i int, used []bool) error {
	ss := rp.p.SectorSize
	buf := make([]byte, ss)
	punched := false
	for a := int64(0); a < int64(len(used)); {
		if used[a] {
			a++
			continue
		}
		b := a
		data := false
		for b < int64(len(used)) && !used[b] {
			if !data {
				if n, _ := f.ReadAt(buf, b*ss); n == len(buf) && !isZero(buf) {
					data = true
				}
			}
			b++
		}
		if data {
			if err := rp.undo.saveBytes(f, name, a*ss, (b-a)*ss); err != nil {
				return err
			}
			if err := f.PunchHole(a*ss, (b-a)*ss); err != nil {
				return fmt.Errorf("punch slots %d-%d of %s: %w", a, b-1, name, err)
			}
			punched = true
			rp.rep.add(RepairAction{File: name, Segment: i, Sector: -1, Slot: a, Count: b - a,
				Message: fmt.Sprintf("%d leaked slot(s) no entry references: punched (no sector changed)", b-a)})
		}
		a = b
	}
	if punched {
		if err := f.Sync(); err != nil {
			return fmt.Errorf("sync %s: %w", name, err)
		}
	}
	return nil
}
