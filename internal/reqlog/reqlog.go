// Package reqlog logs the I/O requests a frontend (package nbd, package
// fusefs) could not serve because the image failed them (EIO, ENOSPC,
// …): at the default level, so an operator sees a disk going bad without
// --debug, and rate-limited, so a client hammering a bad sector does not
// flood the log. Each line names the image, the operation, the offset and
// length, the errno and the error.
//
// # Concurrency
//
// A [Limiter] is safe for concurrent use; its zero value is ready.
package reqlog

import (
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"
)

// PerSecond is how many failed-request lines a Limiter lets through per
// one-second window; the rest are counted and the count is attached to
// the next line logged.
const PerSecond = 10

// Limiter rate-limits the lines of one frontend (a server, a mount).
type Limiter struct {
	mu         sync.Mutex // protects every field
	window     time.Time  // start of the current window
	n          int        // lines let through in the window
	suppressed int        // lines suppressed since the last one let through
}

// Allow reports whether a line may be logged now and, if so, how many
// were suppressed before it.
func (l *Limiter) Allow(now time.Time) (bool, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.window) >= time.Second {
		l.window, l.n = now, 0
	}
	if l.n >= PerSecond {
		l.suppressed++
		return false, 0
	}
	l.n++
	k := l.suppressed
	l.suppressed = 0
	return true, k
}

// Failed logs, at warning level and rate-limited, that the request op on
// [off, off+length) of the image (backend: its Path names it, if it has
// one) failed with errno and err.
func (l *Limiter) Failed(log *slog.Logger, backend any, op string, off, length int64, errno syscall.Errno, err error) {
	ok, suppressed := l.Allow(time.Now())
	if !ok {
		return
	}
	attrs := []any{"image", Image(backend), "op", op, "offset", off, "length", length, "errno", ErrnoName(errno), "err", err}
	if suppressed > 0 {
		attrs = append(attrs, "suppressed_before", suppressed)
	}
	log.Warn("request failed", attrs...)
}

// Image names the image behind a frontend's backend: its Path() (an open
// *blockif.Disk), else "".
func Image(backend any) string {
	if p, ok := backend.(interface{ Path() string }); ok {
		return p.Path()
	}
	return ""
}

// ErrnoName is an errno's symbolic name and text: "EIO (input/output
// error)"; the number for errnos not listed.
func ErrnoName(e syscall.Errno) string {
	names := map[syscall.Errno]string{
		syscall.EIO: "EIO", syscall.ENOSPC: "ENOSPC", syscall.EDQUOT: "EDQUOT", syscall.EFBIG: "EFBIG",
		syscall.ENOMEM: "ENOMEM", syscall.EROFS: "EROFS", syscall.EPERM: "EPERM", syscall.EINVAL: "EINVAL",
		syscall.EOVERFLOW: "EOVERFLOW", syscall.EOPNOTSUPP: "EOPNOTSUPP", syscall.ESHUTDOWN: "ESHUTDOWN",
	}
	if n, ok := names[e]; ok {
		return fmt.Sprintf("%s (%s)", n, e.Error())
	}
	return fmt.Sprintf("errno %d (%s)", int(e), e.Error())
}
