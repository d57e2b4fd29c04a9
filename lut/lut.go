// Package lut is the sparse layout's lookup table: one uint32 per sector of
// the whole disk, telling which slot of its segment file holds the sector.
//
// # On-disk format
//
// The file P.lut is a flat array of little-endian uint32, with no header,
// indexed by global sector number (offset / sectorsize). Segment i's entries
// start at entry i * (split / sectorsize).
//
//	| entry value  | meaning                                                  |
//	|--------------|----------------------------------------------------------|
//	| 0xFFFFFFFF   | unallocated: the sector reads as zeros                   |
//	| v (any other)| data at byte v * sectorsize of segment file P.%04d       |
//
// This layout is frozen: it is byte-compatible with xhyve's sparse images.
// FORMAT.md at the repository root (section 6) is the full reference.
//
// # Design
//
// The table is loaded lazily, one segment's entries at a time ([Table.Load]),
// so opening a huge image costs nothing and touching one sector loads only
// that segment's part (split/sectorsize entries). Changes are tracked per
// 4 KiB page of the file ([Part.Set] marks the page dirty);
// [Part.TakeDirty] snapshots the dirty pages for [Table.WritePages]. The
// caller (package blockif) decides when a page may be written: only once the
// data of every entry in the snapshot is durable.
//
// # Concurrency
//
// [Table] is safe for concurrent use. [Part] is not: its owner serialises
// access (blockif holds a per-segment mutex).
package lut

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"

	"github.com/sparsedisk/sparsedisk/vfs"
)

// Unallocated marks a sector that holds no data. Frozen format constant.
const Unallocated uint32 = 0xFFFFFFFF

// EntrySize is the size in bytes of one LUT entry. Frozen format constant.
const EntrySize = 4

// PageEntries is the number of entries in one 4 KiB page of the LUT file,
// the unit of dirty tracking and of writes.
const PageEntries = 1024

// Suffix is appended to the image path to name the LUT file. Frozen.
const Suffix = ".lut"

// Table is an open LUT file.
type Table struct {
	fs      vfs.FS
	f       vfs.File
	path    string
	entries int64 // number of sectors of the disk
	perSeg  int64 // entries per segment
}

// Create writes a new LUT file of n unallocated entries at path, durably.
// It fails if the file exists.
func Create(fsys vfs.FS, path string, n int64) error {
	f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create LUT: %w", err)
	}
	buf := make([]byte, min(n*EntrySize, 1<<20))
	for i := range buf {
		buf[i] = 0xFF
	}
	total := n * EntrySize
	for off := int64(0); off < total; {
		c := min(total-off, int64(len(buf)))
		if _, err := f.WriteAt(buf[:c], off); err != nil {
			f.Close()
			return fmt.Errorf("write LUT %s: %w", path, err)
		}
		off += c
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync LUT %s: %w", path, err)
	}
	return f.Close()
}

// Open opens the LUT file at path for a disk of n sectors with perSeg
// sectors per segment. A file shorter than n entries is accepted only if it
// still holds minEntries entries (xhyve wrote floor(size/sectorsize)); the
// missing entries read as unallocated. Anything shorter is ErrTruncated.
func Open(fsys vfs.FS, path string, n, minEntries, perSeg int64, readOnly bool) (*Table, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := fsys.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("open LUT: %w", err)
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("stat LUT %s: %w", path, err)
	}
	if size < minEntries*EntrySize || size%EntrySize != 0 {
		f.Close()
		return nil, fmt.Errorf("%w: %s is %d bytes, want %d (%d sectors × %d)", ErrTruncated, path, size, n*EntrySize, n, EntrySize)
	}
	return &Table{fs: fsys, f: f, path: path, entries: n, perSeg: perSeg}, nil
}

// Path is the LUT file's path.
func (t *Table) Path() string { return t.path }

// Part is the part of the table that belongs to one segment. It is not
// safe for concurrent use.
type Part struct {
	// Index is the segment number.
	Index int
	// First is the global sector number of entry 0.
	First int64
	// Entries holds the entries, indexed by sector number within the segment.
	Entries []uint32
	dirty   []uint64 // one bit per page of Entries
}

// Load reads segment i's entries.
func (t *Table) Load(i int) (*Part, error) {
	first := int64(i) * t.perSeg
	n := min(t.perSeg, t.entries-first)
	if n <= 0 {
		return nil, fmt.Errorf("sparsedisk/lut: segment %d out of range", i)
	}
	buf := make([]byte, n*EntrySize)
	off := first * EntrySize
	got, err := t.f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read LUT %s segment %d at offset %d: %w", t.path, i, off, err)
	}
	for j := got; j < len(buf); j++ { // short LUT (xhyve floor variant)
		buf[j] = 0xFF
	}
	s := &Part{Index: i, First: first, Entries: make([]uint32, n), dirty: make([]uint64, (n+PageEntries*64-1)/(PageEntries*64))}
	for j := range s.Entries {
		s.Entries[j] = binary.LittleEndian.Uint32(buf[j*EntrySize:])
	}
	return s, nil
}

// Set changes entry j (sector First+j) and marks its page dirty.
func (s *Part) Set(j int64, v uint32) {
	s.Entries[j] = v
	p := j / PageEntries
	s.dirty[p/64] |= 1 << (p % 64)
}

// Page is a snapshot of one dirty page, ready to be written.
type Page struct {
	Off  int64 // byte offset in the LUT file
	Data []byte
	seg  *Part
	page int64
}

// TakeDirty snapshots every dirty page of s and clears the dirty marks.
// If writing the pages fails, [Redirty] puts the marks back.
func (s *Part) TakeDirty() []Page {
	var pages []Page
	for w, word := range s.dirty {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			p := int64(w*64 + b)
			lo := p * PageEntries
			hi := min(lo+PageEntries, int64(len(s.Entries)))
			data := make([]byte, (hi-lo)*EntrySize)
			for j := lo; j < hi; j++ {
				binary.LittleEndian.PutUint32(data[(j-lo)*EntrySize:], s.Entries[j])
			}
			pages = append(pages, Page{Off: (s.First + lo) * EntrySize, Data: data, seg: s, page: p})
		}
		s.dirty[w] = 0
	}
	return pages
}

// Redirty marks the pages dirty again (after a failed write). The caller
// holds the lock of every segment the pages came from.
func Redirty(pages []Page) {
	for _, p := range pages {
		p.seg.dirty[p.page/64] |= 1 << (p.page % 64)
	}
}

// Dirty reports whether any page of s is dirty.
func (s *Part) Dirty() bool {
	for _, w := range s.dirty {
		if w != 0 {
			return true
		}
	}
	return false
}

// WritePages writes the pages into the LUT file (not yet durable: call
// [Table.Sync]).
func (t *Table) WritePages(pages []Page) error {
	for _, p := range pages {
		if _, err := t.f.WriteAt(p.Data, p.Off); err != nil {
			return fmt.Errorf("write LUT %s at offset %d: %w", t.path, p.Off, err)
		}
	}
	return nil
}

// Sync makes written pages durable.
func (t *Table) Sync() error {
	if err := t.f.Sync(); err != nil {
		return fmt.Errorf("sync LUT %s: %w", t.path, err)
	}
	return nil
}

// Close closes the file.
func (t *Table) Close() error { return t.f.Close() }
