package fusefs

import (
	"context"
	"errors"
	"syscall"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// Errors returned by this package. Match them with errors.Is; returned errors
// may wrap them with the path or value concerned.
var (
	// ErrSizeFixed: a truncate (or open with O_TRUNC) asked for a size other
	// than the disk size. The exposed file is the disk: it never grows or
	// shrinks through the mount. Reported to the kernel as EPERM.
	ErrSizeFixed = errors.New("sparsedisk/fusefs: file size is the disk size and cannot change")
	// ErrUnsupportedMode: an fallocate mode other than
	// PUNCH_HOLE|KEEP_SIZE or ZERO_RANGE[|KEEP_SIZE]. Reported as EOPNOTSUPP.
	ErrUnsupportedMode = errors.New("sparsedisk/fusefs: unsupported fallocate mode")
	// ErrNoMountpoint: the mount point does not exist or is not a directory.
	ErrNoMountpoint = errors.New("sparsedisk/fusefs: mount point missing or not a directory")
	// ErrNoFUSE: /dev/fuse is missing or cannot be opened (no fuse kernel
	// module, or a container without the device).
	ErrNoFUSE = errors.New("sparsedisk/fusefs: /dev/fuse not available")
	// ErrBadName: the file name is empty, ".", "..", or contains a slash or
	// a NUL byte.
	ErrBadName = errors.New("sparsedisk/fusefs: invalid file name")
)

// errnoTable is the whole error-to-errno policy, checked in order with
// errors.Is. The first match wins; anything unmatched is EIO.
var errnoTable = []struct {
	err   error
	errno syscall.Errno
}{
	{blockif.ErrReadOnly, syscall.EROFS},
	{blockif.ErrOutOfRange, syscall.ENOSPC}, // a write past the end: never grow
	{syscall.ENOSPC, syscall.ENOSPC},        // host file system full
	{syscall.EDQUOT, syscall.EDQUOT},        // host quota exhausted
	{ErrSizeFixed, syscall.EPERM},
	{ErrUnsupportedMode, syscall.EOPNOTSUPP},
	{blockif.ErrInvalid, syscall.EINVAL},
	{context.Canceled, syscall.EINTR},
	{blockif.ErrCorrupt, syscall.EIO},
	{blockif.ErrClosed, syscall.EIO},
}

// Errno translates an error from the engine (or this package) into the errno
// the kernel hands to the application. It is the only place where that
// policy lives: nil is 0, engine read-only is EROFS, out of range and a full
// host disk are ENOSPC, corruption and everything unknown are EIO.
func Errno(err error) syscall.Errno {
	if err == nil {
		return 0
	}
	for _, e := range errnoTable {
		if errors.Is(err, e.err) {
			return e.errno
		}
	}
	return syscall.EIO
}
