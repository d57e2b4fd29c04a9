package fusefs

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/internal/reqlog"
)

// fallocate mode bits (linux/falloc.h).
const (
	fallocKeepSize  = 0x01
	fallocPunchHole = 0x02
	fallocZeroRange = 0x10
)

// lseek whence values for sparse files (unistd.h).
const (
	whenceData = 3
	whenceHole = 4
)

// openFlags are the FOPEN_* flags every open of the disk file gets: direct
// I/O (no second page cache above the engine's host files) with parallel
// direct writes (otherwise the kernel holds the inode lock across each
// write and serialises them), and no FLUSH request on close(2) (Linux 5.16
// and later): close promises nothing here, and a FLUSH is a request the
// kernel waits for uninterruptibly, so a process closing the file, at exit
// for instance, could otherwise sleep for ever on a server that is gone.
const openFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES | fuse.FOPEN_NOFLUSH

// root is the mount's root directory. It holds exactly one child, the disk
// file, added when the kernel first asks for the root.
type root struct {
	fs.Inode
	file *diskFile
}

var _ fs.NodeOnAdder = (*root)(nil)
var _ fs.NodeStatfser = (*root)(nil)
var _ fs.NodeGetattrer = (*root)(nil)
var _ fs.NodeUnlinker = (*root)(nil)
var _ fs.NodeRmdirer = (*root)(nil)

// Unlink refuses: the disk file is the mount's reason to exist. (Without
// this method go-fuse answers unlink with success and hides the file.)
func (r *root) Unlink(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }

// Rmdir refuses likewise; there are no directories to remove.
func (r *root) Rmdir(ctx context.Context, name string) syscall.Errno { return syscall.EPERM }

func (r *root) OnAdd(ctx context.Context) {
	ch := r.NewPersistentInode(ctx, r.file, fs.StableAttr{Mode: syscall.S_IFREG, Ino: 2})
	r.AddChild(r.file.name, ch, false)
}

func (r *root) Getattr(ctx context.Context, f fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	out.Mode = syscall.S_IFDIR | 0o755
	out.Nlink = 2
	out.Uid, out.Gid = r.file.uid, r.file.gid
	t := r.file.started
	out.SetTimes(&t, &t, &t)
	return 0
}

// Statfs reports the disk as the whole file system: total = disk size,
// used = allocated bytes, so df shows how full the sparse image is.
func (r *root) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	return r.file.Statfs(ctx, out)
}

// Statfs on the file itself (fstatfs on an open descriptor, as qemu does)
// answers the same as on the mount point.
func (f *diskFile) Statfs(ctx context.Context, out *fuse.StatfsOut) syscall.Errno {
	alloc, err := f.allocated()
	if err != nil {
		return f.fail("statfs", 0, 0, err)
	}
	const bsize = 4096
	size := f.b.Size()
	out.Bsize = bsize
	out.Frsize = bsize
	out.Blocks = uint64((size + bsize - 1) / bsize)
	used := uint64((alloc + bsize - 1) / bsize)
	out.Bfree = out.Blocks - min(used, out.Blocks)
	out.Bavail = out.Bfree
	out.Files = 1
	out.NameLen = 255
	return 0
}

// diskFile is the one regular file: the disk. Its data operations go
// straight to the Device with no locking here (the Device is safe for
// concurrent use); only the cosmetic attributes take mu.
type diskFile struct {
	fs.Inode
	b        blockif.Device
	name     string
	readOnly bool
	log      *slog.Logger
	uid, gid uint32
	started  time.Time

	mtime atomic.Int64  // UnixNano of the last data change; no lock needed
	gen   atomic.Uint64 // bumped after every data change; keys allocCache

	allocMu  sync.Mutex // protects allocOK, allocGen, allocAt, allocVal; held while counting
	allocOK  bool
	allocGen uint64
	allocAt  time.Time
	allocVal int64

	mu    sync.Mutex // protects mode and atime; never held during I/O
	mode  uint32     // permission bits only
	atime time.Time
}

var (
	_ fs.NodeOpener    = (*diskFile)(nil)
	_ fs.NodeReader    = (*diskFile)(nil)
	_ fs.NodeWriter    = (*diskFile)(nil)
	_ fs.NodeFsyncer   = (*diskFile)(nil)
	_ fs.NodeFlusher   = (*diskFile)(nil)
	_ fs.NodeAllocater = (*diskFile)(nil)
	_ fs.NodeLseeker   = (*diskFile)(nil)
	_ fs.NodeGetattrer = (*diskFile)(nil)
	_ fs.NodeSetattrer = (*diskFile)(nil)
	_ fs.NodeStatfser  = (*diskFile)(nil)
)

// failedRequests rate-limits the log lines of requests the image failed,
// across every mount of the process.
var failedRequests reqlog.Limiter

// fail logs an unexpected engine error and returns its errno. Expected
// refusals (read-only, out of range, bad mode) are not logged.
func (f *diskFile) fail(op string, off, n int64, err error) syscall.Errno {
	e := Errno(err)
	switch e {
	case syscall.EROFS, syscall.EPERM, syscall.EOPNOTSUPP, syscall.EINTR:
	default:
		failedRequests.Failed(f.log, f.b, "fuse "+op, off, n, e, err)
	}
	return e
}

func (f *diskFile) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if f.readOnly && flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		return nil, 0, syscall.EROFS
	}
	return nil, openFlags, 0
}

func (f *diskFile) Read(ctx context.Context, _ fs.FileHandle, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	size := f.b.Size()
	if off >= size || off < 0 {
		return fuse.ReadResultData(nil), 0
	}
	if rest := size - off; int64(len(dest)) > rest {
		dest = dest[:rest]
	}
	n, err := f.b.ReadAt(dest, off)
	if err != nil && n < len(dest) {
		return nil, f.fail("read", off, int64(len(dest)), err)
	}
	return fuse.ReadResultData(dest[:n]), 0
}

// Write writes within the disk. A write that starts at or past the end is
// refused with ENOSPC; one that straddles the end is cut short there, the
// way a block device behaves.
func (f *diskFile) Write(ctx context.Context, _ fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if f.readOnly {
		return 0, syscall.EROFS
	}
	size := f.b.Size()
	if off < 0 {
		return 0, syscall.EINVAL
	}
	if off >= size {
		return 0, syscall.ENOSPC
	}
	if rest := size - off; int64(len(data)) > rest {
		data = data[:rest]
	}
	n, err := f.b.WriteAt(data, off)
	if n > 0 {
		f.touch()
	}
	if err != nil {
		return uint32(n), f.fail("write", off, int64(len(data)), err)
	}
	return uint32(n), 0
}

// syncAfterWrite flushes the engine after a successful write whose
// request flags ask for synchronous I/O (O_DSYNC is set for O_SYNC,
// O_DSYNC, RWF_SYNC and RWF_DSYNC alike). If the flush fails, the write is
// reported as failed: its data may not survive a crash, which is what the
// caller asked to be told.
func (f *diskFile) syncAfterWrite(flags uint32, n uint32, st fuse.Status) (uint32, fuse.Status) {
	if !st.Ok() || n == 0 || flags&syscall.O_DSYNC == 0 || f.readOnly {
		return n, st
	}
	if err := f.b.Flush(); err != nil {
		return 0, fuse.Status(f.fail("sync write", 0, int64(n), err))
	}
	return n, st
}

func (f *diskFile) touch() {
	f.mtime.Store(time.Now().UnixNano())
	f.gen.Add(1)
}

// allocated returns the space the disk uses (st_blocks, statfs). A backend
// with OnDiskBytes is asked again once the previous answer is older than
// the attribute timeout (the image's files change under writes, punches
// and the host's own allocation decisions); one counted from Extents only
// after a data change since the count.
func (f *diskFile) allocated() (int64, error) {
	g := f.gen.Load()
	f.allocMu.Lock()
	defer f.allocMu.Unlock()
	if f.allocOK {
		if _, cheap := f.b.(OnDiskByteser); cheap {
			if time.Since(f.allocAt) < attrTimeout {
				return f.allocVal, nil
			}
		} else if f.allocGen == g {
			return f.allocVal, nil
		}
	}
	v, err := allocatedBytes(f.b)
	if err != nil {
		return 0, err
	}
	f.allocOK, f.allocGen, f.allocAt, f.allocVal = true, g, time.Now(), v
	return v, nil
}

// Fsync (fsync and fdatasync alike) flushes the whole engine: every write
// acknowledged before it, through any handle, becomes durable.
func (f *diskFile) Fsync(ctx context.Context, _ fs.FileHandle, flags uint32) syscall.Errno {
	if f.readOnly {
		return 0
	}
	if err := f.b.Flush(); err != nil {
		return f.fail("fsync", 0, 0, err)
	}
	return 0
}

// Flush is close(2) on kernels older than 5.16, which ignore FOPEN_NOFLUSH.
// It does not flush the engine: close promises no durability, and tools
// that open and close often would pay a full sync each time. fsync does.
func (f *diskFile) Flush(ctx context.Context, _ fs.FileHandle) syscall.Errno { return 0 }

// Allocate maps fallocate(2): PUNCH_HOLE|KEEP_SIZE to Trim, ZERO_RANGE
// (with or without KEEP_SIZE) to WriteZeroes; everything else, including
// plain preallocation, is EOPNOTSUPP. Ranges reaching past the end are cut
// at the end when KEEP_SIZE is set and refused with ENOSPC otherwise.
func (f *diskFile) Allocate(ctx context.Context, _ fs.FileHandle, off, length uint64, mode uint32) syscall.Errno {
	var op func(off, n int64) error
	var name string
	switch mode {
	case fallocPunchHole | fallocKeepSize:
		op, name = f.b.Trim, "punch-hole"
	case fallocZeroRange, fallocZeroRange | fallocKeepSize:
		op, name = f.b.WriteZeroes, "zero-range"
	default:
		return Errno(ErrUnsupportedMode)
	}
	if f.readOnly {
		return syscall.EROFS
	}
	size := uint64(f.b.Size())
	end := off + length
	if end < off {
		return syscall.EINVAL
	}
	if end > size {
		if mode&fallocKeepSize == 0 {
			return syscall.ENOSPC
		}
		end = size
	}
	if off >= end {
		return 0
	}
	if err := op(int64(off), int64(end-off)); err != nil {
		return f.fail(name, int64(off), int64(end-off), err)
	}
	f.touch()
	return 0
}

// Lseek answers SEEK_DATA and SEEK_HOLE from the engine's allocation map.
// The kernel handles SEEK_SET/CUR/END itself.
func (f *diskFile) Lseek(ctx context.Context, _ fs.FileHandle, off uint64, whence uint32) (uint64, syscall.Errno) {
	size := f.b.Size()
	if off >= uint64(size) {
		return 0, syscall.ENXIO
	}
	switch whence {
	case whenceData:
		pos, ok, err := seekData(f.b, int64(off))
		if err != nil {
			return 0, f.fail("seek-data", int64(off), 0, err)
		}
		if !ok {
			return 0, syscall.ENXIO
		}
		return uint64(pos), 0
	case whenceHole:
		pos, err := seekHole(f.b, int64(off))
		if err != nil {
			return 0, f.fail("seek-hole", int64(off), 0, err)
		}
		return uint64(pos), 0
	}
	return off, 0
}

func (f *diskFile) Getattr(ctx context.Context, _ fs.FileHandle, out *fuse.AttrOut) syscall.Errno {
	return f.fillAttr(&out.Attr)
}

func (f *diskFile) fillAttr(a *fuse.Attr) syscall.Errno {
	// st_blocks is informational: if it cannot be counted (a segment file
	// gone from under the image, say), stat, open and df must still work,
	// so the last count (or 0) is reported and the error only logged.
	alloc, err := f.allocated()
	if err != nil {
		f.fail("getattr (allocated space)", 0, 0, err)
		f.allocMu.Lock()
		alloc = f.allocVal
		f.allocMu.Unlock()
	}
	f.mu.Lock()
	mode, atime := f.mode, f.atime
	f.mu.Unlock()
	mtime := time.Unix(0, f.mtime.Load())
	a.Mode = syscall.S_IFREG | mode
	a.Size = uint64(f.b.Size())
	a.Blocks = uint64((alloc + 511) / 512) // st_blocks is in 512-byte units
	a.Blksize = 4096
	a.Nlink = 1
	a.Uid, a.Gid = f.uid, f.gid
	a.SetTimes(&atime, &mtime, &mtime)
	return 0
}

// Setattr accepts mode and time changes (kept in memory for the life of the
// mount) and a truncate to the current size; any other size is ErrSizeFixed
// (EPERM). Ownership changes are refused with EPERM as well.
func (f *diskFile) Setattr(ctx context.Context, _ fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if sz, ok := in.GetSize(); ok && sz != uint64(f.b.Size()) {
		return Errno(ErrSizeFixed)
	}
	if uid, ok := in.GetUID(); ok && uid != f.uid {
		return syscall.EPERM
	}
	if gid, ok := in.GetGID(); ok && gid != f.gid {
		return syscall.EPERM
	}
	f.mu.Lock()
	if m, ok := in.GetMode(); ok {
		f.mode = m & 0o7777
	}
	if t, ok := in.GetATime(); ok {
		f.atime = t
	}
	f.mu.Unlock()
	if t, ok := in.GetMTime(); ok {
		f.mtime.Store(t.UnixNano())
	}
	return f.fillAttr(&out.Attr)
}
