package fusefs

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"syscall"
	"testing"

	"github.com/sparsedisk/sparsedisk/blockif"
)

func TestErrno(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("segment 3 sector 17: %w", err) }
	tests := []struct {
		name string
		err  error
		want syscall.Errno
	}{
		{"nil", nil, 0},
		{"read-only", blockif.ErrReadOnly, syscall.EROFS},
		{"read-only wrapped", wrap(blockif.ErrReadOnly), syscall.EROFS},
		{"out of range", wrap(blockif.ErrOutOfRange), syscall.ENOSPC},
		{"host ENOSPC", &fs.PathError{Op: "write", Path: "x.0001", Err: syscall.ENOSPC}, syscall.ENOSPC},
		{"host EDQUOT", wrap(syscall.EDQUOT), syscall.EDQUOT},
		{"corrupt", wrap(blockif.ErrCorrupt), syscall.EIO},
		{"closed", blockif.ErrClosed, syscall.EIO},
		{"invalid", wrap(blockif.ErrInvalid), syscall.EINVAL},
		{"size fixed", ErrSizeFixed, syscall.EPERM},
		{"mode", ErrUnsupportedMode, syscall.EOPNOTSUPP},
		{"canceled", context.Canceled, syscall.EINTR},
		{"host EIO", wrap(syscall.EIO), syscall.EIO},
		{"unknown", errors.New("something else"), syscall.EIO},
		{"corrupt and read-only: first rule wins", errors.Join(blockif.ErrReadOnly, blockif.ErrCorrupt), syscall.EROFS},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Errno(tt.err); got != tt.want {
				t.Errorf("Errno(%v) = %v (%d), want %v (%d)", tt.err, got, got, tt.want, tt.want)
			}
		})
	}
}

func TestErrorPrefix(t *testing.T) {
	for _, err := range []error{ErrSizeFixed, ErrUnsupportedMode, ErrNoMountpoint, ErrNoFUSE, ErrBadName} {
		const p = "sparsedisk/fusefs: "
		if s := err.Error(); len(s) <= len(p) || s[:len(p)] != p {
			t.Errorf("%q lacks prefix %q", s, p)
		}
	}
}
