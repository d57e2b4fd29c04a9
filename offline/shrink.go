package offline

import (
	"fmt"
	"os"
	"slices"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// shrinkChunk is the unit of reads and writes while compacting.
const shrinkChunk = 1 << 20

// ShrinkOptions tune Shrink.
type ShrinkOptions struct {
	// FS is the file system; nil means the operating system's.
	FS vfs.FS
	// DryRun computes what a shrink would reclaim without writing.
	DryRun bool
	// Progress, if not nil, is called with the bytes of live data
	// processed so far and the total.
	Progress func(done, total int64)
}

// ShrinkReport tells what Shrink did (or would do, in a dry run).
type ShrinkReport struct {
	Image  string `json:"image"`
	DryRun bool   `json:"dry_run"`
	// Segments is the number of segments; Compacted how many were
	// rewritten (the others were already compact).
	Segments  int `json:"segments"`
	Compacted int `json:"compacted"`
	// LiveBytes is the data kept: non-zero allocated sectors × sector size.
	LiveBytes int64 `json:"live_bytes"`
	// ZeroSectors counts allocated sectors holding only zeros, dropped.
	ZeroSectors int64 `json:"zero_sectors"`
	// OrphanSlots counts slots no LUT entry referenced (leaked, trimmed or
	// partial), dropped.
	OrphanSlots int64 `json:"orphan_slots"`
	// BytesBefore and BytesAfter are the bytes the segment files and the
	// LUT occupy on their device (after: estimated in a dry run).
	BytesBefore int64 `json:"bytes_before"`
	BytesAfter  int64 `json:"bytes_after"`
}

// Shrink compacts every segment of a sparse image: live slots are rewritten
// in logical sector order (which undoes fragmentation), slots no entry
// references and all-zero sectors are dropped, and files are truncated.
//
// It is crash-safe at every step. The descriptor's intent = shrink marks the
// operation; each segment is compacted into P.%04d.shrink (fsynced), its new
// LUT entries are written to a journal (fsynced: the commit point of that
// segment), then the copy is renamed over the segment and the entries are
// written to the LUT. An interrupted shrink is finished (committed segment)
// or rolled back (uncommitted one) by the next Open for writing or Shrink;
// at no instant does a recovered image read differently. Temporary space is
// at most one segment.
func Shrink(path string, o *ShrinkOptions) (*ShrinkReport, error) {
	if o == nil {
		o = &ShrinkOptions{}
	}
	fsys := o.FS
	if fsys == nil {
		fsys = vfs.OS{}
	}
	if _, err := fsys.Stat(path); err != nil {
		return nil, fmt.Errorf("shrink: %w", err)
	}
	lock, err := format.LockImage(fsys, path, !o.DryRun)
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	desc, err := format.ReadDescriptor(fsys, path)
	if err != nil {
		return nil, err
	}
	if desc.Intent != "" {
		if o.DryRun {
			return nil, fmt.Errorf("%w: %s: intent %q pending; run shrink without --dry-run to finish it", ErrIntent, path, desc.Intent)
		}
		if err := format.FinishIntent(fsys, path, desc, lock.Write); err != nil {
			return nil, err
		}
		desc.Intent = ""
	}
	if desc.Layout != format.LayoutSparse {
		return nil, fmt.Errorf("%w: %s has layout %s; only sparse images can be shrunk (convert it to sparse)", ErrInvalid, path, desc.Layout)
	}
	sh := &shrinker{fsys: fsys, path: path, p: desc.Params, o: o,
		rep: &ShrinkReport{Image: path, DryRun: o.DryRun, Segments: desc.Segments()}}
	flag := os.O_RDWR
	if o.DryRun {
		flag = os.O_RDONLY
	}
	sh.lut, err = fsys.OpenFile(path+lut.Suffix, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open LUT: %w", ErrCorrupt, err)
	}
	defer sh.lut.Close()
	if n, err := sh.lut.Size(); err != nil {
		return nil, err
	} else if n < desc.Sectors()*lut.EntrySize {
		return nil, fmt.Errorf("%w: LUT %s is %d bytes, want %d; run `sparsedisk check -r all`", ErrCorrupt, path+lut.Suffix, n, desc.Sectors()*lut.EntrySize)
	}
	// Pass 1: validate every segment before changing anything.
	var total int64
	for i := 0; i < desc.Segments(); i++ {
		e, size, err := sh.load(i)
		if err != nil {
			return nil, err
		}
		if err := validateEntries(sh, i, e, size); err != nil {
			return nil, err
		}
		for _, v := range e {
			if v != lut.Unallocated {
				total += desc.SectorSize
			}
		}
	}
	sh.total = total
	if sh.rep.BytesBefore, err = sh.allocated(); err != nil {
		return nil, err
	}
	if !o.DryRun {
		if err := lock.SetIntent(&desc, format.IntentShrink); err != nil {
			return nil, err
		}
	}
	for i := 0; i < desc.Segments(); i++ {
		if err := sh.compact(i); err != nil {
			return nil, err
		}
	}
	if o.DryRun {
		sh.rep.BytesAfter = sh.rep.LiveBytes + desc.Sectors()*lut.EntrySize
		return sh.rep, nil
	}
	desc.Intent, desc.State = "", format.StateClean
	if err := lock.Write(desc); err != nil {
		return nil, err
	}
	if sh.rep.BytesAfter, err = sh.allocated(); err != nil {
		return nil, err
	}
	return sh.rep, nil
}

// shrinker is the state of one Shrink.
type shrinker struct {
	fsys  vfs.FS
	path  string
	p     format.Params
	o     *ShrinkOptions
	lut   vfs.File
	rep   *ShrinkReport
	total int64
	done  int64
}

// load reads segment i's LUT entries and its file's length.
func (sh *shrinker) load(i int) ([]uint32, int64, error) {
	e, err := format.ReadEntries(sh.lut, sh.p, i)
	if err != nil {
		return nil, 0, err
	}
	fi, err := sh.fsys.Stat(format.SegmentName(sh.path, i))
	if err != nil {
		return nil, 0, fmt.Errorf("%w: segment %d: %w", ErrCorrupt, i, err)
	}
	return e, fi.Size(), nil
}

// validateEntries refuses a segment whose entries point past its file or
// share a slot: shrink would propagate the damage. check -r all repairs it.
func validateEntries(sh *shrinker, i int, e []uint32, size int64) error {
	ss := sh.p.SectorSize
	slots := size / ss
	owner := make(map[uint32]int, 1024)
	first := int64(i) * (sh.p.Split / ss)
	for j, v := range e {
		if v == lut.Unallocated {
			continue
		}
		if int64(v) >= slots {
			return fmt.Errorf("%w: segment %d sector %d: LUT entry points at slot %d past the end of %s (%d slots); run `sparsedisk check -r all` first",
				ErrCorrupt, i, first+int64(j), v, format.SegmentName(sh.path, i), slots)
		}
		if o, dup := owner[v]; dup {
			return fmt.Errorf("%w: segment %d sectors %d and %d share slot %d; run `sparsedisk check -r all` first",
				ErrCorrupt, i, first+int64(o), first+int64(j), v)
		}
		owner[v] = j
	}
	return nil
}

// allocated sums the on-device bytes of the segment files and the LUT.
func (sh *shrinker) allocated() (int64, error) {
	var total int64
	names := []string{sh.path + lut.Suffix}
	for i := 0; i < sh.p.Segments(); i++ {
		names = append(names, format.SegmentName(sh.path, i))
	}
	for _, name := range names {
		f, err := sh.fsys.OpenFile(name, os.O_RDONLY, 0)
		if err != nil {
			return 0, err
		}
		a, err := f.Allocated()
		f.Close()
		if err != nil {
			return 0, fmt.Errorf("allocated bytes of %s: %w", name, err)
		}
		total += a
	}
	return total, nil
}

// compact rewrites segment i (see Shrink for the protocol).
func (sh *shrinker) compact(i int) error {
	ss := sh.p.SectorSize
	name := format.SegmentName(sh.path, i)
	tmpName := format.ShrinkCopyName(sh.path, i)
	e, size, err := sh.load(i)
	if err != nil {
		return err
	}
	src, err := sh.fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return fmt.Errorf("open segment %d: %w", i, err)
	}
	defer src.Close()
	var dst vfs.File
	if !sh.o.DryRun {
		dst, err = sh.fsys.OpenFile(tmpName, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return fmt.Errorf("create %s: %w", tmpName, err)
		}
		defer func() {
			if dst != nil {
				dst.Close()
			}
		}()
	}
	newE := make([]uint32, len(e))
	var next int64 // next slot of the compacted file
	var live int64
	out := make([]byte, 0, shrinkChunk)
	var outOff int64
	flushOut := func() error {
		if len(out) == 0 {
			return nil
		}
		if dst != nil {
			if _, err := dst.WriteAt(out, outOff); err != nil {
				return fmt.Errorf("write %s at offset %d: %w", tmpName, outOff, err)
			}
		}
		outOff += int64(len(out))
		out = out[:0]
		return nil
	}
	buf := make([]byte, shrinkChunk)
	maxRun := int64(shrinkChunk) / ss
	for j := 0; j < len(e); {
		if e[j] == lut.Unallocated {
			newE[j] = lut.Unallocated
			j++
			continue
		}
		k := j + 1 // run of sectors whose slots are consecutive
		for k < len(e) && int64(k-j) < maxRun && e[k] != lut.Unallocated && e[k] == e[k-1]+1 {
			k++
		}
		chunk := buf[:int64(k-j)*ss]
		if n, err := src.ReadAt(chunk, int64(e[j])*ss); n != len(chunk) {
			return fmt.Errorf("%w: segment %d sector %d: read slot %d: %w", ErrCorrupt, i, int64(i)*(sh.p.Split/ss)+int64(j), e[j], err)
		}
		for m := j; m < k; m++ {
			sec := chunk[int64(m-j)*ss : int64(m-j+1)*ss]
			if isZero(sec) {
				newE[m] = lut.Unallocated
				sh.rep.ZeroSectors++
				continue
			}
			live++
			newE[m] = uint32(next)
			next++
			out = append(out, sec...)
			if len(out) == cap(out) {
				if err := flushOut(); err != nil {
					return err
				}
			}
		}
		sh.done += int64(k-j) * ss
		if sh.o.Progress != nil {
			sh.o.Progress(sh.done, sh.total)
		}
		j = k
	}
	if err := flushOut(); err != nil {
		return err
	}
	var referenced int64
	for _, v := range e {
		if v != lut.Unallocated {
			referenced++
		}
	}
	sh.rep.OrphanSlots += (size+ss-1)/ss - referenced
	sh.rep.LiveBytes += live * ss
	if slices.Equal(newE, e) && next*ss == size {
		if dst != nil {
			dst.Close()
			dst = nil
			if _, err := format.RemoveIfExists(sh.fsys, tmpName); err != nil {
				return err
			}
		}
		return nil
	}
	sh.rep.Compacted++
	if sh.o.DryRun {
		return nil
	}
	if err := dst.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", tmpName, err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmpName, err)
	}
	dst = nil
	// The copy's name must be durable before a journal can name it.
	if err := format.SyncDirOf(sh.fsys, sh.path); err != nil {
		return err
	}
	// Commit point of this segment: the journal with its new entries.
	if err := format.WriteJournal(sh.fsys, sh.path, i, newE); err != nil {
		return err
	}
	return format.RedoSegment(sh.fsys, sh.path, sh.lut, sh.p, i, newE)
}
