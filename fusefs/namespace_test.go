package fusefs

import (
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// TestNamespaceRefusals: the disk file cannot be removed (go-fuse would
// otherwise answer unlink with success and hide the file until remount),
// and statfs on the file answers like statfs on the mount point.
func TestNamespaceRefusals(t *testing.T) {
	m := mountT(t, newMemBackend(1<<20), nil)
	if err := os.Remove(m.Path()); errnoOf(err) != syscall.EPERM {
		t.Errorf("unlink of the disk file: %v, want EPERM", err)
	}
	if err := unix.Rmdir(m.Path()); err == nil {
		t.Errorf("rmdir of the disk file succeeded")
	}
	if _, err := os.Stat(m.Path()); err != nil {
		t.Fatalf("the disk file is gone after refused removals: %v", err)
	}
	var onDir, onFile unix.Statfs_t
	if err := unix.Statfs(m.Dir(), &onDir); err != nil {
		t.Fatal(err)
	}
	if err := unix.Statfs(m.Path(), &onFile); err != nil {
		t.Fatal(err)
	}
	if onFile.Bsize == 0 || onFile.Blocks != onDir.Blocks || onFile.Bsize != onDir.Bsize || onFile.Namelen != onDir.Namelen {
		t.Errorf("statfs on the file = bsize %d blocks %d namelen %d; on the mount point = %d %d %d",
			onFile.Bsize, onFile.Blocks, onFile.Namelen, onDir.Bsize, onDir.Blocks, onDir.Namelen)
	}
}
