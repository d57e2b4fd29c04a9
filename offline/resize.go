package offline

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// ResizeOptions tune Resize.
type ResizeOptions struct {
	// FS is the file system; nil means the operating system's.
	FS vfs.FS
	// AllowShrink must be set to make the disk smaller.
	AllowShrink bool
	// Force drops allocated data past the new end instead of refusing.
	Force bool
	// Progress, if not nil, is called from time to time with the bytes of
	// work done and the total: LUT bytes written when growing a sparse
	// image, bytes scanned for data past the new end when shrinking. It is
	// called from the goroutine running Resize and ends with done == total.
	Progress func(done, total int64)
}

// report calls o.Progress if set.
func (o *ResizeOptions) report(done, total int64) {
	if o.Progress != nil {
		o.Progress(done, total)
	}
}

// ResizeReport tells what Resize did.
type ResizeReport struct {
	Image   string `json:"image"`
	OldSize int64  `json:"old_size"`
	NewSize int64  `json:"new_size"`
	// DroppedSectors counts allocated sectors (sparse) or sectors holding
	// non-zero bytes (split, raw) cut off by a forced shrink.
	DroppedSectors int64 `json:"dropped_sectors"`
	// FirstDropped is the first such sector, -1 if none.
	FirstDropped int64 `json:"first_dropped"`
}

// ResolveSize turns a resize argument into a size: "20G" is absolute,
// "+1G" and "-512M" are relative to cur.
func ResolveSize(cur int64, spec string) (int64, error) {
	s := strings.TrimSpace(spec)
	sign := int64(0)
	switch {
	case strings.HasPrefix(s, "+"):
		sign, s = 1, s[1:]
	case strings.HasPrefix(s, "-"):
		sign, s = -1, s[1:]
	}
	n, err := format.ParseSize(s)
	if err != nil {
		return 0, err
	}
	switch sign {
	case 1:
		if n > (1<<63-1)-cur {
			return 0, fmt.Errorf("%w: size %d + %d overflows", ErrInvalid, cur, n)
		}
		return cur + n, nil
	case -1:
		if n >= cur {
			return 0, fmt.Errorf("%w: cannot shrink a %d-byte disk by %d bytes", ErrInvalid, cur, n)
		}
		return cur - n, nil
	}
	return n, nil
}

// Resize changes the virtual size of the image at path.
//
// Growing creates the new segment files and extends the LUT with
// unallocated entries, makes them durable, and then writes the descriptor
// with the new size: the descriptor is the commit point. The descriptor
// carries intent = resize meanwhile, so an interrupted grow is rolled back
// (the new files removed) by the next Open for writing.
//
// Shrinking needs AllowShrink and refuses (ErrDataPastEnd, naming the first
// sector) while allocated data lies past the new end, unless Force. The
// descriptor with the new size is written first (commit), then the files
// are cut to the new geometry.
func Resize(path string, newSize int64, o *ResizeOptions) (*ResizeReport, error) {
	if o == nil {
		o = &ResizeOptions{}
	}
	fsys := o.FS
	if fsys == nil {
		fsys = vfs.OS{}
	}
	fi, err := fsys.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("resize: %w", err)
	}
	isDesc, err := format.IsDescriptor(fsys, path, fi.Size())
	if err != nil {
		return nil, err
	}
	lock, err := format.LockImage(fsys, path, true)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	if !isDesc {
		return resizeRaw(fsys, path, fi.Size(), newSize, o)
	}
	desc, err := format.ReadDescriptor(fsys, path)
	if err != nil {
		return nil, err
	}
	if err := format.FinishIntent(fsys, path, desc, lock.Write); err != nil {
		return nil, err
	}
	desc.Intent = ""
	rep := &ResizeReport{Image: path, OldSize: desc.Size, NewSize: newSize, FirstDropped: -1}
	np := desc.Params
	np.Size = newSize
	if newSize%desc.SectorSize != 0 {
		return nil, fmt.Errorf("%w: new size %d is not a multiple of the sector size %d", ErrInvalid, newSize, desc.SectorSize)
	}
	if err := np.Validate(); err != nil {
		return nil, err
	}
	switch {
	case newSize == desc.Size:
		return rep, nil
	case newSize > desc.Size:
		return rep, grow(fsys, path, desc, np, lock, o)
	}
	if !o.AllowShrink {
		return nil, fmt.Errorf("%w: %s: new size %d is smaller than %d; shrinking needs --shrink", ErrInvalid, path, newSize, desc.Size)
	}
	if err := findDataPastEnd(fsys, path, desc.Params, newSize, rep, o); err != nil {
		return nil, err
	}
	if rep.FirstDropped >= 0 && !o.Force {
		return nil, fmt.Errorf("%w: %s: sector %d (offset %d) and %d more sector(s) past the new end %d hold data; use --force to drop them",
			ErrDataPastEnd, path, rep.FirstDropped, rep.FirstDropped*desc.SectorSize, rep.DroppedSectors-1, newSize)
	}
	desc.Params = np
	if err := lock.SetIntent(&desc, format.IntentResize); err != nil { // commit
		return nil, err
	}
	if err := format.TrimToGeometry(fsys, path, np); err != nil {
		return nil, err
	}
	desc.Intent = ""
	return rep, lock.Write(desc)
}

// grow adds segment files and LUT entries for np, then commits np.
func grow(fsys vfs.FS, path string, desc format.Descriptor, np format.Params, lock *format.ImageLock, o *ResizeOptions) error {
	old := desc.Params
	oldN, newN := old.Segments(), np.Segments()
	// Refusals come before the intent is recorded: finishing a resize
	// intent removes every file past the geometry, and a stray file found
	// here may hold data (check -r all moves such files aside instead).
	for i := oldN; i < newN; i++ {
		name := format.SegmentName(path, i)
		if fi, err := fsys.Stat(name); err == nil && fi.Size() > 0 {
			return fmt.Errorf("%w: segment file %s already exists beyond the image's %d segments; run `sparsedisk check -r all` first (it moves such files aside)", ErrCorrupt, name, oldN)
		}
	}
	if np.Layout == format.LayoutSparse && np.LUTKind() == lut.Xhyve { // a thin LUT grows by a hole
		if err := format.CheckRoom(fsys, path, (np.Sectors()-old.Sectors())*lut.EntrySize, "the LUT's new entries"); err != nil {
			return err
		}
	}
	if err := lock.SetIntent(&desc, format.IntentResize); err != nil {
		return err
	}
	if old.Layout == format.LayoutSplit {
		// The old last segment may have been short: lengthen it.
		name := format.SegmentName(path, oldN-1)
		if err := format.TruncateFile(fsys, name, min(np.Split, np.Size-int64(oldN-1)*np.Split), true); err != nil {
			return err
		}
	}
	for i := oldN; i < newN; i++ {
		name := format.SegmentName(path, i)
		if fi, err := fsys.Stat(name); err == nil && fi.Size() > 0 {
			return fmt.Errorf("%w: segment file %s already exists beyond the image's %d segments; run `sparsedisk check -r all` first", ErrCorrupt, name, oldN)
		}
		f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return fmt.Errorf("create segment: %w", err)
		}
		if np.Layout == format.LayoutSplit {
			if err = f.Truncate(min(np.Split, np.Size-int64(i)*np.Split)); err == nil {
				err = f.Sync()
			}
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("create segment %s: %w", name, err)
		}
	}
	if np.Layout == format.LayoutSparse {
		f, err := fsys.OpenFile(path+lut.Suffix, os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open LUT: %w", err)
		}
		err = lut.Extend(f, np.LUTKind(), old.Sectors(), np.Sectors(), o.report)
		if err == nil {
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("extend LUT %s: %w", path+lut.Suffix, err)
		}
	}
	if err := format.SyncDirOf(fsys, path); err != nil {
		return err
	}
	desc.Params, desc.Intent = np, ""
	return lock.Write(desc) // commit
}

// findDataPastEnd records in rep the data that lies at or past newSize.
func findDataPastEnd(fsys vfs.FS, path string, p format.Params, newSize int64, rep *ResizeReport, o *ResizeOptions) error {
	ss := p.SectorSize
	if p.Layout == format.LayoutSparse {
		f, err := fsys.OpenFile(path+lut.Suffix, os.O_RDONLY, 0)
		if err != nil {
			return fmt.Errorf("open LUT: %w", err)
		}
		defer f.Close()
		perSeg := p.Split / ss
		from := newSize / ss
		first := int(from / perSeg)
		for i := first; i < p.Segments(); i++ {
			e, err := format.ReadEntries(f, p, i)
			if err != nil {
				return err
			}
			base := int64(first) * perSeg
			o.report((min(int64(i+1)*perSeg, p.Sectors())-base)*lut.EntrySize, (p.Sectors()-base)*lut.EntrySize)
			for j, v := range e {
				sec := int64(i)*perSeg + int64(j)
				if sec >= from && v != lut.Unallocated {
					if rep.FirstDropped < 0 {
						rep.FirstDropped = sec
					}
					rep.DroppedSectors++
				}
			}
		}
		return nil
	}
	// split: look for non-zero bytes.
	buf := make([]byte, 1<<20)
	for off := newSize; off < p.Size; {
		i := off / p.Split
		in := off % p.Split
		c := min(int64(len(buf)), p.Split-in, p.Size-off)
		if err := readPadded(fsys, format.SegmentName(path, int(i)), buf[:c], in); err != nil {
			return err
		}
		for s := int64(0); s < c; s += ss {
			if !isZero(buf[s:min(s+ss, c)]) {
				if rep.FirstDropped < 0 {
					rep.FirstDropped = (off + s) / ss
				}
				rep.DroppedSectors++
			}
		}
		off += c
		o.report(off-newSize, p.Size-newSize)
	}
	return nil
}

// readPadded reads p at off of the named file; bytes past its end read as
// zeros.
func readPadded(fsys vfs.FS, name string, p []byte, off int64) error {
	f, err := fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := f.ReadAt(p, off)
	if n < len(p) {
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read %s at offset %d: %w", name, off, err)
		}
		clear(p[n:])
	}
	return nil
}

// resizeRaw resizes a plain raw image file.
func resizeRaw(fsys vfs.FS, path string, cur, newSize int64, o *ResizeOptions) (*ResizeReport, error) {
	rep := &ResizeReport{Image: path, OldSize: cur, NewSize: newSize, FirstDropped: -1}
	if newSize <= 0 {
		return nil, fmt.Errorf("%w: size %d must be positive", ErrInvalid, newSize)
	}
	if newSize < cur {
		if !o.AllowShrink {
			return nil, fmt.Errorf("%w: %s: new size %d is smaller than %d; shrinking needs --shrink", ErrInvalid, path, newSize, cur)
		}
		p := format.Params{Layout: format.LayoutSplit, Size: cur, Split: cur, SectorSize: 512}
		if err := findDataPastEndRaw(fsys, path, p, newSize, rep, o); err != nil {
			return nil, err
		}
		if rep.FirstDropped >= 0 && !o.Force {
			return nil, fmt.Errorf("%w: %s: sector %d (offset %d) and %d more sector(s) past the new end %d hold data; use --force to drop them",
				ErrDataPastEnd, path, rep.FirstDropped, rep.FirstDropped*512, rep.DroppedSectors-1, newSize)
		}
	}
	if newSize == cur {
		return rep, nil
	}
	return rep, format.TruncateFile(fsys, path, newSize, false)
}

// findDataPastEndRaw is findDataPastEnd for one plain file.
func findDataPastEndRaw(fsys vfs.FS, path string, p format.Params, newSize int64, rep *ResizeReport, o *ResizeOptions) error {
	buf := make([]byte, 1<<20)
	for off := newSize; off < p.Size; {
		c := min(int64(len(buf)), p.Size-off)
		if err := readPadded(fsys, path, buf[:c], off); err != nil {
			return err
		}
		for s := int64(0); s < c; {
			e := min((off+s)/512*512+512-off, c)
			if !isZero(buf[s:e]) {
				if rep.FirstDropped < 0 {
					rep.FirstDropped = (off + s) / 512
				}
				rep.DroppedSectors++
			}
			s = e
		}
		off += c
		o.report(off-newSize, p.Size-newSize)
	}
	return nil
}
