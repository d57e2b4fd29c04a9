package blockif

import (
	"fmt"
	"path/filepath"
	"syscall"

	"github.com/sparsedisk/sparsedisk/lut"
	"github.com/sparsedisk/sparsedisk/vfs"
	"golang.org/x/sys/unix"
)

// OnDiskBytes is what the image's files occupy on their device, as du
// counts them: every segment file, plus the descriptor and (sparse) the LUT.
// It takes one stat per file, opens no segment and reads no LUT entry, so
// it stays cheap for a huge image whose LUT is mostly unloaded. Unlike
// Stats.AllocatedBytes it includes the LUT, the descriptor and slots no
// longer referenced, and it follows the host file system's block
// granularity.
func (d *Disk) OnDiskBytes() (int64, error) {
	if err := d.enter(); err != nil {
		return 0, err
	}
	defer d.leave()
	var total int64
	for _, s := range d.segs {
		a, err := d.allocatedFile(s.Path(), s.Allocated)
		if err != nil {
			return 0, err
		}
		total += a
	}
	if d.desc.Layout == LayoutRaw {
		return total, nil // the raw file is the one segment
	}
	names := []string{d.path}
	if d.desc.Layout == LayoutSparse {
		names = append(names, d.path+lut.Suffix)
	}
	for _, name := range names {
		a, err := d.allocatedFile(name, func() (int64, error) {
			f, err := d.fs.OpenFile(name, 0, 0)
			if err != nil {
				return 0, err
			}
			defer f.Close()
			return f.Allocated()
		})
		if err != nil {
			return 0, err
		}
		total += a
	}
	return total, nil
}

// allocatedFile returns the bytes file name occupies, from a stat when the
// file system gives st_blocks, from slow otherwise.
func (d *Disk) allocatedFile(name string, slow func() (int64, error)) (int64, error) {
	fi, err := d.fs.Stat(name)
	if err != nil {
		return 0, err
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Blocks * 512, nil
	}
	return slow()
}

// checkRoom refuses to start writing n bytes (what: for the message) next
// to path when its file system has less room than that, so a mistyped
// size fails at once with a clear message instead of filling the disk.
// Only the operating system's file system is asked.
func checkRoom(fsys vfs.FS, path string, n int64, what string) error {
	if _, ok := fsys.(vfs.OS); !ok || n <= 0 {
		return nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(path), &st); err != nil {
		return nil // cannot tell: let the writes report it
	}
	if avail := int64(st.Bavail) * int64(st.Bsize); avail >= 0 && n > avail {
		return fmt.Errorf("%s need %s but the file system holding %s has %s free: %w", what, HumanSize(n), path, HumanSize(avail), syscall.ENOSPC)
	}
	return nil
}
