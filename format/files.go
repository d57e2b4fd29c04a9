package format

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
	"golang.org/x/sys/unix"
)

// The names of an image's files, beside the descriptor at path P. They are
// part of the format (FORMAT.md lists every one).

// SegmentName is the name of segment i of the image at path: P.0000,
// P.0001, … (four digits at least, as xhyve names them).
func SegmentName(path string, i int) string { return fmt.Sprintf("%s.%04d", path, i) }

// LUTName is the name of a sparse image's lookup table: P.lut.
func LUTName(path string) string { return path + lut.Suffix }

// TempName is the temporary file a descriptor rewrite goes through: P.tmp.
func TempName(path string) string { return path + ".tmp" }

// OrphanedName is where repair moves a segment file found beyond the
// image's geometry, data kept: P.NNNN.orphaned.
func OrphanedName(segmentName string) string { return segmentName + ".orphaned" }

// UndoName is the n-th undo log of the image at path (n ≥ 1): P.undo.N.
// A repair that removes or unmaps anything first saves it there, so that
// `sparsedisk check --undo` restores the image as it was; the highest N
// is the latest repair.
func UndoName(path string, n int) string { return fmt.Sprintf("%s.undo.%d", path, n) }

// ConvertingName is the hidden name a convert builds its destination
// under, in the destination's directory: .NAME.converting.
func ConvertingName(dst string) string {
	return filepath.Join(filepath.Dir(dst), "."+filepath.Base(dst)+".converting")
}

// ShrinkCopyName is the compacted copy of segment i a shrink builds:
// P.NNNN.shrink.
func ShrinkCopyName(path string, i int) string { return SegmentName(path, i) + ".shrink" }

// JournalName is the shrink journal of the image at path: P.shrink-journal.
func JournalName(path string) string { return path + ".shrink-journal" }

// PartOf reports whether file is one of the segment or LUT files that
// belong beside the image path img (img.lut, img.0000, img.0001, …).
func PartOf(file, img string) bool {
	file, img = filepath.Clean(file), filepath.Clean(img)
	rest, ok := strings.CutPrefix(file, img+".")
	if !ok {
		return false
	}
	if rest == strings.TrimPrefix(lut.Suffix, ".") {
		return true
	}
	if len(rest) < 4 {
		return false
	}
	for _, c := range rest {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// ExtraSegment is a segment file past an image's geometry.
type ExtraSegment struct {
	Index int
	Name  string
	Size  int64
}

// ExtraSegments finds the segment files of the image at path with an
// index of nseg or more, in index order; one trailing empty file at nseg
// is xhyve's habit and not reported. Files are probed one index after the
// other; on the operating system's file system the directory is also
// listed, so a stray file after a gap in the numbering is found too.
func ExtraSegments(fsys vfs.FS, path string, nseg int) []ExtraSegment {
	var out []ExtraSegment
	seen := map[int]bool{}
	for i := nseg; ; i++ {
		name := SegmentName(path, i)
		fi, err := fsys.Stat(name)
		if err != nil {
			break
		}
		seen[i] = true
		if fi.Size() == 0 && i == nseg {
			continue
		}
		out = append(out, ExtraSegment{i, name, fi.Size()})
	}
	if _, ok := fsys.(vfs.OS); !ok {
		return out
	}
	ents, err := os.ReadDir(filepath.Dir(path))
	if err != nil {
		return out
	}
	base := filepath.Base(path) + "."
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), base)
		if !ok || len(rest) < 4 || strings.Trim(rest, "0123456789") != "" {
			continue
		}
		i, err := strconv.Atoi(rest)
		if err != nil || i < nseg || seen[i] || SegmentName(path, i) != filepath.Join(filepath.Dir(path), e.Name()) {
			continue
		}
		fi, err := e.Info()
		if err != nil || !fi.Mode().IsRegular() {
			continue
		}
		out = append(out, ExtraSegment{i, SegmentName(path, i), fi.Size()})
	}
	sort.Slice(out, func(a, b int) bool { return out[a].Index < out[b].Index })
	return out
}

// CheckRoom refuses to start writing n bytes (what: for the message) next
// to path when its file system has less room than that, so a mistyped
// size fails at once with a clear message instead of filling the disk.
// Only the operating system's file system is asked.
func CheckRoom(fsys vfs.FS, path string, n int64, what string) error {
	if _, ok := fsys.(vfs.OS); !ok || n <= 0 {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(path), &st); err != nil || st.Blocks == 0 {
		return nil // cannot tell (no blocks: /proc, sysfs): let the writes report it
	}
	if avail := int64(st.Bavail) * int64(st.Bsize); avail >= 0 && n > avail {
		return fmt.Errorf("%s takes %s but the file system holding %s has %s free: %w", what, HumanSize(n), path, HumanSize(avail), syscall.ENOSPC)
	}
	return nil
}

// RemoveIfExists removes name; a missing file is not an error. It reports
// whether something was removed.
func RemoveIfExists(fsys vfs.FS, name string) (bool, error) {
	if _, err := fsys.Stat(name); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return false, nil
		}
		return false, err
	}
	if err := fsys.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("remove %s: %w", name, err)
	}
	return true, nil
}

// SyncDirOf fsyncs the directory holding path, making renames, creations
// and removals of the image's files durable.
func SyncDirOf(fsys vfs.FS, path string) error {
	return fsys.SyncDir(filepath.Dir(path))
}

// TruncateFile sets a file's length durably. With onlyGrow it never
// shortens the file.
func TruncateFile(fsys vfs.FS, name string, size int64, onlyGrow bool) error {
	f, err := fsys.OpenFile(name, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	cur, err := f.Size()
	if err != nil {
		return err
	}
	if cur == size || (onlyGrow && cur > size) {
		return nil
	}
	if err := f.Truncate(size); err != nil {
		return fmt.Errorf("truncate %s to %d: %w", name, size, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", name, err)
	}
	return nil
}
