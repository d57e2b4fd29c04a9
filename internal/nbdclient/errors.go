package nbdclient

import (
	"errors"
	"fmt"
	"syscall"
)

// Sentinel errors. Errors returned by this package wrap them, so test with
// errors.Is.
var (
	// ErrClosed: the Client was closed by its user.
	ErrClosed = errors.New("sparsedisk/nbdclient: client closed")
	// ErrDisconnected: the connection broke (the server went away, a
	// network error, or a protocol violation); every outstanding request
	// failed and later ones fail at once.
	ErrDisconnected = errors.New("sparsedisk/nbdclient: connection lost")
	// ErrProtocol: the server sent something the protocol does not allow
	// (bad magic, an unknown cookie, a malformed option reply).
	ErrProtocol = errors.New("sparsedisk/nbdclient: protocol violation by the server")
	// ErrRefused: the server refused the export during negotiation
	// (unknown export, TLS required, ...); see [OptionError].
	ErrRefused = errors.New("sparsedisk/nbdclient: export refused")
	// ErrUnsupported: the export does not advertise the command or flag
	// (FLUSH, FUA, TRIM, WRITE_ZEROES, or any write on a read-only export).
	ErrUnsupported = errors.New("sparsedisk/nbdclient: not supported by the export")
	// ErrRange: a negative offset, or a range that overflows 64 bits.
	ErrRange = errors.New("sparsedisk/nbdclient: invalid range")
)

// Error is an error reply from the server to one request. Errno is the NBD
// error value (NBD_EIO = 5, NBD_EINVAL = 22, ...), which equals the Linux
// errno of the same name; Unwrap returns it as a syscall.Errno, so
// errors.Is(err, syscall.ENOSPC) works.
type Error struct {
	Op     string // "read", "write", "flush", "trim", "write-zeroes"
	Offset uint64
	Length uint32
	Errno  uint32
}

func (e *Error) Error() string {
	return fmt.Sprintf("sparsedisk/nbdclient: %s %d+%d: server error %d (%v)", e.Op, e.Offset, e.Length, e.Errno, syscall.Errno(e.Errno))
}

// Unwrap returns the NBD error value as a syscall.Errno.
func (e *Error) Unwrap() error { return syscall.Errno(e.Errno) }

// OptionError is a negotiation error reply (NBD_REP_ERR_*) to an option.
// It wraps [ErrRefused].
type OptionError struct {
	Option  uint32 // the option sent, e.g. 7 for NBD_OPT_GO
	Reply   uint32 // the reply type, bit 31 set
	Message string // the server's optional human-readable text
}

func (e *OptionError) Error() string {
	name := optErrNames[e.Reply]
	if name == "" {
		name = fmt.Sprintf("%#x", e.Reply)
	}
	s := fmt.Sprintf("sparsedisk/nbdclient: option %d refused: %s", e.Option, name)
	if e.Message != "" {
		s += ": " + e.Message
	}
	return s
}

// Unwrap returns [ErrRefused].
func (e *OptionError) Unwrap() error { return ErrRefused }

var optErrNames = map[uint32]string{
	repErrUnsup:         "NBD_REP_ERR_UNSUP",
	repErrPolicy:        "NBD_REP_ERR_POLICY",
	repErrInvalid:       "NBD_REP_ERR_INVALID",
	repErrPlatform:      "NBD_REP_ERR_PLATFORM",
	repErrTLSReqd:       "NBD_REP_ERR_TLS_REQD",
	repErrUnknown:       "NBD_REP_ERR_UNKNOWN",
	repErrShutdown:      "NBD_REP_ERR_SHUTDOWN",
	repErrBlockSizeReqd: "NBD_REP_ERR_BLOCK_SIZE_REQD",
	repErrTooBig:        "NBD_REP_ERR_TOO_BIG",
}
