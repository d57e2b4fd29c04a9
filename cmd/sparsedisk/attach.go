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
	"syscall"
	"time"

	"github.com/pojntfx/go-nbd/pkg/client"
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
			"Example:\n   sparsedisk attach disk.img /dev/nbd0 &\n   mkfs.ext4 /dev/nbd0\n   sparsedisk detach /dev/nbd0",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "read-only", Aliases: []string{"r"}, Usage: "attach read-only"},
			&cli.BoolFlag{Name: "sync", Usage: "make every write durable before it completes (slow)"},
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

// socketPair returns the two ends of a connected Unix stream socket pair.
func socketPair() (*net.UnixConn, *net.UnixConn, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, err
	}
	conns := make([]*net.UnixConn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			if i == 1 {
				conns[0].Close()
			}
			return nil, nil, err
		}
		conns[i] = c.(*net.UnixConn)
	}
	return conns[0], conns[1], nil
}

// kernelBlockSize is the block size asked of the kernel: the image's sector
// size within what the kernel client accepts.
func kernelBlockSize(sector int64) uint32 {
	return uint32(min(max(sector, client.MinimumBlockSize), client.MaximumBlockSize))
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
	srv, err := nbd.NewServer(nbd.Config{Logger: log, AcceptUnframedGo: true}, nbd.Export{Name: name, Backend: d})
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

	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)
	go func() {
		for s := range sigs {
			log.Info("signal: detaching", "signal", s.String(), "device", dev)
			if err := client.Disconnect(devf); err != nil {
				log.Error("detach", "err", err)
			}
		}
	}()
	err = client.Connect(kernelSide, devf, &client.Options{
		ExportName: name,
		BlockSize:  kernelBlockSize(d.SectorSize()),
		OnConnected: func() {
			fmt.Fprintf(c.App.Writer, "attached %s to %s\n", image, dev)
		},
	})
	if err != nil {
		log.Error("kernel client ended", "err", err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if serr := srv.Shutdown(sctx); serr != nil {
		log.Error("shutdown", "err", serr)
	}
	if cerr := d.Close(); cerr != nil {
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
	if err := client.Disconnect(f); err != nil {
		return fmt.Errorf("detach %s: %w", dev, err)
	}
	fmt.Fprintf(c.App.Writer, "detached %s\n", dev)
	return nil
}
