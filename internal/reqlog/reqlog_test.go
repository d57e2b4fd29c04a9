package reqlog

import (
	"bytes"
	"errors"
	"log/slog"
	"strings"
	"syscall"
	"testing"
	"time"
)

type pathed string

func (p pathed) Path() string { return string(p) }

// TestFailedLogsAtDefaultLevelRateLimited: a failed request is logged at
// the default (info) level with image, offset, length and errno; past
// PerSecond lines in a window the rest are counted, and the count rides on
// the next line let through.
func TestFailedLogsAtDefaultLevelRateLimited(t *testing.T) {
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil)) // default level: info
	var l Limiter
	err := errors.New("read segment 1: boom")
	for i := 0; i < PerSecond+5; i++ {
		l.Failed(log, pathed("/img/disk.img"), "nbd read", int64(i)*4096, 4096, syscall.EIO, err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != PerSecond {
		t.Fatalf("%d lines in one burst, want %d:\n%s", len(lines), PerSecond, buf.String())
	}
	for _, want := range []string{"level=WARN", "image=/img/disk.img", "op=\"nbd read\"", "offset=0", "length=4096", "errno=\"EIO (input/output error)\"", "boom"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("line %q lacks %s", lines[0], want)
		}
	}
	// The next window lets a line through, carrying the suppressed count.
	l.mu.Lock()
	l.window = l.window.Add(-time.Second)
	l.mu.Unlock()
	buf.Reset()
	l.Failed(log, nil, "fuse write", 8192, 512, syscall.ENOSPC, err)
	if got := buf.String(); !strings.Contains(got, "suppressed_before=5") || !strings.Contains(got, "ENOSPC") || !strings.Contains(got, `image=""`) {
		t.Errorf("line after the window: %q, want suppressed_before=5, ENOSPC and an empty image", got)
	}
}

func TestErrnoName(t *testing.T) {
	if got := ErrnoName(syscall.ENOSPC); got != "ENOSPC (no space left on device)" {
		t.Errorf("ErrnoName(ENOSPC) = %q", got)
	}
	if got := ErrnoName(syscall.Errno(200)); !strings.HasPrefix(got, "errno 200") {
		t.Errorf("ErrnoName(200) = %q", got)
	}
}
