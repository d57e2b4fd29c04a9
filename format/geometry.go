package format

import (
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// TrimToGeometry cuts the files down to the geometry p: slots of the last
// segment referenced only by LUT entries past the end are punched, the LUT
// is truncated to one entry per sector, segment files past the last are
// removed, and a split image's last segment is cut to its length. It never
// touches data inside the disk; it is the recovery of intent = resize.
func TrimToGeometry(fsys vfs.FS, path string, p Params) error {
	ss := p.SectorSize
	last := p.Segments() - 1
	lastName := SegmentName(path, last)
	if p.Layout == LayoutSparse {
		f, err := fsys.OpenFile(LUTName(path), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open LUT: %w", err)
		}
		defer f.Close()
		size, err := f.Size()
		if err != nil {
			return err
		}
		want := p.Sectors() * lut.EntrySize
		if size > want {
			perSeg := p.Split / ss
			segEnd := min((int64(last)+1)*perSeg*lut.EntrySize, size)
			if segEnd > want {
				buf := make([]byte, segEnd-want)
				if _, err := f.ReadAt(buf, want); err != nil {
					return fmt.Errorf("read LUT tail: %w", err)
				}
				live, err := ReadEntries(f, p, last)
				if err != nil {
					return err
				}
				if err := punchSlots(fsys, lastName, ss, p.LUTKind().DecodeEntries(buf), live); err != nil {
					return err
				}
			}
			if err := f.Truncate(want); err != nil {
				return fmt.Errorf("truncate LUT to %d: %w", want, err)
			}
			if err := f.Sync(); err != nil {
				return fmt.Errorf("sync LUT: %w", err)
			}
		}
	}
	removed := false
	for i := last + 1; ; i++ {
		r, err := RemoveIfExists(fsys, SegmentName(path, i))
		if err != nil {
			return err
		}
		if !r {
			break
		}
		removed = true
	}
	if removed {
		if err := SyncDirOf(fsys, path); err != nil {
			return err
		}
	}
	if p.Layout == LayoutSplit {
		want := min(p.Split, p.Size-int64(last)*p.Split)
		if fi, err := fsys.Stat(lastName); err == nil && fi.Size() > want {
			return TruncateFile(fsys, lastName, want, false)
		}
	}
	return nil
}

// punchSlots punches the slots named by the (decoded) LUT entries tail in
// the segment file name, except slots that a live entry references: the tail
// of a LUT left by a crashed grow can hold garbage (zeros), and punching
// a slot nothing live references is always safe.
func punchSlots(fsys vfs.FS, name string, ss int64, tail []uint32, live []uint32) error {
	keep := make(map[uint32]bool, len(live))
	for _, v := range live {
		keep[v] = true
	}
	f, err := fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return err
	}
	punched := false
	for _, v := range tail {
		if v != lut.Unallocated && !keep[v] && int64(v) < size/ss {
			keep[v] = true
			if err := f.PunchHole(int64(v)*ss, ss); err != nil {
				return fmt.Errorf("punch slot %d of %s: %w", v, name, err)
			}
			punched = true
		}
	}
	if punched {
		return f.Sync()
	}
	return nil
}
