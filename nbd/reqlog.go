package nbd

import (
	"log/slog"
	"syscall"
)

// logFailed logs a failed request: at the default level (rate-limited)
// when the image failed it (EIO, ENOSPC, anything unexpected), at debug
// level when the client asked for something refused by design (a write
// to a read-only export, a request out of range or malformed).
// Lines are rate-limited per server (s.failed).
func logFailed(s *Server, log *slog.Logger, x *export, req request, errno uint32, err error) {
	switch errno {
	case errnoPerm, errnoInval, errnoOverflow, errnoNotSup, errnoShutdown:
		log.Debug("nbd: request failed", "cmd", cmdName(req.typ), "offset", req.offset, "length", req.length, "errno", errno, "err", err)
		return
	}
	var backend any
	if x != nil {
		backend = x.Backend
	}
	s.failed.Failed(log, backend, "nbd "+cmdName(req.typ), int64(req.offset), int64(req.length), syscall.Errno(errno), err)
}
