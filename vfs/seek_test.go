package vfs

import (
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
)

// SeekData and SeekHole find the data written between holes, on the
// operating system's file system and on MemFS alike (whose data regions
// are its non-zero 4 KiB blocks); past the data, SeekData says io.EOF and
// the end of the file is the last hole.
func TestSeekDataHole(t *testing.T) {
	const blk = 1 << 20 // larger than any file system's hole granularity
	for name, fsys := range map[string]FS{"os": OS{}, "mem": NewMemFS()} {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f")
			f, err := fsys.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			one := make([]byte, blk)
			for i := range one {
				one[i] = 1
			}
			f.WriteAt(one, 2*blk) // data at [2, 3) blocks
			if err := f.Truncate(6 * blk); err != nil {
				t.Fatal(err)
			}
			if d, err := f.SeekData(0); err != nil || d != 2*blk {
				t.Errorf("SeekData(0) = %d, %v; want %d", d, err, 2*blk)
			}
			if h, err := f.SeekHole(2 * blk); err != nil || h != 3*blk {
				t.Errorf("SeekHole(2 blocks) = %d, %v; want %d", h, err, 3*blk)
			}
			if h, err := f.SeekHole(0); err != nil || h != 0 {
				t.Errorf("SeekHole(0) = %d, %v; want 0", h, err)
			}
			if _, err := f.SeekData(3 * blk); !errors.Is(err, io.EOF) {
				t.Errorf("SeekData past the data: %v, want io.EOF", err)
			}
			if h, err := f.SeekHole(5 * blk); err != nil || h != 5*blk {
				t.Errorf("SeekHole(5 blocks) = %d, %v; want %d", h, err, 5*blk)
			}
			if _, err := f.SeekHole(6 * blk); !errors.Is(err, io.EOF) {
				t.Errorf("SeekHole at the end: %v, want io.EOF", err)
			}
		})
	}
}
