package main

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// Every workload loops over repetitions outside and targets inside, with
// the target order rotated each repetition, so slow phases of a shared
// machine hit every target alike.

func rotate[T any](ts []T, rep int) []T {
	out := slices.Clone(ts)
	if len(out) > 0 {
		// Spread the starting points over the list, so with few
		// repetitions and many targets each target still moves.
		k := (rep * len(out) / max(cfg.reps, 1)) % len(out)
		if k == 0 && rep > 0 {
			k = rep % len(out)
		}
		out = append(out[k:], out[:k]...)
	}
	return out
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "harness:   "+format+"\n", args...)
}

// nbdJobs are the NBD workloads, in the order of nbdWorkloads:
// sequential 1 MiB writes into an empty image and reads back, then 4 KiB
// random writes and reads at queue depth 16 over the same region, on one
// connection and on four (fio numjobs=4: each job opens its own).
func nbdJobs() []fioJob {
	rw := fioJob{name: "randwrite", rw: "randwrite", bs: "4k", iodepth: 16, engine: "io_uring", size: cfg.seqSize, runtime: cfg.randNBD, endFsync: true}
	rr := fioJob{name: "randread", rw: "randread", bs: "4k", iodepth: 16, engine: "io_uring", size: cfg.seqSize, runtime: cfg.randNBD}
	rw4, rr4 := rw, rr
	rw4.name, rw4.numjobs = "randwrite4", 4
	rr4.name, rr4.numjobs = "randread4", 4
	return []fioJob{
		{name: "seqwrite", rw: "write", bs: "1M", iodepth: 1, engine: "psync", size: cfg.seqSize, endFsync: true},
		{name: "seqread", rw: "read", bs: "1M", iodepth: 1, engine: "psync", size: cfg.seqSize},
		rw, rr, rw4, rr4,
	}
}

// nbdTarget is where fio's I/O goes for an NBD row: the nbd engine to a
// server, or the local file itself with the job's own engine.
func nbdTarget(j fioJob, srv *nbdServer, file string) []string {
	if srv != nil {
		return []string{"--ioengine=nbd", "--uri=" + srv.uri()}
	}
	return []string{"--ioengine=" + j.engine, "--filename=" + file}
}

// nbdVariant is one server over one transport (tr nil: the local file).
type nbdVariant struct {
	target string
	tr     *transport
}

func (v nbdVariant) String() string {
	if v.tr == nil {
		return v.target
	}
	return v.target + " / " + v.tr.key
}

func nbdVariants() []nbdVariant {
	var vs []nbdVariant
	for k := range transports {
		for _, t := range nbdTargets {
			vs = append(vs, nbdVariant{t, &transports[k]})
		}
	}
	return append(vs, nbdVariant{tLocal, nil})
}

// benchNBD runs every NBD workload on every server and transport, and on
// the local file. Each repetition visits the variants in a rotated order;
// each variant gets a fresh empty image, the same settle step, and runs
// the jobs in order (the writes fill what the reads read).
func benchNBD(ctx context.Context, res *results) error {
	jobs := nbdJobs()
	ws := nbdWorkloads()
	dir := filepath.Join(workDir, "nbd")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var errs []string
	for rep := 0; rep < cfg.reps; rep++ {
		for _, v := range rotate(nbdVariants(), rep) {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			err := func() error {
				defer teardown()
				settle(ctx)
				img, err := createImage(ctx, v.target, filepath.Join(dir, imgName(rep, v.target)), cfg.imageSize)
				if err != nil {
					return err
				}
				// Servers close their images (sparsedisk rewrites its
				// descriptor) when stopped: stop them before deleting.
				defer func() { teardown(); removeImage(img) }()
				var srv *nbdServer
				key := "local"
				if v.tr != nil {
					key = v.tr.key
					if srv, err = serveNBD(v.target, img, *v.tr, dir); err != nil {
						return err
					}
				}
				prefault()
				for i, j := range jobs {
					r, err := runFio(ctx, j, nbdTarget(j, srv, img)...)
					if err != nil {
						return err
					}
					row := rowByID(nbdRowID(ws[i].key, key))
					val := r.MiBps
					if row.unit == unitIOPS {
						val = r.IOPS
					}
					res.add(row.id, v.target, val)
					progress("rep %d %-28s %-11s %10.1f %s", rep+1, v, j.name, val, row.unit)
				}
				return nil
			}()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", v, err))
				warnf("nbd %s: %v", v, err)
			}
		}
	}
	return joinErrs(errs)
}

func joinErrs(errs []string) error {
	if len(errs) == 0 {
		return nil
	}
	return fmt.Errorf("%s", strings.Join(errs, "; "))
}

// writeRandom fills [off, off+n) of f with pseudo-random (incompressible,
// never all-zero) bytes from rng.
func writeRandom(f *os.File, rng *rand.ChaCha8, off, n int64) error {
	buf := make([]byte, min(n, 1<<20))
	for n > 0 {
		k := min(n, int64(len(buf)))
		rng.Read(buf[:k])
		if _, err := f.WriteAt(buf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func seed(s string) [32]byte {
	var b [32]byte
	copy(b[:], s)
	return b
}

// benchCopy is workload 4: nbdcopy of a 20 GiB disk holding 200 MiB of
// data (1 MiB extents spread evenly) to null:, so the time is how well
// each server reports and skips holes. It runs over TCP under the host's
// default congestion control (the first transport).
func benchCopy(ctx context.Context, res *results) error {
	dir := filepath.Join(workDir, "copy")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, "src.raw")
	f, err := os.Create(src)
	if err != nil {
		return err
	}
	rng := rand.NewChaCha8(seed("nbdcopy"))
	extents := cfg.copyData >> 20
	step := cfg.copyDisk / extents
	for i := int64(0); i < extents; i++ {
		if err := writeRandom(f, rng, i*step, 1<<20); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Truncate(cfg.copyDisk); err != nil {
		f.Close()
		return err
	}
	f.Close()
	size := fmt.Sprint(cfg.copyDisk)

	// One image per target, holding the same data.
	images := map[string]string{tQraw: src, tKit: src, tLocal: src}
	images[tQcow] = filepath.Join(dir, "copy.qcow2")
	if _, err := run(ctx, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, images[tQcow]); err != nil {
		return err
	}
	images[tSD], err = createImage(ctx, tSD, filepath.Join(dir, "copy"), size)
	if err != nil {
		return err
	}
	err = func() error {
		defer teardown()
		srv, err := serveNBD(tSD, images[tSD], transports[0], dir)
		if err != nil {
			return err
		}
		_, err = run(ctx, "nbdcopy", "--destination-is-zero", src, srv.uri())
		return err
	}()
	if err != nil {
		return fmt.Errorf("filling the sparsedisk image: %w", err)
	}

	var errs []string
	for rep := 0; rep < cfg.reps; rep++ {
		for _, t := range rotate(rowByID("nbdcopy").targets, rep) {
			err := func() error {
				defer teardown()
				from := images[t]
				if t != tLocal {
					srv, err := serveNBD(t, images[t], transports[0], dir)
					if err != nil {
						return err
					}
					from = srv.uri()
				}
				d, err := timed(ctx, "nbdcopy", from, "null:")
				if err != nil {
					return err
				}
				res.add("nbdcopy", t, d.Seconds())
				progress("rep %d %-16s nbdcopy %8.3f s", rep+1, t, d.Seconds())
				return nil
			}()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", t, err))
				warnf("nbdcopy %s: %v", t, err)
			}
		}
	}
	return joinErrs(errs)
}

// makeFiles writes n files of 16 MiB of random data into dir (the tree
// mkfs.ext4 -d copies onto the new file system).
func makeFiles(dir string, n int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rng := rand.NewChaCha8(seed("space"))
	for i := 0; i < n; i++ {
		f, err := os.Create(filepath.Join(dir, fmt.Sprintf("file%03d.bin", i)))
		if err != nil {
			return err
		}
		err = writeRandom(f, rng, 0, 16<<20)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// benchSpace is workload 5: mkfs.ext4 on a 20 GiB disk, populated with
// the files (mkfs.ext4 -d), then the bytes the image takes on the host.
// The kernel has no NBD module here, so sparsedisk goes through its FUSE
// mount and qcow2 through nbdfuse over qemu-nbd; the raw peer is a sparse
// file that mkfs writes directly.
func benchSpace(ctx context.Context, res *results) error {
	dir := filepath.Join(workDir, "space")
	files := filepath.Join(dir, "files")
	if err := makeFiles(files, cfg.spaceFiles); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var errs []string
	for rep := 0; rep < cfg.reps; rep++ {
		for _, t := range rotate(rowByID("space").targets, rep) {
			err := func() error {
				defer teardown()
				img, err := createImage(ctx, t, filepath.Join(dir, imgName(rep, t)), "20G")
				if err != nil {
					return err
				}
				// Servers close their images (sparsedisk rewrites its
				// descriptor) when stopped: stop them before deleting.
				defer func() { teardown(); removeImage(img) }()
				dev := img
				if t != tRawFile {
					ff, err := mountFUSE(t, img, dir)
					if err != nil {
						return err
					}
					dev = ff.path
				}
				if _, err := run(ctx, "mkfs.ext4", "-F", "-q", "-d", files, dev); err != nil {
					return err
				}
				if t != tRawFile {
					if _, err := run(ctx, "sync", dev); err != nil {
						return err
					}
				}
				teardown() // unmount, stop servers: images are flushed and closed
				n, err := onDisk(imageFiles(img)...)
				if err != nil {
					return err
				}
				res.add("space", t, float64(n)/(1<<20))
				if t == tSD {
					if l, err := onDisk(img + ".lut"); err == nil {
						res.mu.Lock()
						res.lutMiB = append(res.lutMiB, float64(l)/(1<<20))
						res.mu.Unlock()
					}
				}
				progress("rep %d %-16s space %10.1f MiB", rep+1, t, float64(n)/(1<<20))
				return nil
			}()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", t, err))
				warnf("space %s: %v", t, err)
			}
		}
	}
	return joinErrs(errs)
}

// fuseJobs is workload 6: through the file in a FUSE mount, O_DIRECT so
// the host page cache above FUSE is not what is measured (every request
// reaches the FUSE server). The local file runs the same jobs buffered
// (see benchFUSE).
func fuseJobs() []fioJob {
	var js []fioJob
	for _, e := range []struct {
		engine string
		depth  int
	}{{"psync", 1}, {"libaio", 16}} {
		js = append(js,
			fioJob{name: fmt.Sprintf("seqwrite-%s", e.engine), rw: "write", bs: "1M", iodepth: e.depth, engine: e.engine, size: cfg.seqSize, direct: true, endFsync: true},
			fioJob{name: fmt.Sprintf("seqread-%s", e.engine), rw: "read", bs: "1M", iodepth: e.depth, engine: e.engine, size: cfg.seqSize, direct: true},
		)
	}
	for _, e := range []struct {
		engine string
		depth  int
	}{{"psync", 1}, {"libaio", 16}} {
		js = append(js,
			fioJob{name: fmt.Sprintf("randwrite-%s", e.engine), rw: "randwrite", bs: "4k", iodepth: e.depth, engine: e.engine, size: cfg.seqSize, runtime: cfg.randFUSE, direct: true, endFsync: true},
			fioJob{name: fmt.Sprintf("randread-%s", e.engine), rw: "randread", bs: "4k", iodepth: e.depth, engine: e.engine, size: cfg.seqSize, runtime: cfg.randFUSE, direct: true},
		)
	}
	return js
}

func benchFUSE(ctx context.Context, res *results) error {
	dir := filepath.Join(workDir, "fuse")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	jobs := fuseJobs()
	var errs []string
	for rep := 0; rep < cfg.reps; rep++ {
		for _, t := range rotate(rowByID("fuse-seqwrite-psync").targets, rep) {
			err := func() error {
				defer teardown()
				img, err := createImage(ctx, t, filepath.Join(dir, imgName(rep, t)), cfg.imageSize)
				if err != nil {
					return err
				}
				// Servers close their images (sparsedisk rewrites its
				// descriptor) when stopped: stop them before deleting.
				defer func() { teardown(); removeImage(img) }()
				settle(ctx)
				file := img
				if t != tLocal {
					ff, err := mountFUSE(t, img, dir)
					if err != nil {
						return err
					}
					file = ff.path
				}
				prefault()
				for _, j := range jobs {
					jj := j
					if t == tLocal {
						// O_DIRECT on the local file would measure the disk,
						// while the engines behind FUSE read and write the
						// page cache: the local file is run buffered, with
						// the same warm cache (an upper bound for reads;
						// for writes see the local-file note).
						jj.direct = false
					}
					r, err := runFio(ctx, jj, "--ioengine="+j.engine, "--filename="+file)
					if err != nil {
						return err
					}
					row := rowByID("fuse-" + j.name)
					v := r.MiBps
					if row.unit == unitIOPS {
						v = r.IOPS
					}
					res.add(row.id, t, v)
					progress("rep %d %-20s %-18s %10.1f %s", rep+1, t, j.name, v, row.unit)
				}
				return nil
			}()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", t, err))
				warnf("fuse %s: %v", t, err)
			}
		}
	}
	return joinErrs(errs)
}

// benchConvert is workload 7: a raw image with 10% of its 64 KiB blocks
// holding random data (at random places) converted to a sparse sparsedisk
// image and to qcow2.
func benchConvert(ctx context.Context, res *results) error {
	dir := filepath.Join(workDir, "convert")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, "src.raw")
	if err := makeConvertSource(src); err != nil {
		return err
	}
	var errs []string
	for rep := 0; rep < cfg.reps; rep++ {
		for _, t := range rotate(rowByID("convert-time").targets, rep) {
			err := func() error {
				dst := filepath.Join(dir, "dst.qcow2")
				if t == tSDConv {
					dst = filepath.Join(dir, "dst.img")
				}
				args := convertArgs(t, src, dst)
				removeImage(dst)
				defer removeImage(dst)
				// The time includes syncing the output, so every tool's
				// result is durable whatever its own cache mode.
				t0 := time.Now()
				if _, err := run(ctx, args...); err != nil {
					return err
				}
				if _, err := run(ctx, append([]string{"sync"}, imageFiles(dst)...)...); err != nil {
					return err
				}
				d := time.Since(t0)
				n, err := onDisk(imageFiles(dst)...)
				if err != nil {
					return err
				}
				if t == tSDConv && rep == 0 {
					// Once per run, untimed: the image converts back to
					// the identical raw file.
					if err := roundTrip(ctx, src, dst); err != nil {
						return err
					}
				}
				res.add("convert-time", t, d.Seconds())
				res.add("convert-size", t, float64(n)/(1<<20))
				progress("rep %d %-22s convert %8.2f s, %8.1f MiB", rep+1, t, d.Seconds(), float64(n)/(1<<20))
				return nil
			}()
			if err != nil {
				errs = append(errs, fmt.Sprintf("%s: %v", t, err))
				warnf("convert %s: %v", t, err)
			}
		}
	}
	return joinErrs(errs)
}

func blocksOf(st os.FileInfo) int64 {
	if s, ok := st.Sys().(*syscall.Stat_t); ok {
		return s.Blocks
	}
	return (st.Size() + 511) / 512
}

// makeConvertSource writes the convert input: a raw file of
// cfg.convertSize with 10% of its 64 KiB blocks, chosen at random,
// holding random data.
func makeConvertSource(src string) error {
	f, err := os.Create(src)
	if err != nil {
		return err
	}
	const blk = 64 << 10
	nblk := cfg.convertSize / blk
	pick := rand.New(rand.NewPCG(7, 10))
	chosen := pick.Perm(int(nblk))[:nblk/10]
	slices.Sort(chosen)
	rng := rand.NewChaCha8(seed("convert"))
	for _, b := range chosen {
		if err := writeRandom(f, rng, int64(b)*blk, blk); err != nil {
			f.Close()
			return err
		}
	}
	if err := f.Truncate(cfg.convertSize); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// roundTrip converts the sparsedisk image img back to raw and compares it
// with the source byte for byte, and runs `sparsedisk check` on it.
func roundTrip(ctx context.Context, src, img string) error {
	back := img + ".back.raw"
	defer os.Remove(back)
	if _, err := run(ctx, binPath, "convert", "-q", img, back, "layout=raw"); err != nil {
		return err
	}
	if _, err := run(ctx, "cmp", src, back); err != nil {
		return fmt.Errorf("raw → sparsedisk → raw is not byte-identical: %w", err)
	}
	_, err := run(ctx, binPath, "check", img)
	return err
}

// convertArgs is the command line of converter t.
func convertArgs(t, src, dst string) []string {
	if t == tSDConv {
		return []string{binPath, "convert", "-q", src, dst, "layout=sparse", "split=1G", "sectorsize=4096"}
	}
	return []string{"qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, dst}
}

// imgName is a per-repetition, per-target image name, so a server that
// is slow to let go of an image never collides with the next one.
func imgName(rep int, target string) string {
	return fmt.Sprintf("r%d-%s", rep+1, strings.NewReplacer(" ", "-", "+", "-").Replace(target))
}
