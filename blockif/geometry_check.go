package blockif

import (
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
	"os"
	"sort"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/sparsedisk/sparsedisk/format"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// Geometry is the cross-examination of an image's descriptor against its
// files, the first thing Check does and the gate every repair passes: a
// repair that trusted a wrong `split` or `size` line would orphan whole
// segments or cut the LUT, and one that trusted a wrong `layout` would
// serve the wrong bytes.
//
// The facts examined are the ones a wrong descriptor line changes: the
// number of segment files against size/split, the LUT's length against
// size/sectorsize, the presence of a LUT against the layout, a split
// image's segment lengths, and every LUT entry against its segment file's
// length (with split/sectorsize cutting the LUT into segments).
type Geometry struct {
	// Disagreements lists, in words, every fact the descriptor and the
	// files disagree on. Empty: the descriptor is trusted.
	Disagreements []string `json:"disagreements"`
	// Files names, for each disagreement, the file it concerns.
	Files []string `json:"files"`
	// Lossy tells that repairing the image to the descriptor's geometry
	// would unmap or drop data the files hold (as opposed to, say, trimming
	// a LUT tail of unallocated entries).
	Lossy bool `json:"lossy"`
	// Implied is a different geometry under which every fact holds, the
	// one closest to the descriptor, or nil if there is none: then the
	// files, not the descriptor, are damaged.
	Implied *format.Params `json:"implied,omitempty"`
	// Fix tells the user what to do: the descriptor edit (or adopt) that
	// gives the implied geometry, or how to deal with damaged files.
	Fix string `json:"fix,omitempty"`
}

// Trusted tells whether the descriptor agrees with the files.
func (g *Geometry) Trusted() bool { return g == nil || len(g.Disagreements) == 0 }

// Summary is the finding in one line: what disagrees.
func (g *Geometry) Summary() string {
	return "the descriptor disagrees with the files: " + strings.Join(g.Disagreements, "; ")
}

// fixFor is what the user should do about the image at path described by
// desc.
func (g *Geometry) fixFor(path string, desc format.Descriptor) string {
	if g.Implied == nil {
		return fmt.Sprintf("no other geometry explains the files, so they are damaged: restore the files named above from a backup; "+
			"or give up the sectors they held with `sparsedisk check -r all --accept-loss %s` "+
			"(everything it removes is saved first; `sparsedisk check --undo %s` puts it back)", path, path)
	}
	q := *g.Implied
	var edits []string
	if q.Layout != desc.Layout {
		edits = append(edits, fmt.Sprintf("`layout = %s`", q.Layout))
	}
	if q.Size != desc.Size {
		edits = append(edits, fmt.Sprintf("`size = %d`", q.Size))
	}
	if q.Split != desc.Split {
		edits = append(edits, fmt.Sprintf("`split = %d`", q.Split))
	}
	if q.SectorSize != desc.SectorSize {
		edits = append(edits, fmt.Sprintf("`sectorsize = %d`", q.SectorSize))
	}
	return fmt.Sprintf("the files imply layout = %s, size = %s, split = %s, sectorsize = %d: "+
		"if those are the values the image was made with, write %s in %s (a text file), "+
		"or move it aside and run `sparsedisk adopt %s layout=%s size=%d split=%d sectorsize=%d` (adopt verifies them); "+
		"`check -r` does not act on a geometry it cannot trust",
		q.Layout, shortSize(q.Size), shortSize(q.Split), q.SectorSize,
		strings.Join(edits, " and "), path, path, q.Layout, q.Size, q.Split, q.SectorSize)
}

// shortSize prints a byte count with the largest exact k/m/g/t suffix.
func shortSize(n int64) string {
	for _, u := range []struct {
		s string
		v int64
	}{{"T", 1 << 40}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}} {
		if n >= u.v && n%u.v == 0 {
			return fmt.Sprintf("%d%s", n/u.v, u.s)
		}
	}
	return fmt.Sprint(n)
}

// imageFiles are the facts about an image's files that do not depend on
// the geometry.
type imageFiles struct {
	fsys  vfs.FS
	path  string
	segs  []os.FileInfo // P.0000 … up to the first index missing
	stray []format.ExtraSegment
	lut   os.FileInfo // nil: no LUT file
	lutF  vfs.File
	bad   []badFile // files that exist but are no regular files
}

type badFile struct{ name, msg string }

func (f *imageFiles) close() {
	if f.lutF != nil {
		f.lutF.Close()
	}
}

// statFiles gathers the facts. Segments are probed up to the first missing
// index; files after a gap are found through ExtraSegments.
func statFiles(fsys vfs.FS, path string) (*imageFiles, error) {
	f := &imageFiles{fsys: fsys, path: path}
	for i := 0; ; i++ {
		name := format.SegmentName(path, i)
		fi, err := fsys.Stat(name)
		if errors.Is(err, fs.ErrNotExist) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("stat %s: %w", name, err)
		}
		if !fi.Mode().IsRegular() {
			f.bad = append(f.bad, badFile{name, fmt.Sprintf("%s is a %s, not a segment file", name, fileKind(fi))})
		}
		f.segs = append(f.segs, fi)
	}
	f.stray = format.ExtraSegments(fsys, path, len(f.segs)+1)
	name := format.LUTName(path)
	fi, err := fsys.Stat(name)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return nil, fmt.Errorf("stat %s: %w", name, err)
	case !fi.Mode().IsRegular():
		f.bad = append(f.bad, badFile{name, fmt.Sprintf("%s is a %s, not a LUT", name, fileKind(fi))})
	default:
		f.lut = fi
		if f.lutF, err = fsys.OpenFile(name, os.O_RDONLY, 0); err != nil {
			return nil, fmt.Errorf("open LUT: %w", err)
		}
	}
	return f, nil
}

func fileKind(fi os.FileInfo) string {
	if fi.IsDir() {
		return "directory"
	}
	return "special file (" + fi.Mode().Type().String() + ")"
}

// verdict is how well a geometry explains the files.
type verdict struct {
	facts  []string
	files  []string
	lossy  bool
	shared int64 // LUT entries sharing a slot within a segment
}

// explain checks every fact against the geometry q. lenient relaxes the
// facts an unfinished offline operation (intent) legitimately leaves
// wrong until it is finished: files and LUT entries past a smaller size
// (resize), entries of a segment being compacted (shrink).
func (f *imageFiles) explain(q format.Params, intent string, maxShared int64) verdict {
	var v verdict
	add := func(lossy bool, file, format string, args ...any) {
		v.facts = append(v.facts, fmt.Sprintf(format, args...))
		v.files = append(v.files, file)
		v.lossy = v.lossy || lossy
	}
	kind, _, _ := strings.Cut(intent, " ")
	resizing, shrinking := kind == format.IntentResize, kind == format.IntentShrink
	for _, b := range f.bad {
		add(true, b.name, "%s", b.msg)
	}
	nseg := q.Segments()
	ss := q.SectorSize
	perSeg := q.Split / ss
	sparse := q.Layout == format.LayoutSparse
	// Segment files: the run from P.0000, and strays after a gap.
	have := len(f.segs)
	present := map[int]bool{}
	for _, x := range f.stray {
		present[x.Index] = true
	}
	var missing []int
	lossyMissing := false
	for i := have; i < nseg; i++ {
		if present[i] {
			continue
		}
		missing = append(missing, i)
		if !lossyMissing {
			lossyMissing = !sparse || f.lutF == nil || !f.unallocated(q, int64(i)*perSeg, min(int64(i+1)*perSeg, q.Sectors()))
		}
	}
	for k, i := range missing {
		name := format.SegmentName(f.path, i)
		if k == 3 && len(missing) > 4 {
			add(lossyMissing, name, "%d more segment files missing, up to %s", len(missing)-3, format.SegmentName(f.path, missing[len(missing)-1]))
			break
		}
		add(lossyMissing, name, "segment file %s is missing: size %d with split %d needs %d segments, %d exist", name, q.Size, q.Split, nseg, have+len(f.stray))
	}
	if !resizing {
		type extraFile struct {
			name string
			size int64
		}
		var extra []extraFile
		for i, fi := range f.segs {
			if i >= nseg && !(i == nseg && i == have-1 && fi.Size() == 0) { // one trailing empty file is xhyve's habit
				extra = append(extra, extraFile{format.SegmentName(f.path, i), fi.Size()})
			}
		}
		for _, x := range f.stray {
			if x.Index >= nseg {
				extra = append(extra, extraFile{x.Name, x.Size})
			}
		}
		// Not lossy: a repair moves them aside, data kept.
		for k, x := range extra {
			if k == 3 && len(extra) > 4 {
				add(false, x.name, "%d more segment files lie past the %d segments, up to %s", len(extra)-3, nseg, extra[len(extra)-1].name)
				break
			}
			add(false, x.name, "segment file %s (%s) lies past the %d segments size %d with split %d needs", x.name, humanize.IBytes(uint64(x.size)), nseg, q.Size, q.Split)
		}
	}
	for _, x := range f.stray {
		if x.Index < nseg {
			add(false, x.Name, "segment file %s exists after a gap in the numbering (%d bytes)", x.Name, x.Size)
		}
	}
	// The LUT against the layout and the size.
	if !sparse && f.lut != nil {
		add(true, format.LUTName(f.path), "%s exists (a %s LUT) but layout = %s", format.LUTName(f.path), humanize.IBytes(uint64(f.lut.Size())), q.Layout)
	}
	if q.Layout == format.LayoutSplit {
		for i := 0; i < min(have, nseg); i++ {
			want := min(q.Split, q.Size-int64(i)*q.Split)
			if got := f.segs[i].Size(); got > want && f.segs[i].Mode().IsRegular() {
				// Not lossy: the bytes past the segment are not part of the disk.
				add(false, format.SegmentName(f.path, i), "segment file %s is %d bytes, longer than a split image's segment %d (%d bytes)", format.SegmentName(f.path, i), got, i, want)
			}
		}
	}
	if !sparse {
		return v
	}
	if f.lut == nil {
		add(true, format.LUTName(f.path), "layout = sparse but there is no LUT %s", format.LUTName(f.path))
		return v
	}
	entries := f.lut.Size() / lut.EntrySize
	switch {
	case f.lut.Size()%lut.EntrySize != 0:
		add(true, f.lutF.Name(), "the LUT is %d bytes, not a whole number of %d-byte entries", f.lut.Size(), lut.EntrySize)
	case entries < q.Sectors():
		add(true, f.lutF.Name(), "the LUT holds %d entries, but size %d / sectorsize %d needs %d", entries, q.Size, ss, q.Sectors())
	case entries > q.Sectors() && !resizing:
		add(!f.unallocated(q, q.Sectors(), entries), f.lutF.Name(), "the LUT holds %d entries, but size %d / sectorsize %d needs %d", entries, q.Size, ss, q.Sectors())
	}
	// Slot ranges: every entry inside its segment file.
	var past int64
	firstPast, pastFile := "", ""
	for i := 0; i < min(have, nseg); i++ {
		if !f.segs[i].Mode().IsRegular() || shrinking {
			continue // a shrink's journal commits new entries for compacted files
		}
		slots := f.segs[i].Size() / ss
		first := int64(i) * perSeg
		n := min(perSeg, min(q.Sectors(), entries)-first)
		if n <= 0 {
			continue
		}
		owner := make(map[uint32]struct{}, 64)
		stop := false
		// ScanFile visits allocated entries only, skipping a thin LUT's
		// holes and an xhyve LUT's empty pages: the cost follows the data.
		err := lut.ScanFile(f.lutF, q.LUTKind(), first, n, func(j int64, x uint32) bool {
			if int64(x) >= slots {
				if past == 0 {
					pastFile = format.SegmentName(f.path, i)
					firstPast = fmt.Sprintf("sector %d → slot %d of %s (%d slots)", first+j, x, format.SegmentName(f.path, i), slots)
				}
				past++
				return true
			}
			if _, dup := owner[x]; dup {
				v.shared++
				if v.shared > maxShared {
					stop = true
					return false
				}
			}
			owner[x] = struct{}{}
			return true
		})
		if err != nil {
			add(true, f.lutF.Name(), "the LUT cannot be read: %v", err)
			return v
		}
		if stop {
			return v
		}
	}
	switch {
	case past == 1:
		add(true, pastFile, "a LUT entry points past the end of its segment file: %s", firstPast)
	case past > 1:
		add(true, pastFile, "%d LUT entries point past the end of their segment file, first %s", past, firstPast)
	}
	return v
}

// unallocated tells whether LUT entries [from, to) are all unallocated
// (entries past the file's end count as unallocated).
func (f *imageFiles) unallocated(q format.Params, from, to int64) bool {
	if f.lutF == nil {
		return false
	}
	to = min(to, f.lut.Size()/lut.EntrySize)
	if from >= to {
		return true
	}
	any := false
	err := lut.ScanFile(f.lutF, q.LUTKind(), from, to-from, func(int64, uint32) bool {
		any = true
		return false
	})
	return err == nil && !any
}

// CrossExamine compares the descriptor desc of the image at path with its
// files and, when they disagree, looks for the geometry closest to desc
// that explains every file. It reads the LUT (once per candidate geometry
// when the descriptor is contradicted) and never writes.
func CrossExamine(fsys vfs.FS, path string, desc format.Descriptor) (*Geometry, error) {
	if fsys == nil {
		fsys = vfs.OS{}
	}
	if desc.Layout == format.LayoutRaw {
		return &Geometry{}, nil
	}
	f, err := statFiles(fsys, path)
	if err != nil {
		return nil, err
	}
	defer f.close()
	v := f.explain(desc.Params, desc.Intent, 1<<62)
	g := &Geometry{Disagreements: v.facts, Files: v.files, Lossy: v.lossy}
	if g.Trusted() {
		return g, nil
	}
	if len(f.bad) > 0 {
		return g, nil // no geometry explains a directory
	}
	type cand struct {
		q     format.Params
		score int
	}
	var best *cand
	for _, q := range f.candidates(desc.Params) {
		if q == desc.Params {
			continue
		}
		if q.Validate() != nil {
			continue
		}
		if cv := f.explain(q, desc.Intent, 0); len(cv.facts) > 0 || cv.shared > 0 {
			continue
		}
		c := cand{q, score(desc.Params, q)}
		if c.score >= 300 {
			continue // three keys wrong at once: a guess, not an explanation
		}
		if best == nil || c.score < best.score {
			best = &c
		}
	}
	if best != nil {
		g.Implied = &best.q
	}
	g.Fix = g.fixFor(path, desc)
	return g, nil
}

// score ranks a candidate geometry: every changed key costs 100, a split
// that is not a power of two a little more.
func score(d, q format.Params) int {
	s := 0
	if q.Layout != d.Layout {
		s += 100
	}
	if q.Size != d.Size {
		s += 100
	}
	if q.Split != d.Split {
		s += 100
		if bits.OnesCount64(uint64(q.Split)) != 1 {
			s += 10
		}
	}
	if q.SectorSize != d.SectorSize {
		s += 100
	}
	return s
}

// candidates lists geometries that could explain the files: the LUT's
// length and the segment count fix the size for each sector size, and the
// split within a range.
func (f *imageFiles) candidates(d format.Params) []format.Params {
	var out []format.Params
	counts := []int{len(f.segs)}
	if n := len(f.segs); n > 1 && f.segs[n-1].Size() == 0 {
		counts = append(counts, n-1) // xhyve's trailing empty file
	}
	layouts := []format.Layout{format.LayoutSplit}
	if f.lut != nil {
		layouts = []format.Layout{format.LayoutSparse}
	}
	for _, layout := range layouts {
		for ss := int64(format.MinSectorSize); ss <= format.MaxSectorSize; ss *= 2 {
			var sizes []int64
			if layout == format.LayoutSparse {
				if f.lut.Size()%lut.EntrySize == 0 {
					sizes = append(sizes, f.lut.Size()/lut.EntrySize*ss)
				}
			} else {
				var sum int64
				for _, fi := range f.segs {
					sum += fi.Size()
				}
				sizes = append(sizes, sum, d.Size)
			}
			for _, size := range sizes {
				if size <= 0 || size%ss != 0 {
					continue
				}
				for _, n := range counts {
					for _, split := range splitsFor(size, n, ss, d.Split, f) {
						out = append(out, format.Params{Layout: layout, Size: size, Split: split, SectorSize: ss})
					}
				}
			}
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return score(d, out[i]) < score(d, out[j]) })
	return out
}

// splitsFor lists splits (multiples of ss) giving size exactly n segments:
// the descriptor's, powers of two, whole MiB (at most 64), and a split
// image's first segment length: the values people give, not every value
// that happens to fit a sparsely written image.
func splitsFor(size int64, n int, ss, dsplit int64, f *imageFiles) []int64 {
	if n <= 0 {
		return nil
	}
	ok := func(s int64) bool {
		if s <= 0 || s%ss != 0 {
			return false
		}
		return (format.Params{Layout: format.LayoutSparse, Size: size, Split: s}).Segments() == n
	}
	var out []int64
	seen := map[int64]bool{}
	try := func(s int64) {
		if !seen[s] && ok(s) {
			seen[s] = true
			out = append(out, s)
		}
	}
	try(dsplit)
	if len(f.segs) > 1 {
		try(f.segs[0].Size())
	}
	lo := (size + int64(n) - 1) / int64(n)
	for s := ss; s > 0 && s <= size*2; s *= 2 {
		try(s)
	}
	const mib = 1 << 20
	for s, k := (lo+mib-1)/mib*mib, 0; k < 64 && ok(s); s, k = s+mib, k+1 {
		try(s)
	}
	return out
}
