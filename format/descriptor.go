package format

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// Layout names how an image stores its bytes.
type Layout string

// The layouts. Their names appear in descriptors and are frozen.
const (
	// LayoutSparse: segments hold slots in allocation order; P.lut maps.
	LayoutSparse Layout = "sparse"
	// LayoutSplit: plain split image; segment i holds its bytes verbatim.
	LayoutSplit Layout = "split"
	// LayoutRaw: one plain file, no descriptor.
	LayoutRaw Layout = "raw"
)

// FormatVersion is the descriptor's format line value. Frozen.
const FormatVersion = "sparsedisk/1"

// Descriptor states.
const (
	StateClean = "clean"
	StateDirty = "dirty"
)

// Limits of the format (FORMAT.md, section 4).
const (
	MinSectorSize     = 512
	MaxSectorSize     = 65536
	DefaultSectorSize = 4096
	DefaultSplit      = 1 << 30
	MaxDescriptorSize = 64 << 10 // a descriptor file is never larger
)

// Params are an image's geometry.
type Params struct {
	Layout     Layout `json:"layout"`
	Size       int64  `json:"size"`        // virtual disk size in bytes
	Split      int64  `json:"split"`       // bytes per segment (sparse, split)
	SectorSize int64  `json:"sector_size"` // bytes per sector (LUT granularity)
	// LUT is the encoding of a sparse image's LUT entries; "" is
	// lut.Xhyve (the descriptor has no `lut` key). Other layouts have
	// none.
	LUT lut.Kind `json:"lut,omitempty"`
}

// LUTKind is the image's LUT encoding: p.LUT, or lut.Xhyve if unset.
func (p Params) LUTKind() lut.Kind { return p.LUT.Or() }

// Segments is the number of segment files the geometry needs.
func (p Params) Segments() int {
	if p.Layout == LayoutRaw || p.Split == 0 {
		return 1
	}
	n := p.Size / p.Split // not (Size+Split-1)/Split: that overflows near 2^63
	if p.Size%p.Split != 0 {
		n++
	}
	return int(n)
}

// Sectors is the number of sectors (LUT entries) of the disk.
func (p Params) Sectors() int64 { return p.Size / p.SectorSize }

// Validate checks the geometry against the format's constraints.
func (p Params) Validate() error {
	switch p.Layout {
	case LayoutSparse, LayoutSplit, LayoutRaw:
	default:
		return fmt.Errorf("%w: layout %q (want sparse, split or raw)", ErrInvalid, p.Layout)
	}
	ss := p.SectorSize
	if ss < MinSectorSize || ss > MaxSectorSize || ss&(ss-1) != 0 {
		return fmt.Errorf("%w: sectorsize %d is not a power of two between %d and %d", ErrInvalid, ss, MinSectorSize, MaxSectorSize)
	}
	if p.Size <= 0 {
		return fmt.Errorf("%w: size %d must be positive", ErrInvalid, p.Size)
	}
	if p.Layout != LayoutSparse && p.LUT != "" {
		return fmt.Errorf("%w: lut=%s: only the sparse layout has a LUT", ErrInvalid, p.LUT)
	}
	if _, err := lut.ParseKind(string(p.LUT)); err != nil {
		return err
	}
	if p.Layout == LayoutRaw {
		return nil
	}
	if p.Size%ss != 0 {
		return fmt.Errorf("%w: size %d is not a multiple of sectorsize %d", ErrInvalid, p.Size, ss)
	}
	if p.Split <= 0 || p.Split%ss != 0 {
		return fmt.Errorf("%w: split %d is not a positive multiple of sectorsize %d", ErrInvalid, p.Split, ss)
	}
	if p.Split/ss >= 0xFFFFFFFF {
		return fmt.Errorf("%w: split %d holds %d sectors, more than a LUT entry can address", ErrInvalid, p.Split, p.Split/ss)
	}
	if p.Segments() > 10_000_000 {
		return fmt.Errorf("%w: %d segments is too many; use a larger split", ErrInvalid, p.Segments())
	}
	return nil
}

// ParseSize parses a byte count with an optional k/m/g/t/p suffix (powers
// of 1024, case-insensitive, optionally followed by "b" or "ib"): "20G",
// "20GB", "1g", "512", "4KiB". Fractions and garbage are rejected.
func ParseSize(s string) (int64, error) {
	t := strings.ToLower(strings.TrimSpace(s))
	t = strings.TrimSuffix(t, "ib")
	t = strings.TrimSuffix(t, "b")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'k':
			mult = 1 << 10
		case 'm':
			mult = 1 << 20
		case 'g':
			mult = 1 << 30
		case 't':
			mult = 1 << 40
		case 'p':
			mult = 1 << 50
		}
		if mult != 1 {
			t = t[:len(t)-1]
		}
	}
	if t == "" || strings.IndexFunc(t, func(r rune) bool { return r < '0' || r > '9' }) >= 0 {
		return 0, fmt.Errorf("%w: size %q: want a whole number with an optional k/m/g/t/p suffix (powers of 1024), like 20G", ErrInvalid, s)
	}
	n, err := strconv.ParseInt(t, 10, 64)
	if err != nil || n > (1<<63-1)/mult {
		return 0, fmt.Errorf("%w: size %q is too large", ErrInvalid, s)
	}
	return n * mult, nil
}

// HumanSize prints n bytes exactly and human-readably: "21474836480 (20 GiB)".
func HumanSize(n int64) string {
	return fmt.Sprintf("%d (%s)", n, humanize.IBytes(uint64(max(n, 0))))
}

// Descriptor is the parsed content of the descriptor file P.
//
// # On-disk format
//
// A UTF-8 text file of `key = value` lines; `#` starts a comment; blank
// lines are ignored; unknown keys are an error (FORMAT.md, section 3). Keys:
//
//	| key        | value                                  | required |
//	|------------|----------------------------------------|----------|
//	| format     | sparsedisk/1                           | yes      |
//	| layout     | sparse or split                        | yes      |
//	| size       | bytes (k/m/g/t/p suffixes accepted)    | yes      |
//	| split      | bytes per segment                      | yes      |
//	| sectorsize | bytes per sector                       | yes      |
//	| lut        | xhyve or thin (sparse; absent = xhyve) | no       |
//	| state      | clean or dirty (open for writing)      | no       |
//	| intent     | an offline tool's unfinished operation | no       |
type Descriptor struct {
	Params
	State  string
	Intent string
}

// ParseDescriptor parses a descriptor; name is used in error messages.
func ParseDescriptor(data []byte, name string) (Descriptor, error) {
	var d Descriptor
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 4096), MaxDescriptorSize)
	line := 0
	for sc.Scan() {
		line++
		text := sc.Text()
		if i := strings.IndexByte(text, '#'); i >= 0 {
			text = text[:i]
		}
		text = strings.TrimSpace(text)
		if text == "" {
			continue
		}
		key, val, ok := strings.Cut(text, "=")
		key, val = strings.TrimSpace(key), strings.TrimSpace(val)
		bad := func(format string, args ...any) error {
			return fmt.Errorf("%w: descriptor %s line %d: %s", ErrInvalid, name, line, fmt.Sprintf(format, args...))
		}
		if !ok || key == "" {
			return d, bad("want `key = value`, got %q", sc.Text())
		}
		if seen[key] {
			return d, bad("key %q given twice", key)
		}
		seen[key] = true
		var err error
		switch key {
		case "format":
			if val != FormatVersion {
				return d, bad("format %q is not %q", val, FormatVersion)
			}
		case "layout":
			d.Layout = Layout(val)
			if d.Layout != LayoutSparse && d.Layout != LayoutSplit {
				return d, bad("layout %q (want sparse or split)", val)
			}
		case "size":
			d.Size, err = ParseSize(val)
		case "split":
			d.Split, err = ParseSize(val)
		case "sectorsize":
			d.SectorSize, err = ParseSize(val)
		case "lut":
			k, kerr := lut.ParseKind(val)
			if val == "" {
				kerr = fmt.Errorf("%w: lut key with no value (this version knows xhyve, thin)", lut.ErrUnknownKind)
			}
			if kerr != nil {
				// Not ErrInvalid: the image is not corrupt, this version
				// cannot read it (a newer one wrote it).
				return d, fmt.Errorf("descriptor %s line %d: %w", name, line, kerr)
			}
			if k != lut.Xhyve {
				d.LUT = k // the default is kept as "", as when absent
			}
		case "state":
			if val != StateClean && val != StateDirty {
				return d, bad("state %q (want clean or dirty)", val)
			}
			d.State = val
		case "intent":
			d.Intent = val
		default:
			return d, bad("unknown key %q", key)
		}
		if err != nil {
			return d, bad("%s: %v", key, err)
		}
	}
	if err := sc.Err(); err != nil {
		return d, fmt.Errorf("%w: descriptor %s: %v", ErrInvalid, name, err)
	}
	for _, k := range []string{"format", "layout", "size", "split", "sectorsize"} {
		if !seen[k] {
			return d, fmt.Errorf("%w: descriptor %s: missing key %q", ErrInvalid, name, k)
		}
	}
	if d.State == "" {
		d.State = StateClean
	}
	if err := d.Params.Validate(); err != nil {
		return d, fmt.Errorf("descriptor %s: %w", name, err)
	}
	return d, nil
}

// Marshal renders the descriptor as text.
func (d Descriptor) Marshal() []byte {
	var b bytes.Buffer
	fmt.Fprintf(&b, "# sparsedisk image\n")
	fmt.Fprintf(&b, "format = %s\n", FormatVersion)
	fmt.Fprintf(&b, "layout = %s\n", d.Layout)
	fmt.Fprintf(&b, "%-26s # %s\n", fmt.Sprintf("size = %d", d.Size), humanize.IBytes(uint64(d.Size)))
	fmt.Fprintf(&b, "%-26s # %s\n", fmt.Sprintf("split = %d", d.Split), humanize.IBytes(uint64(d.Split)))
	fmt.Fprintf(&b, "sectorsize = %d\n", d.SectorSize)
	if d.LUT != "" && d.LUT != lut.Xhyve {
		// Only a non-default kind is written: an xhyve image's descriptor
		// stays byte-identical to what earlier versions wrote (and they
		// can still open it, while they refuse a `lut` key they do not
		// know: right for a thin LUT they would misread).
		fmt.Fprintf(&b, "lut = %s\n", d.LUT)
	}
	state := d.State
	if state == "" {
		state = StateClean
	}
	fmt.Fprintf(&b, "state = %s\n", state)
	if d.Intent != "" {
		fmt.Fprintf(&b, "intent = %s\n", d.Intent)
	}
	return b.Bytes()
}

// WriteDescriptor replaces the descriptor at path atomically and durably:
// temp file, fsync, rename, fsync of the directory. Use it on images that
// are not open; an open Disk rewrites its own descriptor so that its lock
// moves to the new file.
func WriteDescriptor(fsys vfs.FS, path string, d Descriptor) error {
	_, err := replaceDescriptor(fsys, path, d.Marshal(), false, false)
	return err
}

// replaceDescriptor writes data to a temp file, fsyncs it, and renames it over
// path, fsyncing the directory. With lock, the temp file is locked (in the
// given mode) before it becomes visible at path, and that lock is returned:
// no other process can take it in between.
func replaceDescriptor(fsys vfs.FS, path string, data []byte, lock, exclusive bool) (vfs.Lock, error) {
	if fsys == nil {
		fsys = vfs.OS{}
	}
	tmp := TempName(path)
	f, err := fsys.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return nil, fmt.Errorf("write descriptor: %w", err)
	}
	if _, err := f.WriteAt(data, 0); err != nil {
		f.Close()
		return nil, fmt.Errorf("write descriptor %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, fmt.Errorf("sync descriptor %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("close descriptor %s: %w", tmp, err)
	}
	var l vfs.Lock
	if lock {
		if l, err = fsys.Lock(tmp, exclusive); err != nil {
			return nil, fmt.Errorf("lock new descriptor %s: %w", tmp, err)
		}
	}
	fail := func(err error) (vfs.Lock, error) {
		if l != nil {
			l.Close()
		}
		return nil, err
	}
	if err := fsys.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("rename descriptor into place: %w", err))
	}
	if err := fsys.SyncDir(filepath.Dir(path)); err != nil {
		return fail(fmt.Errorf("sync directory of %s: %w", path, err))
	}
	return l, nil
}

// ReadDescriptor reads and parses the descriptor at path.
func ReadDescriptor(fsys vfs.FS, path string) (Descriptor, error) {
	if fsys == nil {
		fsys = vfs.OS{}
	}
	data, err := readSmall(fsys, path)
	if err != nil {
		return Descriptor{}, err
	}
	return ParseDescriptor(data, path)
}

// readSmall reads a whole file of at most MaxDescriptorSize bytes.
func readSmall(fsys vfs.FS, path string) ([]byte, error) {
	f, err := fsys.OpenFile(path, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	if size > MaxDescriptorSize {
		return nil, fmt.Errorf("%w: descriptor %s is %d bytes, larger than any descriptor", ErrInvalid, path, size)
	}
	buf := make([]byte, size)
	n, err := f.ReadAt(buf, 0)
	if n == len(buf) {
		err = nil
	}
	return buf[:n], err
}

// IsDescriptor tells whether path, a file of size bytes, holds a sparsedisk
// descriptor (as opposed to a raw image). A file with segments or a LUT
// beside it must be one.
func IsDescriptor(fsys vfs.FS, path string, size int64) (bool, error) {
	if _, err := fsys.Stat(SegmentName(path, 0)); err == nil {
		return true, nil
	}
	if _, err := fsys.Stat(LUTName(path)); err == nil {
		return true, nil
	}
	if size > MaxDescriptorSize || size == 0 {
		return false, nil
	}
	data, err := readSmall(fsys, path)
	if err != nil {
		return false, err
	}
	return bytes.HasPrefix(data, []byte("# sparsedisk")) || bytes.HasPrefix(data, []byte("format")), nil
}
