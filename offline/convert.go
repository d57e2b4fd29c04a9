package offline

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"sync"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
	"golang.org/x/sys/unix"
)

// convertChunk is the unit of a convert's reads.
const convertChunk = 1 << 20

// rawUnit is the share of a raw or split destination one worker copies.
const rawUnit = 64 << 20

// ConvertOptions tune Convert.
type ConvertOptions struct {
	// FS is the file system of both images; nil means the operating
	// system's.
	FS vfs.FS
	// Layout of the destination; "" means sparse.
	Layout format.Layout
	// Split and SectorSize of the destination; 0 takes the source's (or
	// the defaults for a raw source).
	Split, SectorSize int64
	// LUT is a sparse destination's LUT kind; "" takes a sparse source's,
	// else the default (lut.Xhyve).
	LUT lut.Kind
	// Overwrite allows replacing an existing destination.
	Overwrite bool
	// Workers is the number of parallel copiers; 0 means GOMAXPROCS.
	Workers int
	// Progress, if not nil, is called (from one goroutine at a time) with
	// the bytes of the disk done so far and the total.
	Progress func(done, total int64)
}

// ConvertReport tells what Convert did.
type ConvertReport struct {
	Src    string        `json:"src"`
	Dst    string        `json:"dst"`
	Params format.Params `json:"params"`
	// DataBytes counts the bytes written: non-zero sectors at the
	// destination's sector size.
	DataBytes int64 `json:"data_bytes"`
}

// Convert copies the disk at src (raw, split or sparse) into a new image at
// dst in any layout. Sectors that are all zeros at the destination's
// sector size are not written: a sparse destination does not allocate
// them, split and raw destinations keep holes. The destination is built
// under a hidden temporary name beside dst (.NAME.converting), flushed,
// and renamed into place with the descriptor last, so an interrupted
// convert never leaves an image at dst that looks whole. dst must not
// exist unless Overwrite.
func Convert(src, dst string, o *ConvertOptions) (*ConvertReport, error) {
	if o == nil {
		o = &ConvertOptions{}
	}
	fsys := o.FS
	if fsys == nil {
		fsys = vfs.OS{}
	}
	if filepath.Clean(src) == filepath.Clean(dst) {
		return nil, fmt.Errorf("%w: source and destination are the same file %s", ErrInvalid, src)
	}
	if format.PartOf(dst, src) || format.PartOf(src, dst) {
		return nil, fmt.Errorf("%w: %s and %s are files of the same image (its segments are NAME.0000…, its LUT NAME.lut)", ErrInvalid, src, dst)
	}
	in, err := blockif.Open(src, &blockif.Options{FS: fsys, ReadOnly: true})
	if err != nil {
		return nil, fmt.Errorf("open source: %w", err)
	}
	defer in.Close()
	p, err := convertParams(in, o)
	if err != nil {
		return nil, err
	}
	if !o.Overwrite {
		for _, name := range []string{dst, dst + lut.Suffix, format.SegmentName(dst, 0)} {
			if _, err := fsys.Stat(name); err == nil {
				return nil, fmt.Errorf("%w: %s (use --overwrite to replace it)", blockif.ErrExist, name)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return nil, err
			}
		}
	}
	// Replacing an existing dst: lock it like any writer would, so an
	// image or file that a server or another tool has open is refused
	// rather than swapped under it, and remember whether it is a
	// sparsedisk image (whose segment and LUT files go with it) or a
	// plain file (only dst itself goes; files that merely share its name
	// as a prefix are not ours to delete).
	oldImage := false
	if fi, err := fsys.Stat(dst); err == nil {
		l, err := format.LockImage(fsys, dst, true)
		if err != nil {
			return nil, fmt.Errorf("replace %s: %w", dst, err)
		}
		defer l.Close()
		if fi.Size() <= format.MaxDescriptorSize {
			if _, err := format.ReadDescriptor(fsys, dst); err == nil {
				oldImage = true
			}
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	tmp := format.ConvertingName(dst)
	if err := removeImageFiles(fsys, tmp); err != nil {
		return nil, err
	}
	ok := false
	defer func() {
		if !ok {
			removeImageFiles(fsys, tmp)
		}
	}()
	if err := blockif.Create(tmp, p, &blockif.Options{FS: fsys}); err != nil {
		return nil, err
	}
	out, err := blockif.Open(tmp, &blockif.Options{FS: fsys})
	if err != nil {
		return nil, err
	}
	rep := &ConvertReport{Src: src, Dst: dst, Params: p}
	err = copyDisk(in, out, p, o, rep)
	if cerr := out.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := installImage(fsys, tmp, dst, p, oldImage); err != nil {
		return nil, err
	}
	ok = true
	return rep, nil
}

// convertParams works out the destination geometry.
func convertParams(in *blockif.Disk, o *ConvertOptions) (format.Params, error) {
	sp := in.Params()
	p := format.Params{Layout: o.Layout, Size: sp.Size, Split: o.Split, SectorSize: o.SectorSize}
	if p.Layout == "" {
		p.Layout = format.LayoutSparse
	}
	if p.SectorSize == 0 {
		switch {
		case sp.Layout != format.LayoutRaw:
			p.SectorSize = sp.SectorSize
		case p.Layout == format.LayoutRaw || p.Size%format.DefaultSectorSize != 0:
			p.SectorSize = 512
		default:
			p.SectorSize = format.DefaultSectorSize
		}
	}
	if p.Layout == format.LayoutSparse {
		p.LUT = o.LUT
		if p.LUT == "" && sp.Layout == format.LayoutSparse {
			p.LUT = sp.LUT
		}
		if p.LUT == lut.Xhyve {
			p.LUT = ""
		}
	} else if o.LUT != "" {
		return p, fmt.Errorf("%w: lut=%s: only a sparse destination has a LUT", ErrInvalid, o.LUT)
	}
	if p.Layout == format.LayoutRaw {
		p.Split = 0
	} else if p.Split == 0 {
		if sp.Layout != format.LayoutRaw && sp.Split%p.SectorSize == 0 {
			p.Split = sp.Split
		} else {
			p.Split = format.DefaultSplit
		}
		if p.Split > p.Size {
			p.Split = (p.Size + p.SectorSize - 1) / p.SectorSize * p.SectorSize
		}
	}
	if err := p.Validate(); err != nil {
		if sp.Layout == format.LayoutRaw && p.Size%p.SectorSize != 0 {
			// Every layout but raw needs whole sectors; say how to get them.
			up := (p.Size + p.SectorSize - 1) / p.SectorSize * p.SectorSize
			return p, fmt.Errorf("destination: %w; the source is %d bytes, not a whole number of %d-byte sectors: "+
				"pad it first with `truncate -s %d %s` (the %d bytes added read as zeros)",
				err, p.Size, p.SectorSize, up, in.Path(), up-p.Size)
		}
		return p, fmt.Errorf("destination: %w", err)
	}
	return p, nil
}

// copyDisk copies every non-zero sector of in to out. A sparse
// destination's segments are each copied in logical order by one worker,
// so slots come out in logical order (no fragmentation).
func copyDisk(in, out *blockif.Disk, p format.Params, o *ConvertOptions, rep *ConvertReport) error {
	size := p.Size
	unit := int64(rawUnit)
	if p.Layout == format.LayoutSparse {
		unit = p.Split
	}
	type job struct{ off, n int64 }
	jobs := make(chan job)
	workers := o.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	var (
		mu       sync.Mutex
		firstErr error
		done     int64
	)
	fail := func(err error) {
		mu.Lock()
		if firstErr == nil {
			firstErr = err
		}
		mu.Unlock()
	}
	failed := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return firstErr != nil
	}
	progress := func(n, data int64) {
		mu.Lock()
		done += n
		rep.DataBytes += data
		if o.Progress != nil {
			o.Progress(done, size)
		}
		mu.Unlock()
	}
	var holes *holeFinder
	if _, isOS := o.FS.(vfs.OS); (o.FS == nil || isOS) && in.Params().Layout != format.LayoutSparse {
		holes = newHoleFinder(in)
		defer holes.close()
	}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, convertChunk)
			for j := range jobs {
				if failed() {
					continue
				}
				if err := copyRange(in, out, holes, p.SectorSize, buf, j.off, j.n, progress); err != nil {
					fail(err)
				}
			}
		}()
	}
	for off := int64(0); off < size; off += unit {
		jobs <- job{off, min(unit, size-off)}
	}
	close(jobs)
	wg.Wait()
	return firstErr
}

// copyRange copies [off, off+n) in chunks, skipping the source's holes and
// the destination sectors that are all zeros.
func copyRange(in, out *blockif.Disk, holes *holeFinder, ss int64, buf []byte, off, n int64, progress func(n, data int64)) error {
	sparseIn := in.Params().Layout == format.LayoutSparse
	for pos := off; pos < off+n; {
		c := min(int64(len(buf)), off+n-pos)
		chunk := buf[:c]
		var exts []blockif.Extent
		if sparseIn {
			var err error
			if exts, err = in.Extents(pos, c); err != nil {
				return fmt.Errorf("source extents at offset %d: %w", pos, err)
			}
		} else if holes != nil {
			exts = holes.extents(pos, c)
		} else {
			exts = []blockif.Extent{{Offset: pos, Length: c, Allocated: true}}
		}
		if len(exts) == 1 && !exts[0].Allocated {
			// Nothing to read or write: a huge, mostly empty source is
			// walked at the cost of its extents, not of its size.
			progress(c, 0)
			pos += c
			continue
		}
		for _, e := range exts {
			b := chunk[e.Offset-pos : e.Offset-pos+e.Length]
			if !e.Allocated {
				clear(b)
				continue
			}
			if _, err := in.ReadAt(b, e.Offset); err != nil {
				return fmt.Errorf("read source at offset %d: %w", e.Offset, err)
			}
		}
		// Write runs of destination sectors holding non-zero bytes (chunks
		// start on a sector boundary; the disk's last one may end short).
		var data int64
		for s := int64(0); s < c; {
			se := min(s+ss, c)
			if isZero(chunk[s:se]) {
				s = se
				continue
			}
			r := se
			for r < c && !isZero(chunk[r:min(r+ss, c)]) {
				r = min(r+ss, c)
			}
			if _, err := out.WriteAt(chunk[s:r], pos+s); err != nil {
				return fmt.Errorf("write destination at offset %d: %w", pos+s, err)
			}
			data += r - s
			s = r
		}
		progress(c, data)
		pos += c
	}
	return nil
}

// removeImageFiles removes an image's descriptor, LUT and every segment
// file (missing ones are fine).
func removeImageFiles(fsys vfs.FS, path string) error {
	names := []string{path, format.LUTName(path), format.TempName(path)}
	for _, name := range names {
		if _, err := format.RemoveIfExists(fsys, name); err != nil {
			return err
		}
	}
	for i := 0; ; i++ {
		r, err := format.RemoveIfExists(fsys, format.SegmentName(path, i))
		if err != nil {
			return err
		}
		if !r {
			break
		}
	}
	return format.SyncDirOf(fsys, path)
}

// installImage renames the finished image tmp to dst: an existing dst is
// removed descriptor first (so it never looks whole with mixed files),
// with its segments and LUT if oldImage, and the new descriptor is renamed
// last.
func installImage(fsys vfs.FS, tmp, dst string, p format.Params, oldImage bool) error {
	remove := removeImageFiles
	if !oldImage {
		remove = func(fsys vfs.FS, name string) error {
			_, err := format.RemoveIfExists(fsys, name)
			return err
		}
	}
	if err := remove(fsys, dst); err != nil {
		return fmt.Errorf("remove old %s: %w", dst, err)
	}
	if p.Layout != format.LayoutRaw {
		for i := 0; i < p.Segments(); i++ {
			if err := fsys.Rename(format.SegmentName(tmp, i), format.SegmentName(dst, i)); err != nil {
				return fmt.Errorf("rename segment %d into place: %w", i, err)
			}
		}
		if p.Layout == format.LayoutSparse {
			if err := fsys.Rename(tmp+lut.Suffix, dst+lut.Suffix); err != nil {
				return fmt.Errorf("rename LUT into place: %w", err)
			}
		}
		if err := format.SyncDirOf(fsys, dst); err != nil {
			return err
		}
	}
	if err := fsys.Rename(tmp, dst); err != nil {
		return fmt.Errorf("rename %s into place: %w", dst, err)
	}
	return format.SyncDirOf(fsys, dst)
}

// holeFinder finds the data regions of a raw or split source on the
// operating system's file system with lseek(SEEK_DATA/SEEK_HOLE), so a
// convert never reads the source's holes (as qemu-img does not). Any
// failure makes it report the range as data: it only ever saves work.
type holeFinder struct {
	split int64
	files []*os.File // per segment; nil if it could not be opened
}

func newHoleFinder(in *blockif.Disk) *holeFinder {
	p := in.Params()
	h := &holeFinder{split: p.Split}
	for i := 0; i < p.Segments(); i++ {
		name := in.Path()
		if p.Layout != format.LayoutRaw {
			name = format.SegmentName(in.Path(), i)
		}
		f, err := os.Open(name)
		if err != nil {
			f = nil
		}
		h.files = append(h.files, f)
	}
	return h
}

func (h *holeFinder) close() {
	for _, f := range h.files {
		if f != nil {
			f.Close()
		}
	}
}

// extents describes [pos, pos+n) of the disk as data and hole runs that
// cover it exactly, in order.
func (h *holeFinder) extents(pos, n int64) []blockif.Extent {
	var out []blockif.Extent
	add := func(o, l int64, a bool) {
		if l <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].Allocated == a && out[k].Offset+out[k].Length == o {
			out[k].Length += l
			return
		}
		out = append(out, blockif.Extent{Offset: o, Length: l, Allocated: a})
	}
	end := pos + n
	for pos < end {
		i := pos / h.split
		segEnd := min(end, (i+1)*h.split)
		base := i * h.split
		var f *os.File
		if int(i) < len(h.files) {
			f = h.files[i]
		}
		if f == nil {
			add(pos, segEnd-pos, true)
			pos = segEnd
			continue
		}
		fd := int(f.Fd())
		for pos < segEnd {
			d, err := unix.Seek(fd, pos-base, unix.SEEK_DATA)
			if err != nil { // ENXIO: no data from here to the end of the file
				if err == unix.ENXIO {
					add(pos, segEnd-pos, false)
				} else {
					add(pos, segEnd-pos, true)
				}
				pos = segEnd
				break
			}
			d += base
			if d >= segEnd {
				add(pos, segEnd-pos, false)
				pos = segEnd
				break
			}
			add(pos, d-pos, false)
			e, err := unix.Seek(fd, d-base, unix.SEEK_HOLE)
			if err != nil {
				add(d, segEnd-d, true)
				pos = segEnd
				break
			}
			e = min(e+base, segEnd)
			add(d, e-d, true)
			pos = e
		}
	}
	return out
}
