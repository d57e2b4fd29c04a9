package blockif

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/segment"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// Options tune Open, Create and Check.
type Options struct {
	// ReadOnly opens the image for reading only, under a shared lock.
	ReadOnly bool
	// Sync makes every write, trim and zeroing durable before it returns
	// (xhyve's behaviour; NBD FUA on every write).
	Sync bool
	// FS is the file system; nil means the operating system's.
	FS vfs.FS
	// Logger receives warnings (dirty image checked on open, leaks); nil
	// discards them.
	Logger *slog.Logger
	// NoDirtyCheck skips the automatic check of an image whose descriptor
	// says state = dirty (offline repair tools open such images on purpose).
	NoDirtyCheck bool
	// ForceShare, with ReadOnly, opens the image without taking its lock,
	// beside a process that has it open for writing (qemu-img's
	// --force-share): nothing is written, but what is read may be
	// inconsistent, as the writer changes the files meanwhile. Check
	// honours it too.
	ForceShare bool
	// Compact starts the background compactor of a writable sparse image
	// (see the package documentation, "Online compaction"): it moves slots
	// from the tail of each segment file into reusable holes and truncates
	// the file. Experimental and off everywhere by default: the SIGKILL
	// harness still finds lost flushed writes with it (FORMAT.md 7.8);
	// serve and mount start it only with the hidden --experimental-compact.
	Compact bool
	// ReuseSlots hands freed slots out again (FORMAT.md 7.8) instead of
	// appending every new slot. Experimental and off by default: the
	// SIGKILL harness (SPARSEDISK_KILL_REUSE=1 go test -run
	// TestKillCrashNBD ./cmd/sparsedisk/) still finds flushed writes
	// reading back as zeros with it. Compact implies it.
	ReuseSlots bool
	// CompactInterval is how often the compactor looks at the segments
	// when nothing wakes it earlier (a Flush that made slots reusable
	// does); 0 means one second.
	CompactInterval time.Duration
	// Progress, if not nil, is called by Check (only) as
	// they walk a sparse image: with the bytes of the virtual disk checked
	// so far and the disk size, ending with done == total.
	Progress func(done, total int64)
}

func (o *Options) fs() vfs.FS {
	if o == nil || o.FS == nil {
		return vfs.OS{}
	}
	return o.FS
}

func (o *Options) logger() *slog.Logger {
	if o == nil || o.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return o.Logger
}

// Disk is an open image. It is safe for concurrent use: any number of
// goroutines may call its methods at once.
type Disk struct {
	path     string
	fs       vfs.FS
	desc     format.Descriptor
	readOnly bool
	sync     bool
	reuse    bool // Options.ReuseSlots or Options.Compact
	log      *slog.Logger
	lock     *format.ImageLock // on the descriptor (or raw file); moves with rewrites

	segs []*segState // one per segment (sparse, split); raw: one
	lut  *lut.Table  // sparse layout only

	// ranges serialises writers (WriteAt, Trim, WriteZeroes) whose sector
	// ranges overlap, so read-modify-write of partial sectors and slot
	// allocation never race. Readers do not take it.
	ranges rangeLock

	// flushMu serialises Flush, so that a Flush that returns covers every
	// write completed before it started even while another Flush runs.
	// It is held across the fsyncs on purpose.
	flushMu sync.Mutex

	// closeMu is read-held by every operation for its duration (across its
	// I/O, on purpose) and write-held by Close, so Close waits for in-flight
	// requests and later calls fail with ErrClosed.
	closeMu sync.RWMutex
	closed  bool // protected by closeMu

	writes atomic.Int64 // mutating calls, for Stats

	// lutSynced makes the first LUT load of a writer fdatasync the LUT
	// file once (see loadTable); lutSyncErr is its result.
	lutSynced  sync.Once
	lutSyncErr error

	compactor *compactor // nil unless Options.Compact
}

// segState is the engine's state of one segment: its file and its part of
// the LUT.
type segState struct {
	*segment.File
	sectors int64 // sectors of the disk in this segment

	// mu protects part (the pointer and its entries), err, probed and
	// empty. It is held across the one-time LUT load of the segment, on
	// purpose: every user needs it.
	mu   sync.RWMutex
	part *lut.Part // sparse: nil until loaded
	err  error     // sparse: load error, reported on every access
	// probed and empty summarise the on-disk LUT of a segment whose part
	// is not loaded: once probed, empty tells whether it has no allocated
	// entry, so Extents answers "hole" without loading the part. Only
	// meaningful while part is nil: nothing changes the LUT of a segment
	// without loading its part first.
	probed, empty bool

	// slotState is the slot bookkeeping of a writable sparse segment
	// (reuse.go); mu protects it, except the atomic reader counts.
	slotState
}

// Create makes a new, empty image. It refuses to overwrite anything: the
// descriptor, any segment file or the LUT already present is ErrExist.
// The descriptor is written last, so an interrupted Create leaves no image.
func Create(path string, p format.Params, o *Options) error {
	fsys := o.fs()
	if p.Layout == "" {
		p.Layout = format.LayoutSparse
	}
	if p.SectorSize == 0 {
		p.SectorSize = format.DefaultSectorSize
		if p.Layout == format.LayoutRaw {
			p.SectorSize = 512
		}
	}
	if p.Split == 0 && p.Layout != format.LayoutRaw {
		p.Split = min(format.DefaultSplit, p.Size)
	}
	if p.LUT == lut.Xhyve {
		p.LUT = "" // the default: the descriptor names no kind
	}
	if err := p.Validate(); err != nil {
		return err
	}
	exists := func(name string) error {
		if _, err := fsys.Stat(name); err == nil {
			return fmt.Errorf("%w: %s", ErrExist, name)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	if err := exists(path); err != nil {
		return err
	}
	if p.Layout == format.LayoutRaw {
		f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("create %s: %w", path, err)
		}
		if err := f.Truncate(p.Size); err != nil {
			f.Close()
			return fmt.Errorf("size %s: %w", path, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("sync %s: %w", path, err)
		}
		return f.Close()
	}
	if err := exists(path + lut.Suffix); err != nil {
		return err
	}
	for i := 0; i < p.Segments(); i++ {
		if err := exists(format.SegmentName(path, i)); err != nil {
			return err
		}
	}
	if p.Layout == format.LayoutSparse && p.LUTKind() == lut.Xhyve { // a thin LUT starts as a hole
		if err := format.CheckRoom(fsys, path, p.Sectors()*lut.EntrySize, "the LUT"); err != nil {
			return err
		}
	}
	// A create that fails part-way (disk full, a file size limit) removes
	// what it made, so that retrying is not refused as "already exists".
	created, ok := 0, false
	defer func() {
		if ok {
			return
		}
		for i := 0; i < created; i++ {
			fsys.Remove(format.SegmentName(path, i))
		}
		if p.Layout == format.LayoutSparse {
			fsys.Remove(path + lut.Suffix)
		}
		fsys.Remove(path)
	}()
	for i := 0; i < p.Segments(); i++ {
		name := format.SegmentName(path, i)
		f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return fmt.Errorf("create segment: %w", err)
		}
		created++
		if p.Layout == format.LayoutSplit {
			if err := f.Truncate(min(p.Split, p.Size-int64(i)*p.Split)); err != nil {
				f.Close()
				return fmt.Errorf("size segment %s: %w", name, err)
			}
			err = f.Sync()
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("create segment %s: %w", name, err)
		}
	}
	if p.Layout == format.LayoutSparse {
		if err := lut.Create(fsys, path+lut.Suffix, p.Sectors(), p.LUTKind()); err != nil {
			return err
		}
	}
	if err := format.WriteDescriptor(fsys, path, format.Descriptor{Params: p, State: format.StateClean}); err != nil {
		return err
	}
	ok = true
	return nil
}

// Open opens an image: a sparsedisk descriptor (sparse or split layout) or
// any other regular file as a raw image. Writers take an exclusive lock
// (ErrInUse if it is taken), readers a shared one. An image whose
// descriptor says state = dirty is checked first; corruption refuses a
// writable open.
func Open(path string, o *Options) (*Disk, error) {
	fsys := o.fs()
	d := &Disk{path: path, fs: fsys, log: o.logger()}
	if o != nil {
		d.readOnly, d.sync = o.ReadOnly, o.Sync
	}
	fi, err := fsys.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			if _, serr := fsys.Stat(format.SegmentName(path, 0)); serr == nil {
				return nil, fmt.Errorf("%w: %s", ErrNotAdopted, path)
			}
		}
		return nil, fmt.Errorf("open image: %w", err)
	}
	isDesc, err := format.IsDescriptor(fsys, path, fi.Size())
	if err != nil {
		return nil, fmt.Errorf("open image %s: %w", path, err)
	}
	if o != nil && o.ForceShare && !d.readOnly {
		return nil, fmt.Errorf("%w: ForceShare needs ReadOnly", ErrInvalid)
	}
	if o == nil || !o.ForceShare {
		if d.lock, err = format.LockImage(fsys, path, !d.readOnly); err != nil {
			return nil, err
		}
	}
	if err := d.open(isDesc, fi.Size(), o); err != nil {
		d.closeFiles()
		if d.lock != nil {
			d.lock.Close()
		}
		return nil, err
	}
	d.reuse = o != nil && (o.ReuseSlots || o.Compact)
	if o != nil && o.Compact && !d.readOnly && d.desc.Layout == format.LayoutSparse {
		d.compactor = startCompactor(d, o.CompactInterval)
	}
	return d, nil
}

// setDescriptor rewrites the open image's descriptor, moving the lock to
// the new file.
func (d *Disk) setDescriptor(desc format.Descriptor) error {
	if err := d.lock.Write(desc); err != nil {
		return err
	}
	d.desc = desc
	return nil
}

func (d *Disk) open(isDesc bool, fileSize int64, o *Options) error {
	if !isDesc {
		d.desc = format.Descriptor{Params: format.Params{Layout: format.LayoutRaw, Size: fileSize, Split: fileSize, SectorSize: 512}, State: format.StateClean}
		if fileSize == 0 {
			return fmt.Errorf("%w: %s is empty", ErrInvalid, d.path)
		}
		d.segs = []*segState{{File: segment.New(d.fs, d.path, 0, 512, d.readOnly), sectors: (fileSize + 511) / 512}}
		return nil
	}
	desc, err := format.ReadDescriptor(d.fs, d.path)
	if err != nil {
		return err
	}
	if desc.Intent != "" && !(o != nil && o.NoDirtyCheck) && !d.readOnly {
		// An interrupted offline tool (shrink, resize): finish or roll it
		// back under our exclusive lock, before looking at the files.
		if err := format.FinishIntent(d.fs, d.path, desc, d.setDescriptor); err != nil {
			return err
		}
		desc.Intent = ""
	}
	d.desc = desc
	p := desc.Params
	if p.Layout == format.LayoutSplit {
		// A LUT beside a split descriptor: the image is sparse and
		// serving it as split would return slot order, not the disk.
		if _, err := d.fs.Stat(format.LUTName(d.path)); err == nil {
			return fmt.Errorf("%w: %s says layout = split but the LUT %s exists: the image is sparse; run `sparsedisk check %s`",
				ErrGeometry, d.path, format.LUTName(d.path), d.path)
		}
	}
	nseg := p.Segments()
	d.segs = make([]*segState, nseg)
	for i := range d.segs {
		name := format.SegmentName(d.path, i)
		fi, err := d.fs.Stat(name)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%w: segment file %s is missing (image %s has %d segments)", ErrCorrupt, name, d.path, nseg)
			}
			return fmt.Errorf("stat segment: %w", err)
		}
		if p.Layout == format.LayoutSplit {
			if want := min(p.Split, p.Size-int64(i)*p.Split); fi.Size() > want {
				return fmt.Errorf("%w: segment file %s is %d bytes, longer than its %d", ErrCorrupt, name, fi.Size(), want)
			}
		}
		d.segs[i] = &segState{
			File:    segment.New(d.fs, name, i, p.SectorSize, d.readOnly),
			sectors: min(p.Split, p.Size-int64(i)*p.Split) / p.SectorSize,
		}
	}
	if p.Layout == format.LayoutSparse {
		d.lut, err = lut.Open(d.fs, d.path+lut.Suffix, p.LUTKind(), p.Sectors(), p.Sectors(), p.Split/p.SectorSize, d.readOnly)
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("%w: LUT %s is missing: %w", ErrCorrupt, d.path+lut.Suffix, err)
			}
			if errors.Is(err, lut.ErrTruncated) {
				return fmt.Errorf("%w: %w", ErrCorrupt, err)
			}
			return err
		}
	}
	if desc.Intent != "" && !(o != nil && o.NoDirtyCheck) {
		return fmt.Errorf("%w: %s has an unfinished offline operation (%s); run `sparsedisk check -r all %s` or repeat the operation", ErrInvalid, d.path, desc.Intent, d.path)
	}
	if desc.State == format.StateDirty && !(o != nil && o.NoDirtyCheck) {
		rep, err := d.check(nil)
		if err != nil {
			return fmt.Errorf("check of dirty image %s: %w", d.path, err)
		}
		d.log.Warn("image was not closed cleanly; checked it", "image", d.path, "corruptions", rep.Corruptions, "leaked_slots", rep.LeakedSlots)
		if rep.Corruptions > 0 && !d.readOnly {
			return fmt.Errorf("%w: %s was not closed cleanly and check found %d corruption(s), first: %s; run `sparsedisk check -r all %s`",
				ErrCorrupt, d.path, rep.Corruptions, rep.firstCorruption(), d.path)
		}
	}
	if !d.readOnly {
		dd := d.desc
		dd.State = format.StateDirty
		if err := d.setDescriptor(dd); err != nil {
			return err
		}
	}
	return nil
}

// Path is the image path the Disk was opened with.
func (d *Disk) Path() string { return d.path }

// Size is the virtual disk size in bytes.
func (d *Disk) Size() int64 { return d.desc.Size }

// SectorSize is the image's sector size: the smallest unit of allocation.
func (d *Disk) SectorSize() int64 { return d.desc.SectorSize }

// Params is the image's geometry.
func (d *Disk) Params() format.Params { return d.desc.Params }

// ReadOnly tells whether the Disk was opened read-only.
func (d *Disk) ReadOnly() bool { return d.readOnly }

// enter starts an operation: it fails once the Disk is closed.
func (d *Disk) enter() error {
	d.closeMu.RLock()
	if d.closed {
		d.closeMu.RUnlock()
		return ErrClosed
	}
	return nil
}

func (d *Disk) leave() { d.closeMu.RUnlock() }

// Close flushes, marks the descriptor clean, and releases the lock. It
// waits for in-flight operations. Later calls return ErrClosed.
func (d *Disk) Close() error {
	if d.compactor != nil {
		d.compactor.stop() // before closeMu: it works inside enter/leave
	}
	d.closeMu.Lock()
	defer d.closeMu.Unlock()
	if d.closed {
		return ErrClosed
	}
	d.closed = true
	var err error
	if !d.readOnly {
		err = d.flush()
		if err == nil && d.desc.Layout != format.LayoutRaw {
			dd := d.desc
			dd.State = format.StateClean
			err = d.setDescriptor(dd)
		}
	}
	if cerr := d.closeFiles(); err == nil {
		err = cerr
	}
	if d.lock != nil {
		if lerr := d.lock.Close(); err == nil {
			err = lerr
		}
	}
	return err
}

func (d *Disk) closeFiles() error {
	var err error
	for _, s := range d.segs {
		if s != nil {
			if cerr := s.Close(); err == nil {
				err = cerr
			}
		}
	}
	if d.lut != nil {
		if cerr := d.lut.Close(); err == nil {
			err = cerr
		}
	}
	return err
}
