package blockif

// Device is the block device a frontend serves: an NBD export (package
// nbd) or the one file of a FUSE mount (package fusefs). *Disk satisfies
// it; tests of the frontends substitute an in-memory device.
//
// Implementations must be safe for concurrent use: frontends call every
// method from many goroutines at once, for one client and across clients.
type Device interface {
	// ReadAt and WriteAt follow io.ReaderAt and io.WriterAt; any offset
	// and length within Size is allowed, and frontends never ask past it.
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Flush makes every write completed before the call durable.
	Flush() error
	// Trim deallocates [off, off+n): it reads as zeros afterwards and its
	// space may be released.
	Trim(off, n int64) error
	// WriteZeroes makes [off, off+n) read as zeros.
	WriteZeroes(off, n int64) error
	// Extents describes exactly [off, off+n), in order, as runs of
	// allocated data and unallocated (reads-as-zeros) space.
	Extents(off, n int64) ([]Extent, error)
	// Size is the fixed size of the device in bytes.
	Size() int64
	// SectorSize is the smallest efficient I/O unit (NBD advertises it as
	// the minimum and preferred block size). A power of two, 1…65536.
	SectorSize() int64
	// ReadOnly reports whether writes are refused.
	ReadOnly() bool
}

var _ Device = (*Disk)(nil)
