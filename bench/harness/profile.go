package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The worst row (lowest ratio of sparsedisk to the peer its goal names,
// relative to that goal) is run again for sparsedisk alone with `perf
// record -g` attached to the serving process (`sparsedisk serve` or
// `sparsedisk mount`). Go binaries keep frame pointers, so perf's call
// graphs are complete; perf also sees the kernel side (syscalls, FUSE,
// TCP), which a Go CPU profile would not.

type symShare struct {
	pct float64
	sym string
}

type profileReport struct {
	row      *rowDef
	peer     string
	ratio    float64
	command  string
	selfTop  []symShare // by self time
	ours     []symShare // sparsedisk packages, cumulative (children)
	category map[string]float64
	samples  string
	file     string        // the full report next to RESULTS.md
	wall     time.Duration // how long the profiled run took
	cpu      time.Duration // CPU time perf sampled in the process
	err      string
	pprofTop string // `go tool pprof -top` of the same run: Go's own view
}

func worstRow(res *results) (*rowDef, string, float64) {
	var worst *rowDef
	var peer string
	best := math.Inf(1)
	ratio := math.NaN()
	for _, g := range res.goals() {
		if g.row.job == nil || math.IsNaN(g.ratio) {
			continue
		}
		if score := g.ratio / g.goal.min; score < best {
			best, worst, peer, ratio = score, g.row, g.goal.peer, g.ratio
		}
	}
	return worst, peer, ratio
}

// profileRows profiles the worst row first (into profile.txt), then every
// other fio row that misses a target (profile-ROW.txt), at most three.
func profileRows(ctx context.Context, res *results, out string) ([]*profileReport, error) {
	row, peer, ratio := worstRow(res)
	if row == nil {
		return nil, fmt.Errorf("no fio row has results to profile")
	}
	if _, err := exec.LookPath("perf"); err != nil {
		return nil, fmt.Errorf("perf is not installed (Debian: linux-perf); no profile")
	}
	// Per-row profiles of an earlier run may belong to rows that now
	// meet their targets: remove them so none is left unreferenced.
	if old, err := filepath.Glob(filepath.Join(out, "profile-*.txt")); err == nil {
		for _, f := range old {
			if filepath.Base(f) != "profile-convert.txt" {
				os.Remove(f)
			}
		}
	}
	reps := []*profileReport{}
	r, err := profileRow(ctx, row, peer, ratio, out, "profile.txt")
	if err != nil {
		return nil, err
	}
	reps = append(reps, r)
	// One profile per workload: its transports share the server's code.
	done := map[string]bool{row.panel: true}
	for _, g := range res.goals() {
		if len(reps) == 3 || ctx.Err() != nil {
			break
		}
		if g.met || g.row.job == nil || done[g.row.panel] || math.IsNaN(g.ratio) {
			continue
		}
		done[g.row.panel] = true
		r, err := profileRow(ctx, g.row, g.goal.peer, g.ratio, out, "profile-"+strings.ReplaceAll(g.row.id, "@", "-")+".txt")
		if err != nil {
			warnf("profile %s: %v", g.row.id, err)
			continue
		}
		reps = append(reps, r)
	}
	return reps, nil
}

// profileRow reruns row's job for sparsedisk under perf.
func profileRow(ctx context.Context, row *rowDef, peer string, ratio float64, out, file string) (*profileReport, error) {
	defer teardown()
	fmt.Fprintf(os.Stderr, "harness: == profile: %s (%.2f× %s)\n", row.title, ratio, peer)
	rep := &profileReport{row: row, peer: peer, ratio: ratio}
	dir := filepath.Join(workDir, "profile")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	defer teardown()

	img, err := createImage(ctx, tSD, filepath.Join(dir, "img"), cfg.imageSize)
	if err != nil {
		return nil, err
	}
	job := *row.job
	fuse := strings.HasPrefix(row.id, "fuse-")
	var pid int
	var target []string
	// The server serves Go's profiler on a loopback port; its CPU profile
	// is taken over the measured job only (not the fill before it).
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	debug := "127.0.0.1:" + strconv.Itoa(port)
	extraEnv = []string{"SPARSEDISK_DEBUG_ADDR=" + debug}
	if fuse {
		ff, err := mountFUSE(tSD, img, dir)
		extraEnv = nil
		if err != nil {
			return nil, err
		}
		pid, target = ff.pid, []string{"--ioengine=" + job.engine, "--filename=" + ff.path}
	} else {
		srv, err := serveNBD(tSD, img, *row.tr, dir)
		extraEnv = nil
		if err != nil {
			return nil, err
		}
		pid, target = srv.svc.cmd.Process.Pid, nbdTarget(job, srv, "")
	}
	// Reads and in-place writes need the region written first.
	if job.rw != "write" {
		fill := fioJob{name: "fill", rw: "write", bs: "1M", iodepth: 1, size: cfg.seqSize, direct: fuse, endFsync: true}
		if _, err := runFio(ctx, fill, target...); err != nil {
			return nil, err
		}
	}
	// Every profiled job runs for a fixed time, one second longer than
	// the Go profile's window, so the window lies inside the job (a
	// sequential job starts over at the beginning of its region when it
	// reaches the end).
	job.runtime = cfg.profileSecs + 1
	prefault()
	data := filepath.Join(dir, "perf.data")
	perf, err := start("perf", "perf", "record", "-F", "999", "-g", "-p", strconv.Itoa(pid), "-o", data)
	if err != nil {
		return nil, err
	}
	pprofPath := filepath.Join(dir, "cpu.pprof")
	pprofErr := make(chan error, 1)
	go func() { pprofErr <- fetchProfile(debug, cfg.profileSecs, pprofPath) }()
	t0 := time.Now()
	_, ferr := runFio(ctx, job, target...)
	rep.wall = time.Since(t0)
	perf.stop()
	perr := <-pprofErr
	if ferr != nil {
		return nil, ferr
	}
	rep.command = shellJoin(append(append(job.args(), target...), "# perf record -F 999 -g -p PID"))
	rep.command = strings.ReplaceAll(rep.command, workDir, "$WORK")
	if perr != nil {
		rep.pprofTop = "(no Go profile: " + perr.Error() + ")"
	} else {
		rep.pprofTop = pprofTop(ctx, pprofPath)
	}
	return rep, analyzePerf(ctx, rep, data, filepath.Join(out, file))
}

// fetchProfile takes a Go CPU profile of secs seconds from a sparsedisk
// debug endpoint into path.
func fetchProfile(addr string, secs int, path string) error {
	cl := http.Client{Timeout: time.Duration(secs+30) * time.Second}
	resp, err := cl.Get(fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", addr, secs))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("/debug/pprof/profile: %s", resp.Status)
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// pprofTop renders the Go CPU profile the profiled server wrote, or says
// why there is none.
func pprofTop(ctx context.Context, path string) string {
	if _, err := os.Stat(path); err != nil {
		return "(no Go profile: " + err.Error() + ")"
	}
	out, err := run(ctx, "go", "tool", "pprof", "-top", "-nodecount=20", binPath, path)
	if err != nil {
		return "(go tool pprof failed: " + err.Error() + ")"
	}
	return strings.TrimSpace(string(out))
}

// profileConvert runs sparsedisk convert once under perf record (the
// convert row has no target, but is the slowest relative to its peer in
// practice, so it gets its own profile).
func profileConvert(ctx context.Context, res *results, out string) (*profileReport, error) {
	row := rowByID("convert-time")
	if res.count(row.id, tSDConv) == 0 {
		return nil, fmt.Errorf("convert did not run")
	}
	if _, err := exec.LookPath("perf"); err != nil {
		return nil, fmt.Errorf("perf is not installed (Debian: linux-perf); no profile")
	}
	dir := filepath.Join(workDir, "profile-convert")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	src := filepath.Join(dir, "src.raw")
	if err := makeConvertSource(src); err != nil {
		return nil, err
	}
	fmt.Fprintf(os.Stderr, "harness: == profile: %s\n", row.title)
	data := filepath.Join(dir, "perf.data")
	args := convertArgs(tSDConv, src, filepath.Join(dir, "dst.img"))
	t0 := time.Now()
	if _, err := run(ctx, append([]string{"perf", "record", "-F", "999", "-g", "-o", data, "--"}, args...)...); err != nil {
		return nil, err
	}
	rep := &profileReport{row: row, peer: tQemuImg, ratio: res.ratio(row, tQemuImg), wall: time.Since(t0)}
	rep.command = strings.ReplaceAll(shellJoin(append([]string{"perf", "record", "-F", "999", "-g", "--"}, args...)), workDir, "$WORK")
	return rep, analyzePerf(ctx, rep, data, filepath.Join(out, "profile-convert.txt"))
}

// analyzePerf turns perf.data into the report's tables and a text file.
func analyzePerf(ctx context.Context, rep *profileReport, data, txtPath string) error {
	row, ratio, peer := rep.row, rep.ratio, rep.peer
	self, err := run(ctx, "perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym", "-g", "none", "--percent-limit", "0.3")
	if err != nil {
		return err
	}
	children, err := run(ctx, "perf", "report", "-i", data, "--stdio", "--children", "--sort", "sym", "-g", "none", "--percent-limit", "0.5")
	if err != nil {
		return err
	}
	callers, _ := run(ctx, "perf", "report", "-i", data, "--stdio", "--no-children", "--sort", "sym", "-g", "caller,0.5,callee,function,percent", "--percent-limit", "2")
	txt := fmt.Sprintf("# perf profile of sparsedisk on %q (ratio %.2f× %s)\n# %s\n\n## self time\n%s\n## with children (cumulative)\n%s\n## call chains of the top symbols\n%s",
		row.title, ratio, peer, rep.command, self, children, callers)
	if rep.pprofTop != "" {
		txt += "\n## Go CPU profile of the same server (go tool pprof -top)\n" + rep.pprofTop + "\n"
	}
	if err := os.WriteFile(txtPath, []byte(txt), 0o644); err != nil {
		return err
	}

	rep.selfTop = parsePerf(string(self))
	rep.category = map[string]float64{}
	for _, s := range rep.selfTop {
		rep.category[categorize(s.sym)] += s.pct
	}
	for _, s := range parsePerf(string(children)) {
		if strings.Contains(s.sym, "sparsedisk/") && !strings.Contains(s.sym, "main.") {
			rep.ours = append(rep.ours, s)
		}
	}
	if m := regexp.MustCompile(`# Samples: (\S+)`).FindStringSubmatch(string(self)); m != nil {
		rep.samples = m[1]
	}
	// cpu-clock counts nanoseconds of CPU time.
	if m := regexp.MustCompile(`# Event count \(approx\.\): (\d+)`).FindStringSubmatch(string(self)); m != nil {
		if n, err := strconv.ParseFloat(m[1], 64); err == nil {
			rep.cpu = time.Duration(n)
		}
	}
	rep.file = filepath.Base(txtPath)
	return nil
}

var perfLine = regexp.MustCompile(`^\s+(\d+\.\d+)%\s+(?:\d+\.\d+%\s+)?\[([.k])\]\s+(.+?)\s*$`)

func parsePerf(s string) []symShare {
	var out []symShare
	for _, line := range strings.Split(s, "\n") {
		m := perfLine.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		pct, _ := strconv.ParseFloat(m[1], 64)
		sym := m[3]
		if m[2] == "k" {
			sym = "[kernel] " + sym
		}
		out = append(out, symShare{pct, sym})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].pct > out[j].pct })
	return out
}

// categorize puts a symbol in a coarse bucket for the summary.
func categorize(sym string) string {
	switch {
	case strings.HasPrefix(sym, "[kernel]"):
		k := strings.TrimPrefix(sym, "[kernel] ")
		switch {
		case strings.Contains(k, "copy_") || strings.Contains(k, "memcpy") || strings.Contains(k, "memset") || strings.Contains(k, "clear_page"):
			return "kernel: copying and zeroing memory"
		case strings.Contains(k, "tcp") || strings.Contains(k, "skb") || strings.Contains(k, "sock") || strings.Contains(k, "net_") || strings.Contains(k, "loopback"):
			return "kernel: TCP/loopback"
		case strings.Contains(k, "fuse"):
			return "kernel: FUSE"
		case strings.Contains(k, "ext4") || strings.Contains(k, "jbd2") || strings.Contains(k, "filemap") || strings.Contains(k, "folio") || strings.Contains(k, "page"):
			return "kernel: file system and page cache"
		case strings.HasPrefix(k, "_raw_spin_unlock_irq"):
			// In a VM, cpu-clock samples taken with interrupts off land
			// where they are turned back on: mostly wake-ups.
			return "kernel: scheduling and wake-ups"
		case strings.Contains(k, "futex") || strings.Contains(k, "schedule") || strings.Contains(k, "switch") || strings.Contains(k, "wake") || strings.Contains(k, "epoll"):
			return "kernel: scheduling and wake-ups"
		case strings.Contains(k, "syscall") || strings.Contains(k, "entry_") || strings.Contains(k, "sysret"):
			return "kernel: syscall entry/exit"
		}
		return "kernel: other"
	case sym == "memeqbody" || strings.HasPrefix(sym, "bytes.") || strings.HasPrefix(sym, "internal/bytealg"):
		return "Go: comparing bytes (zero checks)"
	case strings.HasPrefix(sym, "runtime.memclr"):
		return "Go: clearing buffers (memclr)"
	case strings.HasPrefix(sym, "runtime.mallocgc") || strings.HasPrefix(sym, "runtime.gc") || strings.HasPrefix(sym, "runtime.scan") ||
		strings.HasPrefix(sym, "runtime.mark") || strings.HasPrefix(sym, "runtime.greyobject") || strings.HasPrefix(sym, "runtime.findObject") ||
		strings.HasPrefix(sym, "runtime.(*mspan)") || strings.HasPrefix(sym, "runtime.(*mheap)") ||
		strings.HasPrefix(sym, "runtime.(*mcache)") || strings.HasPrefix(sym, "runtime.(*gcWork)") || strings.HasPrefix(sym, "runtime.heapBits") ||
		strings.HasPrefix(sym, "runtime.wbBuf") || strings.HasPrefix(sym, "runtime.bgsweep") || strings.HasPrefix(sym, "runtime.sweep"):
		return "Go: allocation and GC"
	case strings.HasPrefix(sym, "runtime.memmove"):
		return "Go: memmove (buffer copies)"
	case strings.HasPrefix(sym, "runtime."), strings.HasPrefix(sym, "internal/runtime"):
		return "Go: scheduler and other runtime"
	case strings.HasPrefix(sym, "syscall.") || strings.HasPrefix(sym, "internal/poll") || strings.HasPrefix(sym, "golang.org/x/sys"):
		return "Go: syscall wrappers"
	case strings.Contains(sym, "sparsedisk/"):
		return "sparsedisk code"
	case strings.Contains(sym, "go-fuse"):
		return "go-fuse library"
	}
	return "other"
}
