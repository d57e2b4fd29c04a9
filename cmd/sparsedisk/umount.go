package main

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

func init() {
	register(&cli.Command{
		Name:      "umount",
		Usage:     "unmount a `sparsedisk mount` and wait until its image is closed",
		ArgsUsage: "MOUNTPOINT",
		Description: "Unmounts like `fusermount3 -u MOUNTPOINT`; the mount process then flushes,\n" +
			"closes the image clean and exits. umount waits (up to --wait) until the image\n" +
			"is released, so the image can be used as soon as it returns.\n\n" +
			"Example:\n   sparsedisk mount disk.img /mnt/disk &\n   sparsedisk umount /mnt/disk && sparsedisk check disk.img",
		Flags: []cli.Flag{
			&cli.DurationFlag{Name: "wait", Value: time.Minute, Usage: "how long to wait for the image to be closed (0: do not wait)"},
		},
		Action: umountAction,
	})
}

func umountAction(c *cli.Context) error {
	args, err := positional(c)
	if err != nil {
		return err
	}
	if len(args) != 1 {
		return fmt.Errorf("umount takes one MOUNTPOINT")
	}
	dir, err := filepath.Abs(args[0])
	if err != nil {
		return err
	}
	source, fstype, found := findMount(dir)
	if !found {
		return fmt.Errorf("%s is not a mount point", dir)
	}
	if fstype != "fuse.sparsedisk" {
		return fmt.Errorf("%s is a %s mount, not a sparsedisk mount", dir, fstype)
	}
	err = unix.Unmount(dir, 0)
	if errors.Is(err, syscall.EPERM) {
		err = fusermountU(dir)
	}
	if errors.Is(err, syscall.EBUSY) {
		return fmt.Errorf("%s is busy: close the file first (losetup -d, unmount the file system on it, stop the VM): %w", dir, err)
	}
	if err != nil {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	if wait := c.Duration("wait"); wait > 0 && filepath.IsAbs(source) {
		return waitReleased(source, wait)
	}
	return nil
}

// fusermountU unmounts through the setuid helper, for unprivileged users.
func fusermountU(dir string) error {
	bin := "fusermount3"
	if _, err := exec.LookPath(bin); err != nil {
		bin = "fusermount"
	}
	out, err := exec.Command(bin, "-u", dir).CombinedOutput()
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if strings.Contains(msg, "busy") {
			return fmt.Errorf("%s: %w", msg, syscall.EBUSY)
		}
		return fmt.Errorf("%s -u: %v: %s", bin, err, msg)
	}
	return nil
}

// waitReleased waits until the mount process has closed the image, seen as
// the image's write lock being released.
func waitReleased(image string, wait time.Duration) error {
	if _, err := os.Stat(image); err != nil {
		return nil // not an image path we can watch
	}
	deadline := time.Now().Add(wait)
	for {
		d, err := blockif.Open(image, &blockif.Options{ReadOnly: true, NoDirtyCheck: true})
		if err == nil {
			return d.Close()
		}
		if !errors.Is(err, blockif.ErrInUse) {
			return nil // unmounted; whatever else is wrong is not ours to report
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("unmounted, but %s is still open after %v", image, wait)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// findMount looks dir up in /proc/self/mountinfo and returns the mount's
// source and file system type.
func findMount(dir string) (source, fstype string, ok bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		// id parent major:minor root mountpoint opts [optional...] - fstype source superopts
		pre, post, cut := strings.Cut(sc.Text(), " - ")
		if !cut {
			continue
		}
		fields, rest := strings.Fields(pre), strings.Fields(post)
		if len(fields) < 5 || len(rest) < 2 || unescapeMountinfo(fields[4]) != dir {
			continue
		}
		source, fstype, ok = unescapeMountinfo(rest[1]), rest[0], true // last match is the top mount
	}
	return source, fstype, ok
}

// unescapeMountinfo undoes the kernel's octal escapes (\040 for space...).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
