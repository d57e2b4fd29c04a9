// Package vfs is the small file-system seam under the sparsedisk engine.
//
// All I/O of packages lut, segment and blockif goes through [FS] so that
// tests can swap the operating system for [MemFS], an in-memory file system
// that simulates power loss: it keeps only what was made durable with
// [File.Sync] (file contents) and [FS.SyncDir] (directory entries), and on
// [MemFS.Crash] keeps a random subset of everything else.
//
// # Concurrency
//
// [OS] and [MemFS] are safe for concurrent use, and so are the [File]s they
// return: ReadAt, WriteAt, PunchHole and Sync may be called from many
// goroutines at once, as with an *os.File.
package vfs

import (
	"errors"
	"io"
	"os"
)

// ErrLocked is returned by [FS.Lock] when another holder has a conflicting
// lock on the file.
var ErrLocked = errors.New("sparsedisk/vfs: file is locked")

// FS is the file-system interface the engine uses.
type FS interface {
	// OpenFile opens a file like os.OpenFile.
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
	// Remove removes a file.
	Remove(name string) error
	// Rename renames a file, atomically replacing newname.
	Rename(oldname, newname string) error
	// Stat describes a file; a missing file gives an error matching
	// os.ErrNotExist.
	Stat(name string) (os.FileInfo, error)
	// SyncDir makes the directory's entries (creations, renames, removals)
	// durable.
	SyncDir(dir string) error
	// Lock takes an advisory lock on the file now at name (shared or
	// exclusive) without waiting; ErrLocked if it is held in a conflicting
	// mode. The lock belongs to the file, not the name: see [Lock.Current].
	Lock(name string, exclusive bool) (Lock, error)
}

// Lock is a held advisory lock. Closing it releases it.
type Lock interface {
	io.Closer
	// Current tells whether the locked file is still the one at name (a
	// rename may have replaced it since the lock was taken).
	Current(name string) (bool, error)
}

// File is an open file.
type File interface {
	io.ReaderAt
	io.WriterAt
	io.Closer
	// Name is the name the file was opened with.
	Name() string
	// Size is the file's length in bytes.
	Size() (int64, error)
	// Truncate sets the file's length.
	Truncate(size int64) error
	// Sync makes the file's data durable (fdatasync).
	Sync() error
	// PunchHole deallocates [off, off+n) keeping the file's length; the
	// range reads as zeros afterwards.
	PunchHole(off, n int64) error
	// Allocated is the number of bytes the file occupies on its device.
	Allocated() (int64, error)
	// SeekData returns the offset of the first byte at or after off that
	// lies in a data region, like lseek(2) SEEK_DATA; io.EOF if there is
	// none before the end of the file. A data region may still read as
	// zeros; a hole always does. It does not move any file offset other
	// callers rely on (ReadAt and WriteAt take their own).
	SeekData(off int64) (int64, error)
	// SeekHole returns the offset of the first hole at or after off, like
	// SEEK_HOLE: the end of the file counts as a hole, so for off below
	// the file's length it always finds one; io.EOF for off at or past it.
	SeekHole(off int64) (int64, error)
}
