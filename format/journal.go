package format

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"io/fs"
	"os"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
)

// Shrink's on-disk artefacts, beside the image P:
//
//	| file              | content                                          |
//	|-------------------|--------------------------------------------------|
//	| P.%04d.shrink     | the compacted copy of one segment being built    |
//	| P.shrink-journal  | the new LUT entries of that segment (see below)  |
//
// Journal format (little-endian): magic "SDSHRNK1" (8 bytes), segment index
// (uint32), entry count n (uint32), n entries (uint32 each), CRC-32 (IEEE)
// of everything before it (uint32). A journal that is short or fails its
// CRC was never committed and is ignored. The entries are stored in the
// kind-independent form every API uses in memory (the slot number, or
// 0xFFFFFFFF for unallocated: the xhyve encoding), whatever the image's
// LUT kind; RedoSegment encodes them for the LUT. So a journal means the
// same for both kinds and a journal written before thin LUTs existed
// stays valid.
// FORMAT.md (section 8.2) has the byte table and the recovery rules.
const journalMagic = "SDSHRNK1"

// WriteJournal durably writes the journal for segment i (the file and its
// directory entry, together with the compacted copy's).
func WriteJournal(fsys vfs.FS, path string, i int, e []uint32) error {
	name := JournalName(path)
	buf := make([]byte, 0, 8+8+len(e)*lut.EntrySize+4)
	buf = append(buf, journalMagic...)
	buf = binary.LittleEndian.AppendUint32(buf, uint32(i))
	buf = binary.LittleEndian.AppendUint32(buf, uint32(len(e)))
	buf = append(buf, lut.Xhyve.EncodeEntries(e)...)
	buf = binary.LittleEndian.AppendUint32(buf, crc32.ChecksumIEEE(buf))
	f, err := fsys.OpenFile(name, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("create shrink journal: %w", err)
	}
	if _, err := f.WriteAt(buf, 0); err != nil {
		f.Close()
		return fmt.Errorf("write shrink journal %s: %w", name, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("sync shrink journal %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return err
	}
	return SyncDirOf(fsys, path)
}

// readJournal returns the committed segment and entries, or ok=false if
// there is no valid journal.
func readJournal(fsys vfs.FS, path string, p Params) (seg int, e []uint32, ok bool, err error) {
	data, err := ReadFile(fsys, JournalName(path))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return 0, nil, false, nil
		}
		return 0, nil, false, err
	}
	if len(data) < 20 || string(data[:8]) != journalMagic {
		return 0, nil, false, nil
	}
	seg = int(binary.LittleEndian.Uint32(data[8:]))
	n := int64(binary.LittleEndian.Uint32(data[12:]))
	if int64(len(data)) != 16+n*lut.EntrySize+4 {
		return 0, nil, false, nil
	}
	body := data[:len(data)-4]
	if crc32.ChecksumIEEE(body) != binary.LittleEndian.Uint32(data[len(data)-4:]) {
		return 0, nil, false, nil
	}
	perSeg := p.Split / p.SectorSize
	if seg >= p.Segments() || n != min(perSeg, p.Sectors()-int64(seg)*perSeg) {
		return 0, nil, false, fmt.Errorf("%w: shrink journal %s names segment %d with %d entries, which does not fit the image", ErrIntent, JournalName(path), seg, n)
	}
	return seg, lut.Xhyve.DecodeEntries(data[16 : len(data)-4]), true, nil
}

// ReadFile reads a whole file through fsys; a read shorter than the
// file's size is an error.
func ReadFile(fsys vfs.FS, name string) ([]byte, error) {
	f, err := fsys.OpenFile(name, os.O_RDONLY, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	size, err := f.Size()
	if err != nil {
		return nil, err
	}
	buf := make([]byte, size)
	got, err := f.ReadAt(buf, 0)
	if int64(got) == size {
		return buf, nil
	}
	if err == nil {
		err = io.ErrUnexpectedEOF
	}
	return nil, fmt.Errorf("read %s: %w", name, err)
}

// RedoSegment finishes a committed segment i: the compacted copy (if still
// there) replaces the segment, the entries go into the LUT, and the
// journal is removed. Every step is idempotent.
func RedoSegment(fsys vfs.FS, path string, lutFile vfs.File, p Params, i int, e []uint32) error {
	name := SegmentName(path, i)
	tmpName := ShrinkCopyName(path, i)
	if _, err := fsys.Stat(tmpName); err == nil {
		if err := fsys.Rename(tmpName, name); err != nil {
			return fmt.Errorf("rename %s into place: %w", tmpName, err)
		}
		if err := SyncDirOf(fsys, path); err != nil {
			return err
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	first, _ := SegmentEntries(p, i)
	if err := WriteEntries(lutFile, p, first, e); err != nil {
		return fmt.Errorf("LUT of segment %d: %w", i, err)
	}
	if err := lutFile.Sync(); err != nil {
		return fmt.Errorf("sync LUT: %w", err)
	}
	if _, err := RemoveIfExists(fsys, JournalName(path)); err != nil {
		return err
	}
	return SyncDirOf(fsys, path)
}

// recoverShrink finishes the segment a valid journal commits and rolls
// back any other compacted copy.
func recoverShrink(fsys vfs.FS, path string, desc Descriptor) error {
	seg, e, ok, err := readJournal(fsys, path, desc.Params)
	if err != nil {
		return err
	}
	if ok {
		f, err := fsys.OpenFile(LUTName(path), os.O_RDWR, 0)
		if err != nil {
			return fmt.Errorf("open LUT: %w", err)
		}
		err = RedoSegment(fsys, path, f, desc.Params, seg, e)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	removed := false
	for i := 0; i < desc.Segments(); i++ {
		r, err := RemoveIfExists(fsys, ShrinkCopyName(path, i))
		if err != nil {
			return err
		}
		removed = removed || r
	}
	r, err := RemoveIfExists(fsys, JournalName(path))
	if err != nil {
		return err
	}
	if removed || r {
		return SyncDirOf(fsys, path)
	}
	return nil
}
