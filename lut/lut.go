// Package lut is the sparse layout's lookup table: one uint32 per sector of
// the whole disk, telling which slot of its segment file holds the sector.
//
// # On-disk format
//
// The file P.lut is a flat array of little-endian uint32, with no header,
// indexed by global sector number (offset / sectorsize). Segment i's entries
// start at entry i * (split / sectorsize). Two encodings of an entry exist,
// the LUT's [Kind], recorded in the descriptor (key `lut`, absent = xhyve):
//
//	| kind  | unallocated | slot v stored as | never-written LUT pages   |
//	|-------|-------------|------------------|---------------------------|
//	| xhyve | 0xFFFFFFFF  | v                | must hold 0xFF bytes      |
//	| thin  | 0           | v + 1            | are holes (read as zeros) |
//
// xhyve is frozen and byte-compatible with xhyve's sparse images. thin
// lets an empty table be a file-system hole: Create only sets the file's
// length, and a scan skips the holes with SEEK_DATA. Both address slots
// 0 … 0xFFFFFFFE. In memory (Part.Entries, the shrink journal, every API
// of this package) an entry is always the slot number, or [Unallocated];
// only this package's codec ([Kind.Encode], [Kind.Decode]) knows the
// encoding on disk.
// FORMAT.md at the repository root is the full reference.
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
// Tools that only need the allocated entries ([Table.Scan], [ScanFile])
// read the table a chunk at a time and never decode a page that holds no
// allocated entry: holes of a thin LUT are skipped with SEEK_DATA, pages
// of unallocated entries (all 0xFF or all 0x00) are recognised with one
// comparison. Their cost follows the data, not the disk's size.
//
// # Concurrency
//
// [Table] is safe for concurrent use. [Part] is not: its owner serialises
// access (blockif holds a per-segment mutex). [Kind] is a value.
package lut

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"os"
	"strings"
	"sync"

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
	kind    Kind
	entries int64 // number of sectors of the disk
	perSeg  int64 // entries per segment
}

// Kind is the encoding of a LUT's entries on disk (see the package
// documentation). Its names appear in descriptors and are frozen.
type Kind string

// The LUT kinds.
const (
	// Xhyve: unallocated is 0xFFFFFFFF, slot v is v. The default.
	Xhyve Kind = "xhyve"
	// Thin: unallocated is 0, slot v is v+1; unwritten pages are holes.
	Thin Kind = "thin"
)

// Kinds lists the kinds this version knows, default first.
var Kinds = []Kind{Xhyve, Thin}

// ParseKind checks a kind's name; "" is the default, [Xhyve]. An unknown
// name is [ErrUnknownKind], naming it and the kinds this version knows.
func ParseKind(s string) (Kind, error) {
	switch k := Kind(s); k {
	case "":
		return Xhyve, nil
	case Xhyve, Thin:
		return k, nil
	}
	names := make([]string, len(Kinds))
	for i, k := range Kinds {
		names[i] = string(k)
	}
	return "", fmt.Errorf("%w %q (this version knows %s)", ErrUnknownKind, s, strings.Join(names, ", "))
}

// Or returns k, or [Xhyve] if k is "" (the kind of an image whose
// descriptor names none).
func (k Kind) Or() Kind {
	if k == "" {
		return Xhyve
	}
	return k
}

// unallocatedByte is the byte a page of unallocated entries is filled with.
func (k Kind) unallocatedByte() byte {
	if k.Or() == Thin {
		return 0
	}
	return 0xFF
}

// bias is what encoding adds to an entry (mod 2^32): Unallocated+1 = 0.
func (k Kind) bias() uint32 {
	if k.Or() == Thin {
		return 1
	}
	return 0
}

// Encode writes entries e into dst (len(dst) >= len(e)*EntrySize) in k's
// on-disk form.
func (k Kind) Encode(dst []byte, e []uint32) {
	b := k.bias()
	for j, v := range e {
		binary.LittleEndian.PutUint32(dst[j*EntrySize:], v+b)
	}
}

// Decode parses len(dst) entries from raw in k's on-disk form.
func (k Kind) Decode(dst []uint32, raw []byte) {
	b := k.bias()
	for j := range dst {
		dst[j] = binary.LittleEndian.Uint32(raw[j*EntrySize:]) - b
	}
}

// EncodeEntries renders entries as they sit in a LUT of kind k.
func (k Kind) EncodeEntries(e []uint32) []byte {
	buf := make([]byte, len(e)*EntrySize)
	k.Encode(buf, e)
	return buf
}

// DecodeEntries parses entries as they sit in a LUT of kind k; a trailing
// partial entry is ignored.
func (k Kind) DecodeEntries(raw []byte) []uint32 {
	e := make([]uint32, len(raw)/EntrySize)
	k.Decode(e, raw)
	return e
}

// Create writes a new LUT file of n unallocated entries of kind k at
// path, durably. A thin LUT is only given its length: every page is a
// hole. It fails if the file exists.
func Create(fsys vfs.FS, path string, n int64, k Kind) error {
	f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("create LUT: %w", err)
	}
	if err := Extend(f, k, 0, n, nil); err != nil {
		f.Close()
		return fmt.Errorf("create LUT %s: %w", path, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync LUT %s: %w", path, err)
	}
	return f.Close()
}

// Extend makes entries [from, to) of the LUT file f unallocated, for a
// new LUT or a grown disk (not durable: sync f). For a thin LUT whose
// file ends at or before entry from that is one ftruncate; otherwise the
// entries are written, and progress (if not nil) hears the bytes written
// so far and the total.
func Extend(f vfs.File, k Kind, from, to int64, progress func(done, total int64)) error {
	if to <= from {
		return nil
	}
	if k.Or() == Thin {
		size, err := f.Size()
		if err != nil {
			return err
		}
		if size <= from*EntrySize {
			if err := f.Truncate(to * EntrySize); err != nil {
				return fmt.Errorf("truncate to %d entries: %w", to, err)
			}
			if progress != nil {
				progress((to-from)*EntrySize, (to-from)*EntrySize)
			}
			return nil
		}
	}
	total := (to - from) * EntrySize
	buf := bytes.Repeat([]byte{k.unallocatedByte()}, int(min(total, 1<<20)))
	for done := int64(0); done < total; {
		c := min(total-done, int64(len(buf)))
		off := from*EntrySize + done
		if _, err := f.WriteAt(buf[:c], off); err != nil {
			return fmt.Errorf("write at offset %d: %w", off, err)
		}
		done += c
		if progress != nil {
			progress(done, total)
		}
	}
	return nil
}

// ReadEntries reads entries [first, first+n) from the LUT file f of kind
// k. Entries past the file's end read as unallocated (xhyve's short LUT).
func ReadEntries(f vfs.File, k Kind, first, n int64) ([]uint32, error) {
	buf := make([]byte, n*EntrySize)
	off := first * EntrySize
	got, err := f.ReadAt(buf, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read LUT %s at offset %d: %w", f.Name(), off, err)
	}
	e := make([]uint32, n)
	k.Decode(e[:got/EntrySize], buf)
	for j := got / EntrySize; j < len(e); j++ {
		e[j] = Unallocated
	}
	return e, nil
}

// WriteEntries writes entries e at entry first of the LUT file f of kind
// k (not durable: sync f).
func WriteEntries(f vfs.File, k Kind, first int64, e []uint32) error {
	off := first * EntrySize
	if _, err := f.WriteAt(k.EncodeEntries(e), off); err != nil {
		return fmt.Errorf("write LUT %s at offset %d: %w", f.Name(), off, err)
	}
	return nil
}

// scanChunk is the unit of a scan's reads.
const scanChunk = 256 << 10

// scanBufs recycles the scans' read buffers: a scan of a huge image runs
// once per segment, and most find nothing to read.
var scanBufs = sync.Pool{New: func() any { b := make([]byte, scanChunk); return &b }}

// emptyPages holds a page of unallocated entries for each kind, by fill
// byte. Read-only.
var emptyPages = map[byte][]byte{
	0x00: make([]byte, PageEntries*EntrySize),
	0xFF: bytes.Repeat([]byte{0xFF}, PageEntries*EntrySize),
}

// ScanFile calls fn, in order, for every allocated entry among entries
// [first, first+n) of the LUT file f of kind k, with the entry's index
// relative to first and its slot; fn returning false stops the scan. It
// reads scanChunk bytes at a time, skips the holes of a thin LUT
// (SEEK_DATA) and does not decode pages holding only unallocated entries,
// so scanning an empty table costs one seek (thin) or one pass of
// comparisons over its bytes (xhyve). Entries past the file's end read as
// unallocated.
func ScanFile(f vfs.File, k Kind, first, n int64, fn func(j int64, v uint32) bool) error {
	const pageBytes = PageEntries * EntrySize
	empty := emptyPages[k.unallocatedByte()]
	var buf []byte // taken from scanBufs only once there is something to read
	defer func() {
		if buf != nil {
			scanBufs.Put(&buf)
		}
	}()
	var e [PageEntries]uint32
	lo, hi := first*EntrySize, (first+n)*EntrySize
	for pos := lo; pos < hi; {
		if k.Or() == Thin {
			d, err := f.SeekData(pos)
			if errors.Is(err, io.EOF) {
				return nil
			}
			if err != nil {
				return fmt.Errorf("scan LUT %s at offset %d: %w", f.Name(), pos, err)
			}
			if d >= hi {
				return nil
			}
			pos = max(pos, d/EntrySize*EntrySize)
		}
		if buf == nil {
			buf = *scanBufs.Get().(*[]byte)
		}
		c := min(hi-pos, int64(len(buf)))
		got, err := f.ReadAt(buf[:c], pos)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read LUT %s at offset %d: %w", f.Name(), pos, err)
		}
		got -= got % EntrySize
		for p := 0; p < got; {
			q := min(got, p+pageBytes-int((pos+int64(p))%pageBytes))
			page := buf[p:q]
			if !bytes.Equal(page, empty[:len(page)]) {
				m := len(page) / EntrySize
				k.Decode(e[:m], page)
				base := (pos+int64(p))/EntrySize - first
				for x, v := range e[:m] {
					if v != Unallocated && !fn(base+int64(x), v) {
						return nil
					}
				}
			}
			p = q
		}
		if int64(got) < c { // end of file: the rest is unallocated
			return nil
		}
		pos += c
	}
	return nil
}

// Open opens the LUT file at path for a disk of n sectors with perSeg
// sectors per segment. A file shorter than n entries is accepted only if it
// still holds minEntries entries (xhyve wrote floor(size/sectorsize)); the
// missing entries read as unallocated. Anything shorter is ErrTruncated.
func Open(fsys vfs.FS, path string, k Kind, n, minEntries, perSeg int64, readOnly bool) (*Table, error) {
	if _, err := ParseKind(string(k)); err != nil {
		return nil, err
	}
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
	return &Table{fs: fsys, f: f, path: path, kind: k.Or(), entries: n, perSeg: perSeg}, nil
}

// Path is the LUT file's path.
func (t *Table) Path() string { return t.path }

// Kind is the table's encoding.
func (t *Table) Kind() Kind { return t.kind }

// segRange is segment i's first entry and entry count.
func (t *Table) segRange(i int) (first, n int64, err error) {
	first = int64(i) * t.perSeg
	n = min(t.perSeg, t.entries-first)
	if i < 0 || n <= 0 {
		return 0, 0, fmt.Errorf("sparsedisk/lut: segment %d out of range", i)
	}
	return first, n, nil
}

// Scan calls fn for every allocated entry of segment i, in order, with the
// sector's index within the segment and its slot, without loading the
// segment's part (see [ScanFile]); fn returning false stops the scan.
func (t *Table) Scan(i int, fn func(j int64, v uint32) bool) error {
	first, n, err := t.segRange(i)
	if err != nil {
		return err
	}
	if err := ScanFile(t.f, t.kind, first, n, fn); err != nil {
		return fmt.Errorf("segment %d: %w", i, err)
	}
	return nil
}

// Empty tells whether segment i has no allocated entry, reading as little
// as [Table.Scan] does.
func (t *Table) Empty(i int) (bool, error) {
	empty := true
	err := t.Scan(i, func(int64, uint32) bool { empty = false; return false })
	return empty, err
}

// Part is the part of the table that belongs to one segment. It is not
// safe for concurrent use.
type Part struct {
	// Index is the segment number.
	Index int
	// First is the global sector number of entry 0.
	First int64
	// Entries holds the entries, indexed by sector number within the segment.
	Entries []uint32
	kind    Kind
	dirty   []uint64 // one bit per page of Entries
}

// Load reads segment i's entries.
func (t *Table) Load(i int) (*Part, error) {
	first, n, err := t.segRange(i)
	if err != nil {
		return nil, err
	}
	e, err := ReadEntries(t.f, t.kind, first, n)
	if err != nil {
		return nil, fmt.Errorf("segment %d: %w", i, err)
	}
	return &Part{Index: i, First: first, Entries: e, kind: t.kind, dirty: make([]uint64, (n+PageEntries*64-1)/(PageEntries*64))}, nil
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
			data := s.kind.EncodeEntries(s.Entries[lo:hi])
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
