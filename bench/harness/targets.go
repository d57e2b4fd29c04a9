package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
)

// exportName is the NBD export name every server offers.
const exportName = "disk"

// nbdServer is a running NBD server and how fio and nbdcopy reach it.
type nbdServer struct {
	svc  *service
	port int    // TCP
	sock string // Unix socket
}

func (s *nbdServer) uri() string {
	if s.sock != "" {
		return fmt.Sprintf("nbd+unix:///%s?socket=%s", exportName, s.sock)
	}
	return fmt.Sprintf("nbd://127.0.0.1:%d/%s", s.port, exportName)
}

// createImage makes a fresh, empty image for target at base (no extension)
// and returns the path to serve.
func createImage(ctx context.Context, target, base, size string) (string, error) {
	switch target {
	case tKitMem:
		return "", nil // RAM only
	case tSD:
		p := base + ".img"
		_, err := run(ctx, binPath, "create", p, "size="+size, "split=1G", "sectorsize=4096")
		return p, err
	case tQcow:
		p := base + ".qcow2"
		_, err := run(ctx, "qemu-img", "create", "-q", "-f", "qcow2", p, size)
		return p, err
	default: // raw peers
		p := base + ".raw"
		_, err := run(ctx, "truncate", "-s", size, p)
		return p, err
	}
}

// removeImage deletes an image and, for sparsedisk, its segments and LUT.
func removeImage(p string) {
	if p == "" {
		return
	}
	matches, _ := filepath.Glob(p + ".*")
	for _, m := range append(matches, p) {
		os.Remove(m)
	}
}

// serveNBD starts target's NBD server for image over tr: TCP on a free
// loopback port (after setting tr's congestion control as the namespace
// default, so the server's and fio's sockets get it), or a Unix socket in
// dir. sparsedisk keeps that default (--tcp-congestion=system) like the
// peers do.
func serveNBD(target, image string, tr transport, dir string) (*nbdServer, error) {
	srv := &nbdServer{}
	var listen []string // per server: where to listen
	if tr.kind == transportUDS {
		srv.sock = filepath.Join(dir, "nbd.sock")
		os.Remove(srv.sock)
	} else {
		if err := setCC(tr.cc); err != nil {
			return nil, err
		}
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		srv.port = port
	}
	ps := strconv.Itoa(srv.port)
	switch target {
	case tSD:
		listen = []string{"--listen", "127.0.0.1:" + ps}
		if srv.sock != "" {
			listen = []string{"--socket", srv.sock}
		}
	case tQcow, tQraw:
		listen = []string{"-b", "127.0.0.1", "-p", ps}
		if srv.sock != "" {
			listen = []string{"-k", srv.sock}
		}
	case tKit, tKitMem:
		listen = []string{"-i", "127.0.0.1", "-p", ps}
		if srv.sock != "" {
			listen = []string{"-U", srv.sock}
		}
	}
	var args []string
	switch target {
	case tSD:
		args = append(append([]string{binPath, "serve", "--tcp-congestion=system"}, listen...), image+":"+exportName)
	case tQcow:
		args = append(append([]string{"qemu-nbd", "-f", "qcow2", "--cache=writeback", "--shared=8", "-t"}, listen...), "-x", exportName, image)
	case tQraw:
		args = append(append([]string{"qemu-nbd", "-f", "raw", "--cache=writeback", "--shared=8", "-t"}, listen...), "-x", exportName, image)
	case tKit:
		args = append(append([]string{"nbdkit", "-f"}, listen...), "-e", exportName, "file", image)
	case tKitMem:
		args = append(append([]string{"nbdkit", "-f"}, listen...), "-e", exportName, "memory", "size="+cfg.imageSize)
	default:
		return nil, fmt.Errorf("%s is not an NBD server", target)
	}
	svc, err := start(target, args...)
	if err != nil {
		return nil, err
	}
	srv.svc = svc
	if srv.sock != "" {
		return srv, waitUnix(svc, srv.sock)
	}
	return srv, waitTCP(svc, srv.port)
}

// fuseFile is a disk exposed as a file through FUSE.
type fuseFile struct {
	path string
	pid  int // the process serving it (for perf)
}

// mountFUSE exposes image through target's FUSE stack in a fresh mount
// point under dir.
func mountFUSE(target, image, dir string) (*fuseFile, error) {
	mnt := filepath.Join(dir, "mnt")
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return nil, err
	}
	switch target {
	case tSD:
		addMount(mnt)
		svc, err := start("sparsedisk mount", binPath, "mount", "--name", exportName, image, mnt)
		if err != nil {
			return nil, err
		}
		f := filepath.Join(mnt, exportName)
		return &fuseFile{path: f, pid: svc.cmd.Process.Pid}, waitPath(svc, f)
	case tFuseKit, tQcow:
		// The peer stack: an NBD server on a Unix socket (nbdkit file for
		// raw, qemu-nbd for qcow2) and nbdfuse over it.
		sock := filepath.Join(dir, "nbd.sock")
		os.Remove(sock)
		var args []string
		if target == tFuseKit {
			args = []string{"nbdkit", "-f", "-U", sock, "file", image}
		} else {
			args = []string{"qemu-nbd", "-f", "qcow2", "--cache=writeback", "--shared=8", "-t", "-k", sock, "-x", exportName, image}
		}
		srv, err := start(target, args...)
		if err != nil {
			return nil, err
		}
		if err := waitPath(srv, sock); err != nil {
			return nil, err
		}
		addMount(mnt)
		f := filepath.Join(mnt, exportName)
		svc, err := start("nbdfuse", "nbdfuse", f, "nbd+unix:///"+exportName+"?socket="+sock)
		if err != nil {
			return nil, err
		}
		return &fuseFile{path: f, pid: svc.cmd.Process.Pid}, waitPath(svc, f)
	}
	return nil, fmt.Errorf("%s has no FUSE stack", target)
}

// onDisk is the space a set of files takes on the host (st_blocks).
func onDisk(paths ...string) (int64, error) {
	var total int64
	for _, p := range paths {
		var st os.FileInfo
		st, err := os.Stat(p)
		if err != nil {
			return 0, err
		}
		total += blocksOf(st) * 512
	}
	return total, nil
}

// imageFiles lists the host files of an image: the path itself and, for
// sparsedisk, its segments and LUT.
func imageFiles(p string) []string {
	matches, _ := filepath.Glob(p + ".*")
	return append([]string{p}, matches...)
}
