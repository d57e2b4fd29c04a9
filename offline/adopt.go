package offline

import (
	"errors"
	"fmt"
	"io/fs"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
)

// Adopt writes a descriptor for an image made by xhyve, which keeps its
// parameters only on the hypervisor's command line. It first checks them
// against the files: every segment present, the LUT exactly one entry per
// sector, every entry inside its segment file. Nothing is written unless
// all of that holds.
func Adopt(path string, p format.Params, o *blockif.Options) error {
	fsys := fsOf(o)
	if p.Layout == "" {
		p.Layout = format.LayoutSparse
	}
	if p.Layout == format.LayoutRaw {
		return fmt.Errorf("%w: a raw image needs no adoption", ErrInvalid)
	}
	if p.LUTKind() != lut.Xhyve {
		return fmt.Errorf("%w: xhyve images have an xhyve LUT; adopt it as it is, then `sparsedisk convert` it to lut=%s", ErrInvalid, p.LUT)
	}
	if err := p.Validate(); err != nil {
		// xhyve took sizes that are not whole sectors and kept
		// floor(size/sectorsize) entries: name the size the LUT holds.
		if fi, serr := fsys.Stat(path + lut.Suffix); serr == nil && p.SectorSize > 0 && p.Size%p.SectorSize != 0 {
			entries := fi.Size() / lut.EntrySize
			return fmt.Errorf("%w; %s holds %d entries of %d-byte sectors: adopt with size=%d", err, path+lut.Suffix, entries, p.SectorSize, entries*p.SectorSize)
		}
		return err
	}
	if _, err := fsys.Stat(path); err == nil {
		return fmt.Errorf("%w: %s (already has a descriptor)", blockif.ErrExist, path)
	}
	for i := 0; i < p.Segments(); i++ {
		name := format.SegmentName(path, i)
		fi, err := fsys.Stat(name)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%w: segment file %s is missing: size %d with split %d needs %d segments", ErrInvalid, name, p.Size, p.Split, p.Segments())
			}
			return err
		}
		if want := min(p.Split, p.Size-int64(i)*p.Split); p.Layout == format.LayoutSplit && fi.Size() > want {
			return fmt.Errorf("%w: segment file %s is %d bytes, more than split %d allows", ErrInvalid, name, fi.Size(), want)
		}
	}
	if _, err := fsys.Stat(path + lut.Suffix); err == nil && p.Layout == format.LayoutSplit {
		return fmt.Errorf("%w: %s exists, so this is a sparse image: adopt it with layout=sparse (the default)", ErrInvalid, path+lut.Suffix)
	}
	if fi, err := fsys.Stat(format.SegmentName(path, p.Segments())); err == nil && fi.Size() > 0 {
		return fmt.Errorf("%w: segment file %s holds data beyond size %d: is size right?", ErrInvalid, format.SegmentName(path, p.Segments()), p.Size)
	}
	if p.Layout == format.LayoutSparse {
		name := path + lut.Suffix
		fi, err := fsys.Stat(name)
		if err != nil {
			return fmt.Errorf("%w: LUT: %w", ErrInvalid, err)
		}
		if want := p.Sectors() * lut.EntrySize; fi.Size() != want {
			return fmt.Errorf("%w: LUT %s is %d bytes (%d entries), but size %d / sectorsize %d needs %d entries (%d bytes): check size= and sectorsize=",
				ErrInvalid, name, fi.Size(), fi.Size()/lut.EntrySize, p.Size, p.SectorSize, p.Sectors(), want)
		}
		t, err := lut.Open(fsys, name, lut.Xhyve, p.Sectors(), p.Sectors(), p.Split/p.SectorSize, true)
		if err != nil {
			return err
		}
		defer t.Close()
		for i := 0; i < p.Segments(); i++ {
			s, err := t.Load(i)
			if err != nil {
				return err
			}
			fi, err := fsys.Stat(format.SegmentName(path, i))
			if err != nil {
				return err
			}
			slots := fi.Size() / p.SectorSize
			owner := make(map[uint32]int64)
			for j, v := range s.Entries {
				if v == lut.Unallocated {
					continue
				}
				sector := s.First + int64(j)
				if int64(v) >= slots {
					return fmt.Errorf("%w: segment %d sector %d: LUT entry %d is past the end of %s (%d slots): check split= and sectorsize=",
						ErrInvalid, i, sector, v, format.SegmentName(path, i), slots)
				}
				// xhyve gives every sector its own slot; a slot claimed
				// twice within a segment means the entries were cut into
				// segments at the wrong places: split= is wrong.
				if o, dup := owner[v]; dup {
					return fmt.Errorf("%w: sectors %d and %d both map to slot %d of %s: check split= (and sectorsize=)",
						ErrInvalid, o, sector, v, format.SegmentName(path, i))
				}
				owner[v] = sector
			}
		}
	}
	return format.WriteDescriptor(fsys, path, format.Descriptor{Params: p, State: format.StateClean})
}
