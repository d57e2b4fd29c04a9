// Command harness runs sparsedisk's end-to-end benchmarks against its peers
// (qemu-nbd with qcow2 and raw, nbdkit file, nbdkit memory as the protocol
// reference, nbdfuse over nbdkit, qemu-img, and the local file itself) in
// one run on one machine, over TCP under two congestion controls and over
// a Unix socket, repeats every measurement with the target order rotated,
// and writes medians, min–max and ratios to RESULTS.md and a chart to
// results.png. bench/README.md explains the method.
//
//	go run ./bench/harness [-quick] [-out DIR] [-bin bin/sparsedisk] [-work DIR] [-only nbd,copy,space,fuse,convert,cost] [-reps N]
//
// It installs nothing: `make bench` runs scripts/deps.sh first. Every
// server listens on loopback on a free port and is stopped (process group
// killed, FUSE mounts unmounted) after each workload, on failure and on
// SIGINT/SIGTERM.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// config sizes the run; quick mode is a smoke run of a few minutes.
type config struct {
	quick        bool
	reps         int
	imageSize    string // virtual size of the fio images
	seqSize      string // amount of sequential I/O and random region
	prefault     int64  // bytes touched and freed before each target's jobs
	randNBD      int    // seconds per random NBD job
	randFUSE     int    // seconds per random FUSE job
	spaceFiles   int    // number of 16 MiB files put on ext4 (space workload)
	copyDisk     int64  // nbdcopy: virtual size
	copyData     int64  // nbdcopy: bytes of data in it
	convertSize  int64  // convert: raw source size (10% data)
	profileSecs  int
	costRequests int64 // requests per run of the per-request cost rows
}

// The full run is sized to finish in about half an hour on the 2-core
// development VM: every NBD job runs on 4 servers × 3 transports plus the
// local file, 5 times.
func fullConfig() config {
	return config{reps: 5, imageSize: "4G", seqSize: "512m", prefault: 768 << 20, randNBD: 3, randFUSE: 3,
		spaceFiles: 32, copyDisk: 20 << 30, copyData: 200 << 20, convertSize: 2 << 30, profileSecs: 8, costRequests: 50000}
}

func quickConfig() config {
	return config{quick: true, reps: 1, imageSize: "4G", seqSize: "128m", prefault: 192 << 20, randNBD: 1, randFUSE: 1,
		spaceFiles: 4, copyDisk: 20 << 30, copyData: 200 << 20, convertSize: 256 << 20, profileSecs: 2, costRequests: 5000}
}

var (
	workDir  string
	binPath  string
	binShown string // binPath as the user gave it, for the command list
	cfg      config
)

func main() {
	// As root, the run happens in a private network namespace, whose TCP
	// congestion control it may set (see netns.go).
	reexecInNetns()
	quick := flag.Bool("quick", false, "smoke run: one repetition, small sizes, short random jobs (a few minutes)")
	out := flag.String("out", "", "directory for RESULTS.md, results.png and the profiles (default bench, or /tmp/sparsedisk-bench-quick with -quick)")
	bin := flag.String("bin", "bin/sparsedisk", "sparsedisk binary (built with `go build` if missing)")
	work := flag.String("work", "", "scratch directory on the file system to measure (default: a new directory in /var/tmp)")
	only := flag.String("only", "", "comma-separated workloads to run (nbd,copy,space,fuse,convert,cost); default all")
	reps := flag.Int("reps", 0, "repetitions per measurement (default 5, 1 with -quick)")
	chart := flag.String("chart", "", "measure nothing: draw results.png again from this results.json (into -out, default its directory)")
	flag.Parse()
	if *chart != "" {
		dir := *out
		if dir == "" {
			dir = filepath.Dir(*chart)
		}
		if err := replot(*chart, filepath.Join(dir, "results.png")); err != nil {
			fmt.Fprintln(os.Stderr, "harness:", err)
			os.Exit(1)
		}
		return
	}

	cfg = fullConfig()
	if *quick {
		cfg = quickConfig()
	}
	if *out == "" {
		*out = "bench"
		if *quick {
			*out = "/tmp/sparsedisk-bench-quick"
		}
	}
	if *reps > 0 {
		cfg.reps = *reps
	}
	if err := mainErr(*out, *bin, *work, *only); err != nil {
		teardown()
		fmt.Fprintln(os.Stderr, "harness:", err)
		os.Exit(1)
	}
}

func mainErr(out, bin, work, only string) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	defer teardown()

	if os.Geteuid() != 0 {
		warnf("not root: FUSE mounts and perf may fail")
	}
	for _, tool := range []string{"fio", "qemu-img", "qemu-nbd", "nbdkit", "nbdcopy", "nbdfuse", "fusermount3", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat("/usr/bin/" + tool); err2 != nil {
				if _, err3 := os.Stat("/usr/sbin/" + tool); err3 != nil {
					return fmt.Errorf("%s not found: run `make deps` (scripts/deps.sh) first", tool)
				}
			}
		}
	}
	os.Setenv("PATH", "/usr/bin:/usr/sbin:/bin:/sbin:"+os.Getenv("PATH"))

	var err error
	binShown = bin
	if binPath, err = filepath.Abs(bin); err != nil {
		return err
	}
	if _, err := os.Stat(binPath); err != nil {
		fmt.Fprintf(os.Stderr, "harness: building %s\n", bin)
		if _, err := run(ctx, "go", "build", "-o", binPath, "./cmd/sparsedisk"); err != nil {
			return err
		}
	}
	if out, err = filepath.Abs(out); err != nil {
		return err
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	if work == "" {
		if workDir, err = os.MkdirTemp("/var/tmp", "sparsedisk-bench."); err != nil {
			return err
		}
		defer os.RemoveAll(workDir)
	} else {
		if workDir, err = filepath.Abs(work); err != nil {
			return err
		}
		if err := os.MkdirAll(workDir, 0o755); err != nil {
			return err
		}
	}

	if err := setupTransports(); err != nil {
		return err
	}
	res := newResults()
	started := time.Now()
	want := func(w string) bool { return only == "" || slices.Contains(strings.Split(only, ","), w) }
	steps := []struct {
		name string
		fn   func(context.Context, *results) error
	}{
		{"nbd", benchNBD},
		{"copy", benchCopy},
		{"space", benchSpace},
		{"fuse", benchFUSE},
		{"convert", benchConvert},
		{"cost", benchCost},
	}
	var failures []string
	for _, s := range steps {
		if !want(s.name) {
			continue
		}
		t0 := time.Now()
		fmt.Fprintf(os.Stderr, "harness: == %s\n", s.name)
		err := s.fn(ctx, res)
		teardown()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if err != nil {
			// One broken workload must not hide the others: record it and go on.
			warnf("%s: %v", s.name, err)
			failures = append(failures, fmt.Sprintf("%s: %v", s.name, err))
		}
		fmt.Fprintf(os.Stderr, "harness: == %s done in %s\n", s.name, time.Since(t0).Round(time.Second))
	}

	profs, err := profileRows(ctx, res, out)
	teardown()
	if err != nil {
		warnf("profile: %v", err)
		profs = []*profileReport{{err: err.Error()}}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	var convProf *profileReport
	if want("convert") {
		if convProf, err = profileConvert(ctx, res, out); err != nil {
			warnf("convert profile: %v", err)
			convProf = &profileReport{err: err.Error()}
		}
	}
	teardown()
	if ctx.Err() != nil {
		return ctx.Err()
	}
	elapsed := time.Since(started)
	if err := drawChart(res, filepath.Join(out, "results.png")); err != nil {
		warnf("chart: %v", err)
		failures = append(failures, "chart: "+err.Error())
	}
	md := renderMarkdown(ctx, res, profs, convProf, failures, elapsed)
	if err := writeJSON(res, filepath.Join(out, "results.json")); err != nil {
		warnf("results.json: %v", err)
	}
	if err := os.WriteFile(filepath.Join(out, "RESULTS.md"), []byte(md), 0o644); err != nil {
		return err
	}
	fmt.Print(renderSummary(res))
	fmt.Fprintf(os.Stderr, "harness: wrote %s and %s in %s\n", filepath.Join(out, "RESULTS.md"),
		filepath.Join(out, "results.png"), elapsed.Round(time.Second))
	return nil
}
