// Package segment manages one segment file of a split image: its slots
// (sparse layout) or its verbatim bytes (split and raw layouts), the append
// cursor, punched holes and durable sync.
//
// # On-disk format
//
// A segment of image P is the file P.%04d (index zero padded to at least four
// digits; index 10000 is P.10000; format.SegmentName makes the name, and
// FORMAT.md at the repository root describes every file of an image). In the sparse layout it is an array of
// slots of sectorsize bytes, appended in allocation order; slot v starts at
// byte v * sectorsize. In the split layout it holds the disk's bytes
// [i*split, min((i+1)*split, size)) verbatim. Frozen, xhyve-compatible;
// FORMAT.md at the repository root (section 5) is the full reference.
//
// # Concurrency
//
// [File] is safe for concurrent use. The append cursor is atomic, so two
// allocations never get the same slot; which sectors a caller allocates for
// is the caller's business (blockif serialises writers per sector range).
// The dirty flag is set after a write completes and cleared just before an
// fdatasync, so a Sync that returns covers every write that completed
// before it started.
package segment

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"

	"github.com/sparsedisk/sparsedisk/vfs"
)

// File is one segment file, opened lazily on first use.
type File struct {
	fs         vfs.FS
	path       string
	index      int
	sectorSize int64
	readOnly   bool

	openOnce sync.Once
	f        vfs.File
	openErr  error

	next  atomic.Int64 // next free slot (sparse layout)
	dirty atomic.Bool  // written since the last Sync
}

// New describes segment file path (not opened yet).
func New(fsys vfs.FS, path string, index int, sectorSize int64, readOnly bool) *File {
	return &File{fs: fsys, path: path, index: index, sectorSize: sectorSize, readOnly: readOnly}
}

// Path is the segment file's path.
func (s *File) Path() string { return s.path }

// Index is the segment number.
func (s *File) Index() int { return s.index }

func (s *File) file() (vfs.File, error) {
	s.openOnce.Do(func() {
		flag := os.O_RDWR
		if s.readOnly {
			flag = os.O_RDONLY
		}
		s.f, s.openErr = s.fs.OpenFile(s.path, flag, 0)
		if s.openErr != nil {
			s.openErr = fmt.Errorf("open segment %d: %w", s.index, s.openErr)
		}
	})
	return s.f, s.openErr
}

// Size is the file's current length.
func (s *File) Size() (int64, error) {
	f, err := s.file()
	if err != nil {
		return 0, err
	}
	return f.Size()
}

// Allocated is the number of bytes the file occupies on its device.
func (s *File) Allocated() (int64, error) {
	f, err := s.file()
	if err != nil {
		return 0, err
	}
	return f.Allocated()
}

// SetNext sets the append cursor (at load: max(file slots, highest
// referenced slot + 1)).
func (s *File) SetNext(slot int64) { s.next.Store(slot) }

// cursor is the append cursor: the number of slots ever allocated.
func (s *File) cursor() int64 { return s.next.Load() }

// Alloc reserves n consecutive new slots and returns the first. Slots are
// never handed out twice while the segment is open.
func (s *File) Alloc(n int64) int64 { return s.next.Add(n) - n }

// ReadAt reads len(p) bytes at byte offset off of the file. Bytes past the
// end of the file read as zeros (a split segment may be short or sparse).
func (s *File) ReadAt(p []byte, off int64) error {
	f, err := s.file()
	if err != nil {
		return err
	}
	n, err := f.ReadAt(p, off)
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("read %s at offset %d: %w", s.path, off, err)
	}
	clear(p[n:])
	return nil
}

// ReadSlotsStrict reads len(p) bytes at byte offset off, which must lie
// entirely inside the file; a short read is reported as ErrShort.
func (s *File) ReadSlotsStrict(p []byte, off int64) error {
	f, err := s.file()
	if err != nil {
		return err
	}
	n, err := f.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || errors.Is(err, io.EOF) {
		return fmt.Errorf("%w: %s: %d bytes at offset %d, file ends before", ErrShort, s.path, len(p), off)
	}
	return fmt.Errorf("read %s at offset %d: %w", s.path, off, err)
}

// WriteAt writes p at byte offset off and marks the segment dirty.
func (s *File) WriteAt(p []byte, off int64) error {
	f, err := s.file()
	if err != nil {
		return err
	}
	_, err = f.WriteAt(p, off)
	// A failed write may still have stored part of p (the device filled up
	// mid-write, for one): the next Sync must cover those bytes too, or a
	// Flush that succeeds afterwards would leave content that reads back
	// now but reverts after a crash.
	s.dirty.Store(true)
	if err != nil {
		return fmt.Errorf("write %s at offset %d: %w", s.path, off, err)
	}
	return nil
}

// Punch deallocates [off, off+n) of the file; it reads as zeros afterwards.
func (s *File) Punch(off, n int64) error {
	f, err := s.file()
	if err != nil {
		return err
	}
	if err := f.PunchHole(off, n); err != nil {
		return fmt.Errorf("punch hole in %s at offset %d length %d: %w", s.path, off, n, err)
	}
	s.dirty.Store(true)
	return nil
}

// Truncate sets the file length (offline tools only).
func (s *File) Truncate(size int64) error {
	f, err := s.file()
	if err != nil {
		return err
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("truncate %s to %d: %w", s.path, size, err)
	}
	s.dirty.Store(true)
	return nil
}

// Dirty reports whether the segment was written since its last Sync.
func (s *File) Dirty() bool { return s.dirty.Load() }

// Sync makes every completed write durable, if any happened since the last
// Sync. On failure the segment stays dirty.
func (s *File) Sync() error {
	if !s.dirty.Swap(false) {
		return nil
	}
	f, err := s.file()
	if err != nil {
		s.dirty.Store(true)
		return err
	}
	if err := f.Sync(); err != nil {
		s.dirty.Store(true)
		return fmt.Errorf("sync %s: %w", s.path, err)
	}
	return nil
}

// Close closes the file if it was opened.
func (s *File) Close() error {
	if s.f != nil {
		return s.f.Close()
	}
	return nil
}
