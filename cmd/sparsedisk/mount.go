package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/fusefs"
	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"
)

func init() {
	register(&cli.Command{
		Name:      "mount",
		Usage:     "expose an image as one regular file in a FUSE mount point",
		ArgsUsage: "IMAGE MOUNTPOINT",
		Description: "MOUNTPOINT (an existing directory) then holds one file, NAME, whose size is the\n" +
			"virtual disk size: use it with qemu (format=raw), losetup, dd, cp --sparse.\n" +
			"fsync on it makes every earlier write durable; fallocate --punch-hole frees space;\n" +
			"SEEK_DATA/SEEK_HOLE and du reflect the image's allocation. The size is fixed\n" +
			"(truncate fails with EPERM) and writes past the end fail with ENOSPC.\n\n" +
			"NAME is mode 0600 (0400 read-only): only the mounting user may open it, also\n" +
			"with --allow-other. To share the disk, chmod NAME deliberately; the mode lasts\n" +
			"as long as the mount.\n\n" +
			"Runs in the foreground. SIGINT, SIGTERM, `sparsedisk umount MOUNTPOINT` or\n" +
			"`fusermount3 -u MOUNTPOINT` unmount it; the image is then flushed and closed clean.\n\n" +
			"Example:\n   sparsedisk mount disk.img /mnt/disk &\n   losetup -f --show /mnt/disk/disk.img",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "open the image read-only; writes fail with EROFS"},
			&cli.StringFlag{Name: "name", Usage: "file name inside the mount point (default: the image's file name)"},
			&cli.BoolFlag{Name: "allow-other", Usage: "let other users see the mount; NAME stays mode 0600 until you chmod it"},
			&cli.BoolFlag{Name: "sync", Usage: "make every write durable before it completes (slow)"},
			&cli.BoolFlag{Name: "debug", Usage: "log every FUSE request"},
			&cli.BoolFlag{Name: "force", Usage: "mount over a directory that is not empty (its files are hidden until umount)"},
		},
		Action: mountAction,
	})
}

func mountAction(c *cli.Context) error {
	args, err := positional(c)
	if err != nil {
		return err
	}
	if len(args) != 2 {
		return fmt.Errorf("mount takes IMAGE and MOUNTPOINT")
	}
	image, dir := args[0], args[1]
	level := slog.LevelInfo
	if c.Bool("debug") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))

	// Check what we can before opening the image, which marks it dirty.
	if err := checkMountPoint(dir); err != nil {
		return err
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 && !c.Bool("force") {
		return fmt.Errorf("mount point %s is not empty (%d entries, first %s): mounting would hide them until umount; use an empty directory, or --force", dir, len(ents), ents[0].Name())
	}
	if f, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0); err != nil {
		return fmt.Errorf("no FUSE on this system (%w); load the fuse module or give the container /dev/fuse", err)
	} else {
		f.Close()
	}
	name := c.String("name")
	if name == "" {
		name = filepath.Base(image)
	}

	ro := c.Bool("read-only")
	d, err := blockif.Open(image, &blockif.Options{ReadOnly: ro, Sync: c.Bool("sync"), Logger: log})
	if errors.Is(err, blockif.ErrInUse) {
		return fmt.Errorf("%s is in use by another process (mounted or served elsewhere?): %w", image, err)
	}
	if err != nil {
		return err
	}
	closeImage := func() error {
		if err := d.Close(); err != nil {
			log.Error("closing image", "image", image, "err", err)
			return err
		}
		log.Info("image closed clean", "image", image)
		return nil
	}

	fsName := "sparsedisk"
	if abs, err := filepath.Abs(image); err == nil && !strings.ContainsAny(abs, ", \t\n") {
		fsName = abs
	}
	m, err := fusefs.New(dir, d, &fusefs.Options{
		Name:       name,
		ReadOnly:   ro,
		AllowOther: c.Bool("allow-other"),
		FsName:     fsName,
		Logger:     log,
		Debug:      c.Bool("debug"),
	})
	if err != nil {
		closeImage()
		return err
	}
	log.Info("mounted", "image", image, "file", m.Path(), "size", d.Size(), "read_only", m.ReadOnly(), "sync", c.Bool("sync"))

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			// Flush first: if the unmount fails (the file is still open,
			// by a loop device or a VM, say) the next signal is often
			// SIGKILL, and every write acknowledged so far must survive
			// it.
			if !ro {
				if err := d.Flush(); err != nil {
					log.Error("flush on signal", "err", err)
				}
			}
			log.Info("signal: flushed, unmounting", "signal", s.String(), "mountpoint", dir)
			if err := m.Unmount(); err != nil {
				log.Error("unmount failed; close users of the file and signal again (everything written so far is durable)", "err", err)
			}
		}
	}()
	m.Wait()
	log.Info("unmounted", "mountpoint", dir)
	if !ro {
		if err := d.Flush(); err != nil {
			log.Error("flush", "err", err)
		}
	}
	return closeImage()
}

// positional returns the command's positional arguments, applying any flags
// given after them (`mount IMAGE DIR --read-only`): urfave/cli stops
// parsing flags at the first positional argument.
func positional(c *cli.Context) ([]string, error) {
	known := map[string]cli.Flag{}
	for _, f := range c.Command.Flags {
		for _, n := range f.Names() {
			known[n] = f
		}
	}
	var pos []string
	args := c.Args().Slice()
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			pos = append(pos, args[i+1:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			pos = append(pos, a)
			continue
		}
		name, val, hasVal := strings.Cut(strings.TrimLeft(a, "-"), "=")
		f, ok := known[name]
		if !ok {
			return nil, fmt.Errorf("unknown flag %s", a)
		}
		if !hasVal {
			if _, isBool := f.(*cli.BoolFlag); isBool {
				val = "true"
			} else if i+1 < len(args) {
				i++
				val = args[i]
			} else {
				return nil, fmt.Errorf("flag %s needs a value", a)
			}
		}
		if err := c.Set(name, val); err != nil {
			return nil, fmt.Errorf("flag %s: %w", a, err)
		}
	}
	return pos, nil
}

// checkMountPoint refuses a mount point that is missing, not a directory,
// or already carries a FUSE mount. A FUSE mount whose process died is
// named stale. os.Stat alone cannot tell: the kernel may answer it from
// the directory's cached attributes for a while after the daemon died,
// whereas statfs always reaches the daemon (ENOTCONN once it is gone).
func checkMountPoint(dir string) error {
	st, err := os.Stat(dir)
	var sfs unix.Statfs_t
	if err == nil {
		err = unix.Statfs(dir, &sfs)
	}
	if errors.Is(err, syscall.ENOTCONN) {
		return fmt.Errorf("mount point %s is a stale FUSE mount (its process died); run `sparsedisk umount %s` first: %w", dir, dir, err)
	}
	if err != nil {
		return fmt.Errorf("mount point %s: %w", dir, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("mount point %s is not a directory", dir)
	}
	if abs, err := filepath.Abs(dir); err == nil {
		if src, fstype, ok := findMount(abs); ok && strings.HasPrefix(fstype, "fuse") {
			return fmt.Errorf("mount point %s already has a FUSE file system mounted (%s from %s); unmount it first", dir, fstype, src)
		}
	}
	return nil
}
