package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"

	"github.com/sparsedisk/sparsedisk/blockif"
	"github.com/sparsedisk/sparsedisk/nbd"
	"github.com/urfave/cli/v2"
)

func init() {
	register(&cli.Command{
		Name:      "attach",
		Usage:     "attach an image to a kernel NBD device (/dev/nbdX), served in-process",
		ArgsUsage: "IMAGE /dev/nbdX",
		Description: "Serves IMAGE to the kernel's NBD client over a private socket pair and connects it\n" +
			"to the device, which then behaves like a disk (partition it, mkfs, mount). Runs in\n" +
			"the foreground until `sparsedisk detach /dev/nbdX`, SIGINT or SIGTERM; the image is\n" +
			"then flushed and closed clean. Needs root and the nbd kernel module (modprobe nbd).\n\n" +
			"The device's logical block size is the image's sector size (at most 4096) unless\n" +
			"--block-size says otherwise; the export serves any alignment, so a 512-byte device\n" +
			"on a 4 KiB-sector image works (partial sectors are read-modify-written). The device\n" +
			"supports discard (fstrim), flush and FUA.\n\n" +
			"Example:\n   sparsedisk attach disk.img /dev/nbd0 &\n   mkfs.ext4 /dev/nbd0\n   sparsedisk detach /dev/nbd0",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "attach read-only"},
			&cli.BoolFlag{Name: "sync", Usage: "make every write durable before it completes (slow)"},
			&cli.UintFlag{Name: "block-size", Usage: "logical block size `N` of the device (512, 1024, 2048 or 4096; default: the image's sector size, at most 4096)"},
			&cli.UintFlag{Name: "min-block", Value: 1, Usage: "minimum block size `N` the export enforces (1 = any; the device's block size is raised to it)"},
			&cli.BoolFlag{Name: "debug", Usage: "log every failed request"},
		},
		Action: attachAction,
	})
	register(&cli.Command{
		Name:      "detach",
		Usage:     "detach a kernel NBD device attached with `sparsedisk attach`",
		ArgsUsage: "/dev/nbdX",
		Description: "Disconnects the device; the attach process then flushes and closes its image and exits.\n\n" +
			"Example:\n   sparsedisk detach /dev/nbd0",
		Action: detachAction,
	})
}

// openNBDDevice opens a kernel NBD device node, explaining the usual
// reasons it is missing.
func openNBDDevice(dev string) (*os.File, error) {
	st, err := os.Stat(dev)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%s does not exist: the nbd kernel module is not loaded (modprobe nbd) or the device is not visible here", dev)
	}
	if err != nil {
		return nil, err
	}
	if st.Mode()&os.ModeDevice == 0 || st.Mode()&os.ModeCharDevice != 0 {
		return nil, fmt.Errorf("%s is not a block device", dev)
	}
	f, err := os.OpenFile(dev, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s (root needed?): %w", dev, err)
	}
	return f, nil
}

// Ioctls of the Linux kernel's NBD driver (include/uapi/linux/nbd.h):
// _IO(0xab, n).
const (
	nbdSetSock      = 0xab00
	nbdSetBlksize   = 0xab01
	nbdDoIt         = 0xab03
	nbdClearSock    = 0xab04
	nbdSetSizeBlock = 0xab07
	nbdDisconnect   = 0xab08
	nbdSetFlags     = 0xab0a
)

// Block sizes the kernel's NBD driver accepts: a power of two from 512 to
// the page size.
const (
	kernelMinBlock = 512
	kernelMaxBlock = 4096
)

func nbdIoctl(f *os.File, req, arg uintptr) error {
	if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, f.Fd(), req, arg); e != 0 {
		return e
	}
	return nil
}

// socketPair returns the two ends of a connected Unix stream socket pair:
// the server's as a net.Conn, the kernel's as a blocking *os.File.
func socketPair() (net.Conn, *os.File, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	sf := os.NewFile(uintptr(fds[0]), "nbd-server")
	srv, err := net.FileConn(sf)
	sf.Close()
	if err != nil {
		syscall.Close(fds[1])
		return nil, nil, err
	}
	return srv, os.NewFile(uintptr(fds[1]), "nbd-kernel"), nil
}

// kernelBlockSize is the logical block size asked of the kernel: want if
// given (0 = the export's preferred block size, normally the image's
// sector size, within what the kernel accepts). It is never below the
// export's minimum block size, so the kernel sends no request the export
// refuses; an export whose minimum the kernel cannot honour is an error.
func kernelBlockSize(want uint32, info nbd.ExportInfo) (uint32, error) {
	if info.MinBlock > kernelMaxBlock {
		return 0, fmt.Errorf("the export's minimum block size %d is above the %d bytes the kernel NBD driver supports", info.MinBlock, kernelMaxBlock)
	}
	if want == 0 {
		pref := max(info.PrefBlock, info.MinBlock, kernelMinBlock)
		return min(pref, kernelMaxBlock), nil
	}
	if want < kernelMinBlock || want > kernelMaxBlock || want&(want-1) != 0 {
		return 0, fmt.Errorf("--block-size %d: want a power of two from %d to %d", want, kernelMinBlock, kernelMaxBlock)
	}
	if want < info.MinBlock {
		return 0, fmt.Errorf("--block-size %d is below the export's minimum block size %d (--min-block)", want, info.MinBlock)
	}
	return want, nil
}

// waitAttached polls the device's size in sysfs until the kernel shows it
// (the device is usable from then on).
func waitAttached(dev string, done <-chan struct{}) bool {
	p := filepath.Join("/sys/block", filepath.Base(dev), "size")
	for {
		if b, err := os.ReadFile(p); err == nil {
			if n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64); err == nil && n > 0 {
				return true
			}
		}
		select {
		case <-done:
			return false
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// runDoIt hands the socket to the kernel with NBD_DO_IT, which returns when
// the device is disconnected. It runs on a thread of its own with every
// signal blocked: a signal delivered to the thread waiting in NBD_DO_IT
// interrupts the wait, and the kernel then tears the device down at once,
// in-flight requests failed. Signals go to the other threads instead
// (SIGTERM and SIGINT disconnect cleanly through NBD_DISCONNECT). The
// thread is not unlocked: it ends with the goroutine.
func runDoIt(devf *os.File) error {
	runtime.LockOSThread()
	all := ^uint64(0)
	if _, _, e := syscall.RawSyscall6(syscall.SYS_RT_SIGPROCMASK, 0 /* SIG_BLOCK */, uintptr(unsafe.Pointer(&all)), 0, 8, 0, 0); e != 0 {
		return fmt.Errorf("block signals: %w", e)
	}
	return nbdIoctl(devf, nbdDoIt, 0)
}

func attachAction(c *cli.Context) error {
	if c.NArg() != 2 {
		return errors.New("attach takes IMAGE and /dev/nbdX")
	}
	image, dev := c.Args().Get(0), c.Args().Get(1)
	level := slog.LevelInfo
	if c.Bool("debug") {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(c.App.ErrWriter, &slog.HandlerOptions{Level: level}))
	minBlock, err := minBlockFlag(c)
	if err != nil {
		return err
	}

	devf, err := openNBDDevice(dev)
	if err != nil {
		return err
	}
	defer devf.Close()
	ro := c.Bool("read-only")
	d, err := blockif.Open(image, &blockif.Options{ReadOnly: ro, Sync: c.Bool("sync"), Logger: log})
	if err != nil {
		return fmt.Errorf("open %s: %w", image, err)
	}
	name := filepath.Base(image)
	srv, err := nbd.NewServer(nbd.Config{Logger: log, MinBlock: minBlock}, nbd.Export{Name: name, Backend: d})
	if err != nil {
		d.Close()
		return err
	}
	srvSide, kernelSide, err := socketPair()
	if err != nil {
		d.Close()
		return err
	}
	defer kernelSide.Close()
	srv.ServeConn(srvSide)
	shutdown := func() error {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if serr := srv.Shutdown(sctx); serr != nil {
			log.Error("shutdown", "err", serr)
		}
		return d.Close()
	}

	// Negotiate here, then give the kernel the socket in transmission
	// phase with the export's size, block size and flags (TRIM, FLUSH,
	// FUA, read-only).
	info, err := nbd.ClientGo(kernelSide, name)
	if err == nil {
		var bs uint32
		if bs, err = kernelBlockSize(uint32(c.Uint("block-size")), info); err == nil {
			if info.Size%uint64(bs) != 0 {
				log.Warn("image size is not a multiple of the block size; the device omits the tail", "size", info.Size, "block_size", bs)
			}
			err = errors.Join(
				nbdIoctl(devf, nbdSetBlksize, uintptr(bs)),
				nbdIoctl(devf, nbdSetSizeBlock, uintptr(info.Size/uint64(bs))),
				nbdIoctl(devf, nbdSetFlags, uintptr(info.Flags)),
			)
			if err == nil {
				err = nbdIoctl(devf, nbdSetSock, kernelSide.Fd())
			}
			if err != nil {
				err = fmt.Errorf("configure %s (in use by another client?): %w", dev, err)
			}
		}
	}
	if err != nil {
		_ = nbdIoctl(devf, nbdClearSock, 0)
		kernelSide.Close()
		return errors.Join(fmt.Errorf("attach %s to %s: %w", image, dev, err), shutdown())
	}

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			log.Info("signal: detaching", "signal", s.String(), "device", dev)
			if err := nbdIoctl(devf, nbdDisconnect, 0); err != nil {
				log.Error("detach", "err", err)
			}
		}
	}()
	doIt := make(chan error, 1)
	go func() { doIt <- runDoIt(devf) }()
	ended := make(chan struct{})
	go func() {
		if waitAttached(dev, ended) {
			fmt.Fprintf(c.App.Writer, "attached %s to %s\n", image, dev)
		}
	}()
	err = <-doIt
	close(ended)
	_ = nbdIoctl(devf, nbdClearSock, 0)
	if err != nil {
		log.Error("kernel client ended", "err", err)
	}
	if cerr := shutdown(); cerr != nil {
		return cerr
	}
	log.Info("detached; image closed clean", "image", image, "device", dev)
	if err != nil {
		return fmt.Errorf("attach %s to %s: %w", image, dev, err)
	}
	return nil
}

func detachAction(c *cli.Context) error {
	if c.NArg() != 1 {
		return errors.New("detach takes /dev/nbdX")
	}
	dev := c.Args().First()
	f, err := openNBDDevice(dev)
	if err != nil {
		return err
	}
	defer f.Close()
	// Write back what the page cache holds for the device (a user who
	// wrote with dd and no sync) before the disconnect ends the session.
	if err := f.Sync(); err != nil {
		return fmt.Errorf("detach %s: flush: %w", dev, err)
	}
	// As nbd-client -d does: NBD_CMD_DISC to the server, then release the
	// socket. The attach process flushes and closes its image once the
	// kernel lets go.
	if err := nbdIoctl(f, nbdDisconnect, 0); err != nil {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	_ = nbdIoctl(f, nbdClearSock, 0)
	fmt.Fprintf(c.App.Writer, "detached %s\n", dev)
	return nil
}
