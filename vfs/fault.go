package vfs

import (
	"os"
	"sync"
)

// Op names the file operations a [FaultFS] can fail.
type Op string

// The operations a fault can target.
const (
	OpRead     Op = "read"
	OpWrite    Op = "write"
	OpSync     Op = "sync"
	OpPunch    Op = "punch"
	OpTruncate Op = "truncate"
)

// FaultFunc decides whether an operation fails: it returns the error to
// inject, or nil to let the operation through.
type FaultFunc func(op Op, name string, off, n int64) error

// FaultFS wraps a file system and injects errors (ENOSPC, EIO, …) into
// file operations, for fault-injection tests. It is safe for concurrent
// use; SetFault may be called while I/O is in flight.
type FaultFS struct {
	FS
	mu    sync.Mutex // protects fault
	fault FaultFunc
}

// NewFaultFS wraps fsys with no fault set.
func NewFaultFS(fsys FS) *FaultFS { return &FaultFS{FS: fsys} }

// SetFault installs f (nil removes the fault).
func (f *FaultFS) SetFault(fn FaultFunc) {
	f.mu.Lock()
	f.fault = fn
	f.mu.Unlock()
}

func (f *FaultFS) check(op Op, name string, off, n int64) error {
	f.mu.Lock()
	fn := f.fault
	f.mu.Unlock()
	if fn == nil {
		return nil
	}
	if err := fn(op, name, off, n); err != nil {
		return &os.PathError{Op: string(op), Path: name, Err: err}
	}
	return nil
}

// OpenFile opens a file whose operations pass through the fault function.
func (f *FaultFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	file, err := f.FS.OpenFile(name, flag, perm)
	if err != nil {
		return nil, err
	}
	return &faultFile{File: file, fs: f}, nil
}

type faultFile struct {
	File
	fs *FaultFS
}

func (f *faultFile) ReadAt(p []byte, off int64) (int, error) {
	if err := f.fs.check(OpRead, f.Name(), off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.File.ReadAt(p, off)
}

func (f *faultFile) WriteAt(p []byte, off int64) (int, error) {
	if err := f.fs.check(OpWrite, f.Name(), off, int64(len(p))); err != nil {
		return 0, err
	}
	return f.File.WriteAt(p, off)
}

func (f *faultFile) Sync() error {
	if err := f.fs.check(OpSync, f.Name(), 0, 0); err != nil {
		return err
	}
	return f.File.Sync()
}

func (f *faultFile) PunchHole(off, n int64) error {
	if err := f.fs.check(OpPunch, f.Name(), off, n); err != nil {
		return err
	}
	return f.File.PunchHole(off, n)
}

func (f *faultFile) Truncate(size int64) error {
	if err := f.fs.check(OpTruncate, f.Name(), size, 0); err != nil {
		return err
	}
	return f.File.Truncate(size)
}
