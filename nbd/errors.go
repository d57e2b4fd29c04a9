package nbd

import (
	"errors"
	"syscall"

	"github.com/sparsedisk/sparsedisk/blockif"
)

// Errors returned or logged by the server. Match them with errors.Is; the
// server wraps them with the connection, option or request concerned.
var (
	// ErrServerClosed is returned by Serve after Shutdown or Close.
	ErrServerClosed = errors.New("sparsedisk/nbd: server closed")
	// ErrBadMagic: a client sent a wrong magic number in an option or a
	// request header. The connection is dropped; other clients are not
	// affected.
	ErrBadMagic = errors.New("sparsedisk/nbd: bad magic number")
	// ErrShortMessage: a message is shorter than its fixed-length part.
	ErrShortMessage = errors.New("sparsedisk/nbd: message too short")
	// ErrProtocol: the client broke a mandatory rule of the protocol in a
	// way that cannot be answered with an error reply (unknown client
	// flags, an unsatisfiable NBD_OPT_EXPORT_NAME, a payload larger than
	// the advertised maximum). The connection is dropped.
	ErrProtocol = errors.New("sparsedisk/nbd: protocol violation")
	// ErrMalformed: an option's data does not parse (lengths pointing past
	// its end, trailing bytes). Answered with NBD_REP_ERR_INVALID.
	ErrMalformed = errors.New("sparsedisk/nbd: malformed option data")
	// ErrUnknownExport: no export has the requested name.
	ErrUnknownExport = errors.New("sparsedisk/nbd: no such export")
	// ErrTLSRequired: the server requires TLS and the client did not
	// start it.
	ErrTLSRequired = errors.New("sparsedisk/nbd: TLS required")
	// ErrTooManyConnections: Config.MaxConnections negotiated connections
	// exist; a client asking for an export is refused (NBD_REP_ERR_POLICY
	// for NBD_OPT_GO, a dropped connection for NBD_OPT_EXPORT_NAME).
	ErrTooManyConnections = errors.New("sparsedisk/nbd: too many connections")
	// ErrEvicted: Config.MaxHandshakes connections were negotiating when a
	// new one arrived, so the oldest of them was reset.
	ErrEvicted = errors.New("sparsedisk/nbd: pending handshake evicted by a newer connection")
	// ErrOutOfRange: a request reaches past the end of the export.
	ErrOutOfRange = errors.New("sparsedisk/nbd: request out of range")
	// ErrUnaligned: a request is not aligned to the minimum block size the
	// client agreed to honour.
	ErrUnaligned = errors.New("sparsedisk/nbd: request not aligned to the minimum block size")
	// ErrReadOnly: a write, trim or write-zeroes on a read-only export.
	ErrReadOnly = errors.New("sparsedisk/nbd: export is read-only")
	// ErrInvalidRequest: an unknown command, a command flag not valid for
	// the command, or a block-status request without a negotiated context.
	ErrInvalidRequest = errors.New("sparsedisk/nbd: invalid request")
	// ErrTooLarge: a read or write longer than the maximum payload.
	ErrTooLarge = errors.New("sparsedisk/nbd: request larger than the maximum payload")
	// ErrNotFast: NBD_CMD_FLAG_FAST_ZERO on a write-zeroes that cannot be
	// served faster than writing zeroes.
	ErrNotFast = errors.New("sparsedisk/nbd: zeroing would not be fast")
	// ErrShutdown: the server is shutting down.
	ErrShutdown = errors.New("sparsedisk/nbd: server shutting down")
	// ErrConfig: an invalid Config or Export.
	ErrConfig = errors.New("sparsedisk/nbd: invalid configuration")
)

// errnoFor translates the error of a request of type cmd into the NBD error
// value sent to the client. It is the only place where engine and server
// errors become wire errors. A nil error is 0.
//
// Out-of-range requests are EINVAL except for writes and write-zeroes,
// which the protocol wants reported as ENOSPC ("beyond the size of the
// device"). Engine corruption and any unknown error are EIO.
func errnoFor(cmd uint16, err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, ErrReadOnly), errors.Is(err, blockif.ErrReadOnly),
		errors.Is(err, syscall.EPERM), errors.Is(err, syscall.EROFS):
		return errnoPerm
	case errors.Is(err, ErrOutOfRange), errors.Is(err, blockif.ErrOutOfRange):
		if cmd == cmdWrite || cmd == cmdWriteZeroes {
			return errnoNoSpc
		}
		return errnoInval
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT),
		errors.Is(err, syscall.EFBIG):
		return errnoNoSpc
	case errors.Is(err, ErrUnaligned), errors.Is(err, ErrInvalidRequest),
		errors.Is(err, blockif.ErrInvalid):
		return errnoInval
	case errors.Is(err, ErrTooLarge):
		if cmd == cmdRead {
			return errnoOverflow
		}
		return errnoInval
	case errors.Is(err, ErrNotFast):
		return errnoNotSup
	case errors.Is(err, ErrShutdown), errors.Is(err, blockif.ErrClosed):
		return errnoShutdown
	case errors.Is(err, syscall.ENOMEM):
		return errnoNoMem
	default: // blockif.ErrCorrupt, syscall.EIO, anything unexpected
		return errnoIO
	}
}
